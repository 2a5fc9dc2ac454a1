/**
 * Where the server is. One option (`url`) names it: the base URL under which pushsvc serves its
 * routes (`PUSHSVC_BASE_PATH`), or the WebSocket endpoint `<base>/ws` (the form of earlier versions).
 */

/** The server's endpoints, derived from the `url` option or the page. */
export interface Endpoints {
  /** The WebSocket endpoint, ws(s)://host/base/ws. */
  ws: string;
  /** The HTTP base, http(s)://host/base (no trailing slash): `/sse`, `/stream`, `/sse/commands` hang below it. */
  http: string;
}

let scriptBase: string | null = null;

/** @internal The browser build records where it was loaded from (`<base>/static/pushsvc.js`). */
export function setScriptBase(src: string | null | undefined): void {
  const m = src ? /^(.*?)\/static\/pushsvc(\.min)?\.js([?#].*)?$/.exec(src) : null;
  if (m) scriptBase = m[1] + "/";
}

function pageBase(): string | null {
  if (scriptBase) return scriptBase;
  const doc = (globalThis as { document?: { baseURI?: string } }).document;
  if (doc && doc.baseURI && /^https?:/.test(doc.baseURI)) return doc.baseURI;
  const loc = (globalThis as { location?: { href?: string; host?: string } }).location;
  return loc && loc.host && loc.href ? loc.href : null;
}

/**
 * Endpoints for `url` (absolute, or relative to the page), or for the page itself when `url` is
 * not given: the base path the browser build was served under, else the page's folder, so a page
 * served at `https://host/push/` talks to `wss://host/push/ws`. Null outside a page without `url`.
 */
export function endpoints(url?: string): Endpoints | null {
  const page = pageBase();
  let u: URL;
  if (url) u = page ? new URL(url, page) : new URL(url);
  else if (page) u = new URL(".", page);
  else return null;
  u.hash = "";
  const secure = u.protocol === "wss:" || u.protocol === "https:";
  if (u.protocol === "ws:" || u.protocol === "wss:") {
    const ws = u.href;
    u.protocol = secure ? "https:" : "http:";
    u.search = "";
    u.pathname = u.pathname.replace(/\/[^/]*$/, ""); // <base>/ws -> <base>
    return { ws, http: u.href.replace(/\/$/, "") };
  }
  u.search = "";
  const http = u.href.replace(/\/$/, "");
  u.protocol = secure ? "wss:" : "ws:";
  u.pathname = u.pathname.replace(/\/?$/, "/ws");
  return { ws: u.href, http };
}
