"""The browser's signaling protocol: frames in, checked; credentials; errors. No I/O.

A client's frame is parsed into one of the session's messages or a ``SignalingError``
carrying the documented error code (PROTOCOL.md) and whether the connection must close.
The signaling token is an HMAC over the session id and an expiry: the broker keeps no
table of tokens, and a token for one session is worthless for another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import struct
from dataclasses import dataclass
from typing import Any

from aiortc.sdp import SessionDescription

from .link import MAX_CANDIDATES, MAX_MEDIA_SECTIONS
from .sessions import ClientCandidate, ClientOffer, CloseSession

MAX_FRAME_BYTES = 64 * 1024
MAX_FRAMES_PER_SECOND = 100
# More media sections than any offer has; an index past it names nothing.
MAX_SECTIONS = 1024
# A media section's identification (RFC 8843 keeps it to 16 bytes on the wire).
MAX_MID_LENGTH = 64
# Close codes: 4000 + the HTTP status the error resembles.
CLOSE_CODES = {
    "invalid_token": 4401,
    "origin_not_allowed": 4403,
    "session_not_found": 4404,
    "replaced": 4409,
    "frame_too_large": 4413,
    "rate_limited": 4429,
    "busy": 4503,
}


# Not frozen: Python itself assigns to an exception's attributes (``__traceback__`` in
# contextlib, the fields when unpickling).
@dataclass(eq=False)
class SignalingError(Exception):
    """A client's frame or connection the broker refuses, with the documented code."""

    code: str
    message: str

    @property
    def fatal(self) -> bool:
        return self.code in CLOSE_CODES

    @property
    def close_code(self) -> int:
        return CLOSE_CODES.get(self.code, 1000)

    def frame(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message, "fatal": self.fatal}


ClientMessage = ClientOffer | ClientCandidate | CloseSession


