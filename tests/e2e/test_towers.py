"""A tower that goes silent without dying: its agent process stopped (SIGSTOP), then resumed.

The broker hears no load report for ``tower_silence`` (3 s), drops the tower, moves its
sessions and places no new one there; once the agent runs again, the broker links to the
same process again.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import trio

from actors import bridge
from broker.client import BrokerClient, start_session

from .conftest import RunningBroker, wait_for_towers

TOWER_SILENCE = 3.0
# Functional deadlines: the broker must get there, however loaded the machine is.
NOTICE_DEADLINE = TOWER_SILENCE + 7.0
RELINK_DEADLINE = 20.0


def run(main, *args):
    return bridge.run(main, *args, handle_signals=False)


@contextmanager
def stopped(pid: int):
    """The process stopped for the block; resumed on the way out, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


async def towers_ready(client: BrokerClient) -> int:
    status, health = await client.request("GET", "/healthz")
    assert status in (200, 503), (status, health)
    return health["towers_ready"]


async def wait_towers_ready(client: BrokerClient, count: int, timeout: float) -> None:
    with trio.fail_after(timeout):
        while await towers_ready(client) != count:
            await trio.sleep(0.1)


def _other(broker: RunningBroker, tower: str) -> str:
    (other,) = set(broker.tower_pids()) - {tower}
    return other


def test_a_stopped_tower_is_dropped_its_session_repaired_elsewhere_and_relinked(broker):
    wait_for_towers(broker, 2)
    pids = broker.tower_pids()
    outcome = {}

    async def main():
        client = broker.client()
        async with start_session(client) as session:
            await session.wait_state("connected")
            await session.echo("before")
            victim = session.grant.tower
            other = _other(broker, victim)
            outcome["victim"] = victim
            with stopped(pids[victim]):
                await wait_towers_ready(client, 1, NOTICE_DEADLINE)
                repairing = await session.wait_for(
                    lambda frame: frame.get("state") == "repairing", NOTICE_DEADLINE)
                assert repairing["negotiation"] == 1
                assert repairing["reason"].startswith("tower_lost"), repairing
                await session.wait_state("connected", 15, after=1)
                await session.echo("after")
                described = await client.get_session(session.grant.id)
                assert described["state"] == "connected"
                assert described["tower"] == other and described["placements"] == 2
                assert described["negotiation"] >= 2
            # Resumed: the broker links to the same agent again.
            await wait_towers_ready(client, 2, RELINK_DEADLINE)
            await session.echo("still here")
        await client.aclose()

    run(main)
    assert broker.tower_pids()[outcome["victim"]] == pids[outcome["victim"]]


def test_a_first_echo_waited_for_through_a_repair_comes_on_the_new_peer(broker):
    """The client's first peer never opens (its tower stopped as it connects): the echo
    asked of it is taken by the peer the repair makes."""
    wait_for_towers(broker, 2)
    pids = broker.tower_pids()

    async def main():
        client = broker.client()
        async with start_session(client) as session:
            with stopped(pids[session.grant.tower]):
                await session.echo("first", timeout=NOTICE_DEADLINE + 15)
                assert session.peers_made >= 2
            await wait_towers_ready(client, 2, RELINK_DEADLINE)
        await client.aclose()

    run(main)


def test_no_session_is_placed_on_a_stopped_tower(broker):
    wait_for_towers(broker, 2)
    pids = broker.tower_pids()
    victim = "tower-1"
    other = _other(broker, victim)
    placed = []

    async def one(client: BrokerClient) -> None:
        async with start_session(client) as session:
            placed.append(session.grant.tower)
            await session.echo("placed")
            await client.delete_session(session.grant.id)

    async def main():
        client = broker.client()
        with stopped(pids[victim]):
            await wait_towers_ready(client, 1, NOTICE_DEADLINE)
            # Over a few seconds: while the broker is trying to link to the stopped agent
            # again, the half-open attempt must not make the tower look ready.
            with trio.fail_after(60):
                for _ in range(10):
                    await one(client)
                    await trio.sleep(0.5)
            assert placed == [other] * 10
        await wait_towers_ready(client, 2, RELINK_DEADLINE)
        # Resumed, it takes sessions again: held open, four cannot all go to one tower.
        async with start_session(client) as first, start_session(client) as second:
            async with start_session(client) as third, start_session(client) as fourth:
                sessions = (first, second, third, fourth)
                assert victim in {session.grant.tower for session in sessions}
                for session in sessions:
                    await session.echo("back")
        await client.aclose()

    run(main)
