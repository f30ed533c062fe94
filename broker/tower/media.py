"""A synthetic video stream: what a rendered digital human looks like to the platform.

Moving shapes, the session id and the tower's clock, drawn anew for every frame, so a
person watching can tell the picture is live and where it comes from. Frames are only
drawn when aiortc asks for one, which it does only for a session that negotiated video:
a session without media costs no drawing and no encoding.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time

import av
from aiortc import MediaStreamTrack
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 320, 240
FRAMES_PER_SECOND = 15
CLOCK_RATE = 90_000  # the RTP clock of video
_TIME_BASE = fractions.Fraction(1, CLOCK_RATE)


class SyntheticVideoTrack(MediaStreamTrack):
    """A live test picture for one session, at 15 frames per second."""

    kind = "video"

    def __init__(self, session: str, tower: str) -> None:
        super().__init__()
        self.session = session
        self.tower = tower
        self.frames = 0
        self._started: float | None = None

    async def recv(self) -> av.VideoFrame:
        loop = asyncio.get_running_loop()
        if self._started is None:
            self._started = loop.time()
        else:
            # Paced on the loop's clock so a slow frame does not make the next one late too.
            due = self._started + self.frames / FRAMES_PER_SECOND
            await asyncio.sleep(max(0.0, due - loop.time()))
        frame = av.VideoFrame.from_image(self.draw(self.frames))
        frame.pts = self.frames * CLOCK_RATE // FRAMES_PER_SECOND
        frame.time_base = _TIME_BASE
        self.frames += 1
        return frame

    def draw(self, number: int) -> Image.Image:
        """The picture of frame ``number``."""
        phase = number / FRAMES_PER_SECOND
        hue = int(40 + 30 * math.sin(phase / 3))
        image = Image.new("RGB", (WIDTH, HEIGHT), (16, 24 + hue // 2, 48 + hue))
        draw = ImageDraw.Draw(image)
        x = (WIDTH - 60) * (0.5 + 0.5 * math.sin(phase * 1.3))
        y = (HEIGHT - 100) * (0.5 + 0.5 * math.sin(phase * 1.9 + 1))
        draw.ellipse((x, y + 20, x + 60, y + 80), fill=(250, 180, 60))
        bar = int((WIDTH - 20) * (phase % 4) / 4)
        draw.rectangle((10, HEIGHT - 18, 10 + bar, HEIGHT - 10), fill=(90, 220, 140))
        clock = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 10) % 10}"
        draw.text((10, 8), f"session {self.session}", fill=(255, 255, 255))
        draw.text((10, 24), f"{self.tower}  {clock}  frame {number}", fill=(220, 220, 220))
        return image
