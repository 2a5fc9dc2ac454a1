/**
 * pushsvc.js: dependency-free browser client for pushsvc (wire protocol v1).
 * Plain ES2017 classic script; defines `window.PushsvcClient` (and module.exports under CommonJS).
 *
 * @example
 *   const c = new PushsvcClient({ token, getToken: async () => (await fetchToken()).token });
 *   c.on("connected", (welcome) => {});   // {client, user, ping_interval, exp, epoch?, subs?}
 *   const sub = c.subscribe("news", (data, ctx) => {});   // ctx = {channel, seq, encoding, epoch, pattern}
 *   c.subscribe("orders.*", (data, ctx) => {});       // wildcard: ctx.channel is concrete, ctx.pattern "orders.*"
 *   const who = await c.presence("chat.room1");       // {channel, clients: [{client, user, node, info?}], users, clients_total}
 *   c.connect(); await sub.ready;                     // resolves with the `subscribed` frame
 *   await c.publish("chat.room1", { text: "hi" });    // resolves with the `published` frame {id, seq?}
 *   sub.unsubscribe(); c.close();
 *
 * @typedef {Object} PushsvcOptions
 * @property {string} [url]   WebSocket URL. Default: ws(s)://<location.host>/ws (wss on https pages).
 * @property {string} [token] Access token, sent as the first frame {"op":"auth","token":...}, never in the URL.
 * @property {function(): Promise<string>} [getToken] Returns a fresh token. Used before `exp`
 *           (about exp - 30 s; for short tokens halfway through their lifetime) via op "refresh",
 *           after a 4001 close, and on connect() when no token was given.
 * @property {boolean} [debug=false]   Log frames and state changes with console.debug.
 * @property {number} [connectTimeout=15] Seconds allowed from socket creation until `welcome`.
 * @property {Function} [WebSocket]    WebSocket constructor (default: the global one; set it for tests or non-browsers).
 *
 * Events (client.on(name, fn) returns an unsubscribe function; client.off(name, fn) also works):
 *   "connected"    (welcome: {client, user, ping_interval: seconds, exp: unix seconds, epoch?: string,
 *                  subs?: [channel]})
 *                  `subs` lists the server-side subscriptions (token `subs` claim): their messages arrive
 *                  through "message" (or the handlers of a client.subscribe() of the same name), and they
 *                  are resumed with (since, epoch) on every reconnect (auth frame `subs` map).
 *   "join", "leave" ({channel, client, user, info?}): a session joined/left a channel with join/leave events
 *   "disconnected" ({code, reason, willReconnect: boolean, delay: seconds|null})
 *   "error"        (PushsvcError): error frames not matched to a request, subscription failures,
 *                  and getToken/refresh failures. Errors for requests with an id reject that request's Promise.
 *   "message"      ({channel, data, seq, encoding, epoch, pattern}) for every delivered (non-duplicate)
 *                  message; pattern is the wildcard subscription that delivered it, or null
 *   "subscribed"   (frame {channel, id?, recovered?, epoch?}); "unsubscribed" (frame {channel, id?, reason?})
 *
 * PushsvcError: Error with .code (bad_request | unauthorized | forbidden | invalid_channel | rate_limited |
 *   limit_exceeded | unavailable, or client-side: not_connected | disconnected | unsubscribed),
 *   .retryAfter (seconds, from retry_after), .id, .channel.
 *
 * Messages: data is passed as received. When ctx.encoding === "base64", data is a base64 string
 *   (PushsvcClient.decodeBase64(data) gives a Uint8Array). The position (epoch, highest seq) per channel
 *   is tracked; a message whose seq <= the last seen seq is dropped as a duplicate. After `welcome`, every
 *   channel is (re)subscribed with `since` = last seen seq and `epoch` = the stream epoch that seq belongs
 *   to. If `subscribed` says recovered: false, the gap could not be filled (messages expired, or the
 *   stream was created anew: a new epoch, whose seqs restart at 1): the old position is forgotten, the
 *   messages that follow (a replay of what the server still holds, then live ones) are all delivered, and
 *   the app should refetch its state. To resume across page loads, keep ctx.epoch and ctx.seq and pass
 *   them as subscribe(channel, handler, {since, epoch}).
 *
 * Heartbeat: the server sends ping every ping_interval seconds; the client answers pong at once. If no
 *   frame arrives for max(ping_interval * 1.5, ping_interval + 10) seconds the socket is closed and reopened.
 *
 * Close codes -> behaviour (backoff = full jitter: random(0, min(20, 0.5 * 2^attempt)) seconds;
 *   the attempt counter resets on each `welcome`; every reconnect resumes subscriptions with since):
 *   1000 normal          after close(): stop. Sent by the server: reconnect with backoff
 *   1001 going away, 1006 abnormal, 1011 server error: reconnect with backoff
 *   1012 service restart reconnect after random 0..2 s (then backoff if that fails)
 *   4001 unauthorized    with getToken: fetch a new token, reconnect with backoff. Without: stop
 *   4003 forbidden       stop (no reconnect)
 *   4008 rate limited    reconnect after 30 s + backoff
 *   4009 slow consumer, 4010 heartbeat timeout (also used when the client's own watchdog fires),
 *   and any other code:  reconnect with backoff
 */
