"""The browsers' endpoint: the HTTPS API, the signaling WebSocket, and the 301 from HTTP.

Theory of operation: one ASGI application served by hypercorn's trio worker on two
listeners: HTTPS (TLS 1.2+, HTTP/1.1 and HTTP/2) and plain HTTP, whose every request is
answered with ``301`` to the same path on the HTTPS origin. The application is a thin
translation: it checks credentials and input (``signaling``), then asks the session
actors; it holds no session state besides which API key owns which session.

A signaling connection gets a bounded outbox that its session writes frames into; a
writer task sends them, and the reader turns the client's frames into messages for the
session. Bad frames are answered with an error frame; only the errors PROTOCOL.md calls
fatal close the connection, and none of them touch the session.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import importlib.resources
import logging
import json
import math
import re
import resource
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import priority
import psutil
import trio
import hypercorn.events
import hypercorn.protocol
import hypercorn.protocol.events
import hypercorn.protocol.h11
import hypercorn.protocol.h2
import hypercorn.protocol.http_stream
import hypercorn.protocol.ws_stream
import hypercorn.trio.run
import hypercorn.trio.task_group
import hypercorn.trio.tcp_server
from hypercorn.config import Config
from hypercorn.trio import serve

from actors import (
    Actor,
    ActorCrashed,
    ActorRef,
    ActorStopped,
    ActorSystem,
    AskTimeout,
    Exit,
    MailboxFull,
    SupervisorRef,
)
from .config import Settings
from .link import APPLICATIONS, OFFER_REFUSALS, session_weight
from .metrics import SessionCounters, TowerRow, process_usage, render
from .outbox import WRITE_TIMEOUT
from .sessions import (
    CLIENT_OUTBOX_SIZE,
    AttachClient,
    ClientOffer,
    CloseSession,
    DetachClient,
    Describe,
    SESSIONS_PATH,
    Session,
    new_session_id,
    session_name,
    session_spec,
)
from .signaling import (
    MAX_FRAMES_PER_SECOND,
    RateLimit,
    SignalingError,
    SignalingTokens,
    check_offer_sdp,
    frame_cost,
    parse_client_frame,
)
from .towers import TowerDirectory

logger = logging.getLogger(__name__)

# Seconds a made metrics page is served before it is made again.
METRICS_PAGE_AGE = 0.5

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# The browser side: the client module at a stable URL, and the demo page.
_STATIC = importlib.resources.files("broker") / "static"
STATIC_FILES = {
    url: ((_STATIC / name).read_bytes(), content_type)
    for url, name, content_type in (
        ("/", "index.html", "text/html; charset=utf-8"),
        ("/demo.js", "demo.js", "text/javascript; charset=utf-8"),
        ("/demo.css", "demo.css", "text/css; charset=utf-8"),
        ("/client/broker-client.js", "broker-client.js", "text/javascript; charset=utf-8"),
    )
    if (_STATIC / name).is_file()
}
# The page's policy; its sockets may only go to the broker's own signaling origin.
PAGE_POLICY = (
    "default-src 'self'; connect-src 'self' {signaling_origin}; "
    "media-src 'self' blob: mediastream:; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
MAX_BODY_BYTES = 16 * 1024
# A request's body arrives whole within this, or the request ends with 408: a client
# that stopped halfway holds no connection and no task.
BODY_TIMEOUT = 10.0
CLOSE_DRAIN_TIMEOUT = 2.0
# How long the connections open as the broker stops may take to end on their own.
CLOSE_GRACE = 2.0
TLS_HANDSHAKE_TIMEOUT = 10.0
# Connections the kernel completes for the broker before it accepts them (capped by
# net.core.somaxconn). hypercorn's 100 overflowed whenever a burst of browsers arrived
# or left faster than the loop accepted (351 times as 1,000 sessions ended at once): a
# dropped handshake costs its browser a SYN retransmission, a second or more.
LISTEN_BACKLOG = 4096
# At most one log line per this long about connections closed past the limit.
REFUSAL_LOG_INTERVAL = 60.0
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost"})
_SESSION_PATH = re.compile(r"^/v1/sessions/(s-[0-9a-f]{16})(/tokens|/signaling)?$")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class BrokerApi:
    """The ASGI application."""

    def __init__(
        self,
        settings: Settings,
        api_keys: tuple[str, ...],
        tokens: SignalingTokens,
        towers: TowerDirectory,
        system: ActorSystem,
        counters: SessionCounters,
    ) -> None:
        self.settings = settings
        self.api_keys = api_keys
        self.tokens = tokens
        self.towers = towers
        self.system = system
        self.counters = counters
        self.metrics_page: tuple[float, str] = (-1.0, "")
        self.process = psutil.Process()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)

    # HTTP.

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["scheme"] == "http":
            await self._redirect(scope, send)
            return
        page = STATIC_FILES.get(scope["path"])
        if page is not None and scope["method"] in ("GET", "HEAD"):
            content, content_type = page
            headers = self._secure_headers({"cache-control": "no-cache",
                                            "content-security-policy": self.page_policy})
            await _respond(send, 200, content, content_type, headers)
            return
        headers = {"cache-control": "no-store"}
        try:
            if page is not None:
                _allow(scope["method"], "GET", "HEAD")
            status, body = await self._route(scope, receive)
        except ApiError as error:
            status = error.status
            body = {"error": {"code": error.code, "message": error.message}}
            headers.update(error.headers)
            if status in (408, 413) and scope.get("http_version", "").startswith("1"):
                # The rest of the body is never read, so the connection cannot carry
                # another request: HTTP/1 says so (HTTP/2 ends only the stream).
                headers["connection"] = "close"
        if isinstance(body, str):
            await _respond(send, status, body.encode(), "text/plain; version=0.0.4; charset=utf-8",
                           self._secure_headers(headers))
        elif body is None:
            await _respond(send, status, b"", None, self._secure_headers(headers))
        else:
            await _respond(send, status, json.dumps(body).encode(), "application/json",
                           self._secure_headers(headers))

    def _secure_headers(self, headers: dict[str, str]) -> dict[str, str]:
        headers["x-content-type-options"] = "nosniff"
        if self.settings.hsts_max_age:
            headers["strict-transport-security"] = f"max-age={self.settings.hsts_max_age}"
        return headers

    async def _redirect(self, scope: Scope, send: Send) -> None:
        # The target is built from our own name, never the request's Host header; a
        # request target that is not a path ("@evil.example/", an absolute URL) is
        # sent to the front page rather than spliced in after our name.
        path = scope["raw_path"].decode("latin-1")
        location = self.settings.https_origin + (path if path.startswith("/") else "/")
        if scope.get("query_string"):
            location += "?" + scope["query_string"].decode("latin-1")
        await _respond(send, 301, b"", None, {"location": location})

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        method, path = scope["method"], scope["path"]
        if path == "/healthz":
            _allow(method, "GET", "HEAD")
            ready = self.towers.ready_count()
            return (200 if ready else 503), {
                "status": "ok" if ready else "no_tower", "towers_ready": ready}
        if path == "/metrics":
            _allow(method, "GET", "HEAD")
            return 200, self.metrics()
        if path == "/v1/ice-servers":
            _allow(method, "GET", "HEAD")
            self._authenticate(scope)
            return 200, {"ice_servers": list(self.settings.ice_servers)}
        if path == "/v1/sessions":
            _allow(method, "POST")
            key = self._authenticate(scope)
            options = await _read_json(receive)
            return 201, await self._create(key, options)
        match = _SESSION_PATH.match(path)
        if match is None or match.group(2) == "/signaling":
            raise ApiError(404, "not_found", f"there is nothing at {path[:100]}")
        session_id, action = match.group(1), match.group(2)
        if action == "/tokens":
            _allow(method, "POST")
            await self._describe(self._authenticate(scope), session_id)
            return 201, self._token(session_id)
        _allow(method, "GET", "HEAD", "DELETE")
        key = self._authenticate(scope)
        if method != "DELETE":
            return 200, await self._describe(key, session_id, ended_too=True)
        closed = await _ask(
            self._session(session_id), CloseSession("deleted through the API", key)
        )
        if not closed:
            raise ApiError(404, "not_found", f"there is no session {session_id}")
        return 204, None

    def _authenticate(self, scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, key = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    for known in self.api_keys:
                        if hmac.compare_digest(key.strip().encode(), known.encode()):
                            return known
        raise ApiError(401, "unauthorized", "a valid API key is needed (Authorization: Bearer)",
                       {"www-authenticate": "Bearer"})

    def _session(self, session_id: str) -> ActorRef | None:
        return self.system.lookup(f"{SESSIONS_PATH}/{session_name(session_id)}")

    async def _describe(
        self, key: str, session_id: str, *, ended_too: bool = False
    ) -> dict[str, Any]:
        """The session, if it exists and belongs to ``key`` (the session knows its key);
        ``ended_too``: or how it ended, if it did within ``ENDED_KEPT`` seconds."""
        described = None
        try:
            described = await _ask(self._session(session_id), Describe(key))
        except ApiError as error:
            if not (ended_too and error.code == "not_found"):
                raise
        if described is None and ended_too:
            described = self.counters.last_word(session_id, key, trio.current_time())
        if described is None:
            raise ApiError(404, "not_found", f"there is no session {session_id}")
        return described

    async def _create(self, key: str, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - {"application", "offer"})
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field(s): {', '.join(unknown)[:80]}")
        application = options.get("application", "echo")
        if not isinstance(application, str) or application not in APPLICATIONS:
            raise ApiError(400, "bad_request", f"application must be one of {list(APPLICATIONS)}")
        live = self.counters.by_key[key]
        if live >= self.settings.max_sessions_per_key:
            # Before the offer is parsed: a key at its limit costs no more than this.
            raise ApiError(429, "too_many_sessions",
                           f"this API key already has {live} live sessions")
        offer = options.get("offer")
        if offer is not None:
            if not isinstance(offer, str):
                raise ApiError(400, "bad_request", "offer must be an SDP string")
            try:
                check_offer_sdp(offer)
            except SignalingError as error:
                raise ApiError(400, error.code, error.message) from None
        sessions = self.system.lookup(SESSIONS_PATH)
        if not isinstance(sessions, SupervisorRef) or self.system.shutting_down:
            # Starting, or stopping: the endpoint stops after the sessions.
            raise ApiError(503, "no_tower", "the broker is not taking sessions; retry later")
        weight = session_weight(application, self.settings.video_weight,
                                self.settings.tower_capacity)
        tower = self.towers.choose(weight=weight,
                                   unanswered_below=self.settings.max_unanswered_offers)
        if tower is None and self.towers.has_room(weight):
            self.counters.refused["towers_busy"] += 1
            raise ApiError(503, "towers_busy",
                           "every tower with room has as many offers to answer as it may; "
                           "retry in a second", {"retry-after": "1"})
        if tower is None:
            self.counters.refused["no_tower"] += 1
            raise ApiError(503, "no_tower", "no tower is ready to take a session; retry later")
        session_id = new_session_id()
        session = Session(session_id, key, application, tower.name, self.towers,
                          self.settings, self.counters)
        # Counted before the wait, so concurrent requests cannot all pass the limit; the
        # session gives its count back when it ends, also one that failed to start.
        self.counters.by_key[key] += 1
        try:
            await sessions.start_child(session_spec(session))
        except (ActorCrashed, ActorStopped) as error:
            if not session.released:  # it never ran at all
                self.counters.by_key[key] -= 1
                session.settle_offer()
            why = error.error if isinstance(error, ActorCrashed) else "the broker is stopping"
            raise ApiError(503, "no_tower", f"the session could not start: {why}") from None
        created: dict[str, Any] = {"id": session_id}
        if offer is not None and not session.state.ended:
            created["answer"] = await self._answer(session_id, offer)
        if session.state.ended:
            # Its tower full or gone and no other ready (from its start, or before its
            # answer), or the broker stopping: as if no tower had been ready.
            raise ApiError(503, "no_tower",
                           f"the session ended as it started: {session.lifecycle.reason}")
        # Where it is now: a tower full at its offer has moved it.
        created["state"] = session.state.value
        created["tower"] = session.lifecycle.tower
        # Issued once the answer is in: its lifetime is the client's from the response.
        created.update(self._token(session_id))
        created["ice_servers"] = list(self.settings.ice_servers)
        return created

    async def _answer(self, session_id: str, offer: str) -> str | None:
        """Hand the offer to the new session and wait for the tower's answer."""
        reply, answers = trio.open_memory_channel[dict[str, Any]](1)
        ref = self._session(session_id)
        if ref is None:
            return None
        with answers:
            await ref.tell(ClientOffer(offer, reply))
            with trio.move_on_after(self.settings.negotiation_deadline):
                async for frame in answers:
                    if frame["type"] == "answer":
                        return frame["sdp"]
                    if frame.get("code") in OFFER_REFUSALS:
                        # The tower refused the offer: a session nobody can use is ended.
                        ref.tell_nowait(
                            CloseSession(f"the offer was refused: {frame['message']}"))
                        raise ApiError(400, frame["code"], frame["message"])
                    # Not the offer's fault (it reached a session already repairing): the
                    # client offers again on the signaling socket, as it is asked there.
                    return None
        # No answer in time, or none to come: it will come on the signaling socket.
        return None

    @property
    def signaling_origin(self) -> str:
        """Where browsers open signaling sockets: ``wss://`` and the broker's public name."""
        return "wss" + self.settings.https_origin.removeprefix("https")

    @property
    def page_policy(self) -> str:
        # (A policy cannot name an IPv6 address: such a broker's page may open any wss:.)
        return PAGE_POLICY.format(signaling_origin="wss:" if ":" in self.settings.public_host
                                  else self.signaling_origin)

    def _token(self, session_id: str) -> dict[str, Any]:
        token = self.tokens.issue(session_id, trio.current_time())
        return {
            "signaling_url": self.signaling_origin
            + f"/v1/sessions/{session_id}/signaling?token={token}",
            "token": token,
            "token_expires_in": self.settings.token_lifetime,
        }

    def metrics(self) -> str:
        """The metrics page, made at most twice a second: anyone may ask for it, and it
        counts over every actor."""
        now = trio.current_time()
        made_at, page = self.metrics_page
        if now - made_at < METRICS_PAGE_AGE:
            return page
        page = self._render_metrics(now)
        self.metrics_page = (now, page)
        return page

    def _render_metrics(self, now: float) -> str:
        towers = {}
        for connection in self.towers:
            standing = self.towers.placement.load_of(connection.name)
            sessions = standing.sessions if standing else 0
            towers[connection.name] = TowerRow(
                self.towers.state_of(connection.name, now), sessions,
                self.towers.usage.get(connection.name),
                standing.taken / standing.capacity if standing and standing.capacity else 0.0,
                self.towers.placement.unanswered(connection.name),
                connection.waiting_offers())
        return render(self.counters, towers, self.system.statistics(),
                      process_usage(self.process))

    # The signaling WebSocket.

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        if scope["scheme"] != "wss":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        lock = trio.Lock()
        closed = False

        # Reader and writer both send; once either has closed, the other's sends are moot.
        async def send_frame(frame: dict[str, Any]) -> None:
            async with lock:
                if not closed:
                    await send({"type": "websocket.send", "text": json.dumps(frame)})

        async def close(code: int) -> None:
            nonlocal closed
            async with lock:
                if not closed:
                    closed = True
                    await send({"type": "websocket.close", "code": code})

        try:
            session = self._signaling_session(scope)
            outbox, frames = trio.open_memory_channel[dict[str, Any]](CLIENT_OUTBOX_SIZE)
            try:
                await session.ask(AttachClient(outbox))
            except ActorStopped:
                raise SignalingError("session_not_found", "the session has ended") from None
            except AskTimeout:
                # The session may have taken it as the ask ran out: its state frame then
                # waits in the outbox, and the connection is served. Otherwise it is closed
                # in this same step, so that the session, when it comes to the attach,
                # passes it by (and keeps the connection it has, if any).
                if not frames.statistics().current_buffer_used:
                    frames.close()
                    raise SignalingError(
                        "busy", "the session did not take the connection in time; connect again"
                    ) from None
        except SignalingError as error:
            await send_frame(error.frame())
            await close(error.close_code)
            await _drain(receive)
            return
        try:
            async with trio.open_nursery() as nursery:
                # The session's state frame goes out before any answer to the client.
                await nursery.start(self._write, frames, send_frame, close, nursery.cancel_scope)
                await self._read(receive, session, frames, send_frame, close)
                nursery.cancel_scope.cancel()
        finally:
            # Closed first: a frame the session sends before it takes the detach (an
            # answer, say) fails to go, and it keeps the answer for the next connection.
            frames.close()
            try:
                session.tell_nowait(DetachClient(outbox))
            except MailboxFull:
                # The session then finds the outbox closed at its next frame.
                pass

    def _signaling_session(self, scope: Scope) -> ActorRef:
        match = _SESSION_PATH.match(scope["path"])
        if match is None or match.group(2) != "/signaling":
            raise SignalingError("session_not_found", "this is not a session's signaling URL")
        origin = _header(scope, b"origin")
        if origin is not None and _origin(origin) not in self._allowed_origins():
            raise SignalingError("origin_not_allowed", f"origin {origin[:100]} is not allowed")
        session_id = match.group(1)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = (query.get("token") or [""])[0]
        self.tokens.check(token, session_id, trio.current_time())
        session = self._session(session_id)
        if session is None:
            raise SignalingError("session_not_found", "the session has ended")
        return session

    def _allowed_origins(self) -> set[tuple[str, str, int]]:
        settings = self.settings
        if settings.allowed_origins:
            return {_origin(origin) for origin in settings.allowed_origins}
        hosts = {settings.public_host}
        if settings.public_host in LOOPBACK_NAMES:
            # The development certificate is for both names; a browser may use either.
            hosts |= LOOPBACK_NAMES
        return {("https", host, settings.https_port) for host in hosts}

    async def _write(
        self, frames, send_frame, close, scope: trio.CancelScope,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        close_code = 1000
        async for frame in frames:
            await send_frame(frame)
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            if frame.get("type") == "error" and frame.get("fatal"):
                close_code = SignalingError(frame["code"], "").close_code
        # The session closed the outbox: it ended, or another connection replaced this one.
        task_status.started()
        await close(close_code)
        scope.cancel()

    async def _read(
        self, receive: Receive, session: ActorRef,
        frames: trio.MemoryReceiveChannel[dict[str, Any]], send_frame, close,
    ) -> None:
        limit = RateLimit()
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            data = event.get("text")
            if data is None:
                data = event.get("bytes") or b""
            try:
                if not limit.allow(trio.current_time(), frame_cost(data)):
                    raise SignalingError("rate_limited", f"more than {MAX_FRAMES_PER_SECOND} "
                                         "frames, or KiB of frames, a second")
                message = parse_client_frame(data)
            except SignalingError as error:
                await send_frame(error.frame())
                if error.fatal:
                    await close(error.close_code)
                    await _drain(receive)
                    return
                continue
            if frames.statistics().open_send_channels == 0:
                # The session let go of this connection (another replaced it, or it was
                # too slow to read): its writer closes it; nothing more reaches the session.
                continue
            # To a session that has ended, a dead letter; its writer closes the socket.
            await session.tell(message)


async def _drain(receive: Receive) -> None:
    """Read what the client sent before our close, so its close reply is seen and the
    connection ends now rather than at the client's disconnect timeout."""
    with trio.move_on_after(CLOSE_DRAIN_TIMEOUT):
        while (await receive())["type"] != "websocket.disconnect":
            pass


def _origin(origin: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an origin, with the scheme's default port filled in; one
    that does not parse (``https://[``) is no host's."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return "", "", -1
    default = {"https": 443, "http": 80}.get(parts.scheme, -1)
    return parts.scheme, parts.hostname or "", default if port is None else port


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _text(value: bytes | str) -> str:
    """A header's value as text: h2 gives bytes or str, as it was given."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise ApiError(405, "method_not_allowed", f"{method[:10]} is not allowed here",
                       {"allow": ", ".join(allowed)})


async def _ask(ref: ActorRef | None, message: object) -> Any:
    if ref is None:
        raise ApiError(404, "not_found", "there is no such session")
    try:
        return await ref.ask(message)
    except ActorStopped:
        raise ApiError(404, "not_found", "the session has ended") from None
    except AskTimeout:
        raise ApiError(503, "busy", "the session did not answer in time") from None


async def _read_json(receive: Receive) -> dict[str, Any]:
    body = b""
    with trio.move_on_after(BODY_TIMEOUT) as reading:
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                # Not an empty body: nobody waits for what the request would make.
                raise ApiError(400, "bad_request", "the request ended before its body")
            body += event.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, "payload_too_large",
                               f"bodies are at most {MAX_BODY_BYTES} bytes")
            if not event.get("more_body"):
                break
    if reading.cancelled_caught:
        raise ApiError(408, "request_timeout",
                       f"the body did not arrive within {BODY_TIMEOUT:g} s")
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "bad_request", "the body is a JSON object")
    return value


async def _respond(
    send: Send, status: int, body: bytes, content_type: str | None, headers: dict[str, str]
) -> None:
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    if content_type is not None:
        raw.append((b"content-type", content_type.encode()))
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class _ContainedTCPServer(hypercorn.trio.tcp_server.TCPServer):
    """hypercorn's connection, whose failure ends that connection only, and which lets
    go of what it held as it ends.

    hypercorn runs each connection as a task of the whole server, so an error in one
    would stop them all. One such error is known (pgjones/hypercorn#329: a frame on an
    HTTP/2 stream already closed), which a client could provoke at will; data frames of
    that kind are now dropped before they reach it (``_H2WithoutWebSockets``).

    A connection and its protocol refer to each other, and trio's TLS stream refers to
    itself through its handshake. Left as they are, such cycles wait for a full garbage
    collection, which the broker holds back until a batch of sessions has closed
    (``collector.py``): connections that come and go while no session closes (health
    checks, refused requests) would pile up at about 21 KiB each. Broken here, a
    connection's memory goes back as it ends; one that failed still leaves its tasks'
    exceptions in cycles, for the full collection.

    At most ``limit`` connections are open at once (three quarters of the files the
    process may open, set as the endpoint starts); those past it are closed as they
    come, so that clients, however many, leave files for the towers' links, the state
    and the sessions already up.
    """

    limit = 1 << 62
    connections = 0
    refused_logged_at = -math.inf

    async def protocol_send(self, event: hypercorn.events.Event) -> None:
        if not isinstance(event, hypercorn.events.RawData):
            await super().protocol_send(event)
            return
        # hypercorn writes shielded, for a TLS stream cut half-way is broken, but with no
        # deadline: a client that stops reading held its connection, and the broker's
        # shutdown, for good. Past the deadline the connection is dropped instead.
        async with self.send_lock:
            deadline = trio.current_time() + WRITE_TIMEOUT
            with trio.CancelScope(shield=True, deadline=deadline) as writing:
                try:
                    await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                else:
                    return
        if writing.cancelled_caught:
            logger.info("dropped an HTTP connection whose client did not read for %g s",
                        WRITE_TIMEOUT)
            await trio.aclose_forcefully(self.stream)
        await self.protocol.handle(hypercorn.events.Closed())

    async def run(self) -> None:
        stream = self.stream
        server = _ContainedTCPServer
        if server.connections >= server.limit:
            if trio.current_time() - server.refused_logged_at >= REFUSAL_LOG_INTERVAL:
                server.refused_logged_at = trio.current_time()
                logger.warning("%d HTTP connections are open, the most there may be: "
                               "connections past them are closed as they come", server.connections)
            await trio.aclose_forcefully(stream)
            self.__dict__.clear()
            return
        server.connections += 1
        try:
            await super().run()
        except Exception as error:
            logger.warning("an HTTP connection failed: %r", error)
        finally:
            server.connections -= 1
            await trio.aclose_forcefully(stream)
            self.__dict__.clear()
            if isinstance(stream, trio.SSLStream):
                vars(stream).pop("_handshook", None)


class _HandshakeWithoutCompression(hypercorn.protocol.ws_stream.Handshake):
    """A WebSocket handshake that turns down ``permessage-deflate``.

    hypercorn accepts compression whenever a client offers it, and wsproto inflates a
    frame whole before any size is looked at: 200 KB sent with no valid token were
    inflated to 200 MiB, half a second of the broker's CPU. Signaling frames are small
    JSON: they go uncompressed, and a frame marked compressed is a protocol error, on
    which hypercorn drops the connection (the client sees 1006).
    """

    def __init__(self, headers: Any, http_version: str) -> None:
        super().__init__(headers, http_version)
        self.extensions = None


class _AppTaskGroup(hypercorn.trio.task_group.TaskGroup):
    """hypercorn's task group, whose queue to a request's application takes nothing once
    the application has ended: hypercorn kept putting a client's events in a queue
    nobody read, and once ten were there, the connection's reader waited for good."""

    async def spawn_app(self, app: Any, config: Config, scope: Any, send: Any) -> Any:
        sender, receiver = trio.open_memory_channel[Any](config.max_app_queue_size)

        async def app_send(message: Any) -> None:
            if message is None:  # the application has ended
                receiver.close()
            await send(message)

        # A disconnect the queue was too full to take: it comes after what is in it.
        held: list[Any] = []

        async def receive() -> Any:
            if held:
                try:
                    return receiver.receive_nowait()
                except trio.WouldBlock:
                    return held[0]
            return await receiver.receive()

        async def app_put(event: Any) -> None:
            if not event["type"].endswith(".disconnect"):
                with contextlib.suppress(trio.BrokenResourceError):
                    await sender.send(event)
                return
            # Never waited for: it may come from the application's own task (a response
            # given up on), whose queue is full of what it did not read.
            await trio.lowlevel.checkpoint()
            try:
                sender.send_nowait(event)
            except trio.WouldBlock:
                held.append(event)
            except trio.BrokenResourceError:
                pass

        assert self._nursery is not None
        self._nursery.start_soon(
            hypercorn.trio.task_group._handle, app, config, scope, receive,
            app_send, trio.to_thread.run_sync, trio.from_thread.run,
        )
        return app_put


class _MessageBuffer(hypercorn.protocol.ws_stream.WebsocketBuffer):
    """A WebSocket message being received, refused before it grows past the limit."""

    overflowed = False

    def extend(self, event: Any) -> None:
        if self.overflowed or self.length + len(event.data) > self.max_length:
            self.overflowed = True
            self.clear()
            raise hypercorn.protocol.ws_stream.FrameTooLargeError()
        super().extend(event)


class _WSStream(hypercorn.protocol.ws_stream.WSStream):
    """hypercorn's WebSocket stream, which ends its connection at a message over the
    limit, and answers data before its handshake once.

    hypercorn wrote each part of a message before looking at its length, and went on
    taking parts after the limit, the connection open: a client with no token had the
    broker hold 275 MiB in 2 s. Data sent before the handshake's answer got a 400 while
    the application, accepting meanwhile, sent a second answer (a traceback per
    connection in the log).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = _MessageBuffer(self.config.websocket_max_message_size)
        self.cut = False

    async def handle(self, event: hypercorn.events.Event) -> None:
        data = (hypercorn.protocol.events.Body, hypercorn.protocol.events.Data)
        if isinstance(event, data) and not self.closed and not self.handshake.accepted:
            # A 400, once, and the connection ends: the application hears it has gone.
            self.closed = True
            await self._send_error_response(400)
            await self.send(hypercorn.protocol.events.StreamClosed(stream_id=self.stream_id))
            if self.app_put is not None:
                await self.app_put({"type": "websocket.disconnect", "code": 1006})
            return
        await super().handle(event)
        if self.buffer.overflowed and not self.cut:
            self.cut = True  # hypercorn has sent the close (1009): the connection ends
            await self.send(hypercorn.protocol.events.StreamClosed(stream_id=self.stream_id))


class _H2WithoutWebSockets(hypercorn.protocol.h2.H2Protocol):
    """HTTP/2 without RFC 8441 WebSockets, whose stream handling has that bug: browsers
    open the signaling socket over HTTP/1.1 instead.

    The rest of a request answered before its body ended (``408``, ``413``) is dropped,
    its flow-control credit given back: hypercorn would fail the whole connection, and
    every other request on it, at data for a stream it has closed. So is a request's
    data once its response has begun: nobody reads it.

    A response the client does not take within ``WRITE_TIMEOUT`` (its flow-control
    window kept shut) ends its stream: hypercorn waited for good, the request's task
    and the connection with it. At the connection's end, every response still being
    sent is let go: hypercorn left each application task that was finishing its
    response waiting for it, and the connection's socket open, for good.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                code: value for code, value in self.connection.local_settings.items()
                if code != h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL
            },
        )

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.DataReceived) and not self._reading(event.stream_id):
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.RequestReceived) and any(
                name in (b":method", ":method") and _text(value).upper() == "CONNECT"
                for name, value in event.headers
            ):
                # A CONNECT: a tunnel we do not make, or an extended CONNECT (a
                # WebSocket) we did not offer, malformed (RFC 8441).
                self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            else:
                await super()._handle_events([event])
        await self._flush()

    def _reading(self, stream_id: int) -> bool:
        stream = self.streams.get(stream_id)
        return stream is not None and not (
            isinstance(stream, hypercorn.protocol.http_stream.HTTPStream)
            and stream.state is not hypercorn.protocol.http_stream.ASGIHTTPState.REQUEST)

    async def stream_send(self, event: hypercorn.protocol.events.StreamEvent) -> None:
        sending = (hypercorn.protocol.events.Body, hypercorn.protocol.events.EndBody,
                   hypercorn.protocol.events.Data, hypercorn.protocol.events.EndData,
                   hypercorn.protocol.events.Trailers)
        if not isinstance(event, sending):
            await super().stream_send(event)
            return
        with trio.move_on_after(WRITE_TIMEOUT) as waiting:
            await super().stream_send(event)
        if waiting.cancelled_caught:
            buffer = self.stream_buffers.get(event.stream_id)
            if buffer is not None:
                await buffer.close()
                # Woken, the sending task ends the stream and forgets its buffer.
                with contextlib.suppress(priority.MissingStreamError):
                    self.priority.unblock(event.stream_id)
                await self.has_data.set()
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.CANCEL)
            await self._flush()
            await self._close_stream(event.stream_id)

    async def handle(self, event: hypercorn.events.Event) -> None:
        await super().handle(event)
        if isinstance(event, hypercorn.events.Closed):
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()


