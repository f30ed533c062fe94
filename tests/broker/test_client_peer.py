"""The Python client's peer connection against a tower's real one, in one process."""

from __future__ import annotations

import asyncio

from broker.client_peer import ClientPeer, VideoReceived
from broker.tower.application import APPLICATIONS, answer_offer

# Generous: loaded CI machines stall; a healthy run is far below this.
DEADLINE = 20.0


def run(scenario) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(DEADLINE):
            await scenario()

    asyncio.run(bounded())


async def connected(client: ClientPeer):
    """The tower's peer, running the demo application, answering ``client``."""
    demo = APPLICATIONS["demo"](session="s-1", tower="tower-1")
    tower = await answer_offer(await client.offer(), application=demo, on_event=lambda _: None)
    await client.accept(tower.answer_sdp)
    await client.wait_open()
    return tower


def test_a_peer_that_asked_for_video_counts_frames_packets_and_bytes():
    async def scenario():
        client = ClientPeer(video=True)
        tower = await connected(client)
        try:
            received = VideoReceived()
            while received.frames < 5:
                await asyncio.sleep(0.05)
                received = await client.video_received()
            assert received.packets >= received.frames  # a frame takes one packet or more
            assert 0 <= received.packets_lost < received.packets
            # The transport carried the packets, each with its RTP header at least.
            assert received.bytes > 12 * received.packets
            assert 0 <= received.jitter < 1.0
            later = await client.video_received()
            assert later.packets >= received.packets and later.bytes >= received.bytes
            # One RTP stream, no RTX: its statistics are the video's.
            assert "rtx" not in tower.answer_sdp.lower()
        finally:
            await tower.close()
            await client.close()

    run(scenario)


def test_a_peer_that_did_not_ask_for_video_has_no_video_figures():
    async def scenario():
        client = ClientPeer()
        tower = await connected(client)
        try:
            assert await client.video_received() is None
            assert await client.echo("hello") >= 0
        finally:
            await tower.close()
            await client.close()

    run(scenario)


def test_a_peer_awaits_an_answer_from_its_offer_until_it_takes_one():
    # The broker sends an answer again on each new signaling connection while the
    # negotiation lasts: a client that has taken it leaves the next alone.
    async def scenario():
        client = ClientPeer()
        assert not client.awaiting_answer
        offer = await client.offer()
        assert client.awaiting_answer
        demo = APPLICATIONS["echo"](session="s-1", tower="tower-1")
        tower = await answer_offer(offer, application=demo, on_event=lambda _: None)
        try:
            await client.accept(tower.answer_sdp)
            assert not client.awaiting_answer
        finally:
            await tower.close()
            await client.close()

    run(scenario)


def test_close_returns_when_another_close_it_waits_on_is_cancelled():
    """aiortc closes a connection itself when the remote end closes it; a close called
    meanwhile waits on that close's future, which a cancelled waiter cancels for all."""

    async def scenario():
        client = ClientPeer()
        tower = await connected(client)
        try:
            first = asyncio.ensure_future(client.connection.close())
            await asyncio.sleep(0)  # it runs until it waits for the transports to stop
            assert not first.done()
            cancelled_waiter = asyncio.ensure_future(client.connection.close())
            ours = asyncio.ensure_future(client.close())
            await asyncio.sleep(0)
            cancelled_waiter.cancel()
            assert await ours is None
            # The first close stops everything; setting its cancelled future is what
            # fails in it (aiortc 1.16: InvalidStateError).
            await asyncio.wait([first])
            first.exception()
            assert client.connection.connectionState == "closed"
        finally:
            await tower.close()

    run(scenario)


def test_a_cancelled_close_spoils_no_other_close():
    async def scenario():
        client = ClientPeer()
        tower = await connected(client)
        try:
            first = asyncio.ensure_future(client.connection.close())
            await asyncio.sleep(0)
            cancelled = asyncio.ensure_future(client.close())
            other = asyncio.ensure_future(client.close())
            await asyncio.sleep(0)
            cancelled.cancel()
            assert await other is None
            await first  # completes: the future it made was not cancelled under it
            assert cancelled.cancelled()
            assert client.connection.connectionState == "closed"
        finally:
            await tower.close()

    run(scenario)
