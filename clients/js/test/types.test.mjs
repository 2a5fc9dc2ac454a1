// The declarations (dist/index.d.ts through package.json `exports`) under `tsc --strict`:
// a typed example that must compile, and one whose every marked line must be an error.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const here = join(dirname(fileURLToPath(import.meta.url)), "types");
const tsc = join(here, "..", "..", "node_modules", "typescript", "bin", "tsc");


function tscFile(file) {
  const project = join(here, "tsconfig." + file.replace(".ts", "") + ".json");
  const r = spawnSync(process.execPath, [tsc, "-p", project, "--pretty", "false"], { encoding: "utf8" });
  return { status: r.status, out: r.stdout + r.stderr };
}

test("a typed example compiles under tsc --strict", () => {
  const r = tscFile("ok.ts");
  assert.equal(r.status, 0, r.out);
});

test("a mistyped example does not: exactly the marked lines are errors", () => {
  const r = tscFile("bad.ts");
  assert.notEqual(r.status, 0);
  const marked = readFileSync(join(here, "bad.ts"), "utf8")
    .split("\n")
    .map((l, i) => (l.endsWith("// error") ? i + 1 : 0))
    .filter(Boolean);
  const reported = [...new Set([...r.out.matchAll(/bad\.ts\((\d+),\d+\): error/g)].map((m) => Number(m[1])))];
  assert.deepEqual(reported, marked, r.out);
});
