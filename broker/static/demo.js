// The broker's demo page: start a session of the "demo" application, watch its state,
// its video and the echo round trips on its data channel. Exposed for tests as
// `window.demo` = { session, client, events, timings, roundTrips }.
import { BrokerClient } from "/client/broker-client.js";

const scriptStart = performance.now();
const KEY_STORAGE = "session-broker-demo-key";
const LOG_LIMIT = 300;
// Errors after which this page no longer follows the session.
const FINAL_CODES = new Set(["replaced", "session_not_found", "not_found", "origin_not_allowed",
  "no_credentials", "unauthorized"]);

const byId = (id) => document.getElementById(id);
const view = {
  key: byId("key"), keyForm: byId("key-form"), start: byId("start"), end: byId("end"),
  error: byId("error"), notice: byId("notice"), signaling: byId("signaling"),
  sessionId: byId("session-id"), state: byId("state"), reason: byId("reason"),
  tower: byId("tower"), negotiation: byId("negotiation"),
  video: byId("video"), videoPlaceholder: byId("video-placeholder"),
  chatForm: byId("chat-form"), chatInput: byId("chat-input"), chatSend: byId("chat-send"),
  chatLog: byId("chat-log"), rtt: byId("rtt"), log: byId("log"),
};

const demo = {
  session: null,
  client: null,
  events: [],
  roundTrips: [],
  // pageLoadToOpen: ms from navigation start (performance's time origin) to the first
  // "open" of the application's data channel; startToOpen: from the last Start click to
  // that session's first "open".
  timings: { scriptStart, pageLoadToOpen: null, startToOpen: null },
};
window.demo = demo;

let phase = "idle"; // idle, placing, live, ending
let startedAt = 0;
const pendingEchoes = new Map(); // the `t` of a sent message -> its chat entry

const GONE = "The session no longer exists on the broker.";
const MESSAGES = {
  unauthorized: () => "The broker refused this API key (401 unauthorized). Check the key: "
    + "the broker prints it when it starts and keeps it in api-key in its state directory.",
  too_many_sessions: () => "Too many sessions (429): this API key already has all the live "
    + "sessions it may have. End one, or wait for one to end, and try again.",
  no_tower: () => "No tower is ready to take a session (503). Try again in a moment.",
  towers_busy: () => "The towers are setting up many sessions at once (503). Try again in "
    + "a second.",
  unreachable: (error) => `The broker cannot be reached. Is it running? (${error.message})`,
  replaced: () => "Another signaling connection took over this session; this page stopped "
    + "following it.",
  session_not_found: () => GONE,
  not_found: () => GONE,
  origin_not_allowed: () => "The broker does not accept signaling from this page's origin.",
  invalid_token: () => "The broker refused the signaling token.",
  channel_not_open: () => "The data channel is not open (yet): wait for the session to connect.",
};

function describe(error) {
  if (Object.hasOwn(MESSAGES, error?.code ?? "")) return MESSAGES[error.code](error);
  if (error?.code) return `${error.message} (${error.code})`;
  return `Unexpected error: ${error?.message || error}`;
}

function plainError(error) {
  return { code: error?.code ?? error?.name ?? "error", message: String(error?.message ?? error),
    status: error?.status ?? null, fatal: error?.fatal ?? true };
}

function record(type, detail) {
  demo.events.push({ type, detail, at: performance.now(), time: new Date().toISOString() });
}

function log(text, kind = "info") {
  const item = document.createElement("li");
  item.className = `log-${kind}`;
  const time = document.createElement("time");
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = `${now.toLocaleTimeString([], { hour12: false })}.`
    + `${String(now.getMilliseconds()).padStart(3, "0")}`;
  const body = document.createElement("span");
  body.textContent = text;
  item.append(time, body);
  view.log.prepend(item);
  while (view.log.childElementCount > LOG_LIMIT) view.log.lastElementChild.remove();
}

function show(element, text) {
  element.textContent = text || "";
  element.hidden = !text;
}

function showState(state, reason = "") {
  view.state.textContent = state;
  view.state.dataset.state = state;
  view.reason.textContent = reason || "—";
}

function showSignaling(status) {
  view.signaling.dataset.signaling = status;
  view.signaling.textContent = `signaling: ${status}`;
}

