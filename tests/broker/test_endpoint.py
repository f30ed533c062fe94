"""The endpoint's HTTP connections: a burst of them waits for the server rather than
being dropped; each lets go of its memory as it ends; a request's body, which has a
time to arrive in; and HTTP/2 data for a request already answered.

The broker freezes what survives a second out of the garbage collector's sight
(``collector.py``), so a connection whose objects form cycles would wait for a full
collection; these tests run with the collector off and ask that every connection's
objects go by reference counting alone. The clock is trio's, frozen: the server's
timeouts pass only when a test moves it.
"""

import contextlib
import functools
import gc
import json
import select
import socket
import time
import weakref
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import h2.config
import h2.errors
import h2.connection
import h2.events
import h2.settings
import hypercorn.trio.run
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
import wsproto.frame_protocol
from hypercorn.config import Config
from hypercorn.trio import serve
from wsproto.extensions import PerMessageDeflate

from actors import AskTimeout
from broker import endpoint
from broker.client import trusting
from broker.config import Settings
from broker.pki import self_signed_server_certificate

KEEP_ALIVE = 5.0
# More than the sockets between a client and the server hold.
BIG = b"x" * (64 * 2**20)


class RecordedConnection(endpoint._ContainedTCPServer):
    """The endpoint's connection, with weak references to it and to its stream."""

    alive: list[weakref.ref] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alive.extend([weakref.ref(self), weakref.ref(self.stream)])


async def ok(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = BIG if scope["path"] == "/big" else b"ok"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def collector_off(monkeypatch):
    monkeypatch.setattr(RecordedConnection, "alive", [])
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", RecordedConnection)
    gc.collect()
    gc.disable()
    yield RecordedConnection.alive
    gc.enable()


@pytest.fixture
def certificate(tmp_path):
    key, certificate = self_signed_server_certificate()
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "certificate.pem").write_bytes(certificate)
    return tmp_path


@pytest.fixture
async def ports(collector_off, certificate):
    """hypercorn as the endpoint runs it: its HTTPS and plain HTTP ports."""
    config = endpoint.Endpoint(
        None, str(certificate / "certificate.pem"), str(certificate / "key.pem"), None
    ).config(Settings(https_port=0, http_port=0))
    config.keep_alive_timeout = KEEP_ALIVE
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, ok, config, mode="asgi"))
        yield {bind.split("://")[0]: int(bind.rsplit(":", 1)[1]) for bind in binds}
        nursery.cancel_scope.cancel()


async def request(stream) -> bytes:
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    received = b""
    while not received.endswith(b"ok"):
        received += await stream.receive_some(4096)
    return received


async def all_released(alive: list[weakref.ref], connections: int, port: int) -> None:
    """Asserts that the first ``connections`` connections and their streams are freed
    once the server has nothing left to do."""
    while len(alive) < 2 * connections:
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    measured = alive[:2 * connections]
    # trio's listener holds the stream it accepted last until it accepts another.
    async with await trio.open_tcp_stream("127.0.0.1", port):
        for _ in range(20):
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        assert [ref() for ref in measured if ref() is not None] == []


async def tls_connection(port: int, directory) -> trio.SSLStream:
    context = trusting(str(directory / "certificate.pem"))
    return await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)


async def test_a_connection_the_client_closes_is_freed(
    mock_clock, ports, collector_off, certificate
):
    https = ports["https"]
    for _ in range(3):
        stream = await tls_connection(https, certificate)
        assert (await request(stream)).startswith(b"HTTP/1.1 200")
        await stream.aclose()
    await all_released(collector_off, 3, https)


