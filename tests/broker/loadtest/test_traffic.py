"""A simulated browser's traffic against a tower's real peer, in one process."""

from __future__ import annotations

import time
from types import SimpleNamespace

from broker.client_peer import ClientPeer
from broker.loadtest import traffic
from broker.tower.application import EchoApplication, answer_offer
from broker.loadtest.traffic import Tally, send_steadily
from tests.broker.test_client_peer import connected, run


def test_the_video_that_arrived_after_the_last_look_is_counted_at_the_end():
    async def scenario():
        client = ClientPeer(video=True)
        tower = await connected(client)
        try:
            tally = Tally()
            at_start = client.video_frames
            # Shorter than a look's interval: only the first look and the last one.
            await send_steadily(SimpleNamespace(peer=client), tally, rate=20, size=10,
                                until=time.monotonic() + 0.8)
            at_end = client.video_frames
            assert at_end - at_start >= 2  # the tower's video kept coming
            # Everything up to the last look, which came as it ended.
            assert tally.video_frames == at_end
            assert tally.echoed > 0 and tally.timeouts == 0
        finally:
            await tower.close()
            await client.close()

    run(scenario)


def test_a_message_never_echoed_counts_in_the_round_trips_at_the_timeout(monkeypatch):
    monkeypatch.setattr(traffic, "ECHO_TIMEOUT", 0.2)

    class Deaf(EchoApplication):
        """Takes the client's channels, and answers nothing on them."""

        def channel_opened(self, channel) -> None:
            pass

    async def scenario():
        client = ClientPeer()
        tower = await answer_offer(await client.offer(), application=Deaf(),
                                   on_event=lambda _: None)
        try:
            await client.accept(tower.answer_sdp)
            await client.wait_open()
            tally = Tally()
            await traffic._one_echo(client, 1, 10, tally)
            assert (tally.timeouts, tally.round_trips) == (1, [0.2])
        finally:
            await tower.close()
            await client.close()

    run(scenario)
