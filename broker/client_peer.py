"""The asyncio side of the Python client: one aiortc peer connection to a tower.

It opens the data channels PROTOCOL.md asks for (``heartbeat``, answered at once, and
the application's ``echo``), makes the offer, takes the answer, and measures echo
round trips. The client's trio side (``broker.client``) drives it through the bridge;
the per-message path (heartbeat answers, echoes) stays here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import candidate_from_sdp

HEARTBEAT_LABEL = "heartbeat"
ECHO_LABEL = "echo"
# The RTP clock of every WebRTC video codec (VP8, VP9, H.264, AV1): jitter is counted in it.
VIDEO_CLOCK_RATE = 90_000


@dataclass(frozen=True)
class VideoReceived:
    """What a peer has received of the tower's video so far.

    ``packets``, ``packets_lost`` and ``jitter`` (seconds, RFC 3550's interarrival
    jitter) are the video track's inbound RTP statistics; ``bytes`` counts all that
    arrived on the peer connection's transport, the data channels' few bytes included.
    """

    frames: int = 0
    packets: int = 0
    packets_lost: int = 0
    bytes: int = 0
    jitter: float = 0.0


class ClientPeer:
    """A client's peer connection for one negotiation.

    Args:
        ice_servers: what the broker returned with the session.
        answer_heartbeats: False makes a client that goes silent once connected.
        video: ask for the tower's video (the demo application sends it) and count what
            arrives (``video_received``). The video is negotiated without RTX
            retransmissions: one RTP stream, whose statistics count every packet lost.
    """

    def __init__(
        self,
        ice_servers: Sequence[Mapping[str, Any]] = (),
        *,
        answer_heartbeats: bool = True,
        video: bool = False,
    ) -> None:
        servers = [RTCIceServer(**server) for server in ice_servers]
        self.connection = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self.answer_heartbeats = answer_heartbeats
        self.pings = 0
        self.video_frames = 0
        self._video_receiver = None
        if video:
            transceiver = self.connection.addTransceiver("video", direction="recvonly")
            # With RTX, aiortc files each stream's statistics under one id, so the
            # retransmissions' would replace the video's in the report.
            capabilities = RTCRtpReceiver.getCapabilities("video")
            transceiver.setCodecPreferences(
                [codec for codec in capabilities.codecs if codec.mimeType != "video/rtx"])
            self._video_receiver = transceiver.receiver
            self.connection.on("track", self._on_track)
        self.heartbeat = self.connection.createDataChannel(HEARTBEAT_LABEL)
        self.echo_channel = self.connection.createDataChannel(ECHO_LABEL)
        self._opened = asyncio.Event()
        self._replies: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.heartbeat.on("message", self._on_heartbeat)
        self.echo_channel.on("open", self._opened.set)
        self.echo_channel.on("message", self._replies.put_nowait)

    def _on_track(self, track: Any) -> None:
        if track.kind == "video":
            asyncio.ensure_future(self._count_frames(track))

    async def _count_frames(self, track: Any) -> None:
        try:
            while True:
                await track.recv()
                self.video_frames += 1
        except MediaStreamError:
            pass  # the track ended with the connection

    async def video_received(self) -> VideoReceived | None:
        """The video received so far; None for a peer that did not ask for video."""
        if self._video_receiver is None:
            return None
        packets = packets_lost = received = 0
        jitter = 0.0
        for stats in (await self._video_receiver.getStats()).values():
            if stats.type == "inbound-rtp":
                packets += stats.packetsReceived
                packets_lost += stats.packetsLost
                jitter = max(jitter, stats.jitter / VIDEO_CLOCK_RATE)
            elif stats.type == "transport":
                received += stats.bytesReceived
        return VideoReceived(self.video_frames, packets, packets_lost, received, jitter)

    def _on_heartbeat(self, message: str | bytes) -> None:
        self.pings += 1
        if self.answer_heartbeats and self.heartbeat.readyState == "open":
            self.heartbeat.send(message)

    async def offer(self) -> str:
        """Make the offer, with all candidates gathered (aiortc does not trickle)."""
        await self.connection.setLocalDescription(await self.connection.createOffer())
        return self.connection.localDescription.sdp

    @property
    def awaiting_answer(self) -> bool:
        """Whether it offered and has no answer yet."""
        return self.connection.signalingState == "have-local-offer"

    async def accept(self, answer_sdp: str) -> None:
        await self.connection.setRemoteDescription(
            RTCSessionDescription(sdp=answer_sdp, type="answer")
        )

    async def add_candidate(self, candidate: str, sdp_mid: str, sdp_mline_index: int) -> None:
        parsed = candidate_from_sdp(candidate.removeprefix("candidate:"))
        parsed.sdpMid, parsed.sdpMLineIndex = sdp_mid, sdp_mline_index
        await self.connection.addIceCandidate(parsed)

    async def wait_open(self) -> None:
        """Until the echo channel is open."""
        await self._opened.wait()

    async def echo(self, payload: str | bytes) -> float:
        """Send ``payload`` on the echo channel; returns the round trip in seconds.

        Raises:
            ValueError: what came back is not what was sent.
        """
        started = time.perf_counter()
        self.echo_channel.send(payload)
        reply = await self._replies.get()
        elapsed = time.perf_counter() - started
        if reply != payload:
            raise ValueError("the echo differs from what was sent")
        return elapsed

    async def reply(self) -> str | bytes:
        """The next message that came back on the echo channel."""
        return await self._replies.get()

    async def close(self) -> None:
        """Close the peer connection, also one that aiortc is closing already.

        A close after another one waits on the first one's future, which is cancelled
        for every waiter when one waiter is cancelled (and the first close then fails
        to complete it). So this close, if cancelled, leaves the closing to go on
        (shielded), and a cancellation that is not its own means the connection was
        closed by another close.
        """
        try:
            await asyncio.shield(self.connection.close())
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this close was cancelled


async def new_peer(
    ice_servers: Sequence[Mapping[str, Any]] = (),
    *,
    answer_heartbeats: bool = True,
    video: bool = False,
) -> ClientPeer:
    """A ``ClientPeer`` made on the asyncio side (for ``call_asyncio``)."""
    return ClientPeer(ice_servers, answer_heartbeats=answer_heartbeats, video=video)
