"""A Python client of the broker that speaks only the documented protocol (PROTOCOL.md).

``BrokerClient`` makes the HTTPS API calls; ``open_session`` opens the signaling
WebSocket and a peer connection, and follows the broker's repairs on its own: on
``reoffer`` it closes its peer connection, makes a new one and offers again. Given a way
to get a fresh token (``start_session`` gives one), it opens a dropped signaling socket
again, as the browser client does. It runs as trio code under ``actors.bridge.run``; the
peer connection itself lives on the asyncio side (``client_peer``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import trio
from aiortc.exceptions import InvalidStateError
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
    open_websocket_url,
)

from actors.bridge import call_asyncio

from .client_peer import ClientPeer, new_peer


RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 5.0
CLOSE_TIMEOUT = 2.0
# POSTs of a new session while the towers are busy answering others (``towers_busy``):
# each after the broker's Retry-After, drawn up to half as long again so that the
# clients refused together do not all come back together (as the browser client). A
# Retry-After past BUSY_WAIT_MAX (a broker misconfigured, or not ours) is waited as that.
BUSY_ATTEMPTS = 5
BUSY_WAIT_MAX = 30
# Fatal signaling errors after which following the session cannot go on (as the browser
# client has them): the session is gone, or another connection follows it now.
FINAL_CODES = frozenset({"session_not_found", "replaced", "origin_not_allowed"})
ENDED_STATES = frozenset({"failed", "closed"})


class ApiError(Exception):
    """The broker answered with an error (see the table in PROTOCOL.md)."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: int | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        # Seconds to wait before asking again, when the broker said (``Retry-After``).
        self.retry_after = retry_after


@dataclass(frozen=True)
class SessionGrant:
    """What ``POST /v1/sessions`` returned."""

    id: str
    tower: str
    signaling_url: str
    token: str
    ice_servers: tuple[dict[str, Any], ...]
    answer: str | None = None


