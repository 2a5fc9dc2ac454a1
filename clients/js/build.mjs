// Build the package: esbuild bundles (ESM, CommonJS, the minified browser script) and tsc
// declarations, into dist/. `--check` also verifies that pushsvc/static/pushsvc.js (the browser
// build served by pushsvc at /static/pushsvc.js) equals the fresh build and that the browser build
// stays within its budget (10 KiB gzip). `--sync` copies the fresh browser build there.
import { execFileSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
const served = join(here, "..", "..", "pushsvc", "static", "pushsvc.js");
const BUDGET = 10 * 1024; // bytes, gzip -9 of dist/pushsvc.js

const pkg = JSON.parse(readFileSync(join(here, "package.json"), "utf8"));
const banner = `/*! pushsvc ${pkg.version} | ${pkg.license} | built from clients/js (npm run build) */`;
const common = { bundle: true, target: "es2020", logLevel: "warning", legalComments: "none", banner: { js: banner } };

rmSync(dist, { recursive: true, force: true });
await esbuild.build({ ...common, entryPoints: [join(here, "src/index.ts")], format: "esm", platform: "neutral", outfile: join(dist, "index.mjs") });
await esbuild.build({ ...common, entryPoints: [join(here, "src/index.ts")], format: "cjs", platform: "neutral", outfile: join(dist, "index.cjs") });
await esbuild.build({ ...common, entryPoints: [join(here, "src/browser.ts")], format: "iife", platform: "browser", minify: true, logOverride: { "commonjs-variable-in-esm": "silent" }, outfile: join(dist, "pushsvc.js") });
execFileSync(process.execPath, [join(here, "node_modules/typescript/bin/tsc"), "-p", join(here, "tsconfig.json")], { stdio: "inherit" });

const browser = readFileSync(join(dist, "pushsvc.js"));
const gz = gzipSync(browser, { level: 9 }).length;
console.log(`dist/pushsvc.js: ${browser.length} bytes, ${gz} bytes gzip -9 (budget ${BUDGET})`);

if (process.argv.includes("--sync")) {
  writeFileSync(served, browser);
  console.log("copied to pushsvc/static/pushsvc.js");
}
if (process.argv.includes("--check")) {
  let ok = true;
  if (gz > BUDGET) {
    console.error(`FAIL: the browser build is ${gz} bytes gzip, over the ${BUDGET}-byte budget`);
    ok = false;
  }
  let current = null;
  try {
    current = readFileSync(served);
  } catch {}
  if (!current || !current.equals(browser)) {
    console.error("FAIL: pushsvc/static/pushsvc.js differs from a fresh build: run `npm run sync` in clients/js and commit it");
    ok = false;
  } else console.log("pushsvc/static/pushsvc.js equals the fresh build");
  if (!ok) process.exit(1);
}