async def test_a_connection_closed_at_its_keep_alive_is_freed(
    mock_clock, ports, collector_off, certificate
):
    https = ports["https"]
    stream = await tls_connection(https, certificate)
    await request(stream)
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    mock_clock.jump(KEEP_ALIVE)
    with pytest.raises(trio.BrokenResourceError):  # closed, with no TLS close_notify
        await stream.receive_some(4096)
    await stream.aclose()
    await all_released(collector_off, 1, https)


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_a_client_that_stops_reading_is_dropped_and_freed(
    mock_clock, ports, collector_off, certificate, scheme
):
    port = ports[scheme]
    if scheme == "https":
        stream = await tls_connection(port, certificate)
    else:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)  # the server's write is stuck
    mock_clock.jump(endpoint.WRITE_TIMEOUT)
    # What the sockets held, then the end: the server dropped the connection.
    received = 0
    try:
        while received < len(BIG) and (chunk := await stream.receive_some(2**20)):
            received += len(chunk)
    except trio.BrokenResourceError:
        pass  # reset, or closed without TLS's close_notify
    assert received < len(BIG)
    await trio.aclose_forcefully(stream)
    # Its last task, hypercorn's idle timer, ends at the keep-alive.
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    mock_clock.jump(KEEP_ALIVE)
    gc.collect()  # the cut write leaves its exception's cycles, as a failure does
    await all_released(collector_off, 1, port)


async def test_a_failed_tls_handshake_is_freed(mock_clock, ports, collector_off):
    https = ports["https"]
    stream = await trio.open_tcp_stream("127.0.0.1", https)
    await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")  # not a TLS client hello
    while await stream.receive_some(4096):  # a TLS alert, then the end
        pass
    await stream.aclose()
    await all_released(collector_off, 1, https)


async def test_a_tls_connection_that_never_finishes_its_handshake_is_freed(
    mock_clock, ports, collector_off
):
    https = ports["https"]
    stream = await trio.open_tcp_stream("127.0.0.1", https)
    # Nothing sent: the server gives up at its handshake timeout.
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    mock_clock.jump(endpoint.TLS_HANDSHAKE_TIMEOUT)
    assert await stream.receive_some(4096) == b""
    await stream.aclose()
    await all_released(collector_off, 1, https)


async def test_connections_past_the_limit_are_closed_as_they_come(
    mock_clock, ports, collector_off, certificate, monkeypatch, caplog
):
    # Without a limit, clients could take every file the broker may open.
    monkeypatch.setattr(endpoint._ContainedTCPServer, "limit", 1)
    https = ports["https"]
    first = await tls_connection(https, certificate)
    assert (await request(first)).startswith(b"HTTP/1.1 200")
    with pytest.raises(trio.BrokenResourceError):
        await request(await tls_connection(https, certificate))
    assert "the most there may be" in caplog.text
    await first.aclose()
    while endpoint._ContainedTCPServer.connections:
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        mock_clock.jump(1)
    again = await tls_connection(https, certificate)
    assert (await request(again)).startswith(b"HTTP/1.1 200")
    await again.aclose()


