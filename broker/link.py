"""What the broker and a tower say to each other over their mutual-TLS WebSocket.

Every frame is one binary WebSocket message: a registered message below, msgpack in the
runtime's versioned envelope (``actors.Codec``). The tower speaks first (``TowerHello``,
whose capacity may not exceed the broker's ``tower_capacity``) and then reports its load
every ``load_interval`` seconds; those reports are also the link's heartbeat, and only a
report the broker takes counts as one. A frame that does not decode is answered with
``LinkError``, counted, and otherwise ignored: one bad frame does not close the link.
One longer than ``MAX_FRAME_BYTES`` does: the WebSocket refuses it (close code 1009), as
it must refuse a message at some length, and the tower's sessions are moved.

Certificates are renewed over the link: the broker asks (``RenewCertificate``), the
tower makes a new key on its own host and sends only its request (``CertificateRequest``),
the broker signs it (``CertificateIssued``) or refuses and closes the link
(``CertificateRefused``), and the tower installs it and says so (``CertificateInstalled``).
The link stays up throughout: sessions do not notice. A tower that cannot install it says
so in a ``LinkError``, and the broker asks again later; a link whose certificate expires
unrenewed is closed.

Session messages name the session and the negotiation number, so a late answer or state
from an earlier negotiation of the same session is recognised and dropped.

Frames queued together go as one WebSocket message, a ``Bundle`` of them, each taken as
if it had come alone (one that does not decode is refused alone). A busy process reads
its link a message per pass of its scheduler or two, and a pass can take a second: as
2,000 sessions ended at once, their 2,000 frames kept the broker from the tower's load
report for 6 s, and the link was dropped as silent. Both ends bundle when the broker
offered the WebSocket subprotocol ``BUNDLES`` and the tower took it: an end older than
bundles neither offers nor takes it, and the link goes frame by frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors import Codec

LINK_VERSION = 1
# An SDP offer with many candidates is a few KiB; ten times the largest seen is plenty.
MAX_FRAME_BYTES = 256 * 1024

codec = Codec(version=LINK_VERSION, max_frame_bytes=MAX_FRAME_BYTES)
# What each end reads of its link at a time (trio-websocket reads 4 KiB, and a busy
# process reads once per pass of its scheduler). Below the allocator's 128 KiB, past which
# each read would map and unmap its buffer.
RECEIVE_BYTES = 64 * 1024

# How long either end waits for the other's close handshake before dropping the link.
CLOSE_TIMEOUT = 1.0

# The session applications every tower runs (``broker.tower.application.APPLICATIONS``),
# and whether each may send the client video.
APPLICATIONS = {"echo": False, "demo": True}

# The most ICE candidates an offer may carry in its SDP, and the most a client may
# trickle after it: each is an address the tower's ICE checks (PROTOCOL.md).
MAX_CANDIDATES = 100
# The most media and data sections an offer may have: the tower answers each, and an
# answer must fit one link frame (a browser offers a few).
MAX_MEDIA_SECTIONS = 16


def session_weight(application: str, video_weight: int, capacity: int) -> int:
    """What a session of ``application`` counts for against a tower's ``capacity`` until
    its tower has answered it and knows: ``video_weight`` if the application may send
    video (at most the whole capacity: alone, a session always fits). Once answered, a
    session with video counts as that, one without as one.
    """
    return min(video_weight, capacity) if APPLICATIONS.get(application, False) else 1


@codec.message("link.bundle")
@dataclass(frozen=True)
class Bundle:
    """Frames sent together, in order: each an encoded message, never a bundle."""

    frames: tuple[bytes, ...]


# The WebSocket subprotocol by which both ends of a link agree to send bundles.
BUNDLES = "link.bundles"
# A bundle's frames, with room for its own envelope and each frame's length, fit in one
# frame; more frames than these go in the next bundle, and a bundle of more is refused
# whole (each frame taken costs the taker's loop, which one bundle holds throughout).
BUNDLE_BYTES = MAX_FRAME_BYTES - 64 * 1024
BUNDLE_FRAMES = 1024


def bundle(frames: list[bytes]) -> bytes:
    """One message of ``frames`` (encoded messages, at most ``BUNDLE_BYTES`` in all)."""
    return frames[0] if len(frames) == 1 else codec.encode(Bundle(tuple(frames)))


# Tower to broker.


@codec.message("tower.hello")
@dataclass(frozen=True)
class TowerHello:
    """The first frame on a link: who the tower is and what it can take."""

    tower: str
    capacity: int
    agent_version: str


@codec.message("tower.load")
@dataclass(frozen=True)
class TowerLoadReport:
    """Sessions open on the tower now, those whose offers it has answered (the broker
    counts its own until their answer); also the link's heartbeat.

    ``used`` is how much of the capacity they take: a session the tower sends video to
    counts as the tower's ``video_weight`` sessions, one with data only as one. A tower
    older than it reports none (each session then counts as one).

    ``cpu_seconds`` is the CPU time the agent process has used since it started, and
    ``resident_bytes`` its resident memory now: how operators and load tests see a
    tower's cost wherever it runs. A tower older than these fields reports neither (a
    broker takes its reports as before); a broker older than them refuses the reports
    of a newer tower (an unknown field), and from this broker on drops its link as
    silent, naming the refusal: brokers are upgraded before their towers.
    """

    sessions: int
    capacity: int
    draining: bool = False
    cpu_seconds: float | None = None
    resident_bytes: int | None = None
    used: int | None = None


@codec.message("peer.answer")
@dataclass(frozen=True)
class PeerAnswer:
    session: str
    negotiation: int
    sdp: str


@codec.message("peer.rejected")
@dataclass(frozen=True)
class PeerRejected:
    """The tower could not use what it was sent (an offer or candidate that does not parse),
    or took no new peer (``TOWER_FULL``)."""

    session: str
    negotiation: int
    code: str
    message: str


# The code of a PeerRejected for an offer that came when the tower held its capacity:
# the broker places the session again, elsewhere.
TOWER_FULL = "tower_full"

# The codes of a PeerRejected for an offer the tower cannot answer (others are about a
# candidate).
OFFER_REFUSALS = frozenset({"invalid_sdp", "unknown_application"})


@codec.message("peer.state")
@dataclass(frozen=True)
class PeerState:
    """A peer connection reached ``connected``, or ended: ``failed``, ``silent``, ``closed``."""

    session: str
    negotiation: int
    state: str
    detail: str = ""


@codec.message("link.error")
@dataclass(frozen=True)
class LinkError:
    """The other side sent a frame that could not be used."""

    message: str


# Broker to tower.


@codec.message("peer.open")
@dataclass(frozen=True)
class OpenPeer:
    """Answer this offer with a fresh peer connection running ``application``."""

    session: str
    negotiation: int
    offer: str
    application: str
    ice_servers: tuple[Any, ...] = ()


@codec.message("peer.candidate")
@dataclass(frozen=True)
class AddCandidate:
    session: str
    negotiation: int
    candidate: str
    sdp_mid: str | None = None
    sdp_mline_index: int | None = None


@codec.message("peer.close")
@dataclass(frozen=True)
class ClosePeer:
    session: str
    negotiation: int


# Certificate renewal.


@codec.message("certificate.renew")
@dataclass(frozen=True)
class RenewCertificate:
    """Broker to tower: make a new key and send its signing request."""


@codec.message("certificate.request")
@dataclass(frozen=True)
class CertificateRequest:
    """Tower to broker: the signing request (PEM) for a key made on the tower."""

    csr: bytes


@codec.message("certificate.issued")
@dataclass(frozen=True)
class CertificateIssued:
    """Broker to tower: the new certificate (PEM) for the requested key."""

    certificate: bytes


@codec.message("certificate.refused")
@dataclass(frozen=True)
class CertificateRefused:
    """Broker to tower: no new certificate, and why; the broker then closes the link."""

    reason: str


@codec.message("certificate.installed")
@dataclass(frozen=True)
class CertificateInstalled:
    """Tower to broker: the new certificate is in use (new TLS handshakes present it)."""


SessionMessage = PeerAnswer | PeerRejected | PeerState
