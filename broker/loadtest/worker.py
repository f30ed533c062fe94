"""One load-generator process: simulated browsers that speak only the public API.

Started by the coordinator (``python -m broker.loadtest.worker``) with its plan as one
JSON line on stdin; prints one JSON line of figures every second on stdout, and a last
one when its sessions are over. When its stdin closes (the coordinator is gone, or was
stopped) it ends its sessions early, deleting them, and gives up on those still at it
after ``STOP_GRACE``.

Each simulated browser arrives at its planned moment, creates a session with the offer
in the POST (``broker.client.start_session``), times it to its first echo, then echoes
messages at the planned rate and size until the end, follows repairs (timing each from
"repairing" to "connected"), and deletes its session; one whose setup failed is deleted
too, so that the server does not keep negotiating it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import h11
import trio

from actors import bridge
from actors.bridge import call_asyncio

from ..collector import Collector
from ..client import BrokerClient, ClientSession, start_session, trusting
from ..client_peer import new_peer
from .traffic import ClosedSends, Tally, send_steadily

SETUP_TIMEOUT = 30.0
REPORT_INTERVAL = 1.0
# Why a session counts as lost though its client saw no end: a repair was under way.
REPAIRING_AT_THE_END = "repairing at the end"
# The states a session ends in on the broker.
ENDED = ("failed", "closed")
# A session's DELETE at the end: every session of the run ends at once, and the load
# generator's processes are busy closing their peer connections meanwhile (a 5 s bound
# saw a third of 1,000 DELETEs cut off on this 2-core machine, the broker answering).
CLOSE_TIMEOUT = 20.0
# How long a worker waits for the DELETE of a session whose setup failed.
ABANDON_TIMEOUT = 5.0
# Once the coordinator asks it to stop (its stdin closes), how long a worker has to end
# its sessions (DELETE) before it gives up on them: as long as a DELETE may take.
STOP_GRACE = CLOSE_TIMEOUT
# Why a session counts as failed (setting up) or not closed (its DELETE under way) when
# the worker gave up on it past its grace.
STOPPED = "stopped"


@dataclass(frozen=True)
class Plan:
    url: str
    api_key: str
    certificate: str
    # Seconds from the start at which each of this worker's browsers arrives.
    arrivals: list[float]
    # Seconds from the start at which every session ends.
    end: float
    message_rate: float
    message_size: int
    application: str = "echo"
    # The bare aiortc echo server's URL instead of a broker (the floor; its own protocol:
    # POST /peers with the offer, DELETE /peers/{id}).
    floor: bool = False


class Worker:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.tally = Tally()
        self.requested = 0
        self.connected = 0
        self.up = 0
        self.failed: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.setups: list[float] = []
        self.repairs: list[float] = []
        # Sessions repaired at least once (a session may be repaired more than once).
        self.sessions_repaired = 0
        # Sessions up whose repair is under way (they count as up meanwhile).
        self.repairing = 0
        # Sessions whose DELETE at the end failed, by reason.
        self.not_closed: Counter[str] = Counter()
        self.ssl_context = None if plan.floor else trusting(plan.certificate)
        # The browsers' peer connections are long-lived objects too.
        self.collector = Collector()
        self.closed_sends = ClosedSends()
        # Set when the run is stopped early: browsers end their sessions, in order.
        self.ending = trio.Event()
        self.coordinator_gone = False

    async def run(self) -> None:
        self.started = time.monotonic()
        await call_asyncio(self.closed_sends.install)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.collector.run)
                nursery.start_soon(self._report_every_second)
                nursery.start_soon(self._stop_when_stdin_closes, nursery.cancel_scope)
                async with trio.open_nursery() as browsers:
                    for arrival in self.plan.arrivals:
                        browsers.start_soon(self._browser, arrival)
                nursery.cancel_scope.cancel()
        finally:
            # Also when stopped early: what was measured is not lost.
            self._report(final=True)

    async def _browser(self, arrival: float) -> None:
        with trio.move_on_after(max(0.0, arrival - self._elapsed())):
            await self.ending.wait()
        if self.ending.is_set():
            return  # the run was stopped before this browser came
        self.requested += 1
        if self.plan.floor:
            await self._floor_browser()
            return
        client = BrokerClient(self.plan.url, self.plan.api_key, self.ssl_context)
        # Set up; counted lost (once); done with (deleted, or ended by the broker).
        connected = counted = closed = False
        created: str | None = None
        try:
            # The deadline covers the setup only; it is lifted once the first echo is back.
            with trio.CancelScope(deadline=trio.current_time() + SETUP_TIMEOUT) as setup:
                # The page's load, as a browser's: its clock starts once it has its ICE
                # servers, as the floor's, which has none to fetch, starts at its offer.
                await client.ice_servers()
                started = time.perf_counter()
                video = self.plan.application == "demo"
                # A session refused towers_busy is counted as refused, not asked for
                # again: the report says how many the broker turned away.
                async with start_session(client, application=self.plan.application,
                                         video=video, busy_attempts=1) as session:
                    created = session.grant.id
                    await session.echo("first", timeout=SETUP_TIMEOUT)
                    setup.deadline = math.inf
                    self._connected(started)
                    connected = True
                    try:
                        lost = await self._live(session)
                    finally:
                        self._gone()
                    if lost is not None:
                        self.lost[lost] += 1
                        counted = True
                    if lost not in ENDED:  # the broker has it still: deleted
                        await self._close(client.delete_session(session.grant.id))
                    closed = True
            if setup.cancelled_caught:
                self.failed["setup timeout"] += 1
        except Exception as error:
            # Once connected, a session that breaks is lost, not a failed setup; once
            # counted or done with, it is not counted again.
            if not (counted or closed):
                (self.lost if connected else self.failed)[_reason(error)] += 1
        except BaseException:
            # Cancelled (the worker stopping), bare or through a nursery (a group).
            self._stopped(connected, closed)
            raise
        finally:
            with trio.CancelScope(shield=True):
                if created is not None and not connected:
                    await _abandon(client.delete_session(created))
                with trio.move_on_after(2):
                    await client.aclose()

    def _connected(self, started: float) -> None:
        self.setups.append(time.perf_counter() - started)
        self.connected += 1
        self.up += 1
        self.collector.opened()

    def _stopped(self, connected: bool, closed: bool) -> None:
        """A session the worker gave up on when it stopped: one still setting up failed,
        one whose DELETE was under way was not deleted."""
        if not connected:
            self.failed[STOPPED] += 1
        elif not closed:
            self.not_closed[STOPPED] += 1

    def _gone(self) -> None:
        self.up -= 1
        self.collector.closed_one()

    async def _close(self, deleting: Awaitable[Any]) -> None:
        """Delete the session at the end of the run; a refusal is counted, not lost."""
        try:
            with trio.fail_after(CLOSE_TIMEOUT):
                await deleting
        except Exception as error:
            self.not_closed[_reason(error)] += 1

    async def _floor_browser(self) -> None:
        started = time.perf_counter()
        holder: FloorSession | None = None
        connected = False
        created: dict[str, Any] | None = None
        try:
            floor = FloorClient(self.plan.url)
            holder = FloorSession(await call_asyncio(new_peer))
            with trio.move_on_after(SETUP_TIMEOUT) as setup:
                _, created = await floor.request(
                    "POST", "/peers", {"sdp": await call_asyncio(holder.peer.offer)})
                await call_asyncio(holder.peer.accept, created["sdp"])
                await call_asyncio(holder.peer.wait_open)
                await call_asyncio(holder.peer.echo, "first")
            if setup.cancelled_caught:
                self.failed["setup timeout"] += 1
                return
            self._connected(started)
            connected = True
            try:
                await self._send_steadily(holder)
            finally:
                self._gone()
            await self._close(floor.request("DELETE", f"/peers/{created['id']}"))
        except Exception as error:
            (self.lost if connected else self.failed)[_reason(error)] += 1
        except BaseException:
            self._stopped(connected, closed=False)
            raise
        finally:
            with trio.CancelScope(shield=True):
                if created is not None and not connected:
                    await _abandon(floor.request("DELETE", f"/peers/{created['id']}"))
                if holder is not None:
                    with trio.move_on_after(5):
                        await call_asyncio(holder.peer.close)

    async def _send_steadily(self, session: Any) -> None:
        """Send on the timetable until the end of the run, or until it is stopped."""
        until = time.monotonic() + max(0.0, self.plan.end - self._elapsed())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._cancel_when_ending, nursery.cancel_scope)
            await call_asyncio(send_steadily, session, self.tally, self.plan.message_rate,
                               self.plan.message_size, until)
            nursery.cancel_scope.cancel()

    async def _cancel_when_ending(self, scope: trio.CancelScope) -> None:
        await self.ending.wait()
        scope.cancel()

    async def _live(self, session: ClientSession) -> str | None:
        """Echo until the end of the run (or until it is stopped); why the session was
        lost before then (its sends stop there, and it no longer counts as up), or None.
        One still repairing at the end is lost too: nothing says it would have come
        back."""
        lost: str | None = None
        repair = _Repair()
        try:
            async with trio.open_nursery() as nursery:

                async def follow() -> None:
                    nonlocal lost
                    lost = await self._follow_repairs(session, repair)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(follow)
                await self._send_steadily(session)
                nursery.cancel_scope.cancel()
        finally:
            self.repairing -= repair.since is not None
        if lost is None and repair.since is not None:
            lost = REPAIRING_AT_THE_END
        return lost

    async def _follow_repairs(self, session: ClientSession, repair: _Repair) -> str:
        """Time each repair, from "repairing" to "connected" again; returns the state
        the session ended in."""
        position = len(session.frames)
        while True:
            await session.wait_for(lambda _: len(session.frames) > position, timeout=math.inf)
            while position < len(session.frames):
                frame = session.frames[position]
                position += 1
                state = frame.get("state") if frame.get("type") == "state" else None
                if state == "repairing" and repair.since is None:
                    repair.since = time.perf_counter()
                    self.repairing += 1
                elif state == "connected" and repair.since is not None:
                    self.repairs.append(time.perf_counter() - repair.since)
                    repair.since = None
                    self.repairing -= 1
                    repair.done += 1
                    self.sessions_repaired += repair.done == 1
                elif state in ENDED:
                    return state

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    async def _report_every_second(self) -> None:
        while True:
            await trio.sleep(REPORT_INTERVAL)
            self._report()

    def _report(self, final: bool = False) -> None:
        times = os.times()
        figures = {
            "final": final,
            "elapsed": self._elapsed(),
            "requested": self.requested,
            "connected": self.connected,
            "up": self.up,
            "repairing": self.repairing,
            "failed": dict(self.failed),
            "lost": dict(self.lost),
            "not_closed": dict(self.not_closed),
            "setup": self.setups,
            "repairs": self.repairs,
            "sessions_repaired": self.sessions_repaired,
            "cpu": times.user + times.system,
            **self.tally.take(),
        }
        self.setups, self.repairs = [], []
        if self.coordinator_gone:
            return
        try:
            print(json.dumps(figures), flush=True)
        except OSError:
            # The coordinator is gone (its stdin, closing too, ends the sessions in
            # order): nobody to report to any more.
            self.coordinator_gone = True
            sys.stdout = open(os.devnull, "w")

    async def _stop_when_stdin_closes(self, scope: trio.CancelScope) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with stdin:
            try:
                while await stdin.receive_some(1024):
                    pass
            except (OSError, trio.BrokenResourceError):
                pass
        # Sessions up end, and are deleted; the rest give up after the grace.
        self.ending.set()
        await trio.sleep(STOP_GRACE)
        scope.cancel()


@dataclass
class _Repair:
    """When the session's repair under way began (None: none is), and how many it had."""

    since: float | None = None
    done: int = 0


