"""Bad input at every browser-facing boundary: a clear, documented error, nothing else hurt.

One broker serves the whole module, with one healthy session kept open throughout; the
last test checks that it never noticed any of the abuse.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from urllib.parse import urlsplit

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from actors import bridge
from broker.client import trusting

from .conftest import (
    FAST_REPAIR,
    start_broker,
    start_steady_client,
    stop_broker,
    wait_for_towers,
)

SESSIONS_PER_KEY = 6


def run(main, *args):
    return bridge.run(main, *args, handle_signals=False)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    running = start_broker(tmp_path_factory.mktemp("broker"), towers=2,
                           max_sessions_per_key=SESSIONS_PER_KEY, token_lifetime=2.0,
                           **FAST_REPAIR)
    wait_for_towers(running, 2)
    yield running
    stop_broker(running)


@pytest.fixture(scope="module", autouse=True)
def healthy(broker):
    """A session in a process of its own that stays connected while the tests misbehave."""
    steady = start_steady_client(broker)
    yield steady
    steady.kill()


def http(broker, method, path, body=None, headers=None, url=None):
    request = urllib.request.Request((url or broker.url) + path, data=body, method=method,
                                     headers=headers or {})
    context = ssl.create_default_context(cafile=broker.certificate)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                         NoRedirect)
    try:
        with opener.open(request) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def error_code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


def auth(broker, key=None):
    return {"Authorization": f"Bearer {broker.api_key if key is None else key}"}


def test_plain_http_is_redirected_to_https_with_the_same_path(broker):
    status, headers, _ = http(broker, "GET", "/v1/sessions/x?y=1", url=broker.http_url)
    assert status == 301
    assert headers["location"] == broker.url + "/v1/sessions/x?y=1"


@pytest.mark.parametrize("target", ["@evil.example/x", "http://evil.example/x"])
def test_a_redirect_never_splices_a_target_that_is_not_a_path_after_our_name(broker, target):
    parts = urllib.parse.urlsplit(broker.http_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as raw:
        raw.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    head = answer.decode("latin-1").split("\r\n\r\n")[0].lower()
    assert head.startswith("http/1.1 301")
    assert f"location: {broker.url}/\r\n".lower() in head + "\r\n"


def test_https_responses_carry_hsts(broker):
    status, headers, body = http(broker, "GET", "/healthz")
    assert status == 200 and json.loads(body)["towers_ready"] == 2
    assert headers["strict-transport-security"].startswith("max-age=")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic abc"}])
def test_a_missing_or_wrong_api_key_is_401(broker, headers):
    status, response_headers, body = http(broker, "POST", "/v1/sessions", b"{}", headers)
    assert status == 401 and error_code(body) == "unauthorized"
    assert response_headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/v1/sessions/s-0000000000000000", "/v1/sessions/nonsense",
                                  "/nowhere"])
def test_unknown_sessions_and_urls_are_404(broker, path):
    status, _, body = http(broker, "GET", path, headers=auth(broker))
    assert status == 404 and error_code(body) == "not_found"


def test_a_wrong_method_is_405_with_allow(broker):
    status, headers, body = http(broker, "GET", "/v1/sessions", headers=auth(broker))
    assert status == 405 and error_code(body) == "method_not_allowed"
    assert headers["allow"] == "POST"
    # The page's URLs too (they answered 404, "there is nothing at /").
    status, headers, body = http(broker, "POST", "/", b"key=bk_x")
    assert status == 405 and error_code(body) == "method_not_allowed"
    assert headers["allow"] == "GET, HEAD"


def test_head_answers_wherever_get_does_with_the_same_headers_and_no_body(
        broker, new_grant):
    grant = new_grant()
    for path, headers in (("/", {}), ("/healthz", {}), ("/metrics", {}),
                          ("/v1/ice-servers", auth(broker)),
                          (f"/v1/sessions/{grant.id}", auth(broker))):
        got, got_headers, _ = http(broker, "GET", path, headers=headers)
        status, head_headers, body = http(broker, "HEAD", path, headers=headers)
        assert (status, body) == (got, b""), path
        assert head_headers["content-type"] == got_headers["content-type"], path
    status, headers, _ = http(broker, "PUT", f"/v1/sessions/{grant.id}", headers=auth(broker))
    assert status == 405 and headers["allow"] == "GET, HEAD, DELETE"


def test_the_pages_sockets_may_go_to_its_signaling_origin_only(broker, new_grant):
    _, headers, _ = http(broker, "GET", "/")
    policy = dict(directive.strip().split(" ", 1)
                  for directive in headers["content-security-policy"].split(";"))
    signaling = urlsplit(new_grant().signaling_url)
    assert policy["connect-src"] == f"'self' wss://{signaling.netloc}"


def test_the_page_may_submit_no_form_anywhere(broker):
    # Its API key field is in a form: never sent in a URL, whatever the browser does.
    status, headers, page = http(broker, "GET", "/")
    assert status == 200
    assert "form-action 'none'" in headers["content-security-policy"]
    assert b'name="key"' not in page


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"colour": "red"}',
                                  b'{"application": "doom"}', b'{"application": []}',
                                  b'{"application": {}}', b'{"offer": 5}'])
def test_a_bad_body_is_400(broker, body):
    status, _, response = http(broker, "POST", "/v1/sessions", body, auth(broker))
    assert status == 400 and error_code(response) == "bad_request"


def test_a_body_over_16_kib_is_413(broker):
    body = json.dumps({"application": "x" * 20_000}).encode()
    status, _, response = http(broker, "POST", "/v1/sessions", body, auth(broker))
    assert status == 413 and error_code(response) == "payload_too_large"


def test_a_413_on_a_kept_alive_connection_says_it_closes(broker):
    # urllib asks for each connection to close; a browser keeps it alive.
    context = ssl.create_default_context(cafile=broker.certificate)
    url = urlsplit(broker.url)
    host = url.hostname
    with socket.create_connection((host, url.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as connection:
        connection.sendall(
            f"POST /v1/sessions HTTP/1.1\r\nHost: {host}\r\nContent-Length: 20000\r\n"
            f"Authorization: Bearer {broker.api_key}\r\n\r\n".encode() + b"x" * 20_000)
        head = b""
        while b"\r\n\r\n" not in head:
            head += connection.recv(4096)
    lines = head.split(b"\r\n\r\n")[0].decode().lower().split("\r\n")
    assert lines[0].startswith("http/1.1 413")
    assert "connection: close" in lines


def test_too_many_sessions_for_a_key_is_429_until_one_ends(broker, healthy):
    created = []
    while True:
        status, _, body = http(broker, "POST", "/v1/sessions", b"", auth(broker))
        if status != 201:
            break
        created.append(json.loads(body)["id"])
    assert status == 429 and error_code(body) == "too_many_sessions"
    assert len(created) == SESSIONS_PER_KEY - 1  # the healthy session holds one
    assert http(broker, "DELETE", f"/v1/sessions/{created[0]}", headers=auth(broker))[0] == 204
    assert http(broker, "POST", "/v1/sessions", b"", auth(broker))[0] == 201
    # The deleted session is shown as it ended for a while, to its key only.
    status, _, body = http(broker, "GET", f"/v1/sessions/{created[0]}", headers=auth(broker))
    assert status == 200
    assert (json.loads(body)["state"], json.loads(body)["reason"]) == (
        "closed", "deleted through the API")
    assert http(broker, "DELETE", f"/v1/sessions/{created[0]}", headers=auth(broker))[0] == 404
    for session_id in created[1:]:
        http(broker, "DELETE", f"/v1/sessions/{session_id}", headers=auth(broker))


@pytest.fixture
def new_grant(broker):
    """Makes sessions for one test and ends them after it."""
    made = []

    def make():
        async def main():
            return await broker.client().create_session()
        made.append(run(main))
        return made[-1]

    yield make
    for grant in made:
        http(broker, "DELETE", f"/v1/sessions/{grant.id}", headers=auth(broker))


async def _first_frames(url, certificate, send=(), count=1, origin=None):
    """Open the signaling socket, send ``send``, collect ``count`` frames and the close."""
    headers = [("Origin", origin)] if origin else None
    frames, close = [], None
    async with open_websocket_url(url, ssl_context=certificate,
                                  extra_headers=headers) as websocket:
        for frame in send:
            if isinstance(frame, bytes):
                await websocket.send_message(frame)
            else:
                await websocket.send_message(frame if isinstance(frame, str)
                                             else json.dumps(frame))
        try:
            with trio.fail_after(10):
                while len(frames) < count:
                    frames.append(json.loads(await websocket.get_message()))
        except ConnectionClosed as closed:
            close = closed.reason.code
        if close is None:
            with trio.move_on_after(0.5):
                try:
                    await websocket.get_message()
                except ConnectionClosed as closed:
                    close = closed.reason.code
    return frames, close


def test_signaling_tokens_are_checked(broker, new_grant):
    grant, other = new_grant(), new_grant()
    certificate = trusting(broker.certificate)
    base = grant.signaling_url.split("?")[0]

    async def main():
        for url in (base, base + "?token=", base + "?token=abc.def",
                    base + "?token=" + other.token):
            frames, close = await _first_frames(url, certificate)
            assert frames[0]["code"] == "invalid_token" and frames[0]["fatal"] is True
            assert close == 4401
        await trio.sleep(2.5)
        frames, close = await _first_frames(grant.signaling_url, certificate)
        assert frames[0]["code"] == "invalid_token" and "expired" in frames[0]["message"]
        # A fresh token opens it again, once.
        fresh = await broker.client().new_token(grant.id)
        frames, close = await _first_frames(fresh["signaling_url"], certificate)
        assert frames[0]["type"] == "state"
        frames, close = await _first_frames(fresh["signaling_url"], certificate)
        assert frames[0]["code"] == "invalid_token" and "already used" in frames[0]["message"]

    run(main)


def test_a_foreign_origin_is_refused_and_the_own_origin_accepted(broker, new_grant):
    grant = new_grant()
    certificate = trusting(broker.certificate)

    async def main():
        frames, close = await _first_frames(grant.signaling_url, certificate,
                                            origin="https://evil.example")
        assert frames[0]["code"] == "origin_not_allowed" and close == 4403
        for malformed in ("https://[", "https://[zz]", "https://x:99999"):
            frames, close = await _first_frames(grant.signaling_url, certificate,
                                                origin=malformed)
            assert frames[0]["code"] == "origin_not_allowed" and close == 4403
        frames, _ = await _first_frames(grant.signaling_url, certificate, origin=broker.url)
        assert frames[0]["type"] == "state"
        # Both names of the development certificate are the broker's own origin.
        fresh = await broker.client().new_token(grant.id)
        frames, _ = await _first_frames(fresh["signaling_url"], certificate,
                                        origin=broker.url.replace("127.0.0.1", "localhost"))
        assert frames[0]["type"] == "state"

    run(main)


def test_an_ended_session_is_not_found_on_the_signaling_socket(broker, new_grant):
    grant = new_grant()
    http(broker, "DELETE", f"/v1/sessions/{grant.id}", headers=auth(broker))

    async def main():
        frames, close = await _first_frames(grant.signaling_url, trusting(broker.certificate))
        assert frames[0]["code"] == "session_not_found" and close == 4404

    run(main)


@pytest.mark.parametrize("frame, code", [
    ("{nope", "malformed_json"),
    ("[1, 2, 3]", "malformed_json"),
    (b"\x00\x01", "binary_frame"),
    ({"type": "dance"}, "unknown_type"),
    ({"kind": "offer"}, "invalid_message"),
    ({"type": "offer"}, "invalid_message"),
    ({"type": "offer", "sdp": 42}, "invalid_message"),
    ({"type": "offer", "sdp": "hello"}, "invalid_sdp"),
    ({"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"}, "invalid_sdp"),
    ({"type": "candidate", "candidate": "candidate:1 1 udp 1 10.0.0.1 9 typ host",
      "sdpMid": "0", "sdpMLineIndex": 0}, "unexpected_message"),
])
def test_a_bad_frame_gets_an_error_and_the_connection_stays_open(broker, frame, code, new_grant):
    grant = new_grant()

    async def main():
        frames, close = await _first_frames(grant.signaling_url, trusting(broker.certificate),
                                            send=[frame], count=2)
        assert frames[0]["type"] == "state"
        assert frames[1]["type"] == "error" and frames[1]["code"] == code
        assert frames[1]["fatal"] is False and close is None

    run(main)


def test_an_oversized_frame_closes_the_connection_but_not_the_session(broker, new_grant):
    grant = new_grant()

    async def main():
        frames, close = await _first_frames(
            grant.signaling_url, trusting(broker.certificate),
            send=[json.dumps({"type": "offer", "sdp": "v=0" + "x" * 70_000})], count=2)
        assert frames[1]["code"] == "frame_too_large" and close == 4413

    run(main)
    status, _, body = http(broker, "GET", f"/v1/sessions/{grant.id}", headers=auth(broker))
    assert status == 200 and json.loads(body)["state"] == "negotiating"


def test_a_flood_of_frames_is_rate_limited(broker, new_grant):
    grant = new_grant()

    async def main():
        frames, close = await _first_frames(
            grant.signaling_url, trusting(broker.certificate),
            send=["{}"] * 150, count=200)
        assert frames[-1]["code"] == "rate_limited" and close == 4429

    run(main)


def test_a_second_connection_replaces_the_first(broker, new_grant):
    grant = new_grant()
    certificate = trusting(broker.certificate)

    async def main():
        async with open_websocket_url(grant.signaling_url, ssl_context=certificate) as first:
            assert json.loads(await first.get_message())["type"] == "state"
            fresh = await broker.client().new_token(grant.id)
            frames, _ = await _first_frames(fresh["signaling_url"], certificate)
            assert frames[0]["type"] == "state"
            replaced = json.loads(await first.get_message())
            assert replaced["code"] == "replaced" and replaced["fatal"] is True
            with pytest.raises(ConnectionClosed) as closed:
                await first.get_message()
            assert closed.value.reason.code == 4409

    run(main)


def test_the_ice_servers_need_the_api_key_too(broker):
    status, _, body = http(broker, "GET", "/v1/ice-servers")
    assert status == 401 and error_code(body) == "unauthorized"
    status, _, body = http(broker, "GET", "/v1/ice-servers", headers=auth(broker))
    assert status == 200 and json.loads(body) == {"ice_servers": []}


def test_the_healthy_session_never_noticed(broker, healthy):
    status, _, body = http(broker, "GET", f"/v1/sessions/{healthy.id}", headers=auth(broker))
    assert status == 200
    assert json.loads(body)["placements"] == 1
    summary = healthy.finish()
    assert summary["echoes"] > 20 and summary["failed_echoes"] == 0
    assert summary["negotiation"] == 1 and summary["states"] == ["negotiating", "connected"]
    status, _, body = http(broker, "GET", "/healthz")
    assert status == 200 and json.loads(body)["towers_ready"] == 2