hypercorn.trio.run.TCPServer = _ContainedTCPServer  # type: ignore[misc]
hypercorn.trio.tcp_server.TaskGroup = _AppTaskGroup  # type: ignore[misc]
hypercorn.protocol.h11.WSStream = _WSStream  # type: ignore[misc]
hypercorn.protocol.h2.WSStream = _WSStream  # type: ignore[misc]
hypercorn.protocol.H2Protocol = _H2WithoutWebSockets  # type: ignore[misc]
hypercorn.protocol.ws_stream.Handshake = _HandshakeWithoutCompression  # type: ignore[misc]


class Endpoint(Actor):
    """Serves the ``BrokerApi`` that ``make_app`` builds over this actor's system, on the
    HTTPS and HTTP listeners.

    ``on_listening`` gets the settings with the ports actually bound (ports given as 0
    are chosen by the system), once both listeners are up.
    """

    runs_tasks = True

    def __init__(
        self,
        make_app: Callable[[ActorSystem], BrokerApi],
        certificate: str,
        key: str,
        on_listening: Callable[[Settings], None],
    ) -> None:
        self.make_app = make_app
        self.certificate = certificate
        self.key = key
        self.on_listening = on_listening

    def config(self, settings: Settings) -> Config:
        config = Config()
        config.bind = [f"{settings.host}:{settings.https_port}"]
        config.insecure_bind = [f"{settings.host}:{settings.http_port}"]
        config.certfile = self.certificate
        config.keyfile = self.key
        config.include_server_header = False
        # Frames past our own 64 KiB limit get a documented error; hypercorn's cut is a
        # last line of defence far above it.
        config.websocket_max_message_size = 1024 * 1024
        config.keep_alive_max_requests = 1_000_000
        config.backlog = LISTEN_BACKLOG
        config.accesslog = None
        config.graceful_timeout = CLOSE_GRACE
        # A connection that does not finish its TLS handshake is dropped after this (60 s
        # by default: a client could hold connections, up to the cap, that long).
        config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
        # Through the logging module once, not also on hypercorn's own stderr handler.
        config.errorlog = logging.getLogger("hypercorn.error")
        return config

    async def started(self) -> None:
        self.closing = trio.Event()
        self.closed = trio.Event()
        await self.start(self._serve_forever)

    async def finishing(self, exit: Exit) -> None:
        """Take no more connections, and give those open a moment to end on their own:
        the endpoint stops after the sessions, so each signaling socket is still there
        to send its client the session's closed state, then close with 1000."""
        self.closing.set()
        await self.closed.wait()  # hypercorn's graceful_timeout (CLOSE_GRACE) bounds it

    async def _serve_forever(self, task_status: trio.TaskStatus[None]) -> None:
        app = self.make_app(self.system)
        files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if files != resource.RLIM_INFINITY:
            _ContainedTCPServer.limit = files * 3 // 4
        settings = app.settings
        async with trio.open_nursery() as nursery:
            try:
                binds = await nursery.start(functools.partial(
                    serve, app, self.config(settings), mode="asgi",
                    shutdown_trigger=self.closing.wait,
                ))
            except OSError as error:
                raise OSError(
                    error.errno, f"cannot listen on {settings.host} "
                    f"(ports {settings.https_port}, {settings.http_port}): "
                    f"{error.strerror}"
                ) from None
            ports = {bind.split("://")[0]: int(bind.rsplit(":", 1)[1]) for bind in binds}
            app.settings = settings.with_ports(ports["https"], ports["http"])
            self.on_listening(app.settings)
            task_status.started()
        # hypercorn returns once the connections open when ``closing`` was set have ended.
        self.closed.set()