async def test_a_burst_of_connections_waits_for_the_loop_rather_than_being_dropped(ports):
    # This test holds the server's loop (it does not yield) while more browsers connect
    # than hypercorn's default backlog of 100 holds: the kernel completes every
    # handshake, to be accepted once the loop runs. Past a full backlog, a handshake is
    # dropped, and its browser waits for a SYN retransmission, a second or more.
    # The kernel holds no more than net.core.somaxconn, whatever the broker asks.
    burst = min(300, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    if burst <= 101:
        pytest.skip(f"net.core.somaxconn is {burst}: no backlog past hypercorn's own")
    sockets = [socket.socket() for _ in range(burst)]
    try:
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", ports["https"]))
        waiting, deadline = list(sockets), time.monotonic() + 5
        while waiting and time.monotonic() < deadline:
            _, done, _ = select.select([], waiting, [], 0.1)
            waiting = [sock for sock in waiting if sock not in done]
        assert len(waiting) == 0, f"{len(waiting)} of {burst} connections not completed"
        assert {sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for sock in sockets} == {0}
    finally:
        for sock in sockets:
            sock.close()


async def test_a_plain_http_connection_is_freed(mock_clock, ports, collector_off):
    http = ports["http"]
    stream = await trio.open_tcp_stream("127.0.0.1", http)
    assert (await request(stream)).startswith(b"HTTP/1.1 200")
    await stream.aclose()
    await all_released(collector_off, 1, http)


# A request's body.


async def test_a_body_that_never_comes_ends_the_request_with_408(autojump_clock):
    async def receive():
        await trio.sleep_forever()

    with pytest.raises(endpoint.ApiError) as refused:
        await endpoint._read_json(receive)
    assert (refused.value.status, refused.value.code) == (408, "request_timeout")
    assert trio.current_time() == pytest.approx(endpoint.BODY_TIMEOUT)


async def test_a_body_that_trickles_past_its_time_ends_the_request_with_408(autojump_clock):
    async def receive():
        await trio.sleep(1)
        return {"type": "http.request", "body": b" ", "more_body": True}

    with pytest.raises(endpoint.ApiError) as refused:
        await endpoint._read_json(receive)
    assert refused.value.status == 408


async def test_a_request_whose_client_left_before_its_body_makes_nothing():
    # Taken for an empty body, a POST cancelled half-way made a session for nobody.
    parts = [{"type": "http.request", "body": b"", "more_body": True},
             {"type": "http.disconnect"}]

    async def receive():
        return parts.pop(0)

    with pytest.raises(endpoint.ApiError) as refused:
        await endpoint._read_json(receive)
    assert (refused.value.status, refused.value.code) == (400, "bad_request")


async def test_a_body_in_parts_within_its_time_is_read(autojump_clock):
    parts = [b'{"applica', b'tion": "echo"}']

    async def receive():
        await trio.sleep(1)
        return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

    assert await endpoint._read_json(receive) == {"application": "echo"}


# HTTP/2.


async def h2_connection(port: int, directory) -> tuple[trio.SSLStream, h2.connection.H2Connection]:
    context = trusting(str(directory / "certificate.pem"))
    context.set_alpn_protocols(["h2"])
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    await stream.send_all(connection.data_to_send())
    return stream, connection


async def h2_events(stream, connection, until) -> list[h2.events.Event]:
    """What the server sends, until ``until`` (a predicate on the events so far) or the
    end of the connection."""
    events: list[h2.events.Event] = []
    while not until(events):
        data = await stream.receive_some(65536)
        if not data:
            break
        events += connection.receive_data(data)
        await stream.send_all(connection.data_to_send())
    return events


def request_headers(method: str) -> list[tuple[str, str]]:
    return [(":method", method), (":path", "/healthz"), (":scheme", "https"),
            (":authority", "localhost")]


async def test_a_request_answered_before_its_body_ended_leaves_the_connection_up(
    mock_clock, ports, collector_off, certificate
):
    stream, connection = await h2_connection(ports["https"], certificate)
    assert stream.selected_alpn_protocol() == "h2"
    # The server answers at once (as it does a 408 or 413), with the body half sent.
    connection.send_headers(1, request_headers("POST"))
    connection.send_data(1, b"x" * 1000)
    await stream.send_all(connection.data_to_send())
    await h2_events(stream, connection, lambda events: any(
        isinstance(event, h2.events.StreamEnded) and event.stream_id == 1 for event in events))
    # The rest of that body, then another request on the same connection.
    connection.send_data(1, b"y" * 1000, end_stream=True)
    connection.send_headers(3, request_headers("GET"), end_stream=True)
    await stream.send_all(connection.data_to_send())
    events = await h2_events(stream, connection, lambda events: any(
        isinstance(event, h2.events.ConnectionTerminated)
        or isinstance(event, h2.events.StreamEnded) and event.stream_id == 3
        for event in events))
    [answered] = [event for event in events if isinstance(event, h2.events.ResponseReceived)]
    assert (answered.stream_id, dict(answered.headers)[b":status"]) == (3, b"200")
    await stream.aclose()


async def test_a_connection_its_session_let_go_of_reaches_the_session_no_more(autojump_clock):
    """Replaced by another, or dropped for not reading: its frames go nowhere (each would
    otherwise add its own 100 frames a second to the session's, and the tower's link)."""
    told = []

    class Session:
        async def tell(self, message) -> None:
            told.append(message)

    events = [{"type": "websocket.receive", "text": '{"type": "candidate", "candidate": ""}'}]
    events.append({"type": "websocket.disconnect"})

    async def receive():
        return events.pop(0)

    async def ignore(*arguments) -> None:
        pass

    outbox, frames = trio.open_memory_channel(1)
    outbox.close()  # as the session does when it lets go
    await endpoint.BrokerApi._read(None, receive, Session(), frames, ignore, ignore)
    assert told == []


async def test_an_http2_websocket_we_did_not_offer_is_reset_and_the_connection_stays(
    mock_clock, ports, collector_off, certificate
):
    stream, connection = await h2_connection(ports["https"], certificate)
    connection.send_headers(1, [
        (":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
        (":path", "/healthz"), (":authority", "localhost"), ("sec-websocket-version", "13"),
    ])
    connection.send_headers(3, request_headers("GET"), end_stream=True)
    await stream.send_all(connection.data_to_send())
    events = await h2_events(stream, connection, lambda events: any(
        isinstance(event, h2.events.StreamEnded) and event.stream_id == 3 for event in events))
    [reset] = [event for event in events if isinstance(event, h2.events.StreamReset)]
    assert (reset.stream_id, reset.error_code) == (1, h2.errors.ErrorCodes.PROTOCOL_ERROR)
    [answered] = [event for event in events if isinstance(event, h2.events.ResponseReceived)]
    assert (answered.stream_id, dict(answered.headers)[b":status"]) == (3, b"200")
    await stream.aclose()


@asynccontextmanager
async def served(app, certificate) -> AsyncIterator[int]:
    """``app`` served as the endpoint serves it; yields its HTTPS port."""
    config = endpoint.Endpoint(
        None, str(certificate / "certificate.pem"), str(certificate / "key.pem"), None
    ).config(Settings(https_port=0, http_port=0))
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config, mode="asgi"))
        yield int(next(bind for bind in binds if bind.startswith("https")).rsplit(":", 1)[1])
        nursery.cancel_scope.cancel()


