// Resume across a server restart on the same store (--data-dir): every message published while the
// client was away is replayed once, in order; the browser's `online` event reconnects at once.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import WebSocket from "ws";
import { PushsvcClient } from "../dist/index.mjs";
import { channel, next, startServer, until } from "./server.mjs";

let srv;
const clients = []; // closed at the end, also when a test fails (a client keeps reconnecting)
const ENV = { PUSHSVC_MAX_CONNECTIONS_PER_USER: "1" };
after(async () => {
  for (const c of clients) c.close();
  if (srv) await srv.cleanup();
});

/** A WebSocket whose connections fail (a closed port) while `gate.shut`: the client's reconnects
 *  then fail like they do while the server is down, until the test opens the gate. */
const gate = { shut: false };
class GatedWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(gate.shut ? "ws://127.0.0.1:9/ws" : url, protocols);
  }
}

test("resume after a server restart on the same store: nothing lost, nothing twice", async () => {
  srv = await startServer({ env: ENV });
  const { port, dataDir } = srv;
  const ch = channel(), pattern = `${channel()}.*`;
  const c = new PushsvcClient({ url: srv.base, WebSocket: GatedWebSocket, transports: ["websocket"], getToken: () => srv.token("ray") });
  clients.push(c);
  const got = [], wild = [], closes = [], subscribed = [];
  c.on("disconnected", (d) => closes.push(d.code));
  c.on("subscribed", (f) => subscribed.push([f.channel, f.recovered]));
  const sub = c.subscribe(ch, (d, ctx) => got.push([d.i, ctx.seq]));
  c.subscribe(pattern, (d, ctx) => wild.push([d.i, ctx.channel]));
  c.connect();
  await sub.ready;
  for (let i = 0; i < 3; i++) await srv.emit(ch, { i });
  await srv.emit(pattern.replace("*", "a"), { i: 0 });
  await until(() => got.length === 3 && wild.length === 1);
  const epoch = c.welcome.epoch;

  gate.shut = true;
  await srv.stop(); // SIGTERM: the node closes its sockets with 1012
  await until(() => closes.includes(1012), 10000, "the 1012 close");
  srv = await startServer({ port, dataDir, env: ENV }); // same port, same store: same stream, same epoch
  for (let i = 3; i < 8; i++) await srv.emit(ch, { i }); // published while the client is away
  await srv.emit(pattern.replace("*", "b"), { i: 1 });
  assert.equal(c.connected, false);
  assert.equal(c.state, "connecting");

  gate.shut = false;
  subscribed.length = 0;
  await next(c, "connected", 30000);
  await until(() => got.length >= 8 && wild.length >= 2, 10000, "the replay");
  await new Promise((r) => setTimeout(r, 300)); // nothing more (no duplicates) arrives
  assert.deepEqual(got.map((g) => g[0]), [0, 1, 2, 3, 4, 5, 6, 7]);
  const seqs = got.map((g) => g[1]);
  assert.deepEqual(seqs, [...new Set(seqs)].sort((a, b) => a - b));
  assert.deepEqual(wild, [[0, pattern.replace("*", "a")], [1, pattern.replace("*", "b")]]);
  assert.equal(c.welcome.epoch, epoch);
  assert.deepEqual(subscribed.sort(), [[ch, true], [pattern, true]].sort());
  c.close();
});

test("the `online` event reconnects at once instead of after the backoff delay", async () => {
  // a second connection of a user at PUSHSVC_MAX_CONNECTIONS_PER_USER=1 is closed with 4008:
  // the client then waits 30 s + backoff, unless the browser says it is online again
  const token = await srv.token("cap");
  const first = new PushsvcClient({ url: srv.base, WebSocket, transports: ["websocket"], token });
  clients.push(first);
  await next(first.connect(), "connected");
  const target = new EventTarget();
  globalThis.addEventListener = target.addEventListener.bind(target);
  globalThis.removeEventListener = target.removeEventListener.bind(target);
  try {
    const c = new PushsvcClient({ url: srv.base, WebSocket, transports: ["websocket"], token });
    clients.push(c);
    const d = await next(c.connect(), "disconnected");
    assert.equal(d.code, 4008);
    assert.ok(d.willReconnect && d.delay >= 30);
    assert.equal(c.state, "connecting");
    first.close();
    await new Promise((r) => setTimeout(r, 200)); // the server has seen the first one go
    const t0 = Date.now();
    const back = next(c, "connected", 5000);
    target.dispatchEvent(new Event("online"));
    await back;
    assert.ok(Date.now() - t0 < 5000);
    c.close();
  } finally {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});
