/**
 * A browser client of the session broker (PROTOCOL.md), an ES module with no dependencies.
 *
 * `BrokerClient` makes the HTTPS API calls; `startSession` (offer in the POST) and
 * `openSession` (a grant made elsewhere) return a `Session`, which follows the broker's
 * repairs on its own: whenever the broker negotiates a negotiation this client has not
 * offered for, it offers again from a new RTCPeerConnection. A dropped signaling socket
 * is reopened with a fresh token.
 * @module broker-client
 */

const HEARTBEAT_LABEL = "heartbeat";
const APPLICATION_LABEL = "echo";
const RECONNECT_FIRST_DELAY_MS = 500;
const RECONNECT_MAX_DELAY_MS = 5000;
// POSTs of a new session while the towers are busy answering others (`towers_busy`):
// each after the broker's Retry-After, drawn up to half as long again so that the
// clients refused together do not all come back together. A Retry-After past
// BUSY_WAIT_MAX_S (a broker misconfigured, or not ours) is waited as that.
const BUSY_ATTEMPTS = 5;
const BUSY_WAIT_MAX_S = 30;
const ENDED_STATES = new Set(["failed", "closed"]);
// The session is gone: no token or reconnection will bring it back.
const GONE_CODES = new Set(["not_found", "session_not_found"]);
// No fresh token will come: the key was refused (revoked, say), or there is none.
const NO_TOKEN_CODES = new Set(["unauthorized", "no_credentials"]);
// Fatal signaling errors after which following the session cannot go on.
const FINAL_CODES = new Set(["session_not_found", "replaced", "origin_not_allowed"]);
// Close codes of fatal errors, for a close whose error frame was not seen.
const CLOSE_CODE_ERRORS = { 4401: "invalid_token", 4403: "origin_not_allowed",
  4404: "session_not_found", 4409: "replaced", 4413: "frame_too_large", 4429: "rate_limited",
  4503: "busy" };

/** An error from the broker (HTTP or signaling), or from reaching it. */
export class BrokerError extends Error {
  /**
   * @param {string} code - the protocol's code (`unauthorized`, `no_tower`, `replaced`, ...);
   *   `http_<status>` for an error body that is not the protocol's; `unreachable` when
   *   the broker could not be reached or did not answer in time.
   * @param {string} message - for people.
   * @param {{status?: number|null, fatal?: boolean, retryAfter?: number|null}} [options] -
   *   the HTTP status (null on the socket); the socket frame's `fatal` flag, always true
   *   for an HTTP error; the seconds of an HTTP error's `Retry-After`, if it had one.
   */
  constructor(code, message, { status = null, fatal = true, retryAfter = null } = {}) {
    super(message || code);
    this.name = "BrokerError";
    this.code = code;
    this.status = status;
    this.fatal = fatal;
    this.retryAfter = retryAfter;
  }
}

/** The broker's HTTPS API (PROTOCOL.md, "The HTTPS API"). */
export class BrokerClient {
  /**
   * @param {{origin?: string, apiKey?: string|null, requestTimeout?: number}} [options] -
   *   the broker's HTTPS origin (the page's by default); the bearer key (null when the
   *   page's own backend makes sessions: `openSession`); ms to wait for any response
   *   before `unreachable` (a POST with an offer waits for the tower's answer).
   */
  constructor({ origin = globalThis.location?.origin, apiKey = null, requestTimeout = 30000 } = {}) {
    this.origin = String(origin).replace(/\/+$/, "");
    this.apiKey = apiKey;
    this.requestTimeout = requestTimeout;
    this._iceServers = null;
  }

