"""A simulated browser's traffic against a tower's real peer, in one process; and the
worker's count of aiortc's failed sends."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from types import SimpleNamespace
from typing import Any

from broker.client_peer import ClientPeer
from broker.loadtest import traffic
from broker.tower.application import EchoApplication, answer_offer
from broker.loadtest.traffic import ClosedSends, Tally, send_steadily
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


class Deaf(EchoApplication):
    """Takes the client's channels, and answers nothing on them."""

    def channel_opened(self, channel) -> None:
        pass


class Slow(EchoApplication):
    """Echoes every message 0.3 s after it came."""

    def channel_opened(self, channel) -> None:
        loop = asyncio.get_running_loop()
        channel.on("message", lambda message: loop.call_later(0.3, channel.send, message))


async def answered_by(application: EchoApplication) -> tuple[ClientPeer, Any]:
    client = ClientPeer()
    tower = await answer_offer(await client.offer(), application=application,
                               on_event=lambda _: None)
    await client.accept(tower.answer_sdp)
    await client.wait_open()
    return client, tower


def test_a_message_never_echoed_counts_in_the_round_trips_at_the_timeout(monkeypatch):
    monkeypatch.setattr(traffic, "ECHO_TIMEOUT", 0.2)

    async def scenario():
        client, tower = await answered_by(Deaf())
        try:
            tally = Tally()
            echoes = traffic.Echoes(tally)
            before = time.monotonic()
            echoes.send(client, 10)
            await echoes.settle()
            echoes.stop()
            assert (tally.sent, tally.timeouts) == (1, 1)
            [(sent, round_trip)] = tally.round_trips
            assert before <= sent <= before + 0.1 and round_trip == 0.2
        finally:
            await tower.close()
            await client.close()

    run(scenario)


def test_messages_go_on_their_timetable_whatever_the_round_trip():
    # A round trip of 0.3 s at 10 messages a second: waiting for each echo before the
    # next, a session sent 3 a second, and a slow server was offered a third of the load.
    async def scenario():
        client, tower = await answered_by(Slow())
        try:
            tally = Tally()
            await send_steadily(SimpleNamespace(peer=client), tally, rate=10, size=10,
                                until=time.monotonic() + 1.0)
            assert tally.sent >= 9 and tally.echoed == tally.sent and tally.timeouts == 0
            assert min(round_trip for _, round_trip in tally.round_trips) >= 0.3
            # Each went out on time, however slow the echoes.
            assert len(tally.late) == tally.sent and max(tally.late) < 0.3
        finally:
            await tower.close()
            await client.close()

    run(scenario)


def test_messages_due_while_the_channel_is_not_open_count_as_not_sent():
    # A session whose channel the server closed went on counting as up, offering nothing.
    async def scenario():
        tally = Tally()
        await send_steadily(SimpleNamespace(peer=None), tally, rate=10, size=10,
                            until=time.monotonic() + 0.5)
        assert tally.sent == 0 and tally.unsent >= 4

    run(scenario)


def test_messages_in_flight_when_a_session_is_lost_count_as_timeouts():
    # Lost to a killed tower, a session's last messages never come back: left out, they
    # made a chaos run's round trips look better than they were.
    async def scenario():
        client, tower = await answered_by(Deaf())
        try:
            tally = Tally()
            sending = asyncio.ensure_future(send_steadily(
                SimpleNamespace(peer=client), tally, rate=10, size=10,
                until=time.monotonic() + 60))
            await asyncio.sleep(0.5)
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
            assert tally.sent >= 3
            assert tally.timeouts == tally.sent
            assert [rtt for _, rtt in tally.round_trips] == [traffic.ECHO_TIMEOUT] * tally.sent
        finally:
            await tower.close()
            await client.close()

    run(scenario)


def test_a_slow_message_rate_does_not_send_past_the_end():
    # One message every 20 s for 0.3 s: the first wait used to be up to the whole 20 s.
    async def scenario():
        client, tower = await answered_by(Slow())
        try:
            tally = Tally()
            until = time.monotonic() + 0.3
            await send_steadily(SimpleNamespace(peer=client), tally, rate=0.05, size=10,
                                until=until)
            assert time.monotonic() - until < 1.0
        finally:
            await tower.close()
            await client.close()

    run(scenario)


def test_aiortc_sends_failing_as_their_connection_closes_are_counted_not_printed(
        capsys, caplog):
    from aiortc import RTCCertificate, RTCDtlsTransport, RTCIceGatherer, RTCIceTransport

    async def main() -> ClosedSends:
        handler = ClosedSends()
        await handler.install()
        dtls = RTCDtlsTransport(RTCIceTransport(RTCIceGatherer()),
                                [RTCCertificate.generateCertificate()])
        # A send on a connection that is not up, left to fail in a task of its own, as
        # aiortc's data channels do.
        task = asyncio.ensure_future(dtls._send_data(b"x"))
        await asyncio.sleep(0)
        assert task.done()
        del task
        gc.collect()

        async def ours() -> None:
            raise ConnectionError("not aiortc's")

        other = asyncio.ensure_future(ours())
        await asyncio.sleep(0)
        del other
        gc.collect()
        handler.say()
        return handler

    handler = asyncio.run(main())
    assert handler.count == 1
    assert "aiortc: 1 sends failed as their connection closed" in capsys.readouterr().err
    # Anything else is still logged in full, as asyncio does.
    logged = caplog.text
    assert "not aiortc's" in logged and "Cannot send encrypted data" not in logged