def with_window_shut(connection: h2.connection.H2Connection) -> None:
    """The client takes no response data: its streams' flow-control window is 0."""
    connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})


async def test_an_http2_connection_closed_while_a_response_waits_to_be_sent_lets_it_go(
    autojump_clock, certificate
):
    # The response's task waited for its data to go out, for good, and the connection
    # with it: its socket was never closed (one descriptor per such client, unbounded).
    answered = trio.Event()

    async def app(scope, receive, send) -> None:
        await ok(scope, receive, send)
        if scope["type"] == "http":
            answered.set()

    async with served(app, certificate) as port:
        stream, connection = await h2_connection(port, certificate)
        with_window_shut(connection)
        connection.send_headers(1, request_headers("GET"), end_stream=True)
        await stream.send_all(connection.data_to_send())
        await h2_events(stream, connection, lambda events: any(
            isinstance(event, h2.events.ResponseReceived) for event in events))
        await stream.aclose()
        with trio.fail_after(endpoint.WRITE_TIMEOUT / 2):
            await answered.wait()


async def test_an_http2_response_the_client_does_not_take_ends_its_stream_only(
    mock_clock, ports, collector_off, certificate
):
    stream, connection = await h2_connection(ports["https"], certificate)
    with_window_shut(connection)
    connection.send_headers(1, request_headers("GET"), end_stream=True)
    await stream.send_all(connection.data_to_send())
    await h2_events(stream, connection, lambda events: any(
        isinstance(event, h2.events.ResponseReceived) for event in events))
    mock_clock.autojump_threshold = 0.01
    with trio.fail_after(3 * endpoint.WRITE_TIMEOUT):
        events = await h2_events(stream, connection, lambda events: any(
            isinstance(event, h2.events.StreamReset) for event in events))
    [reset] = [event for event in events if isinstance(event, h2.events.StreamReset)]
    assert (reset.stream_id, reset.error_code) == (1, h2.errors.ErrorCodes.CANCEL)
    # The connection still serves the client's other requests.
    connection.ping(b"12345678")
    await stream.send_all(connection.data_to_send())
    with trio.fail_after(endpoint.WRITE_TIMEOUT):
        assert any(isinstance(event, h2.events.PingAckReceived)
                   for event in await h2_events(stream, connection, lambda events: any(
                       isinstance(event, h2.events.PingAckReceived) for event in events)))
    await stream.aclose()


