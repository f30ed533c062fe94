"""The signaling protocol, called directly: client frames, tokens and the rate limit."""

import asyncio
import contextlib
import functools
import json
import pickle
import re
import string
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from hypothesis import example, given
from hypothesis import strategies as st

from broker.sessions import ClientCandidate, ClientOffer, CloseSession
from broker.signaling import (
    CLOSE_CODES,
    MAX_FRAME_BYTES,
    RateLimit,
    SignalingError,
    SignalingTokens,
    check_offer_sdp,
    frame_cost,
    parse_client_frame,
)

PROTOCOL = Path(__file__).resolve().parents[2] / "PROTOCOL.md"
SECRET = bytes(range(32))
SESSION = "s-4kq2w9x1hz7d"


async def _make_offer() -> str:
    peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        peer.createDataChannel("heartbeat")
        await peer.setLocalDescription(await peer.createOffer())
        return peer.localDescription.sdp
    finally:
        await peer.close()


@pytest.fixture(scope="module")
def offer_sdp() -> str:
    """A real offer with a data channel, as aiortc makes it."""
    return asyncio.run(_make_offer())


def refused(data) -> SignalingError:
    with pytest.raises(SignalingError) as caught:
        parse_client_frame(data)
    return caught.value


def frame(**fields) -> str:
    return json.dumps(fields)


def without_lines(sdp: str, prefix: str) -> str:
    kept = [line for line in sdp.splitlines(keepends=True) if not line.startswith(prefix)]
    assert len(kept) < len(sdp.splitlines()), f"the offer has no {prefix!r} line"
    return "".join(kept)


@functools.cache
def protocol_error_table() -> dict[str, tuple[str, str]]:
    """code -> (where, HTTP column) from PROTOCOL.md's table of errors; of a code with a
    row for the API and one for the socket, the socket's."""
    errors = PROTOCOL.read_text().split("\n## Errors\n")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]*) \| ([^|]*) \|", errors, flags=re.MULTILINE)
    return {code: (where.strip(), http.strip()) for code, http, where in rows}


# Offers.


def test_a_real_offer_is_accepted(offer_sdp):
    assert parse_client_frame(frame(type="offer", sdp=offer_sdp)) == ClientOffer(offer_sdp)


def test_an_offer_with_bare_newlines_is_accepted(offer_sdp):
    sdp = offer_sdp.replace("\r\n", "\n")
    assert parse_client_frame(frame(type="offer", sdp=sdp)) == ClientOffer(sdp)


@pytest.mark.parametrize("sdp", ["", "hello", "o=- 1 1 IN IP4 0.0.0.0\r\n", " v=0\r\n"])
def test_an_sdp_must_start_with_its_version(sdp):
    error = refused(frame(type="offer", sdp=sdp))
    assert error.code == "invalid_sdp"
    assert "v=0" in error.message


@pytest.mark.parametrize("sdp", [
    "v=0garbage\r\n",
    "v=0\r\nm=audio not-a-port RTP/AVP 0\r\n",
    "v=0\r\nm=application\r\n",
])
def test_garbage_sdp_is_invalid(sdp):
    error = refused(frame(type="offer", sdp=sdp))
    assert error.code == "invalid_sdp"
    assert error.message.startswith("the SDP does not parse")


def test_an_sdp_without_media_is_invalid(offer_sdp):
    session_part = offer_sdp.split("m=")[0]
    assert session_part.startswith("v=0")
    error = refused(frame(type="offer", sdp=session_part))
    assert (error.code, error.message) == ("invalid_sdp", "the SDP has no media or data section")


def with_candidates(sdp: str, count: int) -> str:
    """The offer with ``count`` host candidates in its first media section."""
    lines = [f"a=candidate:{n} 1 udp 2130706431 192.0.2.{n % 250 + 1} {10000 + n} typ host"
             for n in range(count)]
    head, _, tail = sdp.partition("a=ice-ufrag:")
    return head + "\r\n".join(lines) + "\r\na=ice-ufrag:" + tail


def with_sections(sdp: str, count: int) -> str:
    """The offer with its first media section ``count`` times, each its own mid."""
    head, _, section = sdp.partition("m=")
    section = "m=" + section
    mid = section.split("a=mid:", 1)[1].split("\r\n", 1)[0]
    sections = [section.replace(f"a=mid:{mid}\r\n", f"a=mid:s{n}\r\n")
                for n in range(count)]
    head = head.replace(f"a=group:BUNDLE {mid}",
                        "a=group:BUNDLE " + " ".join(f"s{n}" for n in range(count)))
    return head + "".join(sections)


