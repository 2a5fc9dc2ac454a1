// Every public API call of the package over WebSocket, against a real `pushsvc serve --dev`.
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { PushsvcClient, PushsvcError, Subscription, UnauthorizedError } from "../dist/index.mjs";
import { API_KEY, channel, next, startServer, until } from "./server.mjs";

let srv;
const clients = [];
before(async () => {
  srv = await startServer();
});
after(async () => {
  for (const c of clients) c.close();
  await srv.cleanup();
});

function client(opts) {
  const c = new PushsvcClient({ url: srv.base, WebSocket, transports: ["websocket"], ...opts });
  clients.push(c);
  return c;
}

describe("websocket", () => {
  test("connect: states, welcome, the url forms", async () => {
    const c = client({ token: await srv.token("alice") });
    assert.equal(c.url, srv.base.replace("http:", "ws:") + "/ws");
    assert.equal(c.baseUrl, srv.base);
    assert.equal(new PushsvcClient({ url: c.url }).baseUrl, srv.base); // the /ws form of earlier versions
    const states = [];
    c.on("state", (s) => states.push([s.oldState, s.newState]));
    assert.equal(c.state, "disconnected");
    const welcome = next(c, "connected");
    assert.equal(c.connect(), c);
    const w = await welcome;
    assert.equal(w.user, "alice");
    assert.equal(typeof w.client, "string");
    assert.ok(w.ping_interval > 0 && w.exp > Date.now() / 1000);
    assert.equal(typeof w.epoch, "string");
    assert.equal(c.state, "connected");
    assert.equal(c.connected, true);
    assert.equal(c.transport, "websocket");
    assert.equal(c.welcome, w);
    const gone = next(c, "disconnected");
    c.close();
    assert.deepEqual(await gone, { code: 1000, reason: "client close", willReconnect: false, delay: null });
    assert.deepEqual(states, [["disconnected", "connecting"], ["connecting", "connected"], ["connected", "disconnected"]]);
    assert.equal(c.connected, false);
  });

  test("subscribe, publish, ctx, subscription states, unsubscribe", async () => {
    const ch = channel();
    const c = client({ token: await srv.token("bob") });
    const got = [];
    const sub = c.subscribe(ch, (data, ctx) => got.push([data, ctx]));
    assert.ok(sub instanceof Subscription);
    assert.equal(sub.channel, ch);
    assert.equal(sub.state, "subscribing");
    const subStates = [];
    sub.on("state", (s) => subStates.push(s.newState));
    c.connect();
    const f = await sub.ready;
    assert.equal(f.type, "subscribed");
    assert.equal(f.channel, ch);
    assert.equal(sub.state, "subscribed");
    assert.equal(sub.active, true);
    const pub = await c.publish(ch, { n: 1 });
    assert.equal(pub.type, "published");
    assert.equal(typeof pub.seq, "number");
    await until(() => got.length === 1);
    const [data, ctx] = got[0];
    assert.deepEqual(data, { n: 1 });
    const publisher = { user: "bob", client: c.welcome.client }; // stamped by the server
    assert.deepEqual(ctx, { channel: ch, seq: pub.seq, encoding: null, epoch: c.welcome.epoch, pattern: null, publisher });

    const messages = [];
    const off = c.on("message", (m) => messages.push(m));
    const second = await c.publish(ch, "two");
    await until(() => messages.length === 1);
    assert.deepEqual(messages[0], { channel: ch, data: "two", seq: second.seq, encoding: null, epoch: c.welcome.epoch, pattern: null, publisher });
    off();
    await c.publish(ch, "three");
    await until(() => got.length === 3);
    assert.equal(messages.length, 1); // off() removed the listener

    const u = await sub.unsubscribe();
    assert.equal(u.type, "unsubscribed");
    assert.equal(u.channel, ch);
    assert.equal(sub.state, "unsubscribed");
    assert.equal(sub.active, false);
    assert.deepEqual(subStates, ["subscribed", "unsubscribed"]);
    assert.equal(await sub.unsubscribe(), null); // twice: nothing sent
  });

  test("publish without echo, rpc errors, server API subscribe and disconnect codes", async () => {
    const ch = channel();
    const token = await srv.token("dora");
    const a = client({ token });
    const b = client({ token }); // the same user's other tab
    const gotA = [], gotB = [];
    a.subscribe(ch, (d) => gotA.push(d));
    const subB = b.subscribe(ch, (d, ctx) => gotB.push([d, ctx.publisher]));
    a.connect();
    b.connect();
    await subB.ready;
    await until(() => a.state === "connected");
    const quiet = await a.publish(ch, "quiet", { echo: false });
    await a.publish(ch, "loud");
    await until(() => gotB.length === 2 && gotA.length === 1);
    assert.deepEqual(gotA, ["loud"]); // its own no-echo message never came back
    assert.deepEqual(gotB.map(([d]) => d), ["quiet", "loud"]);
    assert.equal(gotB[0][1].user, "dora");
    assert.equal(typeof quiet.seq, "number");

    // no service answers this method: not_found (the op goes to NATS, `<prefix>-rpc.<method>`)
    await assert.rejects(a.rpc("nobody.here", { x: 1 }), (e) => e instanceof PushsvcError && ["not_found", "forbidden"].includes(e.code));

    // the server API subscribes b to a channel it never asked for: delivered through on("message")
    const other = channel();
    const msgs = [];
    b.on("message", (m) => m.channel === other && msgs.push(m.data));
    const api = (op, body) =>
      fetch(`${srv.base}/api/${op}`, {
        method: "POST",
        headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
        body: JSON.stringify(body),
      }).then((r) => r.json());
    const subscribed = next(b, "subscribed");
    assert.equal((await api("subscribe", { client: b.welcome.client, channel: other })).subscribed, 1);
    assert.equal((await subscribed).channel, other);
    await srv.emit(other, { via: "api" });
    await until(() => msgs.length === 1);
    assert.deepEqual(msgs, [{ via: "api" }]);

    // 4012: reconnect; 4011: stop
    const closed = next(b, "disconnected");
    await api("disconnect", { client: b.welcome.client, reconnect: true });
    const d = await closed;
    assert.equal(d.code, 4012);
    assert.equal(d.willReconnect, true);
    await until(() => b.state === "connected");
    const stopped = next(b, "disconnected");
    await api("disconnect", { client: b.welcome.client });
    const s = await stopped;
    assert.equal(s.code, 4011);
    assert.equal(s.willReconnect, false);
    assert.equal(b.state, "disconnected");
  });

  test("two handlers on one channel; client.unsubscribe drops both", async () => {
    const ch = channel();
    const c = client({ token: await srv.token("carol") }).connect();
    const a = [], b = [];
    const s1 = c.subscribe(ch, (d) => a.push(d));
    const s2 = c.subscribe(ch, (d) => b.push(d));
    await s1.ready;
    await s2.ready;
    await c.publish(ch, 1);
    await until(() => a.length === 1 && b.length === 1);
    assert.equal(await s1.unsubscribe(), null); // s2 still holds the channel
    await c.publish(ch, 2);
    await until(() => b.length === 2);
    assert.deepEqual(a, [1]);
    const u = await c.unsubscribe(ch);
    assert.equal(u.channel, ch);
    assert.equal(s2.state, "unsubscribed");
    assert.equal(await c.unsubscribe(ch), null);
  });

  test("wildcard subscription: ctx.channel is concrete, ctx.pattern the pattern", async () => {
    const tag = channel();
    const c = client({ token: await srv.token("dave") }).connect();
    const got = [];
    const sub = c.subscribe(`${tag}.*`, (data, ctx) => got.push([ctx.channel, ctx.pattern, data]));
    await sub.ready;
    await srv.emit(`${tag}.eu`, { id: 7 });
    await until(() => got.length === 1);
    assert.deepEqual(got, [[`${tag}.eu`, `${tag}.*`, { id: 7 }]]);
  });

  test("resume with {since, epoch} from a kept position; duplicates dropped", async () => {
    const ch = channel();
    const c = client({ token: await srv.token("erin") }).connect();
    await next(c, "connected");
    const seqs = [];
    for (let i = 0; i < 4; i++) seqs.push((await srv.emit(ch, { i })).seq);
    const got = [];
    const sub = c.subscribe(ch, (d, ctx) => got.push([d.i, ctx.seq]), { since: seqs[1], epoch: c.welcome.epoch });
    const f = await sub.ready;
    assert.equal(f.recovered, true);
    await until(() => got.length === 2);
    assert.deepEqual(got, [[2, seqs[2]], [3, seqs[3]]]);

    // another epoch: recovered false, and the full replay is delivered (not taken for duplicates)
    const c2 = client({ token: await srv.token("erin") }).connect();
    const all = [];
    const s2 = c2.subscribe(ch, (d) => all.push(d.i), { since: seqs[3] + 1000, epoch: "not-this-epoch" });
    assert.equal((await s2.ready).recovered, false);
    await until(() => all.length === 4);
    assert.deepEqual(all, [0, 1, 2, 3]);
  });

  test("errors: forbidden subscribe rejects ready, publish without grant, not_connected", async () => {
    const ch = channel("allowed");
    const c = client({ token: await srv.token("frank", { channels: `${ch}`, publish: "nothing" }) });
    await assert.rejects(c.publish(ch, 1), (e) => e instanceof PushsvcError && e.code === "not_connected");
    c.connect();
    const errors = [];
    c.on("error", (e) => errors.push(e));
    const subErr = [];
    const bad = c.subscribe("elsewhere", () => {});
    bad.on("error", (e) => subErr.push(e.code));
    await assert.rejects(bad.ready, (e) => e instanceof PushsvcError && e.code === "forbidden" && e.channel === "elsewhere");
    assert.equal(bad.state, "unsubscribed");
    assert.deepEqual(subErr, ["forbidden"]);
    assert.ok(errors.some((e) => e.code === "forbidden"));
    await c.subscribe(ch, () => {}).ready;
    await assert.rejects(c.publish(ch, 1), (e) => e.code === "forbidden" && e.channel === ch && typeof e.id === "number");
    await assert.rejects(c.subscribe("bad..name", () => {}).ready, (e) => e.code === "invalid_channel");
    assert.equal(c.connected, true); // refusals never close the connection
  });

  test("close() while the WebSocket handshake is in flight: no uncaught error", async () => {
    // a listener that accepts and never answers: the `ws` socket stays CONNECTING
    const held = [];
    const silent = createServer((s) => held.push(s));
    await new Promise((r) => silent.listen(0, "127.0.0.1", r));
    const crashes = [];
    const onCrash = (e) => crashes.push(e);
    process.on("uncaughtException", onCrash);
    try {
      const c = client({ url: `http://127.0.0.1:${silent.address().port}`, token: await srv.token("ivy") });
      const tried = next(c, "transport");
      c.connect();
      await tried;
      await until(() => held.length === 1);
      c.close();
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(c.state, "disconnected");
      assert.deepEqual(crashes.map(String), []);
    } finally {
      process.off("uncaughtException", onCrash);
      for (const s of held) s.destroy();
      silent.close();
    }
  });

  test("types are checked at run time too", () => {
    const c = client({ token: "x" });
    assert.throws(() => c.subscribe(42, () => {}), TypeError);
    assert.throws(() => c.subscribe("news"), TypeError);
    assert.throws(() => new PushsvcClient({ url: srv.base, transports: ["carrier-pigeon"] }), TypeError);
    assert.throws(() => new PushsvcClient(), TypeError); // no page, no url
    assert.throws(() => new PushsvcClient({ url: srv.base, WebSocket }).connect(), TypeError); // no token
  });

  test("presence, presenceStats, join and leave", async () => {
    const ch = `chat.${channel()}`; // --dev: presence and join/leave on for chat.>
    const a = client({ token: await srv.token("ann") }).connect();
    const events = [];
    a.on("join", (e) => events.push(["join", e.user]));
    a.on("leave", (e) => events.push(["leave", e.user]));
    await a.subscribe(ch, () => {}).ready;
    const b = client({ token: await srv.token("ben") }).connect();
    await b.subscribe(ch, () => {}).ready;
    await until(() => events.length === 2, 10000, "two joins");
    assert.deepEqual(events.map((e) => e[1]).sort(), ["ann", "ben"]);
    const who = await a.presence(ch);
    assert.equal(who.type, "presence");
    assert.equal(who.clients_total, 2);
    assert.equal(who.users, 2);
    assert.deepEqual(who.clients.map((x) => x.user).sort(), ["ann", "ben"]);
    const stats = await a.presenceStats(ch);
    assert.deepEqual([stats.clients, stats.users], [2, 2]);
    b.close();
    await until(() => events.some((e) => e[0] === "leave" && e[1] === "ben"), 10000, "ben's leave");
    await assert.rejects(a.presence("news"), (e) => e.code === "forbidden" || e.code === "bad_request");
  });

  test("base64 payloads and decodeBase64", async () => {
    const ch = channel();
    const c = client({ token: await srv.token("gus") }).connect();
    const got = [];
    await c.subscribe(ch, (data, ctx) => got.push([data, ctx.encoding])).ready;
    await srv.emit(ch, new Uint8Array([0xff, 0x00, 0x81]));
    await until(() => got.length === 1);
    assert.equal(got[0][1], "base64");
    assert.deepEqual(Array.from(PushsvcClient.decodeBase64(got[0][0])), [0xff, 0x00, 0x81]);
  });

  test("refresh(): a new token, and the scheduled refresh through getToken", async () => {
    let calls = 0;
    const c = client({ token: await srv.token("hal", { ttl: 4 }), getToken: async () => (calls++, srv.token("hal", { ttl: 3600 })) });
    const w = await next(c.connect(), "connected");
    const f = await c.refresh(await srv.token("hal", { ttl: 600 }));
    assert.equal(f.type, "refreshed");
    assert.ok(f.exp > w.exp);
    // a short token is refreshed halfway through its life, on the same connection
    const c2 = client({ token: await srv.token("ida", { ttl: 3 }), getToken: async () => (calls++, srv.token("ida", { ttl: 3600 })) });
    const closes = [];
    c2.on("disconnected", (d) => closes.push(d.code));
    await next(c2.connect(), "connected");
    await until(() => calls >= 1, 5000, "getToken");
    await new Promise((r) => setTimeout(r, 3000)); // past the first token's exp
    assert.equal(c2.connected, true);
    assert.deepEqual(closes, []);
    assert.ok((await c2.publish(channel(), 1)).type === "published");
  });

  test("server-side subscription (token subs) through on('message'), and Subscription.on('subscribed')", async () => {
    // --dev with PUSHSVC_AUTO_SUBSCRIBE_PERSONAL unset: no subs; subscribing the personal channel works
    const c = client({ token: await srv.token("jo") }).connect();
    const sub = c.subscribe("user.jo", () => {});
    const frames = [];
    sub.on("subscribed", (f) => frames.push(f.channel));
    await sub.ready;
    assert.deepEqual(frames, ["user.jo"]);
  });
});

