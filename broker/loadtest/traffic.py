"""The data a simulated browser sends: echo messages at a steady rate (asyncio side);
what it counts of the tower's video, once a second, when it asked for video; and the
worker's handler of its loop's unretrieved task exceptions (``ClosedSends``).

The messages go on a fixed timetable, whether or not the earlier ones are back (open
loop), each with a sequence number, so that every reply is matched to its message and a
lost one costs one timeout, not every later measurement. The figures go into the
worker's ``Tally`` (plain counters and lists, read by the worker's trio side between
reports; both sides run on the one thread of the asyncio loop).
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiortc
from OpenSSL import SSL

from ..client_peer import VideoReceived

ECHO_TIMEOUT = 5.0
# How often a session's video statistics are read.
VIDEO_INTERVAL = 1.0


@dataclass
class Tally:
    """What a worker's sessions did since its last report (``take`` empties it)."""

    sent: int = 0
    # Messages whose time came while their session's channel was not open (repairing,
    # or closed by the server): the load not offered.
    unsent: int = 0
    echoed: int = 0
    bytes_echoed: int = 0
    timeouts: int = 0
    # Each message's (``time.monotonic()`` it was sent, round trip in seconds): the
    # coordinator files it under the second it was sent in.
    round_trips: list[tuple[float, float]] = field(default_factory=list)
    # How late each message went out against its timetable, in seconds: the load
    # generator's own lag, which would otherwise count in the server's round trips.
    late: list[float] = field(default_factory=list)
    # The tower's video, for sessions that asked for it.
    video_frames: int = 0
    video_packets: int = 0
    video_packets_lost: int = 0
    video_bytes: int = 0
    video_jitters: list[float] = field(default_factory=list)

    def take(self) -> dict[str, Any]:
        taken = {"sent": self.sent, "unsent": self.unsent, "echoed": self.echoed,
                 "bytes": self.bytes_echoed,
                 "timeouts": self.timeouts, "rtt": self.round_trips, "late": self.late,
                 "video_frames": self.video_frames, "video_packets": self.video_packets,
                 "video_packets_lost": self.video_packets_lost,
                 "video_bytes": self.video_bytes, "video_jitter": self.video_jitters}
        self.sent = self.unsent = self.echoed = self.bytes_echoed = self.timeouts = 0
        self.video_frames = self.video_packets = self.video_packets_lost = 0
        self.video_bytes = 0
        self.round_trips, self.late, self.video_jitters = [], [], []
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
    look at the video once a second, and once more at the end.

    The messages go on a fixed timetable (open loop): each when its time comes, whether
    or not the earlier ones are back, so a slow server is offered the same load as a
    quick one and its slowness shows in every round trip it caused. A message not back
    within ``ECHO_TIMEOUT`` counts as a timeout, and as a round trip of that long; so
    does one still in flight when the session is lost (this is cancelled).
    """
    interval = 1.0 / rate
    echoes = Echoes(tally)
    video, video_next = VideoCount(tally), 0.0
    # Spread the sessions' sends over the interval, so they do not all send at once.
    await asyncio.sleep(min(random.uniform(0, interval), max(0.0, until - time.monotonic())))
    due = time.monotonic()
    try:
        while due < until:
            peer = holder.peer
            if peer is not None and due >= video_next:
                video_next = due + VIDEO_INTERVAL
                await video.look(peer)
            if peer is not None and peer.echo_channel.readyState == "open":
                tally.late.append(max(0.0, time.monotonic() - due))
                echoes.send(peer, size)
            else:
                tally.unsent += 1
            echoes.expire()
            due += interval
            await asyncio.sleep(max(0.0, min(due, until) - time.monotonic()))
        # The last ones may still come back: counted either way.
        await echoes.settle()
        if holder.peer is not None:
            await video.look(holder.peer)
    finally:
        echoes.stop()
        echoes.expire(everything=True)


class Echoes:
    """The echo messages of one session in flight, by sequence number: sent by
    ``send``, matched as their replies come (a reader per peer), expired after
    ``ECHO_TIMEOUT``."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.sequence = 0
        # Sequence: sent at (``time.monotonic``), size.
        self.in_flight: dict[int, tuple[float, int]] = {}
        self.peer: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    def send(self, peer: Any, size: int) -> None:
        if peer is not self.peer:
            # A repair's new peer: the old one's replies will not come.
            self.stop()
            self.peer, self.reader = peer, asyncio.ensure_future(self._read(peer))
        self.sequence += 1
        head = f"{self.sequence}:"
        payload = head + "x" * max(0, size - len(head))
        self.in_flight[self.sequence] = (time.monotonic(), len(payload))
        self.tally.sent += 1
        peer.echo_channel.send(payload)

    def expire(self, *, everything: bool = False) -> None:
        """Count the messages not back within ``ECHO_TIMEOUT`` as timeouts; with
        ``everything``, all still in flight (their session is over)."""
        oldest = math.inf if everything else time.monotonic() - ECHO_TIMEOUT
        for sequence, (sent_at, _) in list(self.in_flight.items()):
            if sent_at > oldest:
                break  # in order of sending
            del self.in_flight[sequence]
            self.tally.timeouts += 1
            # In the round trips too, at the least it took: left out, the slowest
            # messages of an overloaded run would vanish from its percentiles.
            self.tally.round_trips.append((sent_at, ECHO_TIMEOUT))

    async def settle(self) -> None:
        """Until every message in flight is back or expired."""
        while self.in_flight:
            self.changed.clear()
            oldest = next(iter(self.in_flight.values()))[0]
            left = oldest + ECHO_TIMEOUT - time.monotonic()
            try:
                await asyncio.wait_for(self.changed.wait(), max(left, 0.0))
            except asyncio.TimeoutError:
                pass
            self.expire()

    def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None

    async def _read(self, peer: Any) -> None:
        while True:
            reply = await peer.reply()
            head = reply.partition(":")[0] if isinstance(reply, str) else ""
            sent = self.in_flight.pop(int(head), None) if head.isdigit() else None
            if sent is None:
                continue  # one that had expired already
            sent_at, size = sent
            self.tally.round_trips.append((sent_at, time.monotonic() - sent_at))
            self.tally.echoed += 1
            self.tally.bytes_echoed += size
            self.changed.set()


AIORTC = Path(aiortc.__file__).parent


class ClosedSends:
    """The asyncio loop's exception handler for a worker.

    aiortc leaves each of its tasks that sends a data channel's data to fail on its own
    when the connection closes under it (a simulated browser closing its peer as a
    message goes out, or a tower killed under it), and asyncio prints each as "Task
    exception was never retrieved" with its traceback (aiortc/aiortc#1040): hundreds of
    lines after a large run. Those are counted and said in one line once the loop is
    closed (``say``), with the tasks that failed as it closed; anything else goes to the
    loop's default handler.
    """

    def __init__(self) -> None:
        self.count = 0

    async def install(self) -> None:
        """Handle the running loop's exceptions from now on."""
        asyncio.get_running_loop().set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error, task = context.get("exception"), context.get("future")
        code = getattr(task.get_coro(), "cr_code", None) if isinstance(task, asyncio.Task) \
            else None
        if (isinstance(error, (ConnectionError, SSL.Error)) and code is not None
                and Path(code.co_filename).is_relative_to(AIORTC)):
            self.count += 1
            return
        loop.default_exception_handler(context)

    def say(self) -> None:
        if self.count:
            print(f"aiortc: {self.count} sends failed as their connection closed "
                  "(aiortc/aiortc#1040)", file=sys.stderr, flush=True)
