import { Emitter } from "./emitter.js";
import { PushsvcError, UnauthorizedError } from "./errors.js";
import { type Entry, Subscription } from "./subscription.js";
import { HttpTransport, type Transport, type TransportHandlers, WebSocketTransport } from "./transports.js";
import type {
  ClientEvents,
  ClientState,
  Frame,
  MessageContext,
  MessageHandler,
  PresenceFrame,
  PresenceStatsFrame,
  PublishedFrame,
  PublishOptions,
  Publisher,
  PushsvcOptions,
  RpcResultFrame,
  RefreshedFrame,
  SubscribedFrame,
  SubscribeOptions,
  TransportName,
  UnsubscribedFrame,
  WebSocketConstructor,
  WelcomeFrame,
} from "./types.js";
import { type Endpoints, endpoints } from "./url.js";

// seconds
const BACKOFF_BASE = 0.5, BACKOFF_FACTOR = 2, BACKOFF_MAX = 20, RATE_LIMIT_DELAY = 30;
const ALL_TRANSPORTS: TransportName[] = ["websocket", "http_stream", "sse"];

/** Close codes after which, before any `welcome`, the next transport is tried at once. */
function transportFailed(code: number): boolean {
  return code !== 4001 && code !== 4003 && code !== 4008 && code !== 1012 && code !== 1013;
}

interface Position {
  lastSeq: number | null;
  epoch: string | null;
}

interface Pending {
  op: string;
  channel?: string;
  entry?: Entry;
  resolve?: (f: any) => void;
  reject?: (e: PushsvcError) => void;
}

/**
 * A connection to pushsvc that reconnects with backoff (full jitter) and resumes every
 * subscription where it left off. See README.md for the full reference.
 *
 * @example
 *   const c = new PushsvcClient({ url: "https://push.example.com", getToken });
 *   const sub = c.subscribe("news", (data, ctx) => console.log(ctx.seq, data));
 *   c.connect(); await sub.ready;
 */
export class PushsvcClient extends Emitter<ClientEvents> {
  /** The PushsvcError class. */
  static Error = PushsvcError;
  /** The UnauthorizedError class (throw it from getToken). */
  static UnauthorizedError = UnauthorizedError;
  /** The Subscription class. */
  static Subscription = Subscription;

  /** The WebSocket endpoint (ws(s)://host/base/ws). */
  readonly url: string;
  /** The HTTP base URL (http(s)://host/base) of the HTTP-streaming and SSE transports. */
  readonly baseUrl: string;
  /** The token in use (null while getToken is pending after a 4001). */
  token: string | null;
  readonly getToken: (() => Promise<string>) | null;
  debug: boolean;
  /** Seconds from opening a transport until `welcome`. */
  connectTimeout: number;
  /** The last `welcome` frame. */
  welcome: WelcomeFrame | null = null;

  /** @internal */ _channels = new Map<string, Entry>();
  private _state: ClientState = "disconnected";
  private _WS: WebSocketConstructor | null;
  private _fetch: typeof fetch | null;
  private _wanted: TransportName[];
  private _transports: TransportName[] = [];
  private _tIndex = 0; // next transport to try while none has connected yet
  private _sticky: TransportName | null = null; // the transport that connected: kept for reconnects
  private _t: Transport | null = null;
  private _timers: Record<string, ReturnType<typeof setTimeout>> = {};
  private _nextId = 1;
  private _attempt = 0;
  private _pending = new Map<number, Pending>();
  private _ready = false; // `welcome` received on the current transport
  private _opening = false; // awaiting getToken() before opening a transport
  private _stopped = true; // connect() not called yet, close() called, or a terminal close code
  private _hbTimeout: number;
  private _serverSubs = new Map<string, Position>(); // server-side subscription -> position
  private _own = new Set<string>(); // "<channel>:<seq>" of this client's no-echo publishes
  private _urlChannels = new Set<string>(); // channels the current HTTP stream resumes by its event id
  private _noResume = false; // the last HTTP stream opened with resumed channels was refused
  private _onOnline = () => {
    if (!this._stopped && !this._t && !this._opening && this._timers.reconnect !== undefined) {
      this._log("online: reconnecting now");
      this._open();
    }
  };