def test_an_offer_has_at_most_16_sections(offer_sdp):
    # The tower answers each: 300 of them came to an answer of 314 KB, over a link frame.
    sdp = with_sections(offer_sdp, 16)
    assert parse_client_frame(frame(type="offer", sdp=sdp)) == ClientOffer(sdp)
    error = refused(frame(type="offer", sdp=with_sections(offer_sdp, 17)))
    assert (error.code, error.message) == (
        "invalid_sdp", "more than 16 media and data sections")


def test_an_offer_carries_at_most_100_candidates(offer_sdp):
    room = 100 - offer_sdp.count("a=candidate:")  # its own host candidates
    sdp = with_candidates(offer_sdp, room)
    assert parse_client_frame(frame(type="offer", sdp=sdp)) == ClientOffer(sdp)
    error = refused(frame(type="offer", sdp=with_candidates(offer_sdp, room + 1)))
    assert (error.code, error.message) == ("invalid_sdp", "more than 100 candidates in the offer")


@pytest.mark.parametrize("attribute", ["a=ice-ufrag:", "a=ice-pwd:"])
def test_an_sdp_without_ice_credentials_is_invalid(offer_sdp, attribute):
    error = refused(frame(type="offer", sdp=without_lines(offer_sdp, attribute)))
    assert (error.code, error.message) == ("invalid_sdp", "a section has no ICE credentials")


@pytest.mark.parametrize("attributes", [("a=fingerprint:",), ("a=fingerprint:", "a=setup:")])
def test_a_data_section_without_a_dtls_fingerprint_is_invalid(offer_sdp, attributes):
    sdp = offer_sdp
    for attribute in attributes:
        sdp = without_lines(sdp, attribute)
    error = refused(frame(type="offer", sdp=sdp))
    assert (error.code, error.message) == (
        "invalid_sdp", "the data section has no DTLS fingerprint"
    )


def test_a_session_level_fingerprint_covers_the_data_section(offer_sdp):
    fingerprint = next(
        line for line in offer_sdp.splitlines(keepends=True) if line.startswith("a=fingerprint:")
    )
    sdp = without_lines(offer_sdp, "a=fingerprint:")
    session_part, media_part = sdp.split("m=", 1)
    sdp = session_part + fingerprint + "m=" + media_part
    check_offer_sdp(sdp)


@pytest.mark.parametrize("fields", [
    {"type": "offer"},
    {"type": "offer", "sdp": None},
    {"type": "offer", "sdp": 42},
    {"type": "offer", "sdp": ["v=0"]},
    {"type": "offer", "sdp": {"sdp": "v=0"}},
])
def test_an_offer_needs_a_string_sdp(fields):
    error = refused(json.dumps(fields))
    assert error.code == "invalid_message"
    assert "'sdp'" in error.message


def test_an_offer_with_an_unknown_field_is_invalid(offer_sdp):
    error = refused(frame(type="offer", sdp=offer_sdp, number=1))
    assert error.code == "invalid_message"
    assert "number" in error.message


def test_an_offer_and_a_candidate_may_say_their_negotiation(offer_sdp):
    assert parse_client_frame(frame(type="offer", sdp=offer_sdp, negotiation=3)) == ClientOffer(
        offer_sdp, negotiation=3)
    candidate = parse_client_frame(frame(type="candidate", candidate="", negotiation=2))
    assert candidate.negotiation == 2
    for wrong in (0, -1, 2**31, "1", 1.5, True, None):
        error = refused(frame(type="offer", sdp=offer_sdp, negotiation=wrong))
        assert (error.code, error.message) == (
            "invalid_message", "the field 'negotiation' must be a positive integer")


# Candidates.


def test_a_candidate_is_parsed():
    data = frame(type="candidate", candidate="candidate:1 1 udp 2130706431 192.0.2.1 9 typ host",
                 sdpMid="0", sdpMLineIndex=0)
    assert parse_client_frame(data) == ClientCandidate(
        "candidate:1 1 udp 2130706431 192.0.2.1 9 typ host", "0", 0
    )


def test_a_candidate_as_the_browser_sends_it_with_its_username_fragment():
    data = frame(type="candidate", candidate="candidate:1 1 udp 1 192.0.2.1 9 typ host",
                 sdpMid=None, sdpMLineIndex=None, usernameFragment="nZhl")
    assert parse_client_frame(data) == ClientCandidate(
        "candidate:1 1 udp 1 192.0.2.1 9 typ host", None, None
    )