  /**
   * One JSON request to `path` (e.g. `/v1/sessions`), with `body` as JSON when given.
   * @param {{keepalive?: boolean}} [options] - `keepalive`: the request outlives the
   *   page (a session ended as the page goes away).
   * @returns {Promise<any>} the decoded body, or null when there is none.
   * @throws {BrokerError} on a non-2xx answer, or `unreachable`.
   */
  async request(method, path, body, { keepalive = false } = {}) {
    const headers = { Accept: "application/json" };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response, text;
    try {
      response = await fetch(this.origin + path, {
        method, headers, cache: "no-store", keepalive,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(this.requestTimeout),
      });
      text = await response.text();
    } catch (error) {
      const late = error?.name === "TimeoutError";
      throw new BrokerError("unreachable", late
        ? `the broker did not answer ${method} ${path} within ${this.requestTimeout / 1000} s`
        : `${method} ${path} failed: ${error?.message || error}`);
    }
    const { status } = response;
    const payload = text ? parseJson(text) : null;
    const error = payload?.error;
    if (!response.ok && typeof error?.code === "string") {
      const retryAfter = Number.parseInt(response.headers.get("retry-after") ?? "", 10);
      throw new BrokerError(error.code, error.message || error.code,
        { status, retryAfter: Number.isFinite(retryAfter) ? retryAfter : null });
    }
    if (!response.ok || payload === undefined) {
      throw new BrokerError(`http_${status}`, `${method} ${path}: ${status} ${text.slice(0, 200)}`,
        { status });
    }
    return payload;
  }

  /** `GET /v1/ice-servers`, asked once and then kept. @returns {Promise<RTCIceServer[]>} */
  async iceServers() {
    if (!this._iceServers) {
      this._iceServers = this.request("GET", "/v1/ice-servers").then((body) => body.ice_servers);
      this._iceServers.catch(() => { this._iceServers = null; });
    }
    return this._iceServers;
  }

  /**
   * `POST /v1/sessions`: places a session on a tower. With `offer` (an SDP) the grant
   * carries the tower's `answer` (null if too late: it then comes on the socket).
   * Refused `towers_busy` (every tower busy answering other offers), it asks again after
   * the broker's `Retry-After` (1 s), up to 5 times in all.
   * @param {{application?: string, offer?: string}} [options]
   * @returns {Promise<object>} the grant: `id`, `state`, `tower`, `signaling_url`,
   *   `token`, `token_expires_in`, `ice_servers` (and `answer`).
   */
  async createSession({ application = "echo", offer } = {}) {
    const body = { application };
    if (offer !== undefined && offer !== null) body.offer = offer;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.request("POST", "/v1/sessions", body);
      } catch (error) {
        if (error.code !== "towers_busy" || attempt >= BUSY_ATTEMPTS) throw error;
        const seconds = Math.min(error.retryAfter ?? 1, BUSY_WAIT_MAX_S) * (1 + Math.random() / 2);
        await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      }
    }
  }

  /** `GET /v1/sessions/{id}`: the session as it is now. @param {string} id */
  async getSession(id) {
    return this.request("GET", `/v1/sessions/${encodeURIComponent(id)}`);
  }

  /** `DELETE /v1/sessions/{id}`: ends the session. @param {string} id */
  async deleteSession(id) {
    await this.request("DELETE", `/v1/sessions/${encodeURIComponent(id)}`, undefined,
      { keepalive: true });
  }

  /** `POST /v1/sessions/{id}/tokens`: `{token, token_expires_in, signaling_url}`. @param {string} id */
  async newToken(id) {
    return this.request("POST", `/v1/sessions/${encodeURIComponent(id)}/tokens`);
  }

  /**
   * Creates a session with the offer in the POST and follows it. When this resolves the
   * first peer connection (and any track) is already there: its events came earlier.
   * @param {{application?: string, video?: boolean}} [options] - `video`: receive the
   *   application's video (a `recvonly` transceiver).
   * @returns {Promise<Session>}
   * @throws {BrokerError} the POST or the ICE servers request failed.
   */
  async startSession({ application = "echo", video = false } = {}) {
    const iceServers = await this.iceServers();
    const session = new Session(this, { iceServers, video });
    try {
      const offer = await session._makeOffer(1);
      const grant = await this.createSession({ application, offer });
      session._granted(grant);
      if (grant.answer) await session._applyAnswer(session.peerConnection, grant.answer);
      session._connect(grant.signaling_url);
    } catch (error) {
      session._finish("the session could not be started", { quiet: true });
      throw error;
    }
    return session;
  }

  /**
   * Follows a session whose grant (made without an offer) came from elsewhere, such as
   * the page's own backend: connects the signaling socket and offers when asked.
   * @param {object} grant - what `POST /v1/sessions` returned.
   * @param {{video?: boolean, getToken?: (sessionId: string) => Promise<{signaling_url: string}>}}
   *   [options] - `getToken` gives a fresh signaling URL to reconnect with (else the
   *   `apiKey` is used); a `BrokerError` `not_found` from it ends the session.
   * @returns {Session}
   */
  openSession(grant, { video = false, getToken } = {}) {
    const session = new Session(this, { iceServers: grant.ice_servers || [], video, getToken });
    session._granted(grant);
    session._connect(grant.signaling_url);
    return session;
  }
}