async def test_data_for_a_request_already_answered_never_holds_up_its_connection(
    mock_clock, ports, collector_off, certificate
):
    # Put in a queue nobody read, the eleventh DATA frame stopped the connection's reader:
    # no more pings answered, no other request taken.
    stream, connection = await h2_connection(ports["https"], certificate)
    with_window_shut(connection)
    connection.send_headers(1, request_headers("POST"))
    await stream.send_all(connection.data_to_send())
    await h2_events(stream, connection, lambda events: any(
        isinstance(event, h2.events.ResponseReceived) for event in events))
    for _ in range(20):
        connection.send_data(1, b"x")
    await stream.send_all(connection.data_to_send())
    mock_clock.autojump_threshold = 0.01
    await trio.sleep(1)  # all of it read, before the ping
    connection.ping(b"12345678")
    await stream.send_all(connection.data_to_send())
    with trio.fail_after(endpoint.WRITE_TIMEOUT / 2):
        await h2_events(stream, connection, lambda events: any(
            isinstance(event, h2.events.PingAckReceived) for event in events))
    await stream.aclose()


@pytest.mark.parametrize("headers", [
    [(":method", "CONNECT"), (":authority", "elsewhere:443")],
    # In lower case, hypercorn took it for a WebSocket, past the broker's own limits.
    [(":method", "connect"), (":scheme", "https"), (":path", "/"),
     (":authority", "localhost"), ("sec-websocket-version", "13")],
], ids=["tunnel", "websocket in lower case"])
async def test_an_http2_connect_is_reset_quietly(
    mock_clock, ports, collector_off, certificate, caplog, headers
):
    stream, connection = await h2_connection(ports["https"], certificate)
    connection.send_headers(1, headers)
    await stream.send_all(connection.data_to_send())
    events = await h2_events(stream, connection, lambda events: any(
        isinstance(event, h2.events.StreamReset) for event in events))
    [reset] = [event for event in events if isinstance(event, h2.events.StreamReset)]
    assert (reset.stream_id, reset.error_code) == (1, h2.errors.ErrorCodes.PROTOCOL_ERROR)
    assert not any(isinstance(event, h2.events.ResponseReceived) for event in events)
    assert caplog.records == []
    await stream.aclose()


async def test_a_response_given_up_on_ends_its_request_though_its_body_was_never_read(
    autojump_clock, certificate
):
    # Its queue full of the body it did not read, the request's task waited for good
    # to hear that its stream had ended, and the connection with it.
    answered = trio.Event()

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            await ok(scope, receive, send)
            return
        await trio.sleep(1)  # an ask to an actor, say, the body not read
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})
        answered.set()

    async with served(app, certificate) as port:
        stream, connection = await h2_connection(port, certificate)
        with_window_shut(connection)
        connection.send_headers(1, request_headers("GET"))
        for _ in range(12):
            connection.send_data(1, b"x")
        await stream.send_all(connection.data_to_send())
        with trio.fail_after(3 * endpoint.WRITE_TIMEOUT):
            await h2_events(stream, connection, lambda events: any(
                isinstance(event, h2.events.StreamReset) for event in events))
            await answered.wait()
        connection.ping(b"12345678")
        await stream.send_all(connection.data_to_send())
        with trio.fail_after(endpoint.WRITE_TIMEOUT):
            await h2_events(stream, connection, lambda events: any(
                isinstance(event, h2.events.PingAckReceived) for event in events))
        await stream.aclose()


async def echo_socket(scope, receive, send) -> None:
    if scope["type"] != "websocket":
        await ok(scope, receive, send)
        return
    await receive()
    await send({"type": "websocket.accept"})
    while (event := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "text": event["text"]})


async def test_a_websocket_turns_down_compression_and_refuses_a_compressed_frame(
    mock_clock, certificate
):
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.certfile = str(certificate / "certificate.pem")
    config.keyfile = str(certificate / "key.pem")
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        [bind] = await nursery.start(functools.partial(serve, echo_socket, config, mode="asgi"))
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        stream = await tls_connection(int(bind.rsplit(":", 1)[1]), certificate)
        await stream.send_all(client.send(wsproto.events.Request(
            host="localhost", target="/", extensions=[PerMessageDeflate()])))
        client.receive_data(await stream.receive_some(4096))
        [accepted] = list(client.events())
        assert isinstance(accepted, wsproto.events.AcceptConnection)
        assert accepted.extensions == []
        # A frame marked compressed (RSV1), as a client that ignored the answer sends it.
        deflate = zlib.compressobj(wbits=-15)
        payload = deflate.compress(b"x" * 10_000) + deflate.flush(zlib.Z_SYNC_FLUSH)
        await stream.send_all(bytes([0xC1, 0xFE]) + len(payload[:-4]).to_bytes(2, "big")
                              + bytes(4) + payload[:-4])
        # wsproto takes it for a protocol error and hypercorn drops the connection.
        received = b""
        with pytest.raises(trio.BrokenResourceError):
            while data := await stream.receive_some(4096):
                received += data
        assert received == b""
        await stream.aclose()
        nursery.cancel_scope.cancel()