@pytest.mark.parametrize("candidate", ["", None])
def test_an_empty_or_null_candidate_is_the_end_of_candidates(candidate):
    data = frame(type="candidate", candidate=candidate, sdpMid="0", sdpMLineIndex=0)
    assert parse_client_frame(data) == ClientCandidate("", "0", 0)


def test_sdp_mid_and_index_may_be_left_out():
    assert parse_client_frame(frame(type="candidate", candidate="")) == ClientCandidate(
        "", None, None
    )


@pytest.mark.parametrize("fields, named", [
    ({"type": "candidate"}, "candidate"),
    ({"type": "candidate", "candidate": 1}, "candidate"),
    ({"type": "candidate", "candidate": True}, "candidate"),
    ({"type": "candidate", "candidate": "", "sdpMid": 0}, "sdpMid"),
    ({"type": "candidate", "candidate": "", "sdpMLineIndex": "0"}, "sdpMLineIndex"),
    ({"type": "candidate", "candidate": "", "sdpMLineIndex": 0.0}, "sdpMLineIndex"),
    ({"type": "candidate", "candidate": "", "sdpMLineIndex": True}, "sdpMLineIndex"),
    ({"type": "candidate", "candidate": "", "sdp_mid": "0"}, "sdp_mid"),
])
def test_a_candidate_with_a_missing_wrong_or_unknown_field_is_invalid(fields, named):
    error = refused(json.dumps(fields))
    assert error.code == "invalid_message"
    assert named in error.message
    assert not error.fatal


def test_a_candidate_is_at_most_1024_characters():
    assert parse_client_frame(frame(type="candidate", candidate="c" * 1024)).candidate == (
        "c" * 1024
    )
    error = refused(frame(type="candidate", candidate="c" * 1025))
    assert error.code == "invalid_message"


def test_an_sdp_mid_is_at_most_64_characters():
    assert parse_client_frame(frame(type="candidate", candidate="", sdpMid="m" * 64)).sdp_mid \
        == "m" * 64
    error = refused(frame(type="candidate", candidate="", sdpMid="m" * 65))
    assert (error.code, error.fatal) == ("invalid_message", False)


# Close, and frames that are no message.


def test_close_ends_the_session():
    assert parse_client_frame(frame(type="close")) == CloseSession("closed by the client")


def test_close_takes_no_fields():
    assert refused(frame(type="close", why="bored")).code == "invalid_message"


@pytest.mark.parametrize("kind", ["answer", "reoffer", "state", "error", "Offer", "", "x" * 100])
def test_a_type_the_protocol_does_not_have_is_unknown(kind):
    error = refused(frame(type=kind))
    assert error.code == "unknown_type"
    assert len(error.message) < 100


@pytest.mark.parametrize("fields", [{}, {"type": None}, {"type": 1}, {"type": ["offer"]}])
def test_a_frame_without_a_string_type_is_invalid(fields):
    assert refused(json.dumps(fields)).code == "invalid_message"


@pytest.mark.parametrize("data", [
    "", "{", "offer", "{'type': 'close'}", '{"type": "close"} trailing', "[" * 10_000,
])
def test_text_that_is_not_json_is_malformed(data):
    error = refused(data)
    assert error.code == "malformed_json"
    assert not error.fatal


@pytest.mark.parametrize("data", ["[]", '["offer"]', '"close"', "1", "null", "true"])
def test_json_that_is_not_an_object_is_malformed(data):
    assert refused(data).code == "malformed_json"


def test_deeply_nested_json_is_malformed_not_a_crash():
    assert refused("[" * 30_000 + "]" * 30_000).code == "malformed_json"


@pytest.mark.parametrize("data", [b"", b'{"type": "close"}', b"\x00\xff"])
def test_a_binary_frame_is_refused(data):
    error = refused(data)
    assert error.code == "binary_frame"
    assert not error.fatal


def test_a_text_frame_of_64_kib_is_read():
    padding = MAX_FRAME_BYTES - len(frame(type="candidate", candidate=""))
    data = frame(type="candidate", candidate="") + " " * padding
    assert len(data) == MAX_FRAME_BYTES
    assert parse_client_frame(data) == ClientCandidate("", None, None)


