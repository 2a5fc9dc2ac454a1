/*
 * pushsvc demo page (served by `pushsvc serve --dev`): a chat and a protocol console over one
 * PushsvcClient (static/pushsvc.js, public API only).
 *
 * Chat: room R is channel chat.R. Joining subscribes with since: 0 (the history the stream still
 * holds, then live); a message is published with op "publish" as data {user, text, ts} where user
 * is the `sub` of the connection's token (from `welcome`) and ts the sender's clock in ms. The name
 * shown is the one pushsvc stamps on the message (`publisher.user`, the sender's verified token
 * `sub`; the handler's ctx.publisher) whatever data.user claims; only a message without a stamp
 * (an API-key emit, `nats pub push.chat.room1 ...`, or a client library that does not pass
 * `publisher` on) falls back to data.user, marked as not verified in its tooltip.
 * Who is here: for the shown room, the users present (client.presence() when the room is
 * joined, then the "join"/"leave" events; `pushsvc serve --dev` turns both on for chat.>). Events
 * arriving while the presence answer is on its way are applied after it, in order.
 * Console: subscribe/publish on any channel; every WebSocket frame in both directions (tokens
 * redacted), seen through the client's `WebSocket` option.
 * Tokens: a dev token for the name from GET dev/token (renewed by the client), or a pasted token,
 * which is used as it is: when the server refuses it (4001) the page says so and stops.
 * Name, rooms and tab are kept per browser tab in sessionStorage.
 */
