"""The data a simulated browser sends: echo messages at a steady rate (asyncio side);
and what it counts of the tower's video, once a second, when it asked for video.

Each message carries a sequence number, so a late reply is told from the current one
and a lost one costs one timeout, not every later measurement. The figures go into the
worker's ``Tally`` (plain counters and lists, read by the worker's trio side between
reports; both sides run on the one thread of the asyncio loop).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from ..client_peer import VideoReceived

ECHO_TIMEOUT = 5.0
# How often a session's video statistics are read.
VIDEO_INTERVAL = 1.0


@dataclass
class Tally:
    """What a worker's sessions did since its last report (``take`` empties it)."""

    sent: int = 0
    echoed: int = 0
    bytes_echoed: int = 0
    timeouts: int = 0
    round_trips: list[float] = field(default_factory=list)
    # The tower's video, for sessions that asked for it.
    video_frames: int = 0
    video_packets: int = 0
    video_packets_lost: int = 0
    video_bytes: int = 0
    video_jitters: list[float] = field(default_factory=list)

    def take(self) -> dict[str, Any]:
        taken = {"sent": self.sent, "echoed": self.echoed, "bytes": self.bytes_echoed,
                 "timeouts": self.timeouts, "rtt": self.round_trips,
                 "video_frames": self.video_frames, "video_packets": self.video_packets,
                 "video_packets_lost": self.video_packets_lost,
                 "video_bytes": self.video_bytes, "video_jitter": self.video_jitters}
        self.sent = self.echoed = self.bytes_echoed = self.timeouts = 0
        self.video_frames = self.video_packets = self.video_packets_lost = 0
        self.video_bytes = 0
        self.round_trips, self.video_jitters = [], []
        return taken

    def add_video(self, since: VideoReceived, now: VideoReceived) -> None:
        self.video_frames += now.frames - since.frames
        self.video_packets += now.packets - since.packets
        self.video_packets_lost += now.packets_lost - since.packets_lost
        self.video_bytes += now.bytes - since.bytes
        if now.packets > since.packets:  # a jitter measured on packets that arrived
            self.video_jitters.append(now.jitter)


class VideoCount:
    """Adds to the tally what a session's peer received of the video since the last
    look; a repair's new peer counts from zero."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.peer: Any = None
        self.seen = VideoReceived()

    async def look(self, peer: Any) -> None:
        if peer is not self.peer:
            self.peer, self.seen = peer, VideoReceived()
        received = await peer.video_received()
        if received is not None:
            self.tally.add_video(self.seen, received)
            self.seen = received


async def send_steadily(
    holder: Any, tally: Tally, rate: float, size: int, until: float
) -> None:
    """Echo ``size``-byte messages at ``rate`` per second over ``holder.peer`` (the
    session's current peer: a repair replaces it) until ``until`` (``time.monotonic``);
    look at the video once a second, and once more at the end."""
    interval = 1.0 / rate
    sequence = 0
    video, video_next = VideoCount(tally), 0.0
    # Spread the sessions' sends over the interval, so they do not all send at once.
    await asyncio.sleep(random.uniform(0, interval))
    while time.monotonic() < until:
        started = time.monotonic()
        peer = holder.peer
        if peer is not None and started >= video_next:
            video_next = started + VIDEO_INTERVAL
            await video.look(peer)
        if peer is not None and peer.echo_channel.readyState == "open":
            sequence += 1
            await _one_echo(peer, sequence, size, tally)
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
    if holder.peer is not None:
        await video.look(holder.peer)


async def _one_echo(peer: Any, sequence: int, size: int, tally: Tally) -> None:
    head = f"{sequence}:"
    payload = head + "x" * max(0, size - len(head))
    tally.sent += 1
    started = time.perf_counter()
    peer.echo_channel.send(payload)
    deadline = started + ECHO_TIMEOUT
    while True:
        left = deadline - time.perf_counter()
        try:
            reply = await asyncio.wait_for(peer.reply(), max(left, 0.001))
        except asyncio.TimeoutError:
            tally.timeouts += 1
            # In the round trips too, at the least it took: left out, the slowest
            # messages of an overloaded run would vanish from its percentiles.
            tally.round_trips.append(ECHO_TIMEOUT)
            return
        if reply == payload:
            tally.round_trips.append(time.perf_counter() - started)
            tally.echoed += 1
            tally.bytes_echoed += len(payload)
            return
        # A reply to an earlier message that timed out: skip it.