def test_a_text_frame_over_64_kib_is_too_large():
    error = refused(frame(type="close") + " " * MAX_FRAME_BYTES)
    assert (error.code, error.fatal, error.close_code) == ("frame_too_large", True, 4413)


def test_the_size_of_a_text_frame_is_counted_in_bytes():
    # 30 000 euro signs: under 64 Ki characters, about 90 000 bytes on the wire.
    data = json.dumps({"type": "offer", "sdp": "\u20ac" * 30_000}, ensure_ascii=False)
    assert len(data) < MAX_FRAME_BYTES < len(data.encode())
    assert refused(data).code == "frame_too_large"


def test_a_binary_frame_over_64_kib_is_too_large():
    assert refused(b"{" * (MAX_FRAME_BYTES + 1)).code == "frame_too_large"
    assert refused(b"{" * MAX_FRAME_BYTES).code == "binary_frame"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
FRAME_FIELDS = st.sampled_from(
    ["type", "sdp", "candidate", "sdpMid", "sdpMLineIndex", "usernameFragment", "why"]
)
FRAME_LIKE = st.dictionaries(
    FRAME_FIELDS,
    st.sampled_from(["offer", "candidate", "close", "v=0\r\n", ""]) | JSON_VALUES,
    max_size=5,
)


@given(st.text() | st.binary() | JSON_VALUES.map(json.dumps) | FRAME_LIKE.map(json.dumps))
@example("v=0")
@example('{"type": "offer", "sdp": "v=0\\r\\nm=audio 9 RTP/AVP 300\\r\\n"}')
@example('{"type": "offer", "sdp": "v=0\\r\\na=setup:bogus\\r\\nm=application 9 X y\\r\\n"}')
@example('{"type": "candidate", "candidate": null, "sdpMLineIndex": -1}')
def test_any_frame_is_a_message_or_a_signaling_error(data):
    try:
        message = parse_client_frame(data)
    except SignalingError as error:
        assert error.code in protocol_error_table()
        assert error.frame()["type"] == "error"
        json.dumps(error.frame())
    else:
        assert isinstance(message, (ClientOffer, ClientCandidate, CloseSession))


SDP_LINES = st.sampled_from([
    "v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "c=IN IP4 192.0.2.1",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "m=audio 9 UDP/TLS/RTP/SAVPF 111",
    "m=video x RTP/AVP 96", "a=ice-ufrag:abcd", "a=ice-pwd:0123456789abcdefghij",
    "a=fingerprint:sha-256 AB:CD", "a=fingerprint:broken", "a=setup:actpass", "a=setup:nope",
    "a=rtpmap:111 opus/48000/2", "a=rtpmap:111", "a=fmtp:96 x=1", "a=ssrc:1 cname:x",
    "a=ssrc:x", "a=candidate:1 1 udp 1 192.0.2.1 9 typ host", "a=candidate:?",
    "a=sctp-port:5000", "a=sctp-port:x", "a=extmap:1", "a=rtcp:x", "a=group:BUNDLE 0",
    "a=mid:0", "a=max-message-size:x", "a=end-of-candidates",
]) | st.text(max_size=30)


@given(st.lists(SDP_LINES, max_size=16), st.sampled_from(["\r\n", "\n"]))
def test_any_sdp_is_accepted_or_invalid_sdp(lines, newline):
    sdp = newline.join(["v=0", *lines]) + newline
    try:
        check_offer_sdp(sdp)
    except SignalingError as error:
        assert error.code == "invalid_sdp"


# Errors as PROTOCOL.md has them.


def test_the_protocol_table_is_read():
    table = protocol_error_table()
    assert table["frame_too_large"] == ("WS, fatal", "—")
    assert table["malformed_json"] == ("WS", "—")
    assert table["no_tower"] == ("API", "503")


def test_fatal_errors_are_those_the_protocol_calls_fatal():
    for code, (where, _http) in protocol_error_table().items():
        if where.startswith("WS"):
            assert SignalingError(code, "").fatal is where.endswith("fatal"), code


@pytest.mark.parametrize("code, close_code", [
    ("invalid_token", 4401),
    ("origin_not_allowed", 4403),
    ("session_not_found", 4404),
    ("replaced", 4409),
    ("frame_too_large", 4413),
    ("rate_limited", 4429),
    ("busy", 4503),
])
def test_fatal_errors_close_with_4000_plus_their_status(code, close_code):
    assert SignalingError(code, "").close_code == close_code
    assert CLOSE_CODES[code] == close_code


