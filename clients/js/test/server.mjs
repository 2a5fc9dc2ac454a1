// A real `pushsvc serve --dev` for the tests: started on a free port (or a given one) with a
// fixed JWT secret and API key, so tokens and emits keep working across restarts on the same
// store (--data-dir). No mocks: real uvicorn, real bundled nats-server, real sockets.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const venvBin = join(repo, ".venv", "bin", "pushsvc");
/** The pushsvc CLI: $PUSHSVC_BIN, else the repository's .venv, else `pushsvc` on PATH. */
export const PUSHSVC = process.env.PUSHSVC_BIN || (existsSync(venvBin) ? venvBin : "pushsvc");
export const SECRET = "pushsvc-js-tests-" + "0123456789abcdef".repeat(2);
export const API_KEY = "js-tests-key";

/**
 * Start `pushsvc serve --dev`. Resolves once it printed its address.
 * @param {{port?: number, dataDir?: string, env?: Record<string,string>, args?: string[]}} [o]
 */
export async function startServer(o = {}) {
  const dataDir = o.dataDir || mkdtempSync(join(tmpdir(), "pushsvc-js-"));
  const args = ["serve", "--dev", "--port", String(o.port ?? 0), "--data-dir", dataDir, ...(o.args || [])];
  const env = { ...process.env, PUSHSVC_JWT_SECRET: SECRET, PUSHSVC_API_KEYS: API_KEY, PUSHSVC_LOG_LEVEL: "warning", PUSHSVC_JWT_LEEWAY: "0", ...(o.env || {}) };
  // its own process group, so that a kill reaches the bundled nats-server too
  const proc = spawn(PUSHSVC, args, { env, stdio: ["ignore", "pipe", "pipe"], detached: true });
  const killGroup = () => {
    try {
      process.kill(-proc.pid, "SIGKILL");
    } catch {}
  };
  process.on("exit", killGroup);
  let out = "", err = "";
  proc.stderr.on("data", (d) => (err += d));
  const base = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("pushsvc serve did not start in 30 s:\n" + out + err)), 30000);
    proc.stdout.on("data", (d) => {
      out += d;
      const m = /serving (http:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    proc.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`pushsvc serve exited with ${code}:\n${out}${err}`));
    });
    proc.on("error", (e) => reject(new Error(`cannot run ${PUSHSVC} (set PUSHSVC_BIN, or pip install -e . in the repository's .venv): ${e.message}`)));
  });
  const port = Number(new URL(base).port);
  const srv = {
    base,
    port,
    dataDir,
    proc,
    /** A dev token (GET /dev/token): `channels` also become its `presence` claim. */
    async token(user, { channels = ">", publish = ">", ttl = 3600 } = {}) {
      const q = new URLSearchParams({ user, channels, publish, ttl: String(ttl) });
      const r = await fetch(`${base}/dev/token?${q}`);
      if (!r.ok) throw new Error(`GET /dev/token: ${r.status} ${await r.text()}`);
      return (await r.json()).token;
    },
    /** POST /emit/{channel} with the API key: resolves with {channel, seq}. */
    async emit(channel, body) {
      const r = await fetch(`${base}/emit/${channel}`, {
        method: "POST",
        headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
        body: typeof body === "string" || body instanceof Uint8Array ? body : JSON.stringify(body),
      });
      if (r.status !== 202) throw new Error(`POST /emit/${channel}: ${r.status} ${await r.text()}`);
      return r.json();
    },
    /**
     * SIGTERM (drain: connections closed with 1012) and wait for the exit; keeps the store.
     * A server still running 12 s later is killed with its nats-server (SIGKILL to the group).
     */
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.on("exit", r));
        proc.kill("SIGTERM");
        const t = setTimeout(killGroup, 12000);
        await exited;
        clearTimeout(t);
      }
      killGroup(); // nothing of it survives (the nats-server child exits with it normally)
      process.off("exit", killGroup);
    },
    /** stop() and remove the store (unless it was given). */
    async cleanup() {
      await srv.stop();
      if (!o.dataDir) rmSync(dataDir, { recursive: true, force: true });
    },
  };
  return srv;
}

/** Resolve when `cond()` is truthy (polled every 20 ms), reject after `ms`. */
export async function until(cond, ms = 10000, what = "condition") {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The next `event` of an emitter (client or subscription). */
export function next(emitter, event, ms = 10000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
    const off = emitter.on(event, (arg) => {
      clearTimeout(t);
      off();
      resolve(arg);
    });
  });
}

let n = 0;
/** A channel name unique to this run. */
export function channel(prefix = "js") {
  return `${prefix}${process.pid}x${++n}`;
}