describe("auth", () => {
  test("4001 with getToken: a new token, reconnect, subscriptions resumed", async () => {
    const ch = channel();
    const expired = await srv.token("kim", { ttl: 1 });
    await new Promise((r) => setTimeout(r, 2100));
    let calls = 0;
    const c = client({ token: expired, getToken: async () => (calls++, srv.token("kim")) });
    const closes = [];
    c.on("disconnected", (d) => closes.push([d.code, d.willReconnect]));
    const sub = c.subscribe(ch, () => {});
    c.connect();
    await sub.ready;
    assert.deepEqual(closes, [[4001, true]]);
    assert.equal(calls, 1);
    assert.equal(c.state, "connected");
  });

  test("4001 without getToken: stop", async () => {
    const expired = await srv.token("lee", { ttl: 1 });
    await new Promise((r) => setTimeout(r, 2100));
    const c = client({ token: expired });
    const d = await next(c.connect(), "disconnected");
    assert.equal(d.code, 4001);
    assert.equal(d.willReconnect, false);
    assert.equal(c.state, "disconnected");
  });

  test("getToken throwing UnauthorizedError stops reconnecting", async () => {
    const c = client({ getToken: async () => { throw new UnauthorizedError("no session"); } });
    const d = await next(c.connect(), "disconnected");
    assert.deepEqual(d, { code: 4001, reason: "unauthorized", willReconnect: false, delay: null });
    assert.equal(c.state, "disconnected");
    assert.ok(PushsvcClient.UnauthorizedError === UnauthorizedError);
  });

  test("getToken throwing another error: reported on error, retried with backoff", async () => {
    let calls = 0;
    const c = client({
      getToken: async () => {
        if (++calls === 1) throw new Error("backend down");
        return srv.token("max");
      },
    });
    const errors = [];
    c.on("error", (e) => errors.push(e.message));
    const closes = [];
    c.on("disconnected", (d) => closes.push([d.code, d.reason, d.willReconnect]));
    await next(c.connect(), "connected", 15000);
    assert.deepEqual(errors, ["backend down"]);
    assert.deepEqual(closes, [[4001, "getToken failed", true]]);
    assert.equal(calls, 2);
  });
});
