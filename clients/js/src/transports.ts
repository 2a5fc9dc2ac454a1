/**
 * The three transports. Each one carries the same frames (docs/protocol.md); they differ in how
 * frames travel:
 *
 * - `websocket`: `GET <base>/ws`, commands and frames on one socket; the token goes in the first
 *   frame (`auth`), pings are answered with `pong`.
 * - `http_stream`: `POST <base>/stream` (fetch, body `{channels, last_event_id?}`,
 *   `Authorization: Bearer`), the answer is NDJSON, one frame per line.
 * - `sse`: `GET <base>/sse?channel=...&last_event_id=...` (fetch with `Authorization: Bearer`,
 *   read as `text/event-stream`: `event:` names the frame type, `data:` holds the frame; comment
 *   lines are heartbeats).
 *
 * On both HTTP transports the welcome frame carries `session`, and commands go to
 * `POST <base>/sse/commands` `{session, commands: [...]}` (answers arrive on the stream). Commands
 * are sent one POST at a time, in order, batching what queued up meanwhile, so the owning node
 * applies them in the order they were issued. A refused POST turns into an `error` frame for each
 * of its commands (same codes as on WebSocket); a 404 (the session is gone) ends the stream.
 */

import type { Frame, TransportName, WebSocketConstructor, WebSocketLike } from "./types.js";

/** What a transport reports to the client. After `close()` it reports nothing more. */
export interface TransportHandlers {
  /** The connection is open and wants the `auth` frame (WebSocket only). */
  onOpen(): void;
  /** Bytes arrived (frames or heartbeats): the client's watchdog is re-armed. */
  onActivity(): void;
  /** One frame, in order. */
  onFrame(f: Frame): void;
  /** The connection ended (WebSocket close code, or the equivalent for HTTP refusals and ends). */
  onClose(code: number, reason: string): void;
}

/** A connection over one transport. */
export interface Transport {
  readonly name: TransportName;
  /** True on WebSocket: the token goes in an `auth` frame and pings are answered with `pong`. */
  readonly framed: boolean;
  /** Send one command object (`op` ...). */
  send(msg: object): void;
  /** Close it and report nothing more. */
  close(code: number, reason: string): void;
}

/** Where and how to open an HTTP transport. */
export interface HttpOptions {
  base: string;
  token: string;
  channels: string[];
  cursor: string | null;
  fetch: typeof fetch;
}

/** Close codes standing for HTTP refusals before a stream starts (docs/protocol.md, "Close codes"). */
export function statusCode(status: number): number {
  if (status === 401) return 4001; // token missing, invalid, expired, revoked
  if (status === 403) return 4003; // origin refused, channel not granted
  if (status === 429) return 4008; // the user's connection cap
  if (status === 503) return 1013; // draining, or at the global cap: try again later
  return 1006; // e.g. 404 from a server without this transport: try the next one
}

/** Error codes for a refused `POST /sse/commands`. */
function commandError(status: number): string {
  if (status === 400 || status === 413) return "bad_request";
  if (status === 401 || status === 403) return "forbidden";
  if (status === 429) return "rate_limited";
  return "unavailable";
}

export class WebSocketTransport implements Transport {
  readonly name = "websocket" as const;
  readonly framed = true;
  private ws: WebSocketLike | null;

  constructor(WS: WebSocketConstructor, url: string, h: TransportHandlers) {
    const ws = (this.ws = new WS(url));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => h.onOpen();
    ws.onmessage = (ev: { data: unknown }) => {
      h.onActivity();
      let raw = ev.data;
      if (typeof raw !== "string") {
        // binary frames are not part of v1; decode ArrayBuffers defensively
        if (!raw || typeof (raw as ArrayBuffer).byteLength !== "number") return;
        raw = new TextDecoder().decode(raw as ArrayBuffer);
      }
      for (const line of (raw as string).split("\n")) {
        if (this.ws !== ws) return;
        const f = parse(line);
        if (f) h.onFrame(f);
      }
    };
    ws.onclose = (ev: { code: number; reason: string }) => {
      if (this.ws === ws) {
        this.detach();
        h.onClose(ev.code, ev.reason);
      }
    };
    ws.onerror = () => {};
  }

  send(msg: object): void {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(msg)); // 1 = OPEN
  }

  close(code: number, reason: string): void {
    const ws = this.ws;
    this.detach();
    if (ws) {
      // closing a CONNECTING socket fails its handshake with an error event; the
      // `ws` package (Node) throws an error event that has no listener
      ws.onerror = () => {};
      try {
        ws.close(code, reason);
      } catch {
        /* already closed, or a code the implementation refuses */
      }
    }
  }

  private detach(): void {
    const ws = this.ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this.ws = null;
  }
}

function parse(line: string): Frame | null {
  if (!line.trim()) return null;
  try {
    const f = JSON.parse(line);
    return f && typeof f === "object" && !Array.isArray(f) ? (f as Frame) : null;
  } catch {
    return null;
  }
}