def parse_client_frame(data: str | bytes) -> ClientMessage:
    """Turn one client frame into a session message.

    Raises:
        SignalingError: with ``binary_frame``, ``frame_too_large``, ``malformed_json``,
            ``unknown_type``, ``invalid_message`` or ``invalid_sdp``.
    """
    if isinstance(data, bytes):
        if len(data) > MAX_FRAME_BYTES:
            raise SignalingError("frame_too_large", f"frames are at most {MAX_FRAME_BYTES} bytes")
        raise SignalingError("binary_frame", "only text frames carrying JSON are spoken here")
    if len(data) > MAX_FRAME_BYTES or len(data.encode(errors="surrogatepass")) > MAX_FRAME_BYTES:
        raise SignalingError("frame_too_large", f"frames are at most {MAX_FRAME_BYTES} bytes")
    try:
        frame = json.loads(data)
    except (ValueError, RecursionError):
        raise SignalingError("malformed_json", "the frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise SignalingError("malformed_json", "a frame is a JSON object")
    kind = frame.get("type")
    if kind == "offer":
        _expect_fields(frame, {"type", "sdp", "negotiation"})
        sdp = _field(frame, "sdp", str)
        check_offer_sdp(sdp)
        return ClientOffer(sdp, negotiation=_negotiation(frame))
    if kind == "candidate":
        _expect_fields(frame, {"type", "candidate", "sdpMid", "sdpMLineIndex",
                               "usernameFragment", "negotiation"})
        candidate = _field(frame, "candidate", str, nullable=True) or ""
        sdp_mid = _field(frame, "sdpMid", str, nullable=True, required=False)
        index = _field(frame, "sdpMLineIndex", int, nullable=True, required=False)
        if len(candidate) > 1024:
            raise SignalingError("invalid_message", "a candidate is at most 1024 characters")
        if sdp_mid is not None and len(sdp_mid) > MAX_MID_LENGTH:
            raise SignalingError(
                "invalid_message", f"an sdpMid is at most {MAX_MID_LENGTH} characters")
        return ClientCandidate(candidate, sdp_mid, index, _negotiation(frame))
    if kind == "close":
        _expect_fields(frame, {"type"})
        return CloseSession("closed by the client")
    if not isinstance(kind, str):
        raise SignalingError("invalid_message", "a frame needs a string 'type'")
    raise SignalingError("unknown_type", f"there is no message type {kind[:40]!r}")


def check_offer_sdp(sdp: str) -> None:
    """Refuse an SDP offer that cannot be negotiated.

    Raises:
        SignalingError: ``invalid_sdp``, saying what is wrong.
    """
    if not is_encodable(sdp):
        raise SignalingError("invalid_sdp", "the SDP is not valid Unicode")
    if not sdp.startswith("v=0"):
        raise SignalingError("invalid_sdp", "an SDP starts with 'v=0'")
    try:
        description = SessionDescription.parse(sdp)
    except Exception as error:  # the parser's failures have no common type
        raise SignalingError("invalid_sdp", f"the SDP does not parse: {error}") from None
    if not description.media:
        raise SignalingError("invalid_sdp", "the SDP has no media or data section")
    if len(description.media) > MAX_MEDIA_SECTIONS:
        raise SignalingError(
            "invalid_sdp", f"more than {MAX_MEDIA_SECTIONS} media and data sections")
    for media in description.media:
        if media.kind == "application" and not (media.dtls and media.dtls.fingerprints):
            raise SignalingError("invalid_sdp", "the data section has no DTLS fingerprint")
        if not media.ice.usernameFragment or not media.ice.password:
            raise SignalingError("invalid_sdp", "a section has no ICE credentials")
    if sum(len(media.ice_candidates) for media in description.media) > MAX_CANDIDATES:
        raise SignalingError("invalid_sdp", f"more than {MAX_CANDIDATES} candidates in the offer")


def _expect_fields(frame: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(frame) - allowed)
    if unknown:
        raise SignalingError("invalid_message", f"unexpected field(s): {', '.join(unknown)[:80]}")


def _negotiation(frame: dict[str, Any]) -> int | None:
    """The negotiation an offer or a candidate is for, when the client says (optional)."""
    if "negotiation" not in frame:
        return None
    value = frame["negotiation"]
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**31:
        raise SignalingError("invalid_message", "the field 'negotiation' must be a "
                                                "positive integer")
    return value


def _field(
    frame: dict[str, Any], name: str, kind: type, *, nullable: bool = False,
    required: bool = True,
) -> Any:
    if name not in frame:
        if required:
            raise SignalingError("invalid_message", f"the field {name!r} is missing")
        return None
    value = frame[name]
    if value is None and nullable:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SignalingError("invalid_message", f"the field {name!r} must be a {kind.__name__}")
    if isinstance(value, int) and not 0 <= value < MAX_SECTIONS:
        raise SignalingError("invalid_message", f"the field {name!r} is out of range")
    if isinstance(value, str) and not is_encodable(value):
        raise SignalingError("invalid_message", f"the field {name!r} is not valid Unicode")
    return value


def is_encodable(text: str) -> bool:
    """False for text JSON can carry but UTF-8 cannot (lone surrogates, from escapes)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class RateLimit:
    """A token bucket: ``rate`` tokens a second, bursts up to ``rate``.

    A frame takes one token and one more per 1,024 characters (``frame_cost``): parsing
    an offer costs the broker about 8 us a line, so a socket sending only the largest
    offers would otherwise have it parse 6 MiB of SDP a second.
    """

    def __init__(self, rate: float = MAX_FRAMES_PER_SECOND) -> None:
        self.rate = rate
        self.tokens = rate
        self.updated: float | None = None

    def allow(self, now: float, cost: int = 1) -> bool:
        if self.updated is not None:
            self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


def frame_cost(data: str | bytes) -> int:
    """The tokens a frame takes: one, and one per 1,024 characters (what parsing costs
    goes by them), up to the largest frame's 64."""
    return 1 + min(len(data), MAX_FRAME_BYTES) // 1024


class SignalingTokens:
    """Short-lived, single-use signaling tokens bound to one session.

    A token is ``<expiry and nonce>.<MAC>``: the broker keeps no table of the tokens it
    issued, only of the ones used, until they expire, so a token seen once (in a
    browser's history, a proxy's log) cannot open a second connection.
    """

    def __init__(self, secret: bytes, lifetime: float) -> None:
        if len(secret) < 32:
            raise ValueError("the token secret must have at least 32 bytes")
        self.secret = secret
        self.lifetime = lifetime
        self.spent: dict[bytes, float] = {}
        self.pruned_at = 0.0

    def issue(self, session_id: str, now: float) -> str:
        body = struct.pack(">d", now + self.lifetime) + secrets.token_bytes(8)
        return f"{_b64(body)}.{_b64(self._mac(session_id, body))}"

    def check(self, token: str, session_id: str, now: float) -> None:
        """Use the token to open this session's signaling connection.

        Raises:
            SignalingError: ``invalid_token``, unless the token is well formed, for this
                session, not expired and not used before.
        """
        try:
            encoded_body, encoded_mac = token.split(".")
            body = _unb64(encoded_body)
            given = _unb64(encoded_mac)
            (expires_at,) = struct.unpack(">d", body[:8])
            if len(body) != 16:
                raise ValueError("a token body is 16 bytes")
        except (ValueError, struct.error):
            raise SignalingError("invalid_token", "the signaling token is malformed") from None
        if not hmac.compare_digest(given, self._mac(session_id, body)):
            raise SignalingError("invalid_token", "the signaling token is not for this session")
        if now > expires_at:
            raise SignalingError("invalid_token", "the signaling token has expired")
        if given in self.spent:
            raise SignalingError("invalid_token", "the signaling token was already used")
        if now - self.pruned_at > self.lifetime:
            self.spent = {mac: expiry for mac, expiry in self.spent.items() if expiry >= now}
            self.pruned_at = now
        self.spent[given] = expires_at

    def _mac(self, session_id: str, body: bytes) -> bytes:
        return hmac.new(self.secret, session_id.encode() + b"\0" + body, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # The decoder skips stray characters and spare bits: only the one spelling is accepted.
    if _b64(data) != text:
        raise ValueError("not the canonical encoding")
    return data
