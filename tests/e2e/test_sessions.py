"""Sessions end to end: the embedded broker, real tower agent processes, aiortc clients."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import trio
from trio_websocket import open_websocket_url

from actors import bridge
from broker.client import ApiError, open_session, start_session, trusting
from broker.client_peer import new_peer

from .conftest import start_broker, stop_broker, wait_for_towers


def run(main, *args):
    return bridge.run(main, *args, handle_signals=False)


def test_a_session_negotiates_and_echoes_100_messages_then_ends(broker):
    wait_for_towers(broker, 2)

    async def main():
        client = broker.client()
        grant = await client.create_session()
        assert grant.signaling_url.startswith("wss://") and grant.ice_servers == ()
        async with open_session(grant, trusting(broker.certificate)) as session:
            await session.wait_state("connected")
            for number in range(100):
                await session.echo(f"message {number}")
            await session.echo(bytes(range(256)))
            described = await client.get_session(grant.id)
            assert described["state"] == "connected"
            assert described["tower"] == grant.tower and described["negotiation"] == 1
            await client.delete_session(grant.id)
            await session.wait_state("closed")
            await session.wait_for(lambda frame: frame["type"] == "disconnected", 5)
        # Shown as it ended for a while; gone for anything else at once.
        ended = await client.get_session(grant.id)
        assert (ended["state"], ended["reason"]) == ("closed", "deleted through the API")
        try:
            await client.delete_session(grant.id)
        except ApiError as error:
            assert (error.status, error.code) == (404, "not_found")
        else:
            raise AssertionError("a deleted session is still there")

    run(main)


def test_twenty_sessions_at_once_all_connect_and_echo(broker):
    wait_for_towers(broker, 2)
    towers_used = set()

    async def one(client):
        grant = await client.create_session()
        towers_used.add(grant.tower)
        async with open_session(grant, trusting(broker.certificate)) as session:
            await session.wait_state("connected", 30)
            for number in range(20):
                await session.echo(f"{grant.id} {number}")
            await client.delete_session(grant.id)

    async def main():
        client = broker.client()
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one, client)

    run(main)
    assert towers_used == {"tower-1", "tower-2"}


def test_kill_9_of_a_tower_moves_its_sessions_and_leaves_the_others_alone(broker):
    wait_for_towers(broker, 2)
    pids = broker.tower_pids()
    assert set(pids) == {"tower-1", "tower-2"}

    async def keep_echoing(session, stop: trio.Event, echoed: list) -> None:
        while not stop.is_set():
            echoed.append(await session.echo("steady"))
            await trio.sleep(0.05)

    async def main():
        client = broker.client()
        certificate = trusting(broker.certificate)
        grants = [await client.create_session() for _ in range(8)]
        victims = [grant for grant in grants if grant.tower == "tower-1"]
        others = [grant for grant in grants if grant.tower == "tower-2"]
        assert victims and others
        async with trio.open_nursery() as nursery:
            sessions = {}
            for grant in grants:
                sessions[grant.id] = await nursery.start(_hold, grant, certificate)
            for session in sessions.values():
                await session.wait_state("connected")
            stop, echoed = trio.Event(), []
            for grant in others:
                nursery.start_soon(keep_echoing, sessions[grant.id], stop, echoed)
            os.kill(pids["tower-1"], signal.SIGKILL)
            for grant in victims:
                session = sessions[grant.id]
                await session.wait_state("repairing", 10)
                await session.wait_state("connected", 10, after=1)
                await session.echo("back")
                described = await client.get_session(grant.id)
                assert described["tower"] == "tower-2" and described["placements"] == 2
                assert described["id"] == grant.id
            stop.set()
            for grant in others:
                session = sessions[grant.id]
                assert session.negotiation == 1 and session.state == "connected"
                assert not [f for f in session.frames if f.get("state") == "repairing"]
            assert len(echoed) > 5
            nursery.cancel_scope.cancel()

    run(main)
    # The broker restarts the agent it lost.
    wait_for_towers(broker, 2)
    assert broker.tower_pids()["tower-1"] != pids["tower-1"]


async def _hold(grant, certificate, task_status=trio.TASK_STATUS_IGNORED):
    async with open_session(grant, certificate) as session:
        task_status.started(session)
        await trio.sleep_forever()


async def _block_every_negotiation(websocket, frames: list) -> None:
    """A client whose peer is gone as soon as it has offered: ICE checks go unanswered."""
    while True:
        frame = json.loads(await websocket.get_message())
        frames.append(frame)
        wants_offer = (frame["type"] == "state" and frame["state"] == "negotiating"
                       and frame["negotiation"] == 1) or frame["type"] == "reoffer"
        if wants_offer:
            peer = await bridge.call_asyncio(new_peer)
            sdp = await bridge.call_asyncio(peer.offer)
            await bridge.call_asyncio(peer.close)
            await websocket.send_message(json.dumps({"type": "offer", "sdp": sdp}))
        if frame["type"] == "state" and frame["state"] in ("failed", "closed"):
            return


def test_a_blocked_negotiation_is_restarted_then_moved_then_fails_with_the_reason(broker):
    wait_for_towers(broker, 2)

    async def main():
        client = broker.client()
        certificate = trusting(broker.certificate)
        healthy = await client.create_session()
        blocked = await client.create_session()
        async with open_session(healthy, certificate) as session:
            await session.wait_state("connected")
            frames: list = []
            async with open_websocket_url(blocked.signaling_url, ssl_context=certificate) as ws:
                with trio.fail_after(40):
                    await _block_every_negotiation(ws, frames)
            states = [f for f in frames if f["type"] == "state"]
            assert states[-1]["state"] == "failed"
            assert "deadline" in states[-1]["reason"]
            reoffers = [f for f in frames if f["type"] == "reoffer"]
            # One retry on the first tower, then the other tower and its one retry.
            assert [f["negotiation"] for f in reoffers] == [2, 3, 4]
            assert {f["tower"] for f in states} == {"tower-1", "tower-2"}
            # The healthy session never noticed.
            await session.echo("still here")
            assert session.negotiation == 1 and session.state == "connected"

    run(main)


def test_a_silent_client_is_declared_silent_and_asked_to_reoffer(broker):
    wait_for_towers(broker, 2)

    async def main():
        client = broker.client()
        grant = await client.create_session()
        async with open_session(grant, trusting(broker.certificate),
                                answer_heartbeats=False) as session:
            await session.wait_state("connected")
            repairing = await session.wait_for(
                lambda f: f.get("state") == "repairing", 10)
            assert repairing["reason"].startswith("silent")
            await session.wait_for(lambda f: f["type"] == "reoffer", 10)
            assert (await client.get_session(grant.id))["id"] == grant.id

    run(main)


def test_an_offer_in_the_post_is_answered_in_the_response(broker):
    wait_for_towers(broker, 2)

    async def main():
        client = broker.client()
        assert await client.ice_servers() == ()
        async with start_session(client) as session:
            assert session.grant.answer.startswith("v=0")
            await session.echo("first")
            await session.wait_state("connected")
            # The answer came with the POST, never again on the signaling socket.
            assert not [f for f in session.frames if f["type"] == "answer"]
            assert session.peers_made == 1
            await client.delete_session(session.grant.id)
        with pytest.raises(ApiError) as refused:
            await client.create_session(offer="v=0\r\nnot an offer")
        assert (refused.value.status, refused.value.code) == (400, "invalid_sdp")
        await client.aclose()

    run(main)


def test_a_session_refused_while_the_towers_are_busy_is_asked_for_again(tmp_path):
    # One tower that takes one unanswered offer at a time: a session placed without its
    # offer holds it until it offers, ends or gives up (at its negotiation deadline).
    broker = start_broker(tmp_path, towers=1, max_unanswered_offers=1,
                          negotiation_deadline=60)
    try:
        wait_for_towers(broker, 1)

        async def main():
            client = broker.client()
            holder = await client.create_session()
            with pytest.raises(ApiError) as refused:
                await client.create_session(busy_attempts=1)
            assert (refused.value.status, refused.value.code) == (503, "towers_busy")
            assert refused.value.retry_after == 1

            async def let_go_after_a_refusal():
                while refusals(await client.request("GET", "/metrics")) < 2:
                    await trio.sleep(0.05)
                await client.delete_session(holder.id)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(let_go_after_a_refusal)
                    started = trio.current_time()
                    async with start_session(client) as session:
                        # It waited out the broker's Retry-After before asking again.
                        assert trio.current_time() - started >= 1
                        await session.echo("after a refusal")
                        await client.delete_session(session.grant.id)
            await client.aclose()

        run(main)
    finally:
        stop_broker(broker)


def refusals(metrics: tuple[int, str]) -> int:
    for line in metrics[1].splitlines():
        if line.startswith('broker_sessions_refused_total{reason="towers_busy"}'):
            return int(float(line.split()[-1]))
    return 0


def test_a_client_that_connects_late_offers_for_the_negotiation_it_missed(broker):
    """The broker repaired a session while its client was away: the state frame on
    connecting tells the client which negotiation to offer for."""
    wait_for_towers(broker, 2)

    async def main():
        client = broker.client()
        grant = await client.create_session()
        # Nobody offers within the deadline: the broker restarts the negotiation.
        with trio.fail_after(15):
            while (await client.get_session(grant.id))["negotiation"] < 2:
                await trio.sleep(0.2)
        fresh = await client.new_token(grant.id)
        late = dataclasses.replace(grant, signaling_url=fresh["signaling_url"])
        async with open_session(late, trusting(broker.certificate)) as session:
            await session.wait_state("connected", after=1)
            await session.echo("made it")
            assert session.offered >= 2 and session.peers_made == 1

    run(main)


def test_a_dropped_signaling_socket_is_opened_again_with_a_fresh_token(broker):
    wait_for_towers(broker, 2)

    async def main():
        client = broker.client()
        async with start_session(client) as session:
            await session.wait_state("connected")
            # A frame over 64 KiB: the broker answers with a fatal error and closes.
            await session.websocket.send_message("x" * 70_000)
            error = await session.wait_for(lambda f: f["type"] == "error", 10)
            assert (error["code"], error["fatal"]) == ("frame_too_large", True)
            await session.wait_for(lambda f: f["type"] == "reconnected", 10)
            # The broker greets the new connection with the session's state, as it is.
            with trio.fail_after(10):
                while not [f for f in _after_reconnecting(session) if f["type"] == "state"]:
                    await trio.sleep(0.05)
            [state] = [f for f in _after_reconnecting(session) if f["type"] == "state"]
            assert state["state"] == "connected"
            await session.echo("still the same session")
            assert session.peers_made == 1
            await client.delete_session(session.grant.id)
            await session.wait_state("closed")
            # Ended: the broker closes the socket, and it is not opened again.
            with trio.fail_after(10):
                while [f["type"] for f in session.frames].count("disconnected") < 2:
                    await trio.sleep(0.05)
            await trio.sleep(1)
            assert session.frames[-1]["type"] == "disconnected"
        await client.aclose()

    run(main)


def _after_reconnecting(session) -> list[dict]:
    kinds = [frame["type"] for frame in session.frames]
    return session.frames[kinds.index("reconnected") + 1:]