  /** @throws TypeError without `url` outside a browser page, or with an unknown transport name. */
  constructor(options: PushsvcOptions = {}) {
    super();
    const o = options;
    const ep: Endpoints | null = endpoints(o.url);
    if (!ep) throw new TypeError("PushsvcClient: options.url is required outside a browser page");
    this.url = ep.ws;
    this.baseUrl = ep.http;
    this.token = o.token || null;
    this.getToken = typeof o.getToken === "function" ? o.getToken : null;
    this.debug = !!o.debug;
    this.connectTimeout = o.connectTimeout || 15;
    this._hbTimeout = this.connectTimeout;
    const g = globalThis as { WebSocket?: WebSocketConstructor; fetch?: typeof fetch };
    this._WS = o.WebSocket || g.WebSocket || null;
    this._fetch = o.fetch || (g.fetch ? g.fetch.bind(globalThis) : null);
    this._wanted = o.transports ? o.transports.slice() : ALL_TRANSPORTS;
    for (const t of this._wanted) {
      if (ALL_TRANSPORTS.indexOf(t) < 0) throw new TypeError("PushsvcClient: unknown transport " + JSON.stringify(t));
    }
  }

  /** `disconnected`, `connecting` (also while waiting to reconnect) or `connected`. */
  get state(): ClientState {
    return this._state;
  }

  /** True between `welcome` and the end of that connection. */
  get connected(): boolean {
    return this._ready;
  }

  /** The transport in use or being tried, or null. */
  get transport(): TransportName | null {
    return this._t ? this._t.name : null;
  }

  /**
   * Open the connection (no-op if already open or opening). Returns this.
   * @throws TypeError without token and getToken; Error when no listed transport can run here.
   */
  connect(): this {
    if (!this.token && !this.getToken) throw new TypeError("PushsvcClient: a token or getToken is required");
    this._transports = this._wanted.filter((t) => (t === "websocket" ? !!this._WS : !!this._fetch));
    if (!this._transports.length) throw new Error("PushsvcClient: no WebSocket or fetch implementation available");
    if (this._stopped) this._listenOnline(true);
    this._stopped = false;
    if (!this._t && !this._opening) {
      this._attempt = 0;
      this._open();
    }
    return this;
  }

  /** Close with 1000 and stop reconnecting. Subscriptions are kept and resumed by a later connect(). */
  close(): void {
    const active = !this._stopped || !!this._t;
    const t = this._t;
    this._stopped = true;
    this._listenOnline(false);
    this._detach();
    this._clearTimer("reconnect");
    this._failPending();
    if (t) t.close(1000, "client close");
    this._setState("disconnected");
    if (active) this._emit("disconnected", { code: 1000, reason: "client close", willReconnect: false, delay: null });
  }

  /**
   * Subscribe `handler` to a channel or a wildcard pattern (`orders.*`, `orders.>`).
   * @param opts since: last seq already seen, to resume from; epoch: the stream epoch of that seq
   * @throws TypeError for a channel that is not a non-empty string or a handler that is not a function
   */
  subscribe<T = unknown>(channel: string, handler: MessageHandler<T>, opts?: SubscribeOptions): Subscription<T> {
    if (typeof channel !== "string" || !channel) throw new TypeError("subscribe: channel must be a non-empty string");
    if (typeof handler !== "function") throw new TypeError("subscribe: handler must be a function");
    let e = this._channels.get(channel);
    if (!e) {
      let resolve!: Entry["resolve"], reject!: Entry["reject"];
      const ready = new Promise<SubscribedFrame>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      ready.catch(() => {}); // no unhandled-rejection noise when the app does not await it
      e = {
        channel,
        subs: new Set(),
        confirmed: false,
        onStream: false,
        state: "subscribing",
        lastSeq: opts && typeof opts.since === "number" ? opts.since : null,
        epoch: opts && typeof opts.epoch === "string" ? opts.epoch : null,
        ready,
        resolve,
        reject,
      };
      this._channels.set(channel, e);
      const pos = this._serverSubs.get(channel);
      if (this._ready && pos) {
        // the server already subscribed it
        e.lastSeq = pos.lastSeq;
        e.epoch = pos.epoch;
        e.confirmed = true;
        e.state = "subscribed";
        e.resolve({ type: "subscribed", channel });
      } else if (this._ready) this._sendSubscribe(e);
    }
    const s = new Subscription<T>(this, e, handler);
    e.subs.add(s);
    return s;
  }