var PushsvcClient = (function () {
  "use strict";

  var BACKOFF_BASE = 0.5, BACKOFF_FACTOR = 2, BACKOFF_MAX = 20, RATE_LIMIT_DELAY = 30; // seconds

  class PushsvcError extends Error {
    constructor(code, message, extra) {
      super(message || code);
      this.name = "PushsvcError"; this.code = code;
      if (extra) Object.assign(this, extra);
    }
  }

  function defaultUrl() {
    if (typeof location === "undefined" || !location.host) return null;
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  }

  /** Returned by client.subscribe(). `ready` resolves with the `subscribed` frame, or rejects with a PushsvcError. */
  class Subscription {
    constructor(client, entry, handler) {
      this.channel = entry.channel;
      this._client = client; this._entry = entry; this._handler = handler; this._active = true;
    }
    get ready() { return this._entry.ready; }
    get active() { return this._active && this._client._channels.get(this.channel) === this._entry; }
    /** Remove this handler; the last handler of a channel sends op unsubscribe. Resolves with the answer frame or null. */
    unsubscribe() {
      if (!this._active) return Promise.resolve(null);
      this._active = false; return this._client._removeHandler(this._entry, this._handler);
    }
  }

  class PushsvcClient {
    /** @param {PushsvcOptions} [options] */
    constructor(options) {
      var o = options || {};
      this.url = o.url || defaultUrl();
      if (!this.url) throw new TypeError("PushsvcClient: options.url is required outside a browser page");
      this.token = o.token || null;
      this.getToken = typeof o.getToken === "function" ? o.getToken : null;
      this.debug = !!o.debug;
      this.connectTimeout = o.connectTimeout || 15;
      this.welcome = null;      // last welcome frame
      this.state = "disconnected"; // "connecting" | "connected" | "reconnecting" | "disconnected"
      this._WS = o.WebSocket || (typeof WebSocket !== "undefined" ? WebSocket : null);
      this._listeners = {}; this._timers = {}; this._nextId = 1; this._attempt = 0; this._ws = null;
      this._channels = new Map(); // channel -> {channel, handlers:Set, lastSeq, ready, resolve, reject, confirmed}
      this._pending = new Map();  // request id -> {op, channel, resolve, reject} or {op:"subscribe", entry}
      this._ready = false;        // `welcome` received on the current socket
      this._opening = false;      // awaiting getToken() before opening a socket
      this._stopped = true;       // connect() not called yet, close() called, or a terminal close code
      this._hbTimeout = this.connectTimeout;
      this._serverSubs = new Map(); // server-side subscription -> {lastSeq, epoch} (position)
    }

    get connected() { return this._ready; }

    on(event, fn) {
      (this._listeners[event] || (this._listeners[event] = new Set())).add(fn);
      return () => this.off(event, fn);
    }
    off(event, fn) { if (this._listeners[event]) this._listeners[event].delete(fn); }

    /** Open the connection (no-op if already open or opening). Returns this. */
    connect() {
      if (!this.token && !this.getToken) throw new TypeError("PushsvcClient: a token or getToken is required");
      if (!this._WS) throw new Error("PushsvcClient: no WebSocket implementation available");
      this._stopped = false;
      if (!this._ws && !this._opening) { this._attempt = 0; this._open(); }
      return this;
    }

    /** Close with 1000 and stop reconnecting. Subscriptions are kept and resumed by a later connect(). */
    close() {
      var active = !this._stopped || !!this._ws, ws = this._ws;
      this._stopped = true; this.state = "disconnected";
      this._detach(); this._clearTimer("reconnect"); this._failPending();
      if (ws) { try { ws.close(1000, "client close"); } catch (e) { /* ignore */ } }
      if (active) this._emit("disconnected", { code: 1000, reason: "client close", willReconnect: false, delay: null });
    }

    /**
     * @param {string} channel
     * @param {function(*, {channel:string, seq:(number|null), encoding:(string|null)})} handler
     * @param {{since?: number, epoch?: string}} [opts] since: last seq already seen, to resume from;
     *   epoch: the stream epoch that seq belongs to (ctx.epoch of the message)
     * @returns {Subscription}
     */
    subscribe(channel, handler, opts) {
      if (typeof channel !== "string" || !channel) throw new TypeError("subscribe: channel must be a non-empty string");
      if (typeof handler !== "function") throw new TypeError("subscribe: handler must be a function");
      var e = this._channels.get(channel);
      if (!e) {
        e = { channel: channel, handlers: new Set(), confirmed: false,
          lastSeq: opts && typeof opts.since === "number" ? opts.since : null,
          epoch: opts && typeof opts.epoch === "string" ? opts.epoch : null };
        e.ready = new Promise((resolve, reject) => { e.resolve = resolve; e.reject = reject; });
        e.ready.catch(() => {}); // no unhandled-rejection noise when the app does not await it
        this._channels.set(channel, e);
        if (this._ready && this._serverSubs.has(channel)) { // the server already subscribed it
          var pos = this._serverSubs.get(channel);
          e.lastSeq = pos.lastSeq; e.epoch = pos.epoch; e.confirmed = true;
          e.resolve({ type: "subscribed", channel: channel });
        } else if (this._ready) this._sendSubscribe(e);
      }
      e.handlers.add(handler);
      return new Subscription(this, e, handler);
    }

    /** Drop every handler of a channel and send op unsubscribe. */
    unsubscribe(channel) {
      var e = this._channels.get(channel);
      if (!e) return Promise.resolve(null);
      e.handlers.clear(); return this._removeHandler(e, null);
    }

    /** Resolves with the `published` frame {id, seq?}; rejects with PushsvcError (not_connected if not connected). */
    publish(channel, data) {
      return this._request({ op: "publish", channel: channel, data: data === undefined ? null : data });
    }

    /**
     * Who is subscribed to a channel, on every node. Needs a `presence` grant in the token.
     * Resolves with {channel, clients: [{client, user, node, info?}], users, clients_total, truncated?}.
     */
    presence(channel) { return this._request({ op: "presence", channel: channel }); }

    /** Counts only: resolves with {channel, clients, users}. */
    presenceStats(channel) { return this._request({ op: "presence_stats", channel: channel }); }

    /** Send op refresh with a new token (also used for reconnects). Resolves with the `refreshed` frame {exp}. */
    refresh(token) {
      this.token = token;
      return this._request({ op: "refresh", token: token }).then((f) => { this._scheduleRefresh(f.exp); return f; });
    }

    /** Apply a `subscribed` frame to a position {lastSeq, epoch}: on recovered: false (a gap, or a
     *  new stream epoch) or a changed epoch, forget the old seq so that no message of the new epoch,
     *  whose seqs restarted, is mistaken for a duplicate; then adopt the frame's epoch. */
    static _settlePosition(pos, f) {
      if (f.recovered === false || (typeof f.epoch === "string" && pos.epoch !== null && f.epoch !== pos.epoch)) pos.lastSeq = null;
      if (typeof f.epoch === "string") pos.epoch = f.epoch;
    }

    static decodeBase64(s) {
      var bin = atob(s), out = new Uint8Array(bin.length);
      for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
      return out;
    }

    // ---- internals -------------------------------------------------------------------------

    _log() { if (this.debug) console.debug.apply(console, ["[pushsvc]"].concat(Array.from(arguments))); }

    _emit(event, arg) {
      Array.from(this._listeners[event] || []).forEach((fn) => {
        try { fn(arg); } catch (err) { console.error("[pushsvc] " + event + " listener failed", err); }
      });
    }

    _setTimer(name, fn, ms) {
      this._clearTimer(name);
      this._timers[name] = setTimeout(() => { delete this._timers[name]; fn(); }, Math.max(0, Math.min(ms, 2147483647)));
    }
    _clearTimer(name) {
      if (this._timers[name] !== undefined) { clearTimeout(this._timers[name]); delete this._timers[name]; }
    }

    async _open() {
      this._clearTimer("reconnect");
      if (!this.token && this.getToken) {
        var failed = null;
        this._opening = true;
        try { this.token = await this.getToken(); } catch (err) { failed = err; }
        this._opening = false;
        if (this._stopped || this._ws) return;
        if (failed) { this._emit("error", failed); return this._onClose(4001, "getToken failed"); }
      }
      this.state = "connecting";
      this._log("connecting", this.url);
      var ws;
      try { ws = new this._WS(this.url); } catch (err) { this._emit("error", err); return this._onClose(1006, String(err)); }
      ws.binaryType = "arraybuffer";
      this._ws = ws; this._ready = false;
      ws.onopen = () => { if (this._ws === ws) this._sendRaw(this._authFrame()); };
      ws.onmessage = (ev) => { if (this._ws === ws) this._onData(ev.data); };
      ws.onclose = (ev) => { if (this._ws === ws) this._onClose(ev.code, ev.reason); };
      ws.onerror = () => this._log("socket error");
      this._armWatchdog(this.connectTimeout);
    }

    _authFrame() { // resumes server-side subscriptions with since
      var msg = { op: "auth", token: this.token }, subs = {}, any = false;
      this._serverSubs.forEach((pos, channel) => {
        var e = this._channels.get(channel);
        if (e && e.lastSeq !== null) pos = e;
        if (pos.lastSeq === null) return;
        subs[channel] = pos.epoch !== null ? { since: pos.lastSeq, epoch: pos.epoch } : { since: pos.lastSeq };
        any = true;
      });
      if (any) msg.subs = subs;
      return msg;
    }

    _armWatchdog(seconds) {
      this._setTimer("watchdog", () => {
        var ws = this._ws, reason = this._ready ? "heartbeat timeout" : "connect timeout";
        this._log("no frame for " + seconds + " s: closing");
        this._detach();
        if (ws) { try { ws.close(4010, reason); } catch (e) { /* ignore */ } }
        this._onClose(4010, reason);
      }, seconds * 1000);
    }

    _sendRaw(msg) {
      var ws = this._ws;
      if (!ws || ws.readyState !== 1) return false; // 1 = OPEN
      if (this.debug) this._log("send", msg.op === "auth" || msg.op === "refresh" ? { op: msg.op } : msg);
      ws.send(JSON.stringify(msg));
      return true;
    }

    _request(msg) {
      if (!this._ready) return Promise.reject(new PushsvcError("not_connected", "not connected", { channel: msg.channel }));
      var id = msg.id = this._nextId++;
      return new Promise((resolve, reject) => {
        this._pending.set(id, { op: msg.op, channel: msg.channel, resolve: resolve, reject: reject });
        this._sendRaw(msg);
      });
    }

    _sendSubscribe(e) { // answered synchronously in _onFrame, so ordering with following messages holds
      var id = this._nextId++, msg = { op: "subscribe", channel: e.channel, id: id };
      if (e.lastSeq !== null) {
        msg.since = e.lastSeq;
        if (e.epoch !== null) msg.epoch = e.epoch;
      }
      this._pending.set(id, { op: "subscribe", channel: e.channel, entry: e });
      this._sendRaw(msg);
    }

    _onSubscribed(e, f) {
      if (this._channels.get(e.channel) !== e) return;
      PushsvcClient._settlePosition(e, f);
      e.confirmed = true; e.resolve(f);
      this._emit("subscribed", f);
    }

    _onSubscribeError(e, err) {
      if (this._channels.get(e.channel) !== e) return;
      err.channel = e.channel;
      this._emit("error", err);
      if (err.code === "rate_limited" || err.code === "unavailable") { // transient: retry on this socket
        var ws = this._ws;
        this._setTimer("resub:" + e.channel, () => {
          if (this._ws === ws && this._ready && this._channels.get(e.channel) === e) this._sendSubscribe(e);
        }, (err.retryAfter || 5) * 1000);
        return;
      }
      this._channels.delete(e.channel); e.reject(err);
    }

    _removeHandler(e, handler) {
      if (handler) e.handlers.delete(handler);
      if (e.handlers.size || this._channels.get(e.channel) !== e) return Promise.resolve(null);
      this._channels.delete(e.channel);
      if (!e.confirmed) e.reject(new PushsvcError("unsubscribed", "unsubscribed before confirmation", { channel: e.channel }));
      if (!this._ready) return Promise.resolve(null);
      return this._request({ op: "unsubscribe", channel: e.channel });
    }

    _onData(raw) {
      this._armWatchdog(this._ready ? this._hbTimeout : this.connectTimeout);
      if (typeof raw !== "string") { // binary frames are not part of v1; decode ArrayBuffers defensively
        if (!raw || typeof raw.byteLength !== "number" || typeof TextDecoder === "undefined") return;
        raw = new TextDecoder().decode(raw);
      }
      raw.split("\n").forEach((line) => {
        if (!line.trim()) return;
        var f;
        try { f = JSON.parse(line); } catch (err) { this._log("unparsable frame", line); return; }
        if (f && typeof f === "object" && this._ws) this._onFrame(f);
      });
    }

    _take(id) {
      if (id === undefined || id === null || !this._pending.has(id)) return null;
      var p = this._pending.get(id);
      this._pending.delete(id); return p;
    }

    _onFrame(f) {
      if (f.type !== "ping" && f.type !== "message") this._log("recv", f);
      var p, e;
      switch (f.type) {
        case "ping": this._sendRaw({ op: "pong" }); break;
        case "welcome":
          var pi = Number(f.ping_interval) > 0 ? Number(f.ping_interval) : 25;
          this._hbTimeout = Math.max(pi * 1.5, pi + 10);
          this._ready = true; this._attempt = 0; this.welcome = f; this.state = "connected";
          this._armWatchdog(this._hbTimeout);
          this._scheduleRefresh(f.exp);
          var serverSubs = new Map();
          (Array.isArray(f.subs) ? f.subs : []).forEach((ch) => {
            serverSubs.set(ch, this._serverSubs.get(ch) || { lastSeq: null, epoch: null });
          });
          this._serverSubs = serverSubs;
          this._channels.forEach((entry) => { if (!serverSubs.has(entry.channel)) this._sendSubscribe(entry); });
          this._emit("connected", f);
          break;
        case "message": this._onMessage(f); break;
        case "error":
          var err = new PushsvcError(f.code || "error", f.message, { id: f.id, retryAfter: f.retry_after });
          p = this._take(f.id);
          if (p && p.entry) this._onSubscribeError(p.entry, err);
          else if (p) { err.channel = p.channel; p.reject(err); } else this._emit("error", err);
          break;
        case "subscribed":
          p = this._take(f.id);
          if ((e = p ? p.entry : this._channels.get(f.channel))) this._onSubscribed(e, f);
          else if ((e = this._serverSubs.get(f.channel))) { // a server-side subscription
            PushsvcClient._settlePosition(e, f);
            this._emit("subscribed", f);
          }
          break;
        case "join": case "leave":
          this._emit(f.type, { channel: f.channel, client: f.client, user: f.user, info: f.info });
          break;
        case "unsubscribed":
          p = this._take(f.id);
          if (p) p.resolve(f);
          else if ((e = this._channels.get(f.channel))) { // server-initiated
            this._channels.delete(f.channel);
            if (!e.confirmed) e.reject(new PushsvcError(f.reason || "unsubscribed", "unsubscribed by server", { channel: f.channel }));
          }
          this._emit("unsubscribed", f);
          break;
        default: // published, refreshed, and answers of future ops
          p = this._take(f.id);
          if (p) p.resolve(f);
      }
    }

    _onMessage(f) {
      var key = typeof f.pattern === "string" ? f.pattern : f.channel; // the subscription it came through
      var e = this._channels.get(key);
      var seq = typeof f.seq === "number" ? f.seq : null;
      var pos = e || this._serverSubs.get(key) || null; // (a server-side subscription may have no handlers)
      if (pos && seq !== null) {
        if (pos.lastSeq !== null && seq <= pos.lastSeq) { this._log("duplicate", key, seq); return; }
        pos.lastSeq = seq;
      }
      var ctx = { channel: f.channel, seq: seq, encoding: f.encoding || null,
        epoch: pos ? pos.epoch : null, pattern: f.pattern || null };
      if (e) Array.from(e.handlers).forEach((h) => {
        try { h(f.data, ctx); } catch (err) { console.error("[pushsvc] handler for " + key + " failed", err); }
      });
      this._emit("message", { channel: f.channel, data: f.data, seq: seq, encoding: ctx.encoding,
        epoch: ctx.epoch, pattern: ctx.pattern });
    }

    _scheduleRefresh(exp, delay) { // at exp - 30 s (or halfway for tokens living < 60 s)
      this._clearTimer("refresh");
      if (!this.getToken || typeof exp !== "number") return;
      var left = exp * 1000 - Date.now(), ws = this._ws;
      if (delay === undefined) delay = Math.max(left - 30000, left / 2, 1000);
      else if (left <= 0) return;
      this._setTimer("refresh", async () => {
        try {
          var token = await this.getToken();
          if (this._ws === ws && this._ready) await this.refresh(token);
        } catch (err) {
          if (this._ws !== ws || !this._ready) return;
          this._emit("error", err);
          this._scheduleRefresh(exp, 10000); // retry until expiry (the server then closes with 4001)
        }
      }, delay);
    }

    _detach() {
      var ws = this._ws;
      if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      this._ws = null; this._ready = false;
      for (var name in this._timers) if (name !== "reconnect") this._clearTimer(name);
    }

    _failPending() {
      this._pending.forEach((p) => { // subscribes are re-sent after the next welcome, so just forget them
        if (p.op !== "subscribe") p.reject(new PushsvcError("disconnected", "connection closed", { channel: p.channel }));
      });
      this._pending.clear();
    }

    _onClose(code, reason) {
      this._detach(); this._failPending();
      if (this._stopped) return;
      var attempt = this._attempt++;
      var backoff = () => Math.random() * Math.min(BACKOFF_MAX, BACKOFF_BASE * Math.pow(BACKOFF_FACTOR, attempt)) * 1000;
      var delay;
      if (code === 4003) delay = null;
      else if (code === 4001) { if (this.getToken) { this.token = null; delay = backoff(); } else delay = null; }
      else if (code === 4008) delay = RATE_LIMIT_DELAY * 1000 + backoff();
      else if (code === 1012) delay = attempt === 0 ? Math.random() * 2000 : backoff();
      else delay = backoff();
      this._log("closed", code, reason, delay === null ? "(stopped)" : "reconnect in " + Math.round(delay) + " ms");
      this.state = delay === null ? "disconnected" : "reconnecting";
      if (delay === null) this._stopped = true; else this._setTimer("reconnect", () => this._open(), delay);
      this._emit("disconnected", { code: code, reason: reason || "", willReconnect: delay !== null,
        delay: delay === null ? null : delay / 1000 });
    }
  }

  PushsvcClient.Error = PushsvcError;
  PushsvcClient.Subscription = Subscription;
  return PushsvcClient;
})();

if (typeof window !== "undefined") window.PushsvcClient = PushsvcClient;
if (typeof module !== "undefined") module.exports = PushsvcClient;