/**
 * One session seen from the browser. Events (CustomEvent, `detail` as given):
 * "state" {state, negotiation, tower, reason}, "peerconnection" {peerConnection},
 * "track" {track, stream}, "open" {channel}, "message" {data}, "error" {error},
 * "closed" {reason, state}, "signaling" {connected}.
 */
export class Session extends EventTarget {
  /** @param {BrokerClient} client @param {object} options @private */
  constructor(client, { iceServers, video, getToken }) {
    super();
    /** @type {string|null} */ this.id = null;
    /** "placing" until the grant, then the broker's: negotiating, connected, repairing, failed, closed. */
    this.state = "placing";
    this.negotiation = 0;
    /** @type {string|null} */ this.tower = null;
    this.reason = "";
    /** @type {RTCPeerConnection|null} */ this.peerConnection = null;
    /** @type {RTCDataChannel|null} the application's channel (label "echo"). */ this.channel = null;
    /** The incoming tracks of the current peer connection; the same object throughout. */
    this.stream = new MediaStream();
    this._client = client;
    this._iceServers = iceServers;
    this._video = video;
    this._getToken = getToken;
    this._offered = 0; // the negotiation of the last offer sent (or being made)
    this._generation = 0; // counts peer connections; frames of older ones are dropped
    this._socket = null;
    this._queue = []; // [generation, frame] waiting for the socket to open
    this._reconnectDelay = RECONNECT_FIRST_DELAY_MS;
    this._reconnectTimer = null;
    this._closing = null;
    this._done = false;
  }

  /**
   * Sends on the application's data channel.
   * @param {string|Blob|ArrayBuffer|ArrayBufferView} data
   * @throws {BrokerError} `channel_not_open` (not yet, or while the session is repaired).
   */
  send(data) {
    if (!this.channel || this.channel.readyState !== "open") {
      throw new BrokerError("channel_not_open", "the data channel is not open", { fatal: false });
    }
    this.channel.send(data);
  }

  /**
   * Ends the session: `{"type":"close"}` on the signaling socket; when it is not open,
   * `DELETE` (with an API key) or `close` on a socket opened for it (with `getToken`).
   * Then closes the socket and the peer connection and emits "closed".
   * @returns {Promise<void>} once closed; never rejects.
   */
  close() {
    this._closing ??= this._close();
    return this._closing;
  }

  async _close() {
    if (this._done) return;
    if (this._socket?.readyState === WebSocket.CONNECTING) {
      // One on its way: the close goes over it once it opens, not over a second socket
      // (one of the two would replace the other, and its close could go nowhere).
      await withinTime(openedOrClosed(this._socket), this._client.requestTimeout,
        "the signaling socket did not open").catch(() => {});
    }
    const socket = this._socket;
    if (socket?.readyState === WebSocket.OPEN) {
      // The close frame follows the message in order, so the socket is closed from this
      // side at once rather than by the broker: a server-side close of a WebSocket over
      // HTTP/2 is what hypercorn 0.18 mishandles (a KeyError that drops the connection).
      socket.send(JSON.stringify({ type: "close" }));
    } else if (this.id && (this._client.apiKey || this._getToken)) {
      try {
        if (this._client.apiKey) await this._client.deleteSession(this.id);
        else await this._closeOverNewSocket();
      } catch (caught) {
        const error = caught instanceof BrokerError ? caught
          : new BrokerError("token_failed", `no signaling token: ${caught?.message || caught}`);
        if (!GONE_CODES.has(error.code)) this._emit("error", { error });
      }
    }
    this._finish("closed by the client", { state: "closed" });
  }