  /** Drop every handler of a channel and send unsubscribe. Resolves with the answer, or null. */
  unsubscribe(channel: string): Promise<UnsubscribedFrame | null> {
    const e = this._channels.get(channel);
    if (!e) return Promise.resolve(null);
    return this._removeSubscription(e, null, true);
  }

  /**
   * Resolves with the `published` frame {id, seq?}; rejects with PushsvcError (not_connected if not connected).
   * `{echo: false}`: every other subscriber gets it, this connection does not (nor from a later replay).
   */
  publish(channel: string, data?: unknown, options?: PublishOptions): Promise<PublishedFrame> {
    const cmd: { op: string; channel: string; [k: string]: unknown } = { op: "publish", channel, data: data === undefined ? null : data };
    if (options && options.echo === false) cmd.echo = false;
    const p = this._request<PublishedFrame>(cmd);
    if (cmd.echo === false) {
      p.then((f) => {
        if (typeof f.seq === "number") this._noteOwn(channel + ":" + f.seq);
      }, () => {});
    }
    return p;
  }

  /**
   * Call a backend method over NATS (`<prefix>-rpc.<method>`, needs an `rpc` grant). Resolves with the
   * responder's data; rejects with PushsvcError (forbidden, not_found, unavailable, too_large, or the
   * responder's own code).
   */
  rpc<T = unknown>(method: string, data?: unknown): Promise<T> {
    return this._request<RpcResultFrame>({ op: "rpc", method, data: data === undefined ? null : data }).then(
      (f) => f.data as T,
    );
  }

  private _noteOwn(key: string): void {
    this._own.add(key);
    if (this._own.size > 1000) this._own.delete(this._own.values().next().value as string);
  }

  /** Who is subscribed to a channel, on every node (needs a `presence` grant). */
  presence(channel: string): Promise<PresenceFrame> {
    return this._request({ op: "presence", channel });
  }

  /** Counts only: {channel, clients, users}. */
  presenceStats(channel: string): Promise<PresenceStatsFrame> {
    return this._request({ op: "presence_stats", channel });
  }

  /** Send refresh with a new token (also used for reconnects). Resolves with the `refreshed` frame {exp}. */
  refresh(token: string): Promise<RefreshedFrame> {
    this.token = token;
    return this._request<RefreshedFrame>({ op: "refresh", token }).then((f) => {
      this._scheduleRefresh(f.exp);
      return f;
    });
  }