@pytest.mark.parametrize("code", [
    "malformed_json", "binary_frame", "unknown_type", "invalid_message", "invalid_sdp",
    "unexpected_message",
])
def test_non_fatal_errors_leave_the_connection_open(code):
    error = SignalingError(code, "what went wrong")
    assert not error.fatal
    assert error.frame() == {
        "type": "error", "code": code, "message": "what went wrong", "fatal": False,
    }


def test_a_fatal_error_frame_says_so():
    assert SignalingError("replaced", "taken over").frame()["fatal"] is True


def test_a_signaling_error_passes_through_context_managers():
    @contextlib.contextmanager
    def guarded():
        yield

    with pytest.raises(SignalingError) as caught:
        with guarded():
            raise SignalingError("invalid_token", "expired")
    assert caught.value.code == "invalid_token"


def test_a_signaling_error_survives_pickling():
    error = pickle.loads(pickle.dumps(SignalingError("rate_limited", "too fast")))
    assert (error.code, error.message, error.close_code) == ("rate_limited", "too fast", 4429)


# Tokens.


@pytest.fixture
def tokens() -> SignalingTokens:
    return SignalingTokens(SECRET, lifetime=60.0)


def test_a_token_opens_its_session_until_it_expires(tokens):
    tokens.check(tokens.issue(SESSION, now=1000.0), SESSION, now=1000.0)
    tokens.check(tokens.issue(SESSION, now=1000.0), SESSION, now=1060.0)


def test_a_token_opens_one_connection_only(tokens):
    token = tokens.issue(SESSION, now=1000.0)
    tokens.check(token, SESSION, now=1000.0)
    with pytest.raises(SignalingError) as caught:
        tokens.check(token, SESSION, now=1001.0)
    assert caught.value.code == "invalid_token" and "already used" in caught.value.message
    assert tokens.issue(SESSION, now=1000.0) != token


def test_used_tokens_are_forgotten_once_expired(tokens):
    for second in range(200):
        tokens.check(tokens.issue(SESSION, now=float(second)), SESSION, now=float(second))
    assert len(tokens.spent) <= 2 * tokens.lifetime + 1


def test_an_expired_token_is_refused(tokens):
    token = tokens.issue(SESSION, now=1000.0)
    with pytest.raises(SignalingError) as caught:
        tokens.check(token, SESSION, now=1060.001)
    assert caught.value.code == "invalid_token"
    assert "expired" in caught.value.message
    assert caught.value.close_code == 4401


def test_a_token_is_worthless_for_another_session(tokens):
    token = tokens.issue(SESSION, now=0.0)
    with pytest.raises(SignalingError) as caught:
        tokens.check(token, "s-other", now=0.0)
    assert caught.value.code == "invalid_token"
    assert "not for this session" in caught.value.message


def test_a_token_of_another_secret_is_refused(tokens):
    token = SignalingTokens(bytes(32), lifetime=60.0).issue(SESSION, now=0.0)
    with pytest.raises(SignalingError) as caught:
        tokens.check(token, SESSION, now=0.0)
    assert caught.value.code == "invalid_token"


def test_tokens_are_url_safe(tokens):
    token = tokens.issue(SESSION, now=12345.678)
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)


@pytest.mark.parametrize("token", [
    "", ".", "abc", "a.b.c", "QE4AAAAAAAA", "QE4AAAAAAAA.", "!!!.???", "QE4A.AAAA",
    "\u00e9\u00e9\u00e9.\u00e9\u00e9\u00e9", "QE4AAAAAAAAAA.AAAA", "Q.A",
])
def test_a_malformed_token_is_refused(tokens, token):
    with pytest.raises(SignalingError) as caught:
        tokens.check(token, SESSION, now=0.0)
    assert caught.value.code == "invalid_token"


def test_a_token_with_its_expiry_rewritten_is_refused(tokens):
    token = tokens.issue(SESSION, now=0.0)
    later = tokens.issue(SESSION, now=10_000.0)
    forged = later.split(".")[0] + "." + token.split(".")[1]
    with pytest.raises(SignalingError) as caught:
        tokens.check(forged, SESSION, now=5_000.0)
    assert caught.value.code == "invalid_token"


@pytest.mark.parametrize("length", [0, 16, 31])
def test_the_token_secret_has_at_least_32_bytes(length):
    with pytest.raises(ValueError, match="32 bytes"):
        SignalingTokens(b"k" * length, lifetime=60.0)