function renderControls() {
  const channelOpen = demo.session?.channel?.readyState === "open" && phase === "live";
  view.start.disabled = phase !== "idle";
  view.start.textContent = phase === "placing" ? "Starting…" : "Start session";
  view.end.disabled = phase !== "live";
  view.end.textContent = phase === "ending" ? "Ending…" : "End session";
  view.key.disabled = phase !== "idle";
  view.chatInput.disabled = !channelOpen;
  view.chatSend.disabled = !channelOpen;
  view.chatInput.placeholder = channelOpen ? "A message to echo"
    : phase === "live" ? "Waiting for the data channel to open…" : "Start a session first";
}

function renderSession(session) {
  view.sessionId.textContent = session.id ?? "—";
  view.tower.textContent = session.tower ?? "—";
  view.negotiation.textContent = session.negotiation ? String(session.negotiation) : "—";
  showState(session.state, session.reason);
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

function chatEntry(kind, text) {
  const item = document.createElement("li");
  item.className = `chat-${kind}`;
  const body = document.createElement("span");
  body.className = "chat-text";
  body.textContent = text;
  const status = document.createElement("span");
  status.className = "chat-status";
  item.append(body, status);
  view.chatLog.prepend(item);
  return { item, status };
}

function sendChat(event) {
  event.preventDefault();
  const text = view.chatInput.value.trim();
  if (!text || !demo.session) return;
  const t = performance.now();
  try {
    demo.session.send(JSON.stringify({ t, text }));
  } catch (error) {
    show(view.notice, describe(error));
    return;
  }
  const entry = chatEntry("sent", `sent: ${text}`);
  entry.status.textContent = "waiting for the echo…";
  pendingEchoes.set(t, entry);
  view.chatInput.value = "";
  view.chatInput.focus();
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function receiveChat(data) {
  const now = performance.now();
  const text = typeof data === "string" ? data : `(${data.byteLength ?? data.size} bytes)`;
  const message = parseJson(text);
  if (typeof message?.t !== "number") {
    chatEntry("received", `received: ${text}`);
    return;
  }
  const roundTrip = now - message.t;
  demo.roundTrips.push(roundTrip);
  const sent = pendingEchoes.get(message.t);
  pendingEchoes.delete(message.t);
  if (sent) sent.status.textContent = "echoed";
  const echo = chatEntry("echo", `echo: ${message.text ?? ""}`);
  echo.status.textContent = `${roundTrip.toFixed(1)} ms`;
  view.rtt.textContent = `${median(demo.roundTrips).toFixed(1)} ms `
    + `(${demo.roundTrips.length} echo${demo.roundTrips.length === 1 ? "" : "es"})`;
}

function channelOpened() {
  const now = performance.now();
  demo.timings.pageLoadToOpen ??= now;
  if (demo.timings.startToOpen === null) {
    demo.timings.startToOpen = now - startedAt;
    log(`data channel open (${Math.round(demo.timings.startToOpen)} ms after Start)`, "good");
  } else {
    log(`data channel open again (negotiation ${demo.session.negotiation})`, "good");
  }
  show(view.notice, "");
  renderControls();
}

function showVideo(session, reload = false) {
  // Reassigning the same stream reloads the element, which then plays the new tracks.
  if (reload || view.video.srcObject !== session.stream) view.video.srcObject = session.stream;
  const hasVideo = session.stream.getVideoTracks().length > 0;
  view.videoPlaceholder.hidden = hasVideo;
  if (hasVideo) view.video.play().catch(() => {});
}

function follow(session) {
  const on = (type, handler) => session.addEventListener(type, (event) => {
    if (demo.session === session) handler(event.detail);
  });
  on("state", (detail) => {
    record("state", detail);
    renderSession(session);
    log(`state ${detail.state}, negotiation ${detail.negotiation}, tower ${detail.tower}`
      + (detail.reason ? ` (${detail.reason})` : ""), detail.state === "connected" ? "good" : "info");
    if (detail.state === "repairing") show(view.notice, `Repairing the session: ${detail.reason}`);
    if (detail.state === "negotiating" && detail.negotiation > 1) {
      show(view.notice, `Negotiating again (negotiation ${detail.negotiation})…`);
    }
    if (detail.state === "connected") show(view.notice, "");
  });
  on("peerconnection", () => {
    log(`new peer connection (negotiation ${session.negotiation})`);
    for (const entry of pendingEchoes.values()) entry.status.textContent = "lost in the repair";
    pendingEchoes.clear();
    renderControls();
    showVideo(session);
  });
  on("track", ({ track }) => {
    log(`incoming ${track.kind} track`);
    showVideo(session, true);
  });
  on("open", channelOpened);
  on("message", ({ data }) => receiveChat(data));
  on("error", ({ error }) => {
    record("error", { error: plainError(error) });
    log(`error ${error.code}: ${error.message}`, error.fatal ? "error" : "warn");
    if (FINAL_CODES.has(error.code)) show(view.error, describe(error));
    else if (error.fatal) show(view.notice, `${describe(error)} Reconnecting…`);
  });
  on("signaling", ({ connected }) => {
    record("signaling", { connected });
    showSignaling(connected ? "connected" : "reconnecting");
    log(connected ? "signaling connected" : "signaling lost; reconnecting", connected ? "info" : "warn");
    if (!connected) show(view.notice, "Lost the signaling connection to the broker; reconnecting…");
    else show(view.notice, session.state === "connected" ? "" : "Signaling connected; negotiating…");
  });
  on("closed", (detail) => {
    record("closed", detail);
    phase = "idle";
    renderSession(session);
    showState(detail.state === "failed" ? "failed" : "closed", detail.reason);
    showSignaling("idle");
    show(view.notice, "");
    view.video.srcObject = null;
    view.videoPlaceholder.hidden = false;
    if (detail.state === "failed") show(view.error, `The session failed for good: ${detail.reason}`);
    log(`session ended: ${detail.reason}`, detail.state === "failed" ? "error" : "info");
    renderControls();
  });
}

async function start() {
  if (phase !== "idle") return;
  const apiKey = view.key.value.trim();
  if (!apiKey) {
    show(view.error, "Enter the API key first: the broker prints it when it starts.");
    view.key.focus();
    return;
  }
  storedKey(apiKey);
  phase = "placing";
  startedAt = performance.now();
  demo.timings.startToOpen = null;
  show(view.error, "");
  show(view.notice, "Asking the broker for a session…");
  view.sessionId.textContent = view.tower.textContent = view.negotiation.textContent = "—";
  view.rtt.textContent = "—";
  view.chatLog.replaceChildren();
  demo.roundTrips.length = 0;
  pendingEchoes.clear();
  showState("placing");
  renderControls();
  log("placing a session (application demo, with video)…");
  if (demo.client?.apiKey !== apiKey) demo.client = new BrokerClient({ apiKey });
  const { client } = demo;
  let session;
  try {
    session = await client.startSession({ application: "demo", video: true });
  } catch (error) {
    phase = "idle";
    record("error", { error: plainError(error) });
    showState("idle");
    show(view.notice, "");
    show(view.error, describe(error));
    log(`could not start: ${error.code ?? error.name}: ${error.message}`, "error");
    renderControls();
    return;
  }
  demo.session = session;
  phase = "live";
  follow(session);
  renderSession(session);
  showSignaling("connecting");
  show(view.notice, "Connecting to the tower…");
  showVideo(session);
  log(`session ${session.id} placed on ${session.tower}`);
  if (session.channel?.readyState === "open") channelOpened();
  renderControls();
}

async function end() {
  const session = demo.session;
  if (phase !== "live" || !session) return;
  phase = "ending";
  renderControls();
  show(view.notice, "Ending the session…");
  log("ending the session…");
  await session.close();
  phase = "idle";
  show(view.notice, "");
  renderControls();
}

// Storage may be disabled (then the key field alone holds the key).
function storedKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return key ?? null;
  }
}

function takeKey() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const key = fragment.get("key");
  // Keep the key out of the address bar, the history and anything copied from them.
  if (key) history.replaceState(null, "", location.pathname + location.search);
  view.key.value = storedKey(key) || "";
  return { autostart: Boolean(key) && fragment.has("autostart") };
}

view.start.addEventListener("click", start);
view.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});
view.end.addEventListener("click", end);
view.chatForm.addEventListener("submit", sendChat);
window.addEventListener("pagehide", () => {
  const session = demo.session;
  if ((phase !== "live" && phase !== "ending") || !session) return;
  // Its close frame goes only over a socket that is open; the DELETE (a keepalive
  // request, which outlives the page) ends it whatever state its socket is in.
  session.close();
  if (session.id && demo.client.apiKey) demo.client.deleteSession(session.id).catch(() => {});
});

const { autostart } = takeKey();
demo.client = new BrokerClient({ apiKey: view.key.value.trim() || null });
renderControls();
log(`page ready; ${view.key.value ? "API key loaded" : "enter the API key to start"}`);
if (autostart) start();