@dataclass
class FloorSession:
    """A browser of the floor: one peer, never repaired."""

    peer: Any


class FloorClient:
    """Plain HTTP/1.1 requests to the bare echo server, one connection each."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.host, self.port = host, int(port)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        headers = [("host", f"{self.host}:{self.port}"), ("connection", "close"),
                   ("content-length", str(len(data))), ("content-type", "application/json")]
        stream = await trio.open_tcp_stream(self.host, self.port)
        async with stream:
            connection = h11.Connection(h11.CLIENT)
            await stream.send_all(connection.send(h11.Request(method=method, target=path,
                                                              headers=headers))
                                  + connection.send(h11.Data(data=data))
                                  + connection.send(h11.EndOfMessage()))
            status, payload = 0, b""
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    payload += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        if status >= 400:
            raise RuntimeError(f"{status}: the floor refused {method} {path}")
        return status, json.loads(payload) if payload else None


async def _abandon(deleting: Awaitable[Any]) -> None:
    """Delete a session set up in vain (its setup failed or ran out of time, or the
    worker stopped first), so that the server does not go on negotiating it on a
    tower's room. Best effort, and bounded: its failure is counted already."""
    with trio.move_on_after(ABANDON_TIMEOUT), contextlib.suppress(Exception):
        await deleting


def _reason(error: BaseException) -> str:
    """A failure's reason for the report: the first error inside any exception group,
    cut to its first clause."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    if isinstance(error, trio.TooSlowError):
        return "timeout"
    text = str(error) or type(error).__name__
    return text.split(":")[0][:120]


def main() -> None:
    worker = Worker(Plan(**json.loads(sys.stdin.readline())))
    try:
        bridge.run(worker.run, handle_signals=False)
    except KeyboardInterrupt:
        pass
    finally:
        gc.collect()  # the tasks that failed as the loop closed are reported as they go
        worker.closed_sends.say()


if __name__ == "__main__":
    main()