(function () {
  "use strict";

  var $ = function (id) { return document.getElementById(id); };
  var NAME_RE = /^[A-Za-z0-9_-]{1,32}$/, ROOM_RE = /^[A-Za-z0-9_-]{1,64}$/;
  var MAX_ITEMS = 500, MAX_LOG = 1000;
  var store = window.sessionStorage;

  // Close codes in words (docs/protocol.md, "Close codes").
  var CLOSE_WORDS = {
    1000: "closed by the server",
    1001: "server going away",
    1006: "connection lost",
    1009: "frame too big",
    1011: "server error",
    1012: "server restarting",
    4001: "token refused: missing, invalid or expired",
    4003: "forbidden",
    4008: "rate limited",
    4009: "too slow to keep up",
    4010: "no heartbeat"
  };

  var ADJECTIVES = ["amber", "brave", "calm", "deft", "eager", "fuzzy", "gentle", "happy", "jolly", "keen",
    "lucky", "merry", "nimble", "plucky", "quiet", "rapid", "sunny", "swift", "tidy", "witty"];
  var ANIMALS = ["otter", "badger", "heron", "lynx", "panda", "falcon", "gecko", "koala", "lemur", "marten",
    "newt", "ocelot", "puffin", "quokka", "raven", "seal", "tapir", "vole", "walrus", "yak"];
  function pick(list) { return list[Math.floor(Math.random() * list.length)]; }
  function randomName() { return pick(ADJECTIVES) + "-" + pick(ANIMALS) + "-" + (10 + Math.floor(Math.random() * 90)); }

  function clock(ms) { return new Date(ms).toLocaleTimeString(); }
  function load(key, fallback) {
    try { var v = JSON.parse(store.getItem("pushsvc-demo:" + key)); return v == null ? fallback : v; } catch (e) { return fallback; }
  }
  function save(key, value) { try { store.setItem("pushsvc-demo:" + key, JSON.stringify(value)); } catch (e) { /* private mode */ } }

  var wsUrl = new URL("ws", location.href);
  wsUrl.protocol = location.protocol === "https:" ? "wss:" : "ws:";

  // ---- console log --------------------------------------------------------------------------

  function logLine(cls, text, dir) {
    var ul = $("log"), li = document.createElement("li");
    var stick = ul.scrollTop + ul.clientHeight >= ul.scrollHeight - 4;
    li.className = cls;
    if (dir) { var d = document.createElement("span"); d.className = "dir"; d.textContent = dir; li.appendChild(d); }
    li.appendChild(document.createTextNode(text));
    ul.appendChild(li);
    while (ul.children.length > MAX_LOG) ul.removeChild(ul.firstChild);
    if (stick) ul.scrollTop = ul.scrollHeight;
  }
  function spaced(obj) { return JSON.stringify(obj, null, 1).replace(/\n\s*/g, " "); } // wraps at spaces
  function logFrame(direction, raw) {
    if (typeof raw !== "string") { logLine(direction, "[binary frame, " + (raw.byteLength || raw.size || 0) + " bytes]", direction === "in" ? "\u2190" : "\u2192"); return; }
    raw.split("\n").forEach(function (line) {
      if (!line.trim()) return;
      var f = null;
      try { f = JSON.parse(line); } catch (e) { /* shown raw */ }
      if (f && (f.type === "ping" || f.op === "pong") && !$("show-pings").checked) return;
      if (f && typeof f.token === "string") f.token = "<redacted " + f.token.length + " chars>";
      logLine(direction, f ? spaced(f) : line, direction === "in" ? "\u2190" : "\u2192");
    });
  }

  /** The WebSocket the client opens, with every frame copied to the console (client option `WebSocket`). */
  function TappedWebSocket(url, protocols) {
    var ws = protocols === undefined ? new WebSocket(url) : new WebSocket(url, protocols);
    var send = ws.send.bind(ws);
    ws.send = function (data) { logFrame("out", data); send(data); };
    ws.addEventListener("message", function (ev) { logFrame("in", ev.data); });
    return ws;
  }

  // ---- connection badge ---------------------------------------------------------------------

  var ticker = null;
  function setBadge(state, text, delay, code) {
    var el = $("status");
    clearInterval(ticker); ticker = null;
    el.dataset.state = state;
    if (code) el.dataset.code = code; else delete el.dataset.code;
    var idle = state === "disconnected" || state === "stopped";
    $("disconnect").hidden = idle;
    $("connect").textContent = idle ? "Connect" : "Reconnect";
    $("connect").title = idle ? "" : "connect again with the name and token above";
    if (delay == null) { el.textContent = text; return; }
    var deadline = Date.now() + delay * 1000;
    var render = function () {
      var left = (deadline - Date.now()) / 1000;
      el.textContent = text + (left > 0.05 ? ", reconnecting in " + left.toFixed(1) + " s" : ", reconnecting now\u2026");
      if (left <= 0.05) { clearInterval(ticker); ticker = null; }
    };
    render();
    ticker = setInterval(render, 100);
  }
  function note(text) { $("identity-note").textContent = text || ""; }

  // ---- chat state ---------------------------------------------------------------------------

  // name -> {name, channel, sub, items: <li>s (detached when not shown), unread, lastSeq, epoch, joined,
  //          members: Map(client id -> user) | null (presence unknown), early: events while loading | null}
  var rooms = new Map();
  var current = null;
  var client = null, pasted = false, wasConnected = false, me = null;

  function saveRooms() { save("rooms", Array.from(rooms.keys())); save("room", current ? current.name : null); }

  function renderRooms() {
    var ul = $("rooms");
    ul.textContent = "";
    rooms.forEach(function (room) {
      var li = document.createElement("li"), btn = document.createElement("button"), name = document.createElement("span"), n = document.createElement("span");
      btn.type = "button"; btn.dataset.room = room.name;
      btn.setAttribute("aria-current", room === current ? "true" : "false");
      name.textContent = "#" + room.name;
      n.className = "unread"; n.textContent = room.unread ? String(room.unread) : "";
      btn.appendChild(name); btn.appendChild(n);
      btn.addEventListener("click", function () { showRoom(room); });
      li.appendChild(btn); ul.appendChild(li);
    });
    $("room-title").textContent = current ? "#" + current.name : "no room";
    $("room-channel").textContent = current ? current.channel : "join a room to chat";
    $("leave").hidden = !current;
    $("send").disabled = $("text").disabled = !current;
    renderMembers();
  }

  // ---- who is here (presence + join/leave) --------------------------------------------------

  function renderMembers() {
    var ul = $("members"), count = $("member-count"), room = current;
    ul.textContent = "";
    if (!room || !room.members) { count.textContent = room && room.presenceError ? "(" + room.presenceError + ")" : ""; return; }
    var users = new Map(); // user -> sessions
    room.members.forEach(function (user) { users.set(user, (users.get(user) || 0) + 1); });
    count.textContent = "(" + users.size + ")";
    Array.from(users.keys()).sort().forEach(function (user) {
      var li = document.createElement("li");
      li.textContent = user;
      li.dataset.user = user;
      if (user === me) li.className = "me";
      var n = users.get(user);
      if (n > 1) { var s = document.createElement("span"); s.className = "sessions muted"; s.textContent = "\u00d7" + n; li.appendChild(s); }
      ul.appendChild(li);
    });
  }

  function applyEvent(room, e) {
    if (e.type === "join") room.members.set(e.client, e.user); else room.members.delete(e.client);
  }

  function loadPresence(room) {
    var c = client;
    room.members = null; room.early = []; room.presenceError = null;
    c.presence(room.channel).then(function (p) {
      if (c !== client || rooms.get(room.name) !== room) return;
      room.members = new Map();
      p.clients.forEach(function (m) { room.members.set(m.client, m.user); });
      room.early.forEach(function (e) { applyEvent(room, e); });
      room.early = null;
      if (room === current) renderMembers();
    }, function (err) {
      if (c !== client || rooms.get(room.name) !== room) return;
      room.early = null; room.presenceError = err.code === "bad_request" ? "presence off" : (err.code || "unavailable");
      if (room === current) renderMembers();
    });
  }

  function onMemberEvent(type, e) {
    var room = e.channel.slice(0, 5) === "chat." ? rooms.get(e.channel.slice(5)) : null;
    if (!room || room.channel !== e.channel) return;
    var ev = { type: type, client: e.client, user: e.user };
    if (room.early) room.early.push(ev);
    else if (room.members) { applyEvent(room, ev); if (room === current) renderMembers(); }
  }

  function showRoom(room) {
    var ol = $("messages");
    current = room;
    ol.textContent = "";
    if (room) { room.unread = 0; room.items.forEach(function (li) { ol.appendChild(li); }); ol.scrollTop = ol.scrollHeight; }
    renderRooms(); saveRooms();
  }

  function addItem(room, li) {
    room.items.push(li);
    if (room.items.length > MAX_ITEMS) { var old = room.items.shift(); if (old.parentNode) old.parentNode.removeChild(old); }
    if (room !== current) { room.unread++; renderRooms(); return; }
    var ol = $("messages"), stick = ol.scrollTop + ol.clientHeight >= ol.scrollHeight - 8;
    ol.appendChild(li);
    if (stick || li.classList.contains("mine")) ol.scrollTop = ol.scrollHeight;
  }

  function notice(room, text, isError) {
    var li = document.createElement("li");
    li.className = "notice" + (isError ? " error" : "");
    li.textContent = text;
    addItem(room, li);
  }

  /** {who, verified, text, ts}: what a chat message says; who is the server's stamp when it has one. */
  function describe(data, ctx) {
    var m = { who: null, verified: false, text: null, ts: null };
    if (ctx.encoding === "base64") m.text = "[binary data, base64: " + data.length + " chars]";
    else if (data && typeof data === "object" && !Array.isArray(data)) {
      if (typeof data.user === "string") m.who = data.user;
      if (typeof data.ts === "number" && isFinite(data.ts)) m.ts = data.ts;
      m.text = typeof data.text === "string" ? data.text : JSON.stringify(data);
    } else m.text = typeof data === "string" ? data : JSON.stringify(data);
    var publisher = ctx.publisher; // {user, client?}: stamped by pushsvc from the sender's token
    if (publisher && typeof publisher.user === "string") { m.who = publisher.user; m.verified = true; }
    return m;
  }

  function onChatMessage(room, data, ctx) {
    var m = describe(data, ctx);
    var li = document.createElement("li"), meta = document.createElement("div"), who = document.createElement("span");
    var time = document.createElement("time"), text = document.createElement("div");
    li.className = "msg" + (m.who !== null && m.who === me ? " mine" : "");
    if (ctx.seq !== null) { li.dataset.seq = ctx.seq; room.lastSeq = ctx.seq; room.epoch = ctx.epoch || null; }
    meta.className = "meta"; who.className = "who"; text.className = "text";
    who.textContent = m.who !== null ? m.who : "(no name)";
    who.title = m.verified ? "sender verified by pushsvc (publisher.user)" : "name claimed by the message (not verified)";
    var at = m.ts !== null ? m.ts : Date.now();
    time.dateTime = new Date(at).toISOString();
    time.textContent = clock(at);
    time.title = m.ts !== null ? "sent (sender's clock)" : "received";
    meta.appendChild(who); meta.appendChild(time);
    if (ctx.seq !== null) { var seq = document.createElement("span"); seq.className = "seq"; seq.title = "stream sequence"; seq.textContent = "seq " + ctx.seq; meta.appendChild(seq); }
    text.textContent = m.text;
    li.appendChild(meta); li.appendChild(text);
    addItem(room, li);
  }

  function subscribeRoom(room) {
    if (!client) return;
    var position = room.lastSeq !== null ? { since: room.lastSeq } : { since: 0 }; // since 0: the whole history
    if (room.lastSeq !== null && room.epoch) position.epoch = room.epoch;
    var sub = room.sub = client.subscribe(room.channel, function (data, ctx) { onChatMessage(room, data, ctx); }, position);
    sub.ready.catch(function (err) {
      if (room.sub !== sub) return;
      notice(room, "could not join " + room.channel + ": " + (err.code ? err.code + ": " : "") + err.message, true);
      room.sub = null;
    });
  }

  function joinRoom(name, show) {
    var room = rooms.get(name);
    if (!room) {
      room = { name: name, channel: "chat." + name, sub: null, items: [], unread: 0, lastSeq: null, epoch: null, joined: false,
        members: null, early: null, presenceError: null };
      rooms.set(name, room);
      subscribeRoom(room);
    }
    if (show || !current) showRoom(room); else { renderRooms(); saveRooms(); }
    return room;
  }

  function leaveRoom(room) {
    if (room.sub) room.sub.unsubscribe().catch(function () { /* gone with the connection */ });
    room.sub = null;
    rooms.delete(room.name);
    showRoom(rooms.size ? rooms.values().next().value : null);
  }

  // ---- console subscriptions ----------------------------------------------------------------

  var consoleSubs = new Map(); // channel -> {since, sub}

  function subscribeConsole(channel, entry) {
    if (!client) return;
    var sub = entry.sub = client.subscribe(channel, function () { /* frames are shown by the tap */ },
      entry.since !== null ? { since: entry.since } : undefined);
    sub.ready.catch(function () { // the error itself is logged by the "error" listener
      if (consoleSubs.get(channel) === entry && entry.sub === sub) { consoleSubs.delete(channel); renderSubs(); }
    });
  }

  function renderSubs() {
    var ul = $("subs");
    ul.textContent = "";
    consoleSubs.forEach(function (entry, channel) {
      var li = document.createElement("li"), btn = document.createElement("button");
      li.textContent = channel;
      btn.type = "button"; btn.title = "unsubscribe"; btn.setAttribute("aria-label", "unsubscribe " + channel); btn.textContent = "\u00d7";
      btn.addEventListener("click", function () {
        consoleSubs.delete(channel); renderSubs();
        if (entry.sub) entry.sub.unsubscribe().catch(function (e) { logLine("error", "unsubscribe " + channel + " failed: " + e.message); });
      });
      li.appendChild(btn); ul.appendChild(li);
    });
  }

  // ---- the connection -----------------------------------------------------------------------

  async function devToken(name) {
    var r = await fetch("dev/token?user=" + encodeURIComponent(name), { cache: "no-store" });
    if (!r.ok) throw new Error("GET dev/token: HTTP " + r.status + (r.status === 404 ? " (is the server running with --dev?)" : ""));
    var j = await r.json();
    logLine("event", "dev token for " + j.user + ", valid " + j.ttl + " s (until " + clock(Date.now() + j.ttl * 1000) + ")");
    return j.token;
  }

  function describeClose(d) {
    if (d.code === 4001 && d.reason === "getToken failed") return "could not get a dev token";
    return (CLOSE_WORDS[d.code] || "closed") + " (" + d.code + ")";
  }

  function wire(c) {
    var mine = function (fn) { return function (arg) { if (c === client) fn(arg); }; };
    c.on("connected", mine(function (w) {
      me = w.user;
      setBadge("connected", (wasConnected ? "reconnected as " : "connected as ") + w.user);
      wasConnected = true;
      var exp = typeof w.exp === "number" ? clock(w.exp * 1000) : null;
      note(pasted ? "Using your token for " + w.user + (exp ? "; it expires at " + exp + " (not renewed)." : ".")
        : "Using a dev token for " + w.user + (exp ? ", renewed before it expires at " + exp + "." : "."));
      logLine("event", "welcome: client " + w.client + ", user " + w.user + ", ping every " + w.ping_interval + " s" +
        (exp ? ", token expires " + exp : ""));
    }));
    c.on("disconnected", mine(function (d) {
      if (d.code === 1000 && d.reason === "client close") {
        setBadge("disconnected", "disconnected"); wasConnected = false;
        logLine("event", "disconnected by you");
        return;
      }
      var words = describeClose(d);
      if (d.willReconnect) setBadge("reconnecting", words, d.delay, d.code);
      else {
        setBadge("stopped", words + ", not reconnecting", null, d.code);
        wasConnected = false;
        if (d.code === 4001) note("The server refused the token (4001). Paste a valid one, or clear the token field to use a dev token, then Connect.");
        else if (d.code === 4003) note("The server refused this page (4003 forbidden); check PUSHSVC_ALLOWED_ORIGINS.");
      }
      logLine("event", "closed " + d.code + (d.reason ? " (" + d.reason + ")" : "") + ": " + words +
        (d.willReconnect ? ", reconnecting in " + d.delay.toFixed(1) + " s" : ", not reconnecting"));
    }));
    c.on("error", mine(function (e) {
      logLine("error", "error " + (e.code || "") + (e.channel ? " [" + e.channel + "]" : "") + ": " + e.message +
        (e.retryAfter ? " (retry after " + e.retryAfter + " s)" : ""));
    }));
    c.on("subscribed", mine(function (f) {
      var room = rooms.get(f.channel.slice(5));
      if (f.channel.slice(0, 5) === "chat." && room && room.channel === f.channel) {
        if (!room.joined) { room.joined = true; notice(room, "joined " + f.channel + " as " + me); }
        else if (f.recovered === false) notice(room, "messages sent while you were away may be missing (history expired or was reset)", true);
        loadPresence(room);
      }
    }));
    c.on("disconnected", mine(function () { // unknown until the rooms are joined again
      rooms.forEach(function (room) { room.members = null; room.early = null; });
      renderMembers();
    }));
    c.on("join", mine(function (e) { onMemberEvent("join", e); }));
    c.on("leave", mine(function (e) { onMemberEvent("leave", e); }));
    c.on("unsubscribed", mine(function (f) {
      if (!f.reason) return;
      var room = f.channel.slice(0, 5) === "chat." ? rooms.get(f.channel.slice(5)) : null;
      if (room && room.channel === f.channel) { notice(room, "removed from " + f.channel + " by the server (" + f.reason + ")", true); room.sub = null; }
      if (consoleSubs.has(f.channel)) { consoleSubs.delete(f.channel); renderSubs(); }
    }));
  }

  function connect() {
    var name = $("user").value.trim(), token = $("token").value.trim();
    if (!token && !NAME_RE.test(name)) { note("A name is 1 to 32 letters, digits, _ or -."); $("user").focus(); return; }
    if (client) { var old = client; client = null; old.close(); }
    save("name", name);
    pasted = !!token; wasConnected = false; me = pasted ? null : name;
    note("");
    var options = { url: wsUrl.href, WebSocket: TappedWebSocket, debug: /[?&]debug\b/.test(location.search),
                    transports: [$("transport").value] };
    if (pasted) options.token = token; // used as it is: a refusal (4001) stops the client
    else options.getToken = function () { return devToken(name); };
    client = new PushsvcClient(options);
    window.pushsvcDemoClient = client; // handy from the devtools console
    wire(client);
    rooms.forEach(function (room) { room.joined = false; subscribeRoom(room); });
    consoleSubs.forEach(function (entry, channel) { subscribeConsole(channel, entry); });
    setBadge("connecting", "connecting\u2026");
    client.connect();
  }

  // ---- controls -----------------------------------------------------------------------------

  $("connect-form").addEventListener("submit", function (ev) { ev.preventDefault(); connect(); });
  $("disconnect").addEventListener("click", function () { if (client) client.close(); });

  $("join-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var name = $("room").value.trim().replace(/^#/, "");
    if (!ROOM_RE.test(name)) { $("room").setCustomValidity("letters, digits, _ and -"); $("room").reportValidity(); return; }
    joinRoom(name, true);
    $("room").value = "";
  });
  $("room").addEventListener("input", function () { $("room").setCustomValidity(""); });
  $("leave").addEventListener("click", function () { if (current) leaveRoom(current); });

  $("send-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var room = current, text = $("text").value.trim();
    if (!room || !text) return;
    if (!client || !client.connected) { notice(room, "not sent (not connected): " + text, true); return; }
    $("send").disabled = true;
    client.publish(room.channel, { user: me, text: text, ts: Date.now() }).then(function () {
      if ($("text").value.trim() === text) $("text").value = "";
    }, function (e) {
      notice(room, "not sent (" + (e.code ? e.code + ": " : "") + e.message + "): " + text, true);
    }).then(function () { $("send").disabled = !current; $("text").focus(); });
  });

  $("subscribe-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var channel = $("channel").value.trim(), since = $("since").value.trim();
    if (!channel) return;
    if (consoleSubs.has(channel)) { logLine("event", "already subscribed to " + channel); return; }
    var entry = { since: since === "" ? null : Number(since), sub: null };
    consoleSubs.set(channel, entry);
    renderSubs();
    subscribeConsole(channel, entry);
    if (!client || !client.connected) logLine("event", "subscription to " + channel + " will be sent once connected");
  });

  $("publish-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var channel = $("pub-channel").value.trim(), data;
    try { data = JSON.parse($("pub-data").value); } catch (e) { logLine("error", "data is not valid JSON: " + e.message); return; }
    if (!client) { logLine("error", "not connected"); return; }
    client.publish(channel, data).then(function (f) {
      logLine("event", "published to " + channel + (f.seq != null ? " (seq " + f.seq + ")" : ""));
    }, function (e) {
      logLine("error", "publish to " + channel + " failed: " + (e.code ? e.code + ": " : "") + e.message);
    });
  });
  $("clear-log").addEventListener("click", function () { $("log").textContent = ""; });

  function selectTab(which) {
    ["chat", "console"].forEach(function (t) {
      $("tab-" + t).setAttribute("aria-selected", t === which ? "true" : "false");
      $("panel-" + t).hidden = t !== which;
    });
    save("tab", which);
  }
  $("tab-chat").addEventListener("click", function () { selectTab("chat"); });
  $("tab-console").addEventListener("click", function () { selectTab("console"); });

  // ---- start: a name, the rooms of this tab, a dev-token connection ---------------------------

  $("user").value = load("name", null) || randomName();
  selectTab(load("tab", "chat") === "console" ? "console" : "chat");
  var saved = load("rooms", ["room1"]), shown = load("room", null);
  (Array.isArray(saved) ? saved : ["room1"]).forEach(function (name) { if (ROOM_RE.test(name)) joinRoom(name, name === shown); });
  renderRooms();
  connect();
})();