async def websocket_opened(
    port: int, certificate
) -> tuple[wsproto.WSConnection, trio.SSLStream]:
    """A WebSocket to ``port``, its handshake answered."""
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    stream = await tls_connection(port, certificate)
    await stream.send_all(client.send(wsproto.events.Request(host="localhost", target="/")))
    client.receive_data(await stream.receive_some(4096))
    assert isinstance(next(client.events()), wsproto.events.AcceptConnection)
    return client, stream


async def test_a_websocket_message_over_the_limit_ends_the_connection(
    autojump_clock, certificate
):
    # hypercorn kept each part before looking at the length, then kept taking parts: a
    # client with no token had the broker hold 275 MiB in 2 s.
    async with served(echo_socket, certificate) as port:
        client, stream = await websocket_opened(port, certificate)
        # A text frame said to be a TiB long, then its first 2 MiB.
        await stream.send_all(bytes([0x81, 0xFF]) + (2**40).to_bytes(8, "big") + bytes(4))
        received = b""
        with trio.fail_after(60):
            with contextlib.suppress(trio.BrokenResourceError):
                for _ in range(32):
                    await stream.send_all(b"a" * 65536)
            with contextlib.suppress(trio.BrokenResourceError):
                while data := await stream.receive_some(65536):
                    received += data
        # The connection ended (the close, 1009, may be lost with what the broker did not
        # read: its socket is reset).
        client.receive_data(received)
        closes = [event for event in client.events()
                  if isinstance(event, wsproto.events.CloseConnection)]
        assert [close.code for close in closes] in ([], [1009])
        await stream.aclose()


async def test_every_message_before_a_clean_close_reaches_a_slow_application(
    autojump_clock, certificate
):
    # The close's disconnect, finding the queue full, must wait its turn, not take the
    # place of a message (a candidate, an offer) the session has yet to read.
    got = []
    done = trio.Event()

    async def app(scope, receive, send) -> None:
        if scope["type"] != "websocket":
            await ok(scope, receive, send)
            return
        await receive()
        await send({"type": "websocket.accept"})
        await trio.sleep(2)  # busy: an ask to the session, say
        while (event := await receive())["type"] == "websocket.receive":
            got.append(event["text"])
            await trio.sleep(0.5)
        done.set()

    async with served(app, certificate) as port:
        client, stream = await websocket_opened(port, certificate)
        frames = b"".join(client.send(wsproto.events.TextMessage(str(i))) for i in range(15))
        await stream.send_all(frames + client.send(wsproto.events.CloseConnection(code=1000)))
        with trio.fail_after(30):
            await done.wait()
        assert got == [str(i) for i in range(15)]
        await stream.aclose()


async def test_data_before_a_websockets_answer_gets_one_400_and_no_traceback(
    autojump_clock, certificate, caplog
):
    async with served(echo_socket, certificate) as port:
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        stream = await tls_connection(port, certificate)
        await stream.send_all(client.send(wsproto.events.Request(host="localhost", target="/"))
                              + b"frames before the answer")
        received = b""
        with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(4096):
                received += data
        assert received.startswith(b"HTTP/1.1 400") and received.count(b"HTTP/1.1") == 1
        assert "Error in ASGI Framework" not in caplog.text
        await stream.aclose()


