"""How a simulated browser's failure is named in the report, and what a lost session
counts as."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from actors import bridge
from broker.loadtest import worker as worker_module
from broker.loadtest.worker import Plan, Worker, _reason, _Repair


def test_a_failure_is_named_by_its_first_clause():
    assert _reason(RuntimeError("503 no_tower: no tower is ready")) == "503 no_tower"
    assert _reason(ConnectionResetError()) == "ConnectionResetError"
    assert _reason(trio.TooSlowError()) == "timeout"


def test_a_failure_inside_a_nursery_is_named_by_what_failed():
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [OSError("refused: port")])])
    assert _reason(nested) == "refused"
    assert _reason(ExceptionGroup("nursery", [trio.TooSlowError()])) == "timeout"


class LosingSession:
    """A session as a browser follows it, without a peer (so nothing is sent), whose
    broker says it failed once ``lose`` is called."""

    peer = None

    def __init__(self) -> None:
        self.frames: list[dict] = [{"type": "state", "state": "connected"}]
        self.lost = trio.Event()

    def lose(self) -> None:
        self.frames.append({"type": "state", "state": "failed"})
        self.lost.set()

    async def wait_for(self, predicate, timeout: float) -> None:
        if not predicate(None):
            await self.lost.wait()


def test_a_session_lost_before_the_end_stops_there_and_counts_as_lost_only():
    # It used to go on "sending" until the end of the run, counted as up, and then its
    # DELETE's 404 counted it failed as well.
    worker = Worker(Plan("http://127.0.0.1:9", "", "", arrivals=[0.0], end=60.0,
                         message_rate=1.0, message_size=10, floor=True))
    worker.started = time.monotonic()
    session = LosingSession()

    async def lose_soon() -> None:
        await trio.testing.wait_all_tasks_blocked()  # sending, and following the session
        session.lose()

    async def main() -> str | None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lose_soon)
                return await worker._live(session)

    assert bridge.run(main, handle_signals=False) == "failed"


class RepairingSession:
    """A session as a browser follows it, without a peer, whose broker starts repairing it
    once ``repair`` is called, and never says it is back."""

    peer = None

    def __init__(self) -> None:
        self.frames: list[dict] = [{"type": "state", "state": "connected"}]
        self.changed = trio.Event()

    def repair(self) -> None:
        self.frames.append({"type": "state", "state": "repairing"})
        self.changed.set()

    async def wait_for(self, predicate, timeout: float) -> None:
        while not predicate(None):
            await self.changed.wait()
            self.changed = trio.Event()


def test_a_session_still_repairing_at_the_end_counts_as_lost():
    # It used to count nowhere: neither repaired nor lost, as if all had gone well.
    worker = Worker(Plan("http://127.0.0.1:9", "", "", arrivals=[0.0], end=1.0,
                         message_rate=1.0, message_size=10, floor=True))
    worker.started = time.monotonic()
    session = RepairingSession()
    seen = []

    async def main() -> str | None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async def repair_soon() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    session.repair()
                    await trio.testing.wait_all_tasks_blocked()
                    seen.append(worker.repairing)

                nursery.start_soon(repair_soon)
                return await worker._live(session)

    assert bridge.run(main, handle_signals=False) == "repairing at the end"
    assert worker.repairs == []
    assert seen == [1] and worker.repairing == 0  # repairing until its end


def test_a_worker_whose_coordinator_is_gone_stops_reporting_rather_than_crashing(
        monkeypatch):
    # Its next report raised BrokenPipeError and took every session down unended; the
    # stdin closing with it ends them in order instead.
    reading, writing = os.pipe()
    os.close(reading)
    monkeypatch.setattr(sys, "stdout", os.fdopen(writing, "w"))
    worker = Worker(Plan("http://127.0.0.1:9", "", "", arrivals=[], end=1.0,
                         message_rate=1.0, message_size=10, floor=True))
    worker.started = time.monotonic()
    worker._report()
    worker._report(final=True)
    assert worker.coordinator_gone


class StandInClient:
    """The broker as a browser sees it, whose DELETE never answers when told so."""

    def __init__(self, *args) -> None:
        pass

    async def ice_servers(self) -> tuple:
        return ()

    async def delete_session(self, session_id: str) -> None:
        await trio.sleep_forever()

    async def aclose(self) -> None:
        pass


class StandInSession(RepairingSession):
    grant = type("Grant", (), {"id": "s-1"})()

    def __init__(self, echoes: bool) -> None:
        super().__init__()
        self.echoes = echoes

    async def echo(self, text: str, timeout: float) -> None:
        if not self.echoes:
            await trio.sleep_forever()


@pytest.mark.parametrize(("echoes", "counted"), [
    (False, ("failed", {"stopped": 1})),  # still setting up
    (True, ("not_closed", {"stopped": 1})),  # its DELETE under way
])
def test_a_session_a_stopping_worker_gives_up_on_is_counted(monkeypatch, echoes, counted):
    # The cancel comes through start_session's nursery, as a group: it was counted nowhere.
    @asynccontextmanager
    async def start_session(client, **options):
        async with trio.open_nursery():
            yield StandInSession(echoes)

    monkeypatch.setattr(worker_module, "BrokerClient", StandInClient)
    monkeypatch.setattr(worker_module, "start_session", start_session)
    monkeypatch.setattr(worker_module, "ABANDON_TIMEOUT", 0.1)  # its DELETE never answers
    worker = Worker(Plan("https://127.0.0.1:9", "", "", arrivals=[0.0], end=0.2,
                         message_rate=1.0, message_size=10))
    worker.ssl_context = None
    worker.started = time.monotonic()

    async def main() -> None:
        with trio.move_on_after(2):  # the worker's grace, run out
            await worker._browser(0.0)

    bridge.run(main, handle_signals=False)
    name, figures = counted
    assert getattr(worker, name) == figures
    assert worker.lost == {}


@pytest.mark.parametrize("how", ["timeout", "error"])
def test_a_session_whose_setup_failed_is_deleted(monkeypatch, how):
    # It was left to the broker, negotiating on a tower's room for its deadlines.
    deleted = []

    class Deleting(StandInClient):
        async def delete_session(self, session_id: str) -> None:
            deleted.append(session_id)

    class Failing(StandInSession):
        async def echo(self, text: str, timeout: float) -> None:
            if how == "error":
                raise ConnectionResetError()
            await trio.sleep_forever()

    @asynccontextmanager
    async def start_session(client, **options):
        yield Failing(echoes=False)

    monkeypatch.setattr(worker_module, "BrokerClient", Deleting)
    monkeypatch.setattr(worker_module, "start_session", start_session)
    monkeypatch.setattr(worker_module, "SETUP_TIMEOUT", 0.1)
    worker = Worker(Plan("https://127.0.0.1:9", "", "", arrivals=[0.0], end=0.2,
                         message_rate=1.0, message_size=10))
    worker.ssl_context = None
    worker.started = time.monotonic()
    bridge.run(worker._browser, 0.0, handle_signals=False)
    reason = "setup timeout" if how == "timeout" else "ConnectionResetError"
    assert worker.failed == {reason: 1}
    assert deleted == ["s-1"]


def test_a_floor_peer_whose_setup_failed_is_deleted(monkeypatch):
    # The floor kept it, and its memory counted, for the rest of the run.
    requests = []

    class Floor:
        def __init__(self, url: str) -> None:
            pass

        async def request(self, method: str, path: str, body=None):
            requests.append((method, path))
            return 201, {"id": "p-1", "sdp": "answer"}

    class NeverOpens:
        async def offer(self) -> str:
            return "offer"

        async def accept(self, sdp: str) -> None:
            pass

        async def wait_open(self) -> None:
            await asyncio.Event().wait()

        async def close(self) -> None:
            pass

    async def new_peer() -> NeverOpens:
        return NeverOpens()

    monkeypatch.setattr(worker_module, "FloorClient", Floor)
    monkeypatch.setattr(worker_module, "new_peer", new_peer)
    monkeypatch.setattr(worker_module, "SETUP_TIMEOUT", 0.1)
    worker = Worker(Plan("http://127.0.0.1:9", "", "", arrivals=[0.0], end=0.2,
                         message_rate=1.0, message_size=10, floor=True))
    worker.started = time.monotonic()
    bridge.run(worker._browser, 0.0, handle_signals=False)
    assert worker.failed == {"setup timeout": 1}
    assert requests == [("POST", "/peers"), ("DELETE", "/peers/p-1")]


def test_a_session_repaired_twice_is_two_repairs_of_one_session():
    worker = Worker(Plan("http://127.0.0.1:9", "", "", arrivals=[0.0], end=60.0,
                         message_rate=1.0, message_size=10, floor=True))
    session = RepairingSession()

    async def main() -> str:
        async def follow_the_broker() -> None:
            await trio.testing.wait_all_tasks_blocked()
            for state in ("repairing", "connected", "repairing", "connected", "closed"):
                session.frames.append({"type": "state", "state": state})
            session.changed.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow_the_broker)
                return await worker._follow_repairs(session, _Repair())

    assert bridge.run(main, handle_signals=False) == "closed"
    assert len(worker.repairs) == 2
    assert worker.sessions_repaired == 1
    assert worker.repairing == 0