class BrokerClient:
    """The broker's HTTPS API.

    Args:
        url: the broker's HTTPS origin, e.g. ``https://127.0.0.1:8443``.
        api_key: the bearer key for session requests.
        ssl_context: trusts the broker's certificate (for the embedded broker, a context
            that loads its self-signed certificate).
    """

    def __init__(self, url: str, api_key: str, ssl_context: ssl.SSLContext) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 443
        self.api_key = api_key
        self.ssl_context = ssl_context
        # Idle kept-alive connections, as a browser keeps its connection to the origin.
        self._idle: list[_HttpConnection] = []
        self._ice_servers: tuple[dict[str, Any], ...] | None = None

    async def request(
        self, method: str, path: str, body: Any = None, *, api_key: str | None = None,
        raw_body: bytes | None = None,
    ) -> tuple[int, Any]:
        """One HTTP/1.1 request; returns the status and the decoded JSON body (or text)."""
        status, _, payload = await self._exchange(method, path, body, api_key, raw_body)
        return status, payload

    async def _exchange(
        self, method: str, path: str, body: Any, api_key: str | None = None,
        raw_body: bytes | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """``request``, with the response's headers too."""
        data = raw_body if raw_body is not None else (
            b"" if body is None else json.dumps(body).encode())
        fields = [("host", f"{self.host}:{self.port}"), ("content-length", str(len(data)))]
        key = self.api_key if api_key is None else api_key
        if key:
            fields.append(("authorization", f"Bearer {key}"))
        if data:
            fields.append(("content-type", "application/json"))
        request = h11.Request(method=method, target=path, headers=fields)
        while self._idle:
            connection = self._idle.pop()
            try:
                status, headers, payload = await connection.exchange(request, data)
                break
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                # The server closed it while idle: try the next one, or a new one.
                await trio.aclose_forcefully(connection.stream)
        else:
            stream = await trio.open_ssl_over_tcp_stream(
                self.host, self.port, ssl_context=self.ssl_context
            )
            connection = _HttpConnection(stream)
            status, headers, payload = await connection.exchange(request, data)
        if connection.reusable():
            self._idle.append(connection)
        else:
            await trio.aclose_forcefully(connection.stream)
        if not payload:
            return status, headers, None
        try:
            return status, headers, json.loads(payload)
        except ValueError:
            return status, headers, payload.decode(errors="replace")

    async def aclose(self) -> None:
        """Close the kept-alive connections."""
        while self._idle:
            await trio.aclose_forcefully(self._idle.pop().stream)

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        status, headers, payload = await self._exchange(method, path, body)
        if status >= 400:
            error = (payload or {}).get("error", {}) if isinstance(payload, dict) else {}
            retry_after = headers.get("retry-after", "")
            raise ApiError(status, error.get("code", "unknown"), error.get("message", ""),
                           int(retry_after) if retry_after.isascii() and retry_after.isdigit()
                           else None)
        return payload

    async def create_session(
        self, application: str = "echo", offer: str | None = None, *,
        busy_attempts: int = BUSY_ATTEMPTS,
    ) -> SessionGrant:
        """``POST /v1/sessions``; with ``offer``, the grant carries the tower's answer.

        Refused ``towers_busy`` (every tower busy answering other offers), it asks again
        after the broker's ``Retry-After`` (1 s), up to ``busy_attempts`` times in all;
        the last refusal is raised (``ApiError``).
        """
        if busy_attempts < 1:
            raise ValueError(f"busy_attempts must be at least 1, not {busy_attempts}")
        body: dict[str, Any] = {"application": application}
        if offer is not None:
            body["offer"] = offer
        for attempt in range(1, busy_attempts + 1):
            try:
                created = await self._call("POST", "/v1/sessions", body)
                break
            except ApiError as error:
                if error.code != "towers_busy" or attempt >= busy_attempts:
                    raise
                wait = 1 if error.retry_after is None else min(error.retry_after, BUSY_WAIT_MAX)
                await trio.sleep(wait * random.uniform(1, 1.5))
        return SessionGrant(
            id=created["id"],
            tower=created["tower"],
            signaling_url=created["signaling_url"],
            token=created["token"],
            ice_servers=tuple(created["ice_servers"]),
            answer=created.get("answer"),
        )

    async def ice_servers(self) -> tuple[dict[str, Any], ...]:
        """``GET /v1/ice-servers``, once: what a peer needs before it can offer."""
        if self._ice_servers is None:
            self._ice_servers = tuple(
                (await self._call("GET", "/v1/ice-servers"))["ice_servers"]
            )
        return self._ice_servers

    async def get_session(self, session_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/sessions/{session_id}")

    async def delete_session(self, session_id: str) -> None:
        await self._call("DELETE", f"/v1/sessions/{session_id}")

    async def new_token(self, session_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/sessions/{session_id}/tokens")


class _HttpConnection:
    def __init__(self, stream: trio.SSLStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def exchange(
        self, request: h11.Request, data: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Send ``request``; returns the response's status, headers (names in lower
        case) and body."""
        connection, stream = self.h11, self.stream
        await stream.send_all(connection.send(request) + connection.send(h11.Data(data=data))
                              + connection.send(h11.EndOfMessage()))
        status, headers, payload = 0, {}, b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                chunk = await stream.receive_some(65536)
                if not chunk and status == 0:
                    raise trio.BrokenResourceError("the connection closed before a response")
                connection.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {name.decode(): value.decode(errors="replace")
                           for name, value in event.headers}
            elif isinstance(event, h11.Data):
                payload += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, headers, payload

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False


@dataclass
class ClientSession:
    """A live session seen from the client: its frames, its state, its peer.

    The protocol's one rule for a client: offer whenever the broker is negotiating a
    negotiation this client has not offered for yet (its ``state`` frame on connect, or
    a ``reoffer``), with a fresh peer connection; take the answer of the last offer.
    """

    grant: SessionGrant
    websocket: WebSocketConnection
    answer_heartbeats: bool = True
    video: bool = False
    # Opens the signaling socket again at a URL with a fresh token; None: a dropped
    # socket ends the following.
    reconnect: Callable[[], Awaitable[WebSocketConnection]] | None = None
    frames: list[dict[str, Any]] = field(default_factory=list)
    state: str = ""
    negotiation: int = 0
    offered: int = 0
    peer: ClientPeer | None = None
    peers_made: int = 0
    # ``time.perf_counter()`` when the tower's first answer reached the client: with the
    # ``POST`` (``start_session``) or on the socket.
    answered_at: float | None = None
    _changed: trio.Event = field(default_factory=trio.Event)
    _on_peer: set[trio.CancelScope] = field(default_factory=set)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.websocket.send_message(json.dumps(frame))

    async def wait_for(self, predicate, timeout: float) -> dict[str, Any]:
        """Wait for a received frame matching ``predicate``; returns it.

        Raises:
            trio.TooSlowError: none within ``timeout`` seconds.
        """
        seen = 0
        with trio.fail_after(timeout):
            while True:
                for frame in self.frames[seen:]:
                    if predicate(frame):
                        return frame
                seen = len(self.frames)
                await self._changed.wait()

    async def wait_state(self, state: str, timeout: float = 15.0, *, after: int = 0) -> None:
        """Wait until the broker says the session is in ``state`` (at negotiation > after)."""
        await self.wait_for(
            lambda frame: frame.get("type") == "state" and frame["state"] == state
            and frame["negotiation"] > after,
            timeout,
        )

    async def echo(self, payload: str | bytes, timeout: float = 10.0) -> float:
        """One echo round trip on the data channel, in seconds: on the current peer, so
        that a repair's new peer takes over from one that will never open, or whose
        channel closed under it."""
        with trio.fail_after(timeout):
            while True:
                peer = self.peer
                assert peer is not None
                with trio.CancelScope() as on_peer:
                    self._on_peer.add(on_peer)  # cancelled when the peer is replaced
                    try:
                        await call_asyncio(peer.wait_open)
                        return await call_asyncio(peer.echo, payload)
                    except InvalidStateError:
                        if self.state in ENDED_STATES:
                            raise
                        await trio.sleep_forever()  # until a repair's peer comes
                    finally:
                        self._on_peer.discard(on_peer)

    async def _offer(self, negotiation: int) -> None:
        if self.peer is not None:
            await call_asyncio(self.peer.close)
        peer = await call_asyncio(
            functools.partial(new_peer, self.grant.ice_servers,
                              answer_heartbeats=self.answer_heartbeats, video=self.video)
        )
        self._take_peer(peer)
        sdp = await call_asyncio(peer.offer)
        # Counted as offered once sent: one lost with its socket is made again, as the
        # broker's state frame on the next socket asks for it.
        await self.send({"type": "offer", "sdp": sdp, "negotiation": negotiation})
        self.offered = negotiation

    def _take_peer(self, peer: ClientPeer) -> None:
        """The session's peer from now on: echoes waiting on the last one move to it."""
        self.peer = peer
        self.peers_made += 1
        for waiting in self._on_peer:
            waiting.cancel()

    async def _follow(self) -> None:
        while True:
            try:
                await self._take(json.loads(await self.websocket.get_message()))
            except ConnectionClosed:
                self._record({"type": "disconnected"})
                if not await self._reconnect():
                    return

    async def _take(self, frame: dict[str, Any]) -> None:
        """One frame from the broker: recorded, and acted on."""
        self._record(frame)
        kind = frame.get("type")
        if kind == "state":
            self.state = frame["state"]
            self.negotiation = max(self.negotiation, frame["negotiation"])
            if self.state == "negotiating" and frame["negotiation"] > self.offered:
                await self._offer(frame["negotiation"])
        elif kind == "reoffer" and frame["negotiation"] > self.offered:
            self.negotiation = frame["negotiation"]
            await self._offer(frame["negotiation"])
        elif kind == "answer" and self.peer is not None:
            # (One it has already taken may come again on a new connection.)
            if frame["negotiation"] == self.offered and self.peer.awaiting_answer:
                if self.answered_at is None:
                    self.answered_at = time.perf_counter()
                await call_asyncio(self.peer.accept, frame["sdp"])

    async def _reconnect(self) -> bool:
        """Open the signaling socket again, unless the session is over; whether it is
        open again. Waits between attempts, longer each time up to a few seconds."""
        errors = [frame for frame in self.frames if frame.get("type") == "error"]
        final = bool(errors) and errors[-1].get("fatal") and errors[-1]["code"] in FINAL_CODES
        if self.reconnect is None or self.state in ENDED_STATES or final:
            return False
        delay = RECONNECT_FIRST_DELAY
        while True:
            # Drawn up to half as long again: the clients a broker dropped together do
            # not all come back together.
            await trio.sleep(delay * (1 + random.random() / 2))
            try:
                self.websocket = await self.reconnect()
            except ApiError as error:
                if error.status in (401, 403, 404):  # gone, or no longer ours to follow
                    return False
            except (OSError, HandshakeError, trio.BrokenResourceError, h11.ProtocolError,
                    KeyError, TypeError):  # also a token reply that is not the protocol's
                pass
            else:
                self._record({"type": "reconnected"})
                return True
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    def _record(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        self._changed.set()
        self._changed = trio.Event()


@asynccontextmanager
async def open_session(
    grant: SessionGrant,
    ssl_context: ssl.SSLContext,
    *,
    answer_heartbeats: bool = True,
    offer: bool = True,
    peer: ClientPeer | None = None,
    video: bool = False,
    new_token: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> AsyncIterator[ClientSession]:
    """Connect to a session's signaling socket and negotiate; repairs are followed.

    Args:
        offer: False connects without ever offering (to test the signaling socket).
        peer: a peer that already offered for negotiation 1 in the ``POST`` (its
            answer, if the grant has one, is taken here).
        video: every peer asks for the tower's video (see ``ClientPeer``).
        new_token: a fresh signaling token (``POST /v1/sessions/{id}/tokens``), to open
            a dropped socket again with; without it a dropped socket ends the following.
    """
    async with open_websocket_url(grant.signaling_url, ssl_context=ssl_context) as websocket, \
            trio.open_nursery() as nursery:

        async def connect_again() -> WebSocketConnection:
            assert new_token is not None
            url = (await new_token())["signaling_url"]
            return await connect_websocket_url(nursery, url, ssl_context=ssl_context)

        session = ClientSession(grant, websocket, answer_heartbeats, video,
                                reconnect=None if new_token is None else connect_again)
        if not offer:
            session.offered = 1 << 30
        if peer is not None:
            session.peer, session.offered, session.peers_made = peer, 1, 1
        nursery.start_soon(session._follow)
        try:
            yield session
        finally:
            with trio.CancelScope(shield=True):
                if session.websocket is not websocket:  # a later one: closed here
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await session.websocket.aclose()
                nursery.cancel_scope.cancel()
                if session.peer is not None:
                    await call_asyncio(session.peer.close)


@asynccontextmanager
async def start_session(
    client: BrokerClient,
    *,
    application: str = "echo",
    answer_heartbeats: bool = True,
    video: bool = False,
    busy_attempts: int = BUSY_ATTEMPTS,
) -> AsyncIterator[ClientSession]:
    """Create a session with the offer in the ``POST`` and follow it: the quickest way in.

    The peer connection starts connecting as soon as the ``POST`` returns with the answer;
    the signaling socket opens meanwhile. ``video`` asks for the tower's video (the demo
    application sends it); ``busy_attempts`` is ``create_session``'s. A session created
    but not handed over (its answer refused by the peer, its socket not opened, a
    cancel) is deleted, so that the broker does not go on negotiating it.
    """
    ice_servers = await client.ice_servers()
    peer = await call_asyncio(
        functools.partial(new_peer, ice_servers, answer_heartbeats=answer_heartbeats,
                          video=video)
    )
    grant: SessionGrant | None = None
    handed_over = False
    try:
        grant = await client.create_session(application, offer=await call_asyncio(peer.offer),
                                            busy_attempts=busy_attempts)
        answered_at = None
        if grant.answer is not None:
            answered_at = time.perf_counter()
            await call_asyncio(peer.accept, grant.answer)
        new_token = functools.partial(client.new_token, grant.id)
        async with open_session(grant, client.ssl_context, answer_heartbeats=answer_heartbeats,
                                peer=peer, video=video, new_token=new_token) as session:
            session.answered_at = session.answered_at or answered_at
            handed_over = True
            yield session
    except BaseException:
        if not handed_over:
            with trio.CancelScope(shield=True):
                await call_asyncio(peer.close)
                if grant is not None:
                    with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
                        await client.delete_session(grant.id)
        raise


def trusting(certificate_file: str) -> ssl.SSLContext:
    """A client TLS context that trusts exactly this (self-signed) certificate."""
    context = ssl.create_default_context(cafile=certificate_file)
    return context
