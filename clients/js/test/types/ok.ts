// Must compile with `tsc --strict`: the typed API as an app uses it (imported by package name,
// so the package.json `exports` types are what is checked).
import {
  PushsvcClient,
  PushsvcError,
  UnauthorizedError,
  type ClientState,
  type MessageEvent,
  type PresenceFrame,
  type Subscription,
  type TransportName,
} from "pushsvc";
import NodeWebSocket from "ws";

// both WebSocket constructors fit the option: the browser's and the `ws` package's
new PushsvcClient({ url: "ws://127.0.0.1:8000/ws", WebSocket: NodeWebSocket });
new PushsvcClient({ url: "ws://127.0.0.1:8000/ws", WebSocket: globalThis.WebSocket, fetch: globalThis.fetch });

interface ChatMessage {
  user: string;
  text: string;
}

const transports: TransportName[] = ["websocket", "sse"];
const client = new PushsvcClient({
  url: "https://push.example.com/push",
  transports,
  getToken: async () => {
    const r = await fetch("/token");
    if (r.status === 401) throw new UnauthorizedError();
    return (await r.json()).token as string;
  },
});

client.on("message", (m) => {
  const seq: number | null = m.seq;
  const ch: string = m.channel;
  const p: string | null = m.pattern;
  void [seq, ch, p];
});
client.on("connected", (w) => console.log(w.client, w.user, w.exp.toFixed(0), w.subs?.length));
client.on("disconnected", (d) => console.log(d.code, d.reason, d.willReconnect, d.delay ?? "stopped"));
client.on("state", (s) => {
  const now: ClientState = s.newState;
  void now;
});
client.on("join", (e) => console.log(e.user, e.info));
client.on("error", (e) => {
  if (e instanceof PushsvcError) console.log(e.code, e.retryAfter, e.channel);
});
const off: () => void = client.on("subscribed", (f) => console.log(f.channel, f.recovered, f.epoch));
off();

const sub: Subscription<ChatMessage> = client.subscribe<ChatMessage>("chat.room1", (data, ctx) => {
  console.log(data.user, data.text, ctx.seq, ctx.epoch, ctx.pattern, ctx.encoding);
}, { since: 12, epoch: "63f1a2b4c5d6e" });
sub.on("state", (s) => console.log(s.channel, s.newState === "subscribed"));
client.connect();

async function main(): Promise<void> {
  const f = await sub.ready;
  console.log(f.recovered === true);
  const pub = await client.publish("chat.room1", { user: "ann", text: "hi" });
  console.log(pub.seq);
  const who: PresenceFrame = await client.presence("chat.room1");
  console.log(who.clients.map((c) => c.user), who.clients_total);
  const stats = await client.presenceStats("chat.room1");
  console.log(stats.clients + stats.users);
  const r = await client.refresh("new-token");
  console.log(r.exp);
  const u = await sub.unsubscribe();
  console.log(u?.channel);
  const bytes: Uint8Array = PushsvcClient.decodeBase64("AAEC");
  console.log(bytes.length, client.state, client.transport, client.connected);
  const last: MessageEvent | null = null;
  console.log(last);
  client.close();
}
void main();
