"""The collector: garbage made between two ticks is collected, survivors are frozen,
and frozen garbage is reclaimed once enough sessions closed."""

from __future__ import annotations

import gc
import weakref

import pytest
import trio

from broker.collector import FREEZE_INTERVAL, Collector


class Node:
    """A cyclic object: only the cyclic collector can reclaim it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def unfrozen():
    yield
    gc.unfreeze()


def garbage_cycle() -> weakref.ref:
    return weakref.ref(Node())


async def test_new_garbage_is_collected_before_the_survivors_are_frozen(autojump_clock):
    collector = Collector(closed_before_full=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collector.run)
        await trio.sleep(FREEZE_INTERVAL * 1.5)
        survivor = Node()
        dead = garbage_cycle()
        gc.disable()  # only the collector's own collections count here
        try:
            await trio.sleep(FREEZE_INTERVAL)
            assert dead() is None
            assert gc.is_tracked(survivor) and gc.get_freeze_count() > 0
            later = garbage_cycle()
            await trio.sleep(FREEZE_INTERVAL)
            assert later() is None
        finally:
            gc.enable()
        nursery.cancel_scope.cancel()


async def test_frozen_garbage_waits_for_enough_closed_sessions(autojump_clock):
    collector = Collector(closed_before_full=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collector.run)
        session = Node()
        left_behind = weakref.ref(session)
        gc.disable()
        try:
            await trio.sleep(FREEZE_INTERVAL * 1.5)  # the session's objects are frozen
            collector.opened()
            collector.opened()
            del session
            collector.closed_one()
            await trio.sleep(FREEZE_INTERVAL)
            assert left_behind() is not None  # one closed: not worth a full collection
            collector.closed_one()
            await trio.sleep(FREEZE_INTERVAL)
            assert left_behind() is None
            assert collector.closed == 0
        finally:
            gc.enable()
        nursery.cancel_scope.cancel()


async def test_a_quarter_of_the_sessions_alive_closed_is_enough(autojump_clock):
    collector = Collector(closed_before_full=2)
    for _ in range(40):
        collector.opened()
    for _ in range(7):
        collector.closed_one()
    assert not collector.due()  # 7 of 33 alive: under a quarter
    collector.closed_one()
    assert collector.due()  # 8 of 32
