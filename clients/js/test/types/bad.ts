// Must NOT compile: each line marked `// error` is a mistake the types catch (test/types.test.mjs
// checks that tsc reports exactly these lines).
import { PushsvcClient } from "pushsvc";

const client = new PushsvcClient({ url: "wss://push.example.com/ws" });
client.subscribe(42, () => {}); // error
client.subscribe("news"); // error
client.on("message", (m) => m.sequence); // error
client.on("mesage", () => {}); // error
new PushsvcClient({ transports: ["websocket", "long_polling"] }); // error
new PushsvcClient({ getToken: () => "not a promise" }); // error
client.subscribe<{ n: number }>("news", (data) => data.text); // error
client.publish(); // error
const s: "open" | "closed" = client.state; // error
void s;