@pytest.mark.parametrize("origin, parts", [
    ("https://Broker.example", ("https", "broker.example", 443)),
    ("http://127.0.0.1:8080", ("http", "127.0.0.1", 8080)),
    ("https://[", ("", "", -1)),
    ("https://[zz]", ("", "", -1)),
    ("https://x:99999", ("", "", -1)),
    ("null", ("", "", -1)),
])
def test_an_origin_is_read_and_a_malformed_one_is_no_hosts(origin, parts):
    assert endpoint._origin(origin) == parts


@pytest.mark.parametrize("host, https_port, sockets", [
    ("sessions.example", 443, "wss://sessions.example"),
    ("127.0.0.1", 8443, "wss://127.0.0.1:8443"),
    ("::1", 8443, "wss:"),  # a policy has no way to name an IPv6 address
])
def test_the_pages_sockets_may_go_to_the_signaling_origin_only(host, https_port, sockets):
    settings = Settings(public_host=host, https_port=https_port)
    api = endpoint.BrokerApi(settings, (), None, None, None, None)
    assert f"connect-src 'self' {sockets};" in api.page_policy


async def test_a_session_too_busy_to_take_the_socket_is_not_called_ended(autojump_clock):
    # It used to be told session_not_found (4404), and the clients, taking that for final,
    # left a live session.
    attaching = []

    class BusySession:
        async def ask(self, message):
            attaching.append(message.outbox)
            raise AskTimeout("/broker/sessions/session:s-1", 5.0)

    api = SimpleNamespace(_signaling_session=lambda scope: BusySession())
    events = [{"type": "websocket.connect"}, {"type": "websocket.disconnect"}]
    sent = []

    async def receive():
        return events.pop(0)

    async def send(message):
        sent.append(message)

    await endpoint.BrokerApi._websocket(api, {"scheme": "wss"}, receive, send)
    accept, error, close = sent
    assert accept["type"] == "websocket.accept"
    frame = json.loads(error["text"])
    assert (frame["code"], frame["fatal"]) == ("busy", True)
    assert close == {"type": "websocket.close", "code": 4503}
    # The session, coming to the attach later, finds nobody reading.
    [outbox] = attaching
    assert outbox.statistics().open_receive_channels == 0


async def serve_signaling(session) -> list[dict]:
    """The endpoint's signaling handler, with ``session`` standing in for the session
    actor, for a client that connects, stays a second and leaves: what it was sent."""
    api = SimpleNamespace(_signaling_session=lambda scope: session)
    api._write = functools.partial(endpoint.BrokerApi._write, api)
    api._read = functools.partial(endpoint.BrokerApi._read, api)
    events = [{"type": "websocket.connect"}, {"type": "websocket.disconnect"}]
    sent = []

    async def receive():
        await trio.sleep(1)
        return events.pop(0)

    async def send(message):
        sent.append(message)

    await endpoint.BrokerApi._websocket(api, {"scheme": "wss"}, receive, send)
    return sent


async def test_a_socket_the_session_took_as_its_ask_ran_out_is_served(autojump_clock):
    # The session attached it (telling the connection it had before "replaced") just as
    # the ask gave up: told "busy" too, both clients would have had to connect again.
    told = []

    class LateSession:
        async def ask(self, message):
            message.outbox.send_nowait({"type": "state", "state": "connected"})
            raise AskTimeout("/broker/sessions/session:s-1", 5.0)

        def tell_nowait(self, message):
            told.append(message)

    accept, state = await serve_signaling(LateSession())
    assert accept["type"] == "websocket.accept"
    assert json.loads(state["text"]) == {"type": "state", "state": "connected"}
    [detach] = told
    assert isinstance(detach, endpoint.DetachClient)


async def test_a_closed_socket_takes_no_more_frames_from_its_session(autojump_clock):
    # Until the session took the detach, what it sent (an answer, say) went into the
    # ended connection's outbox and was lost; refused, the session keeps the answer.
    attached, told = [], []

    class Session:
        async def ask(self, message):
            attached.append(message.outbox)
            message.outbox.send_nowait({"type": "state", "state": "negotiating"})

        def tell_nowait(self, message):
            told.append(message)

    await serve_signaling(Session())
    [outbox] = attached
    assert [type(message) for message in told] == [endpoint.DetachClient]
    with pytest.raises(trio.BrokenResourceError):
        outbox.send_nowait({"type": "answer", "negotiation": 1, "sdp": "v=0"})