  /** `close` on a signaling socket opened only for it: no API key to `DELETE` with. */
  async _closeOverNewSocket() {
    const timeout = this._client.requestTimeout;
    const granted = await withinTime(Promise.resolve(this._getToken(this.id)), timeout,
      "getToken did not answer");
    const url = typeof granted === "string" ? granted : granted?.signaling_url;
    if (!url) throw new BrokerError("token_failed", "getToken gave no signaling_url");
    await new Promise((resolve, reject) => {
      const socket = new WebSocket(url);
      const fail = (error) => {
        clearTimeout(timer);
        socket.onmessage = socket.onclose = null;
        socket.close();
        reject(error);
      };
      const timer = setTimeout(() => fail(new BrokerError("unreachable",
        "the signaling socket did not answer, to close the session")), timeout);
      socket.onmessage = (event) => {
        // An accepted connection is greeted with the session's state; an error (its
        // token or origin refused, the session gone) means a close would go nowhere.
        const frame = parseJson(event.data);
        if (frame?.type === "state") {
          clearTimeout(timer);
          socket.onmessage = socket.onclose = null;
          socket.send(JSON.stringify({ type: "close" }));
          socket.close();
          resolve();
        } else if (frame?.type === "error") {
          fail(new BrokerError(frame.code || "unknown", frame.message || "",
            { fatal: Boolean(frame.fatal) }));
        }
      };
      socket.onclose = () => fail(new BrokerError("unreachable",
        "the signaling socket closed before the session could be closed"));
    });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _granted(grant) {
    Object.assign(this, { id: grant.id, state: grant.state || "negotiating",
      tower: grant.tower ?? null, negotiation: Math.max(this.negotiation, 1) });
    if (grant.ice_servers) this._iceServers = grant.ice_servers;
  }

  /** A new peer connection (the old one closed) and its offer, for `negotiation`. */
  async _makeOffer(negotiation) {
    this._offered = negotiation;
    const peerConnection = this._newPeerConnection(negotiation);
    await peerConnection.setLocalDescription(await peerConnection.createOffer());
    return peerConnection.localDescription.sdp;
  }

  _newPeerConnection(negotiation) {
    this._closePeerConnection();
    const generation = ++this._generation;
    const peerConnection = new RTCPeerConnection({ iceServers: this._iceServers });
    const current = () => peerConnection === this.peerConnection && !this._done;
    const heartbeat = peerConnection.createDataChannel(HEARTBEAT_LABEL);
    heartbeat.onmessage = (event) => {
      if (heartbeat.readyState === "open") heartbeat.send(event.data);
    };
    const channel = peerConnection.createDataChannel(APPLICATION_LABEL);
    channel.binaryType = "arraybuffer";
    channel.onopen = () => { if (current()) this._emit("open", { channel }); };
    channel.onmessage = (event) => { if (current()) this._emit("message", { data: event.data }); };
    if (this._video) peerConnection.addTransceiver("video", { direction: "recvonly" });
    peerConnection.ontrack = ({ track }) => {
      if (!current()) return;
      this.stream.addTrack(track);
      this._emit("track", { track, stream: this.stream });
    };
    peerConnection.onicecandidate = ({ candidate: found }) => this._send({ type: "candidate",
      candidate: found?.candidate ?? "", sdpMid: found?.sdpMid ?? null,
      sdpMLineIndex: found?.sdpMLineIndex ?? null, negotiation }, generation);
    for (const track of this.stream.getTracks()) this.stream.removeTrack(track);
    this.peerConnection = peerConnection;
    this.channel = channel;
    this._emit("peerconnection", { peerConnection });
    return peerConnection;
  }

  _closePeerConnection() {
    const peerConnection = this.peerConnection;
    if (!peerConnection) return;
    this.peerConnection = null;
    this.channel = null;
    peerConnection.onicecandidate = peerConnection.ontrack = null;
    peerConnection.close();
  }

  async _offer(negotiation) {
    const generation = this._generation + 1; // the one _makeOffer is about to make
    let sdp = null, failure = null;
    try {
      sdp = await this._makeOffer(negotiation);
    } catch (error) {
      failure = error;
    }
    if (generation !== this._generation || this._done) return; // superseded meanwhile
    if (failure) {
      // The negotiation then misses its deadline and the broker repairs it.
      this._emit("error", { error: new BrokerError("offer_failed",
        `the browser could not make an offer: ${failure?.message || failure}`, { fatal: false }) });
    } else if (this._socket?.readyState === WebSocket.OPEN) {
      this._socket.send(JSON.stringify({ type: "offer", sdp, negotiation }));
    } else {
      // Not sent: the broker's state frame on reconnecting asks for a fresh offer.
      this._offered = negotiation - 1;
      this._closePeerConnection();
      this._generation++;
    }
  }

  async _applyAnswer(peerConnection, sdp) {
    if (!peerConnection || peerConnection !== this.peerConnection
        || peerConnection.signalingState !== "have-local-offer") return;
    try {
      await peerConnection.setRemoteDescription({ type: "answer", sdp });
    } catch (error) {
      // The negotiation then misses its deadline and the broker repairs it.
      this._emit("error", { error: new BrokerError("answer_rejected",
        `the browser refused the tower's answer: ${error?.message || error}`, { fatal: false }) });
    }
  }

  /** Sends a frame now, or once the socket is open; dropped if `generation` is past. */
  _send(frame, generation) {
    if (this._done || generation !== this._generation) return;
    if (this._socket?.readyState === WebSocket.OPEN) {
      this._socket.send(JSON.stringify(frame));
    } else {
      this._queue.push([generation, frame]);
    }
  }

  _connect(url) {
    if (this._done) return;
    let socket;
    try {
      socket = this._socket = new WebSocket(url);
    } catch (error) {
      this._emit("error", { error: new BrokerError("bad_signaling_url", String(error?.message)) });
      return this._scheduleReconnect();
    }
    let fatal = null; // the fatal error frame, if one came before the close
    // A socket that neither opens nor closes (its connection lost on the way, say) is
    // given up as if it had closed: how long it would hang is up to the browser.
    const opening = setTimeout(() => {
      if (socket !== this._socket || socket.readyState !== WebSocket.CONNECTING) return;
      socket.onopen = socket.onmessage = socket.onclose = null;
      this._socket = null;
      socket.close();
      if (this._done || this._closing) return;
      this._emit("signaling", { connected: false });
      this._scheduleReconnect();
    }, this._client.requestTimeout);
    socket.onopen = () => {
      clearTimeout(opening);
      if (socket !== this._socket) return;
      this._emit("signaling", { connected: true });
      const queue = this._queue.splice(0);
      for (const [generation, frame] of queue) {
        if (generation === this._generation) socket.send(JSON.stringify(frame));
      }
    };
    socket.onmessage = (event) => {
      if (socket !== this._socket || this._done) return;
      const frame = parseJson(event.data);
      if (frame?.type === "error" && frame.fatal) fatal = frame;
      this._onFrame(frame);
    };
    socket.onclose = (event) => {
      clearTimeout(opening);
      if (socket !== this._socket) return;
      this._socket = null;
      if (this._done || this._closing) return;
      const code = fatal?.code || CLOSE_CODE_ERRORS[event.code];
      const message = fatal?.message || event.reason
        || `the broker closed the signaling socket (${event.code})`;
      if (code && !fatal) this._emit("error", { error: new BrokerError(code, message) });
      if (FINAL_CODES.has(code)) {
        this._finish(`${code}: ${message}`);
        return;
      }
      this._emit("signaling", { connected: false });
      this._scheduleReconnect();
    };
  }

  _scheduleReconnect() {
    if (this._done || this._closing) return;
    const delay = this._reconnectDelay;
    this._reconnectDelay = Math.min(delay * 2, RECONNECT_MAX_DELAY_MS);
    // Drawn up to half as long again: the clients a broker dropped together do not all
    // ask for their tokens and sockets together.
    this._reconnectTimer = setTimeout(() => this._reconnect(), delay * (1 + Math.random() / 2));
  }

  async _reconnect() {
    this._reconnectTimer = null;
    if (this._done || this._closing) return;
    let url = null, error = null;
    try {
      if (this._getToken) {
        const granted = await withinTime(Promise.resolve(this._getToken(this.id)),
          this._client.requestTimeout, "getToken did not answer");
        url = typeof granted === "string" ? granted : granted?.signaling_url;
      } else if (this._client.apiKey) {
        url = (await this._client.newToken(this.id)).signaling_url;
      } else {
        error = new BrokerError("no_credentials", "no API key or getToken to reconnect with");
      }
    } catch (caught) {
      error = caught instanceof BrokerError ? caught
        : new BrokerError("token_failed", `no signaling token: ${caught?.message || caught}`);
    }
    if (this._done || this._closing) return;
    error ??= url ? null : new BrokerError("token_failed", "getToken gave no signaling_url");
    if (!error) return this._connect(url);
    this._emit("error", { error });
    if (GONE_CODES.has(error.code) || NO_TOKEN_CODES.has(error.code)) {
      this._finish(`${error.code}: ${error.message}`);
    } else {
      this._scheduleReconnect();
    }
  }

  _onFrame(frame) {
    if (frame?.type === "state") {
      this._onState(frame);
    } else if (frame?.type === "answer" && frame.negotiation === this._offered) {
      this._applyAnswer(this.peerConnection, frame.sdp);
    } else if (frame?.type === "reoffer") {
      this.negotiation = Math.max(this.negotiation, frame.negotiation);
      if (frame.negotiation > this._offered && !this._closing) this._offer(frame.negotiation);
    } else if (frame?.type === "error") {
      const error = new BrokerError(frame.code, frame.message, { fatal: Boolean(frame.fatal) });
      this._emit("error", { error });
    }
  }

  _onState(frame) {
    // A state frame means the socket is attached and healthy: backoff starts over.
    this._reconnectDelay = RECONNECT_FIRST_DELAY_MS;
    this.state = frame.state;
    this.negotiation = Math.max(this.negotiation, frame.negotiation);
    this.tower = frame.tower;
    this.reason = frame.reason || "";
    this._emit("state", { state: this.state, negotiation: frame.negotiation,
      tower: this.tower, reason: this.reason });
    if (ENDED_STATES.has(frame.state)) {
      this._finish(this.reason || frame.state, { state: frame.state });
    } else if (frame.state === "negotiating" && frame.negotiation > this._offered
               && !this._closing) {
      this._offer(frame.negotiation);
    }
  }

  /** Stops following: socket, reconnection and peer connection closed, "closed" emitted. */
  _finish(reason, { state = this.state, quiet = false } = {}) {
    if (this._done) return;
    this._done = true;
    clearTimeout(this._reconnectTimer);
    this._queue.length = 0;
    const socket = this._socket;
    this._socket = null;
    if (socket && socket.readyState <= WebSocket.OPEN) socket.close(1000);
    this._closePeerConnection();
    this._generation++;
    for (const track of this.stream.getTracks()) track.stop();
    if (ENDED_STATES.has(state)) this.state = state;
    if (!quiet) this._emit("closed", { reason, state: this.state });
  }
}

/** `promise`, or a rejection (`unreachable`, `message`) after `ms` milliseconds. */
function withinTime(promise, ms, message) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new BrokerError("unreachable", message)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** Settles once `socket` (connecting) opens or closes. */
function openedOrClosed(socket) {
  return new Promise((resolve) => {
    socket.addEventListener("open", resolve, { once: true });
    socket.addEventListener("close", resolve, { once: true });
  });
}

/** The JSON value of `text`, or undefined when it is not JSON. */
function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}