SESSION_IDS = st.text(min_size=1, max_size=30)


@given(SESSION_IDS, SESSION_IDS, st.floats(0, 1e9))
def test_a_token_never_opens_another_session(session_id, other, now):
    tokens = SignalingTokens(SECRET, lifetime=60.0)
    token = tokens.issue(session_id, now)
    tokens.check(token, session_id, now)
    if other != session_id:
        with pytest.raises(SignalingError):
            tokens.check(token, other, now)


@given(st.data())
def test_changing_any_character_of_a_token_breaks_it(data):
    tokens = SignalingTokens(SECRET, lifetime=60.0)
    token = tokens.issue(SESSION, data.draw(st.floats(0, 1e9), label="now"))
    index = data.draw(st.integers(0, len(token) - 1), label="index")
    replacement = data.draw(st.characters().filter(lambda c: c != token[index]), label="char")
    tampered = token[:index] + replacement + token[index + 1:]
    with pytest.raises(SignalingError) as caught:
        tokens.check(tampered, SESSION, now=0.0)
    assert caught.value.code == "invalid_token"


def test_no_other_spelling_of_a_token_is_accepted(tokens):
    token = tokens.issue(SESSION, now=0.0)
    alphabet = string.ascii_letters + string.digits + "-_=.+/ "
    accepted = []
    for index, original in enumerate(token):
        for replacement in alphabet.replace(original, ""):
            tampered = token[:index] + replacement + token[index + 1:]
            try:
                tokens.check(tampered, SESSION, now=0.0)
            except SignalingError:
                continue
            accepted.append(tampered)
    assert accepted == []


@given(st.text(min_size=1, max_size=4), st.sampled_from(["start", "end", "dot"]))
def test_adding_characters_to_a_token_breaks_it(extra, where):
    tokens = SignalingTokens(SECRET, lifetime=60.0)
    token = tokens.issue(SESSION, 0.0)
    body, mac = token.split(".")
    tampered = {
        "start": extra + token, "end": token + extra, "dot": body + extra + "." + mac,
    }[where]
    with pytest.raises(SignalingError):
        tokens.check(tampered, SESSION, now=0.0)


# The rate limit.


def test_a_burst_of_100_frames_is_allowed_and_the_101st_refused():
    limit = RateLimit()
    assert all(limit.allow(5.0) for _ in range(100))
    assert not limit.allow(5.0)
    assert not limit.allow(5.0)


def test_the_limit_refills_with_time():
    limit = RateLimit()
    for _ in range(100):
        limit.allow(0.0)
    assert not limit.allow(0.0)
    assert not limit.allow(0.0078125)
    assert sum(limit.allow(0.25) for _ in range(100)) == 25
    assert sum(limit.allow(0.75) for _ in range(100)) == 50


def test_a_quiet_connection_does_not_save_up_more_than_a_burst():
    limit = RateLimit()
    limit.allow(0.0)
    assert sum(limit.allow(3600.0) for _ in range(200)) == 100


def test_a_steady_100_frames_a_second_is_allowed():
    limit = RateLimit()
    assert all(limit.allow(index / 100) for index in range(1000))


def test_a_frame_takes_one_token_and_one_per_kib():
    assert [frame_cost(text) for text in ("", "x" * 1023, "x" * 1024, "x" * MAX_FRAME_BYTES)] \
        == [1, 1, 2, 65]
    # Larger frames are refused as too large, after taking no more than the largest.
    assert frame_cost(b"x" * 2**20) == 65


def test_large_offers_are_limited_by_their_size():
    # A socket sending only 64 KiB offers gets the broker to parse 100 KiB a second.
    limit = RateLimit()
    offer = "x" * MAX_FRAME_BYTES
    assert [limit.allow(0.0, frame_cost(offer)) for _ in range(2)] == [True, False]
    assert not limit.allow(0.25, frame_cost(offer))  # 35 tokens left, 25 more since
    assert limit.allow(0.3, frame_cost(offer))
    # Ten a second for ten seconds: the burst and then 100 KiB a second get through.
    allowed = sum(limit.allow(100 + attempt / 10, frame_cost(offer)) for attempt in range(100))
    assert allowed == 16 and allowed * 65 <= 100 + 10 * 100


def test_a_lower_rate():
    limit = RateLimit(rate=2)
    assert [limit.allow(0.0) for _ in range(3)] == [True, True, False]
    assert limit.allow(0.5)
    assert not limit.allow(0.5)