  /** Decode a message whose ctx.encoding is "base64". */
  static decodeBase64(s: string): Uint8Array {
    const bin = atob(s), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  /**
   * @internal Apply a `subscribed` frame to a position: on recovered: false (a gap, or a new stream
   * epoch) or a changed epoch, forget the old seq so that no message of the new epoch, whose seqs
   * restarted, is mistaken for a duplicate; then adopt the frame's epoch.
   */
  static _settlePosition(pos: Position, f: SubscribedFrame): void {
    if (f.recovered === false || (typeof f.epoch === "string" && pos.epoch !== null && f.epoch !== pos.epoch)) pos.lastSeq = null;
    if (typeof f.epoch === "string") pos.epoch = f.epoch;
  }

  // ---- internals -------------------------------------------------------------------------

  private _log(...args: unknown[]): void {
    if (this.debug) console.debug("[pushsvc]", ...args);
  }

  private _setState(s: ClientState): void {
    const old = this._state;
    if (old === s) return;
    this._state = s;
    this._emit("state", { newState: s, oldState: old });
  }

  private _setSubState(e: Entry, s: Entry["state"]): void {
    const old = e.state;
    if (old === s) return;
    e.state = s;
    for (const sub of Array.from(e.subs)) sub._emit("state", { channel: e.channel, newState: s, oldState: old });
  }

  private _listenOnline(on: boolean): void {
    const g = globalThis as { addEventListener?: Function; removeEventListener?: Function };
    if (typeof g.addEventListener !== "function" || typeof g.removeEventListener !== "function") return;
    if (on) g.addEventListener("online", this._onOnline);
    else g.removeEventListener("online", this._onOnline);
  }

  private _setTimer(name: string, fn: () => void, ms: number): void {
    this._clearTimer(name);
    this._timers[name] = setTimeout(() => {
      delete this._timers[name];
      fn();
    }, Math.max(0, Math.min(ms, 2147483647)));
  }

  private _clearTimer(name: string): void {
    if (this._timers[name] !== undefined) {
      clearTimeout(this._timers[name]);
      delete this._timers[name];
    }
  }

  private async _open(): Promise<void> {
    this._clearTimer("reconnect");
    this._setState("connecting");
    if (!this.token && this.getToken) {
      let failed: unknown = null;
      this._opening = true;
      try {
        this.token = await this.getToken();
      } catch (err) {
        failed = err || new Error("getToken failed");
      }
      this._opening = false;
      if (this._stopped || this._t) return;
      if (failed instanceof UnauthorizedError) return this._stop(4001, "unauthorized");
      if (failed) {
        this._emit("error", failed as Error);
        return this._onClose(4001, "getToken failed");
      }
    }
    const name = this._sticky || this._transports[this._tIndex];
    this._log("connecting", name);
    this._emit("transport", { transport: name, fallback: !this._sticky && this._tIndex > 0 });
    const h: TransportHandlers = {
      onOpen: () => {
        if (this._t === t) this._t.send(this._authFrame());
      },
      onActivity: () => {
        if (this._t === t) this._armWatchdog(this._ready ? this._hbTimeout : this.connectTimeout);
      },
      onFrame: (f) => {
        if (this._t === t) this._onFrame(f);
      },
      onClose: (code, reason) => {
        if (this._t === t) this._onClose(code, reason);
      },
    };
    let t: Transport;
    this._ready = false;
    try {
      if (name === "websocket") {
        this._urlChannels = new Set();
        t = new WebSocketTransport(this._WS!, this.url, h);
      } else {
        const { channels, cursor } = this._streamChannels();
        this._urlChannels = new Set(cursor !== null ? channels : []); // resumed by the event id
        t = new HttpTransport(name, { base: this.baseUrl, token: this.token!, channels, cursor, fetch: this._fetch! }, h);
      }
    } catch (err) {
      this._emit("error", err as Error);
      return this._onClose(1006, String(err));
    }
    this._t = t;
    this._armWatchdog(this.connectTimeout);
  }

  /**
   * The channels and the event id (`<epoch>:<seq>`) an HTTP stream opens with. Resumed by the id:
   * the channels confirmed on the previous stream whose position belongs to its epoch, and the
   * server-side subscriptions with a position; the id is the lowest of their seqs, so no channel
   * misses anything (what one has seen already is dropped as a duplicate). The others are
   * subscribed by command after `welcome`, with their own since/epoch, as on WebSocket, so a
   * refusal stays theirs. The server wants at least one channel: with none to resume, the stream
   * opens with the user's personal channel `user.<sub>` (always granted), which stays subscribed.
   */
  private _streamChannels(): { channels: string[]; cursor: string | null } {
    const epoch = this.welcome && typeof this.welcome.epoch === "string" ? this.welcome.epoch : null;
    const channels: string[] = [];
    let min: number | null = null;
    const take = (channel: string, p: Position) => {
      if (p.lastSeq === null || p.epoch !== epoch || epoch === null || this._noResume) return;
      channels.push(channel);
      min = min === null ? p.lastSeq : Math.min(min, p.lastSeq);
    };
    this._channels.forEach((e) => e.onStream && take(e.channel, e));
    this._serverSubs.forEach((p, ch) => !this._channels.has(ch) && take(ch, p));
    if (min !== null) return { channels, cursor: epoch + ":" + min };
    const sub = tokenSub(this.token);
    return { channels: sub ? ["user." + sub] : Array.from(this._channels.keys()), cursor: null };
  }

  private _authFrame(): object {
    // resumes server-side subscriptions with since
    const msg: { op: string; token: string | null; subs?: Record<string, { since: number; epoch?: string }> } = { op: "auth", token: this.token };
    const subs: Record<string, { since: number; epoch?: string }> = {};
    let any = false;
    this._serverSubs.forEach((p, channel) => {
      let pos: Position = p;
      const e = this._channels.get(channel);
      if (e && e.lastSeq !== null) pos = e;
      if (pos.lastSeq === null) return;
      subs[channel] = pos.epoch !== null ? { since: pos.lastSeq, epoch: pos.epoch } : { since: pos.lastSeq };
      any = true;
    });
    if (any) msg.subs = subs;
    return msg;
  }

  private _armWatchdog(seconds: number): void {
    this._setTimer("watchdog", () => {
      const t = this._t, reason = this._ready ? "heartbeat timeout" : "connect timeout";
      this._log("no frame for " + seconds + " s: closing");
      this._detach();
      if (t) t.close(4010, reason);
      this._onClose(4010, reason);
    }, seconds * 1000);
  }

  private _send(msg: { op: string; [k: string]: unknown }): void {
    const t = this._t;
    if (!t) return;
    if (this.debug) this._log("send", msg.op === "auth" || msg.op === "refresh" ? { op: msg.op } : msg);
    t.send(msg);
  }

  private _request<F>(msg: { op: string; channel?: string; [k: string]: unknown }): Promise<F> {
    if (!this._ready) return Promise.reject(new PushsvcError("not_connected", "not connected", { channel: msg.channel }));
    const id = (msg.id = this._nextId++);
    return new Promise<F>((resolve, reject) => {
      this._pending.set(id, { op: msg.op, channel: msg.channel, resolve, reject });
      this._send(msg);
    });
  }

  private _sendSubscribe(e: Entry): void {
    // answered in order on the connection, so ordering with the messages that follow holds
    const id = this._nextId++;
    const msg: { op: string; channel: string; id: number; since?: number; epoch?: string } = { op: "subscribe", channel: e.channel, id };
    if (e.lastSeq !== null) {
      msg.since = e.lastSeq;
      if (e.epoch !== null) msg.epoch = e.epoch;
    }
    this._pending.set(id, { op: "subscribe", channel: e.channel, entry: e });
    this._send(msg);
  }

  private _onSubscribed(e: Entry, f: SubscribedFrame): void {
    if (this._channels.get(e.channel) !== e) return;
    PushsvcClient._settlePosition(e, f);
    e.confirmed = true;
    if (this._t && !this._t.framed) e.onStream = true;
    this._setSubState(e, "subscribed");
    e.resolve(f);
    for (const s of Array.from(e.subs)) s._emit("subscribed", f);
    this._emit("subscribed", f);
  }

  private _onSubscribeError(e: Entry, err: PushsvcError): void {
    if (this._channels.get(e.channel) !== e) return;
    err.channel = e.channel;
    this._emit("error", err);
    for (const s of Array.from(e.subs)) s._emit("error", err);
    if (err.code === "rate_limited" || err.code === "unavailable") {
      // transient: retry on this connection
      const t = this._t;
      this._setTimer("resub:" + e.channel, () => {
        if (this._t === t && this._ready && this._channels.get(e.channel) === e) this._sendSubscribe(e);
      }, (err.retryAfter || 5) * 1000);
      return;
    }
    this._drop(e);
    e.reject(err);
  }

  /** Forget an entry: its Subscriptions become `unsubscribed`. */
  private _drop(e: Entry): void {
    if (this._channels.get(e.channel) === e) this._channels.delete(e.channel);
    this._setSubState(e, "unsubscribed");
  }

  /** @internal */
  _removeSubscription(e: Entry, s: Subscription<any> | null, all = false): Promise<UnsubscribedFrame | null> {
    if (s) e.subs.delete(s);
    if ((e.subs.size && !all) || this._channels.get(e.channel) !== e) return Promise.resolve(null);
    this._drop(e); // every remaining Subscription of the channel becomes `unsubscribed`
    e.subs.clear();
    if (!e.confirmed) e.reject(new PushsvcError("unsubscribed", "unsubscribed before confirmation", { channel: e.channel }));
    if (!this._ready) return Promise.resolve(null);
    return this._request<UnsubscribedFrame>({ op: "unsubscribe", channel: e.channel });
  }

  private _take(id: unknown): Pending | null {
    if (typeof id !== "number" || !this._pending.has(id)) return null;
    const p = this._pending.get(id)!;
    this._pending.delete(id);
    return p;
  }

  private _onFrame(f: Frame): void {
    if (f.type !== "ping" && f.type !== "message") this._log("recv", f);
    let p: Pending | null, e: Entry | undefined;
    switch (f.type) {
      case "ping":
        if (this._t && this._t.framed) this._send({ op: "pong" }); // HTTP transports: no answer needed
        break;
      case "welcome":
        this._onWelcome(f as WelcomeFrame);
        break;
      case "message":
        this._onMessage(f);
        break;
      case "error": {
        const err = new PushsvcError(typeof f.code === "string" ? f.code : "error", f.message as string, {
          id: f.id as number,
          retryAfter: f.retry_after as number,
        });
        p = this._take(f.id);
        if (p && p.entry) this._onSubscribeError(p.entry, err);
        else if (p) {
          err.channel = p.channel;
          p.reject!(err);
        } else {
          if (typeof f.channel === "string") err.channel = f.channel;
          this._emit("error", err);
        }
        break;
      }
      case "subscribed": {
        const sf = f as SubscribedFrame;
        p = this._take(f.id);
        let pos: Position | undefined;
        if ((e = p ? p.entry : this._channels.get(sf.channel))) this._onSubscribed(e, sf);
        else if ((pos = this._serverSubs.get(sf.channel))) {
          // a server-side subscription
          PushsvcClient._settlePosition(pos, sf);
          this._emit("subscribed", sf);
        } else if (!p) {
          // subscribed by the server API: delivered through on("message") like the token's subs
          pos = { lastSeq: null, epoch: null };
          PushsvcClient._settlePosition(pos, sf);
          this._serverSubs.set(sf.channel, pos);
          this._emit("subscribed", sf);
        }
        break;
      }
      case "join":
      case "leave":
        this._emit(f.type, { channel: f.channel as string, client: f.client as string, user: f.user as string, info: f.info as Record<string, unknown> | undefined });
        break;
      case "unsubscribed": {
        const uf = f as UnsubscribedFrame;
        this._serverSubs.delete(uf.channel);
        p = this._take(f.id);
        if (p) p.resolve!(uf);
        else if ((e = this._channels.get(uf.channel))) {
          // server-initiated
          this._drop(e);
          if (!e.confirmed) e.reject(new PushsvcError(uf.reason || "unsubscribed", "unsubscribed by server", { channel: uf.channel }));
        }
        this._emit("unsubscribed", uf);
        break;
      }
      default: // published, refreshed, presence, presence_stats, and answers of future ops
        p = this._take(f.id);
        if (p && p.resolve) p.resolve(f);
    }
  }

  private _onWelcome(f: WelcomeFrame): void {
    const pi = Number(f.ping_interval) > 0 ? Number(f.ping_interval) : 25;
    this._hbTimeout = Math.max(pi * 1.5, pi + 10);
    this._ready = true;
    this._attempt = 0;
    this._noResume = false;
    this.welcome = f;
    this._channels.forEach((e) => (e.onStream = false)); // set again by this stream's `subscribed`
    if (this._t) this._sticky = this._t.name;
    this._armWatchdog(this._hbTimeout);
    this._scheduleRefresh(f.exp);
    const serverSubs = new Map<string, Position>();
    for (const ch of Array.isArray(f.subs) ? f.subs : []) serverSubs.set(ch, this._serverSubs.get(ch) || { lastSeq: null, epoch: null });
    this._serverSubs = serverSubs;
    this._channels.forEach((entry) => {
      if (!serverSubs.has(entry.channel)) this._sendSubscribe(entry); // stream channels are listed in subs
    });
    // resumed channels unsubscribed while the stream was opening
    this._urlChannels.forEach((ch) => {
      if (!this._channels.has(ch)) this._request({ op: "unsubscribe", channel: ch }).catch(() => {});
    });
    this._setState("connected");
    this._emit("connected", f);
  }

  private _onMessage(f: Frame): void {
    const channel = f.channel as string;
    const pattern = typeof f.pattern === "string" ? f.pattern : null;
    const key = pattern !== null ? pattern : channel; // the subscription it came through
    const e = this._channels.get(key);
    const seq = typeof f.seq === "number" ? f.seq : null;
    if (seq !== null && this._own.size && this._own.has(channel + ":" + seq)) return; // our no-echo publish
    const pos: Position | null = e || this._serverSubs.get(key) || null; // a server-side subscription may have no handlers
    if (pos && seq !== null) {
      if (pos.lastSeq !== null && seq <= pos.lastSeq) {
        this._log("duplicate", key, seq);
        return;
      }
      pos.lastSeq = seq;
    }
    const publisher = (f.publisher as Publisher | undefined) || null;
    const ctx: MessageContext = { channel, seq, encoding: (f.encoding as string) || null, epoch: pos ? pos.epoch : null, pattern, publisher };
    if (e) {
      for (const s of Array.from(e.subs)) {
        try {
          s._handler(f.data, ctx);
        } catch (err) {
          console.error("[pushsvc] handler for " + key + " failed", err);
        }
      }
    }
    this._emit("message", { channel, data: f.data, seq, encoding: ctx.encoding, epoch: ctx.epoch, pattern, publisher });
  }

  private _scheduleRefresh(exp: unknown, delay?: number): void {
    // at exp - 30 s (or halfway for tokens living < 60 s)
    this._clearTimer("refresh");
    if (!this.getToken || typeof exp !== "number") return;
    const left = exp * 1000 - Date.now(), t = this._t;
    if (delay === undefined) delay = Math.max(left - 30000, left / 2, 1000);
    else if (left <= 0) return;
    this._setTimer("refresh", async () => {
      try {
        const token = await this.getToken!();
        if (this._t === t && this._ready) await this.refresh(token);
      } catch (err) {
        if (this._t !== t || !this._ready) return;
        if (err instanceof UnauthorizedError) return this._stop(4001, "unauthorized");
        this._emit("error", err as Error);
        this._scheduleRefresh(exp, 10000); // retry until expiry (the server then closes with 4001)
      }
    }, delay);
  }

  private _detach(): void {
    for (const name in this._timers) if (name !== "reconnect") this._clearTimer(name);
    this._t = null;
    this._ready = false;
    this._channels.forEach((e) => this._setSubState(e, "subscribing"));
  }

  private _failPending(): void {
    this._pending.forEach((p) => {
      // subscribes are re-sent after the next welcome, so just forget them
      if (p.op !== "subscribe") p.reject!(new PushsvcError("disconnected", "connection closed", { channel: p.channel }));
    });
    this._pending.clear();
  }

  /** Stop for good (terminal close, UnauthorizedError): state disconnected, no reconnect. */
  private _stop(code: number, reason: string): void {
    const t = this._t;
    this._detach();
    this._failPending();
    if (t) t.close(code === 4001 ? 1000 : code, reason);
    this._clearTimer("reconnect");
    this._stopped = true;
    this._listenOnline(false);
    this._setState("disconnected");
    this._emit("disconnected", { code, reason, willReconnect: false, delay: null });
  }

  private _onClose(code: number, reason: string): void {
    const t = this._t, welcomed = this._ready;
    this._detach();
    this._failPending();
    if (this._stopped) return;
    if (!welcomed && t && !t.framed && /^HTTP 40[03]\b/.test(reason) && !this._noResume && this._urlChannels.size) {
      // an HTTP stream refused with resumed channels (a grant gone, a bad position): open the next
      // one without; they are subscribed by command (with since) after welcome
      this._noResume = true;
      code = 1006;
    }
    if (!welcomed && !this._sticky && transportFailed(code) && this._tIndex + 1 < this._transports.length) {
      this._tIndex++; // not this transport: try the next one at once
      this._log("transport failed", code, reason, "trying", this._transports[this._tIndex]);
      this._open();
      return;
    }
    if (!this._sticky) this._tIndex = 0;
    const attempt = this._attempt++;
    const backoff = () => Math.random() * Math.min(BACKOFF_MAX, BACKOFF_BASE * Math.pow(BACKOFF_FACTOR, attempt)) * 1000;
    let delay: number | null;
    // 4011 (disconnected by the server) and an app's 4500-4999 stop; 4012 and 4100-4499 reconnect
    if (code === 4003 || code === 4011 || (code >= 4500 && code <= 4999)) delay = null;
    else if (code === 4001) {
      if (this.getToken) {
        this.token = null;
        delay = backoff();
      } else delay = null;
    } else if (code === 4008) delay = RATE_LIMIT_DELAY * 1000 + backoff();
    else if (code === 1012) delay = attempt === 0 ? Math.random() * 2000 : backoff();
    else delay = backoff();
    this._log("closed", code, reason, delay === null ? "(stopped)" : "reconnect in " + Math.round(delay) + " ms");
    if (delay === null) {
      this._stopped = true;
      this._listenOnline(false);
      this._setState("disconnected");
    } else {
      this._setState("connecting");
      this._setTimer("reconnect", () => this._open(), delay);
    }
    this._emit("disconnected", { code, reason: reason || "", willReconnect: delay !== null, delay: delay === null ? null : delay / 1000 });
  }
}

/** The `sub` claim of a JWT (read, not verified: the server verifies), or null. */
function tokenSub(token: string | null): string | null {
  try {
    const b64 = token!.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const sub = JSON.parse(atob(b64 + "===".slice((b64.length + 3) % 4))).sub;
    return typeof sub === "string" && /^[A-Za-z0-9_-]+$/.test(sub) ? sub : null;
  } catch {
    return null;
  }
}