export class HttpTransport implements Transport {
  readonly framed = false;
  private dead = false;
  private abort = new AbortController();
  private session: string | null = null;
  private queue: object[] = [];
  private posting = false;
  // the text/event-stream event being assembled
  private event = "";
  private data: string[] = [];

  constructor(
    readonly name: "http_stream" | "sse",
    private o: HttpOptions,
    private h: TransportHandlers,
  ) {
    this.run().catch((err) => this.end(1006, String((err && err.message) || err)));
  }

  send(msg: object): void {
    this.queue.push(msg);
    this.pump();
  }

  close(): void {
    this.dead = true;
    this.abort.abort();
  }

  private end(code: number, reason: string): void {
    if (this.dead) return;
    this.close();
    this.h.onClose(code, reason);
  }

  private async run(): Promise<void> {
    const o = this.o;
    const headers: Record<string, string> = { Authorization: "Bearer " + o.token };
    let url: string;
    let init: RequestInit;
    if (this.name === "sse") {
      const q = new URLSearchParams();
      for (const c of o.channels) q.append("channel", c);
      if (o.cursor !== null) q.set("last_event_id", o.cursor);
      const qs = q.toString();
      url = o.base + "/sse" + (qs ? "?" + qs : "");
      headers.Accept = "text/event-stream";
      init = { headers, cache: "no-store" };
    } else {
      url = o.base + "/stream";
      headers["Content-Type"] = "application/json";
      headers.Accept = "application/x-ndjson";
      const body: { channels: string[]; last_event_id?: string } = { channels: o.channels };
      if (o.cursor !== null) body.last_event_id = o.cursor;
      init = { method: "POST", headers, body: JSON.stringify(body), cache: "no-store" };
    }
    init.signal = this.abort.signal;
    let res: Response;
    try {
      res = await o.fetch(url, init);
    } catch (err) {
      return this.end(1006, "network error");
    }
    if (this.dead) return;
    if (res.status !== 200 || !res.body) {
      const text = (await res.text().catch(() => "")).trim().slice(0, 200);
      return this.end(statusCode(res.status), "HTTP " + res.status + (text ? ": " + text : ""));
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      let chunk: ReadableStreamReadResult<Uint8Array>;
      try {
        chunk = await reader.read();
      } catch {
        return this.end(1006, "connection lost");
      }
      if (this.dead) return;
      if (chunk.done) return this.end(1006, "stream ended");
      this.h.onActivity();
      buf += decoder.decode(chunk.value, { stream: true });
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0 && !this.dead) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (this.name === "sse") this.sseLine(line);
        else this.frame(parse(line));
      }
    }
  }

  /**
   * One line of text/event-stream (WHATWG HTML 9.2.6): fields build an event, a blank line ends
   * it. `event:` names the frame type (none: a `message`), `data:` lines hold the frame; `id:` is
   * the `<epoch>:<seq>` of a message, which its frame carries too, and comments are heartbeats.
   */
  private sseLine(line: string): void {
    if (line === "") {
      const data = this.data, event = this.event;
      this.data = [];
      this.event = "";
      if (!data.length) return;
      const f = parse(data.join("\n"));
      if (f && !f.type) f.type = event || "message";
      return this.frame(f);
    }
    if (line[0] === ":") return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
  }

  private frame(f: Frame | null): void {
    if (!f || this.dead) return;
    if (f.type === "close") {
      return this.end(typeof f.code === "number" ? f.code : 1006, typeof f.reason === "string" ? f.reason : "");
    }
    if (f.type === "welcome" && typeof f.session === "string") {
      this.session = f.session;
      this.pump();
    }
    this.h.onFrame(f);
  }

  /** Send the queued commands: one POST at a time, in order. */
  private async pump(): Promise<void> {
    if (this.posting || this.dead || this.session === null || !this.queue.length) return;
    const commands = this.queue;
    this.queue = [];
    this.posting = true;
    let status = 0, retryAfter: number | undefined;
    try {
      const res = await this.o.fetch(this.o.base + "/sse/commands", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ session: this.session, commands }),
        cache: "no-store",
        signal: this.abort.signal,
      });
      status = res.status;
      retryAfter = Number(res.headers.get("Retry-After")) || undefined;
      await res.body?.cancel().catch(() => {});
    } catch {
      status = 0;
    }
    this.posting = false;
    if (this.dead) return;
    if (status === 404) return this.end(1006, "session closed");
    if (status < 200 || status >= 300) {
      const code = commandError(status);
      for (const c of commands as Frame[]) {
        if (c.id !== undefined) {
          this.h.onFrame({ type: "error", code, id: c.id, channel: c.channel, message: "POST /sse/commands: " + (status ? "HTTP " + status : "network error"), retry_after: retryAfter });
        }
      }
    }
    this.pump();
  }
}
