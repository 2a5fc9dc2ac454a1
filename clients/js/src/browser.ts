/**
 * The browser build (dist/pushsvc.js, served by pushsvc at /static/pushsvc.js): a classic script
 * defining globalThis.PushsvcClient (with .Error, .UnauthorizedError, .Subscription), and
 * module.exports under CommonJS. Loaded from `<base>/static/pushsvc.js`, its default URL is that
 * `<base>`.
 */
import { PushsvcClient } from "./client.js";
import { setScriptBase } from "./url.js";

const doc = (globalThis as { document?: { currentScript?: { src?: string } | null } }).document;
setScriptBase(doc && doc.currentScript ? doc.currentScript.src : null);

(globalThis as { PushsvcClient?: typeof PushsvcClient }).PushsvcClient = PushsvcClient;
declare const module: { exports: unknown } | undefined;
if (typeof module !== "undefined" && module) module.exports = PushsvcClient;
