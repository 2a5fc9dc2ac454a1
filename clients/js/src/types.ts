/**
 * Shapes of the wire frames (docs/protocol.md, "Frames") and of the client's events.
 * Frames may carry fields added by later protocol versions: read what you know, ignore the rest.
 */

/** Client state: `connecting` covers the first attempt and every reconnect (with its backoff delay). */
export type ClientState = "disconnected" | "connecting" | "connected";

/** Subscription state: `subscribing` until the server's `subscribed`, and again while reconnecting. */
export type SubscriptionState = "unsubscribed" | "subscribing" | "subscribed";

/** Transport names of the `transports` option, tried in this order by default. */
export type TransportName = "websocket" | "http_stream" | "sse";

/**
 * A WebSocket constructor: the browser's, or e.g. `WebSocket` from the `ws` package in Node.
 * (Loosely typed so that both fit: only the members of WebSocketLike are used.)
 */
export type WebSocketConstructor = new (url: string, protocols?: any) => WebSocketLike;

/** The part of the WHATWG WebSocket interface the client uses (handlers get `{data}` / `{code, reason}`). */
export interface WebSocketLike {
  readonly readyState: number;
  binaryType: any;
  onopen: any;
  onmessage: any;
  onclose: any;
  onerror: any;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** `welcome`: the connection is authenticated. `exp` is Unix seconds, `ping_interval` seconds. */
export interface WelcomeFrame {
  type: "welcome";
  client: string;
  user: string;
  ping_interval: number;
  exp: number;
  epoch?: string;
  node?: string;
  /** Server-side subscriptions (token `subs` claim), delivered through the `message` event. */
  subs?: string[];
  /** SSE / HTTP-streaming only: the session secret that addresses `POST /sse/commands`. */
  session?: string;
  [extra: string]: unknown;
}

/** `subscribed`: answer to subscribe (`recovered` present when a position was given). */
export interface SubscribedFrame {
  type: "subscribed";
  channel: string;
  id?: number | string;
  recovered?: boolean;
  epoch?: string;
  [extra: string]: unknown;
}

/** `unsubscribed`: answer to unsubscribe, or a removal by the server (`reason`, e.g. "forbidden"). */
export interface UnsubscribedFrame {
  type: "unsubscribed";
  channel: string;
  id?: number | string;
  reason?: string;
  [extra: string]: unknown;
}

/** `published`: NATS has the message; `seq` is its stream sequence (history on). */
export interface PublishedFrame {
  type: "published";
  id?: number | string;
  seq?: number;
  [extra: string]: unknown;
}

/** `refreshed`: the new token is in use until `exp` (Unix seconds). */
export interface RefreshedFrame {
  type: "refreshed";
  exp: number;
  id?: number | string;
  [extra: string]: unknown;
}

/** One present session of a channel (`info`: its token's `info` claim). */
export interface PresenceClient {
  client: string;
  user: string;
  node: string;
  info?: Record<string, unknown>;
}

/** Answer to presence(): `clients` lists at most PUSHSVC_PRESENCE_LIMIT sessions (`truncated` then). */
export interface PresenceFrame {
  type: "presence";
  channel: string;
  clients: PresenceClient[];
  users: number;
  clients_total: number;
  truncated?: boolean;
  id?: number | string;
  [extra: string]: unknown;
}

/** Answer to presenceStats(): counts only. */
export interface PresenceStatsFrame {
  type: "presence_stats";
  channel: string;
  clients: number;
  users: number;
  id?: number | string;
  [extra: string]: unknown;
}

/** What a subscription handler gets beside the data. */
export interface MessageContext {
  /** The concrete channel (also for a wildcard subscription). */
  channel: string;
  /** Stream sequence (history on), else null. */
  seq: number | null;
  /** "base64" when data is the base64 of non-UTF-8 bytes, else null. */
  encoding: string | null;
  /** The stream epoch `seq` belongs to (history on), else null. */
  epoch: string | null;
  /** The wildcard subscription that delivered it, or null. */
  pattern: string | null;
  /** Who published it, stamped by the server (a client's publish, a JWT emit), or null. */
  publisher: Publisher | null;
}

/** The sender of a message, as the server stamped it (never what a client claims). */
export interface Publisher {
  user: string;
  client?: string;
}

/** Options of publish(). */
export interface PublishOptions {
  /** false: not delivered back to this connection (default true). */
  echo?: boolean;
}

/** Answer to rpc(): the responder's data. */
export interface RpcResultFrame {
  type: "rpc_result";
  id?: number | string;
  data: unknown;
  encoding?: string;
  [extra: string]: unknown;
}

/** The `message` event: every delivered (non-duplicate) message. */
export interface MessageEvent<T = unknown> extends MessageContext {
  data: T;
}

/** `join` / `leave` events of channels with PUSHSVC_JOIN_LEAVE_CHANNELS. */
export interface MemberEvent {
  channel: string;
  client: string;
  user: string;
  info?: Record<string, unknown>;
}

/** The `disconnected` event. `delay` is seconds until the next attempt, null when stopped. */
export interface DisconnectedEvent {
  code: number;
  reason: string;
  willReconnect: boolean;
  delay: number | null;
}

/** The `state` event of the client. */
export interface StateEvent {
  newState: ClientState;
  oldState: ClientState;
}

/** The `transport` event: a transport is being tried (`fallback`: after another one failed). */
export interface TransportEvent {
  transport: TransportName;
  fallback: boolean;
}

/** The `state` event of a subscription. */
export interface SubscriptionStateEvent {
  channel: string;
  newState: SubscriptionState;
  oldState: SubscriptionState;
}

/** Events of PushsvcClient: `client.on(name, (arg) => ...)`. */
export interface ClientEvents {
  state: StateEvent;
  connected: WelcomeFrame;
  disconnected: DisconnectedEvent;
  transport: TransportEvent;
  error: Error;
  message: MessageEvent;
  subscribed: SubscribedFrame;
  unsubscribed: UnsubscribedFrame;
  join: MemberEvent;
  leave: MemberEvent;
}

/** Events of a Subscription: `sub.on(name, (arg) => ...)`. */
export interface SubscriptionEvents {
  state: SubscriptionStateEvent;
  subscribed: SubscribedFrame;
  error: Error;
}

/** A wire frame from the server (any `type`; unknown types are ignored). */
export interface Frame {
  type?: string;
  id?: unknown;
  [field: string]: unknown;
}

/** Options of `new PushsvcClient(options)`. */
export interface PushsvcOptions {
  /**
   * The server: its base URL (`https://host/base`) or its WebSocket endpoint (`wss://host/base/ws`).
   * Default in a browser: where the browser build was loaded from (`<base>/static/pushsvc.js`),
   * else the folder of the page (`document.baseURI`). Required elsewhere.
   */
  url?: string;
  /** Access token (JWT). WebSocket: sent in the first frame, never in the URL; HTTP: `Authorization`. */
  token?: string;
  /**
   * Returns a fresh token: on connect() without a token, after a 4001, and before `exp` (refresh).
   * Throw UnauthorizedError to stop reconnecting; any other error is retried with backoff.
   */
  getToken?: () => Promise<string>;
  /** Transports to try, in order, until one connects (default all three). */
  transports?: TransportName[];
  /** WebSocket constructor (default: the global one). Node 20: `WebSocket` of the `ws` package. */
  WebSocket?: WebSocketConstructor;
  /** fetch for HTTP-streaming, SSE and commands (default: the global one). */
  fetch?: typeof fetch;
  /** Seconds allowed from opening a transport until `welcome` (default 15). */
  connectTimeout?: number;
  /** Log frames and state changes with console.debug. */
  debug?: boolean;
}

/** Options of client.subscribe(): resume from a position kept by the app (ctx.seq, ctx.epoch). */
export interface SubscribeOptions {
  /** The last seq already seen: the server replays what came after it. */
  since?: number;
  /** The stream epoch `since` belongs to. */
  epoch?: string;
}

/** A subscription handler. */
export type MessageHandler<T = unknown> = (data: T, ctx: MessageContext) => void;
