"""Benchmark of session setup through the broker against a bare aiortc echo server.

What it measures: the time from asking for a session to the first echo on its data
channel, at the 50th, 95th and 99th percentile, with 1, 10 and 50 sessions started at
the same moment (each timed on its own), along two paths:

- broker: the embedded broker (``python -m broker serve ... --towers 1``) in its own
  process with one tower agent: one process answers and shakes hands, as the floor's
  does (two towers would share a round's handshakes between two processes). The clock
  starts just before the client's peer connection is made and stops when the first
  echo comes back; in between,
  ``broker.client.start_session``: the offer, ``POST /v1/sessions`` carrying it and
  returning the tower's answer, the WSS signaling socket opening while ICE runs, and
  ``ClientSession.echo``. Each session is one simulated browser that has loaded the page
  before its user asks for a session: its HTTPS connection is open and it has fetched
  the ICE servers (``GET /v1/ice-servers``) before the clock starts; a round's clocks
  start once all its browsers are ready, as if their users asked at the same moment.
- floor: ``benchmarks.echo_floor``, a plain asyncio program in its own process that
  answers an offer POSTed over plain HTTP with a new aiortc peer connection echoing
  every data-channel message; no TLS, no WebSocket, no actors. The clock starts just
  before the client's peer connection is made and stops at the first echo.

Both paths use the same client, ``broker.client_peer.ClientPeer`` (the ``heartbeat`` and
``echo`` data channels, ``iceServers=[]``), driven by trio code under
``actors.bridge.run`` in this process, and the same 100-byte text echo. Broker and floor
rounds alternate so that the machine's noise hits both; each path first opens one
session that is not counted. Every session is held open until all sessions of its round
have echoed, then closed (``DELETE`` and the client's peer connection) before the next
round. The target is a broker p50 at most 1.25 times the floor's; a missed target is
reported, not raised. Wall time is ``time.perf_counter``.

Each level also splits the p50 where the time went: from the start to the tower's
answer in the client's hands (the offer, the ``POST`` and, through the broker, the
tower's answer), and from there to the first echo (ICE, DTLS, SCTP, the data channel).

Run from the project root::

    .venv/bin/python -m benchmarks.sessions            # full run, prints a table
    .venv/bin/python -m benchmarks.sessions --json     # one JSON object, nothing else
    .venv/bin/python -m benchmarks.sessions --quick    # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import psutil
import trio

from actors import bridge
from actors.bridge import call_asyncio
from broker.client import BrokerClient, start_session, trusting
from broker.client_peer import new_peer
from broker.loadtest.worker import FloorClient

from ._report import print_rows, verdict

ROOT = Path(__file__).resolve().parent.parent
TOWERS = 1
RATIO_TARGET = 1.25
PAYLOAD = "x" * 100
SESSION_TIMEOUT = 30.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# After the server itself has exited, how long its children may take to follow it.
GROUP_GRACE = 5.0
GONE_TIMEOUT = 10.0
ROUND_TIMEOUT = 4 * SESSION_TIMEOUT
BROKER_TRANSPORT = f"HTTPS POST + WSS signaling (TLS), broker process + {TOWERS} tower agent(s)"
FLOOR_TRANSPORT = "plain HTTP POST on 127.0.0.1, no TLS, no WebSocket, one server process"


@dataclass(frozen=True)
class Level:
    """Sessions started at the same moment, and how many such rounds per path."""

    concurrency: int
    rounds: int


FULL = (Level(1, 20), Level(10, 6), Level(50, 4))
QUICK = (Level(1, 5), Level(10, 1))


# The servers, as processes of their own


@dataclass
class Server:
    """A server process started in a process group of its own, and what it announced."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    announced: dict[str, Any]


def log_tail(log: Path, characters: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-characters:]
    except OSError:
        return ""


def _interrupted(signal_number: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal_number}")


def start_server(name: str, command: list[str], log: Path) -> Server:
    """Start ``command`` and read the JSON line it prints once it listens.

    The server runs in a session of its own (no terminal's signal reaches it), so this
    process turns SIGTERM into ``KeyboardInterrupt``, as Ctrl-C is: either way the
    ``finally`` that stops the server runs.

    Raises:
        RuntimeError: the process ended, or said nothing within ``START_TIMEOUT``.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file, start_new_session=True
        )
    assert process.stdout is not None
    try:
        readable, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        line = process.stdout.readline() if readable else b""
        if not line:
            raise RuntimeError(f"the {name} did not start:\n{log_tail(log)}")
        return Server(name, process, log, json.loads(line))
    except BaseException:
        stop_server(Server(name, process, log, {}))
        raise


def process_group_members(group: int) -> list[int]:
    """Live (not zombie) processes of process group ``group``, from ``/proc``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # pid (comm) state ppid pgrp ...; comm may itself hold spaces and parentheses
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry))
    return members


def stop_server(server: Server) -> bool:
    """SIGINT, as Ctrl-C; then make sure the whole process tree is gone.

    Returns:
        True when the server exited with status 0 and every process of its group ended
        without being killed from here.
    """
    process = server.process
    group = process.pid  # start_new_session made the server its group's leader
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + GROUP_GRACE
    while process_group_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = process_group_members(group)
    if survivors:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    if process.stdout is not None:
        process.stdout.close()
    return process.returncode == 0 and not survivors


# The two paths, as seen by the same client


class Countdown:
    """Holds each of a round's sessions until all of them have arrived at the same point:
    ready to start (so their clocks start together), or echoed (so they stay open)."""

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.reached = trio.Event()

    async def arrive_and_wait(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.reached.set()
        await self.reached.wait()


@dataclass(frozen=True)
class Setup:
    """One session's seconds from its start to the tower's answer and to its first echo."""

    answered: float
    echoed: float


class SessionPath(Protocol):
    """One way of getting a session with an echo, timed from the client's side."""

    name: str

    async def session(
        self, setups: list[Setup], all_ready: Countdown, all_echoed: Countdown
    ) -> None:
        """Get ready as its client would before its user asks, wait for ``all_ready``;
        open one session, append its ``Setup`` to ``setups``, wait for
        ``all_echoed``, then close it."""
        ...

    async def settle(self) -> None:
        """Until the server is done with the sessions closed in the last round."""
        ...


class BrokerPath:
    """Sessions through the broker's public protocol (``broker.client``)."""

    name = "broker"

    def __init__(self, url: str, api_key: str, certificate: str) -> None:
        self.ssl_context = trusting(certificate)
        self.client = BrokerClient(url, api_key, self.ssl_context)
        self.client_url, self.api_key = url, api_key
        self.opened: list[str] = []

    async def session(
        self, setups: list[Setup], all_ready: Countdown, all_echoed: Countdown
    ) -> None:
        # Each session is one browser that has loaded the page: its connection to the
        # origin is open and it knows the ICE servers before its user clicks "start".
        client = BrokerClient(self.client_url, self.api_key, self.ssl_context)
        await client.ice_servers()
        await all_ready.arrive_and_wait()
        started = time.perf_counter()
        async with start_session(client) as session:
            self.opened.append(session.grant.id)
            await session.echo(PAYLOAD, timeout=SESSION_TIMEOUT)
            echoed = time.perf_counter()
            # The answer came with the POST or, if the POST gave up waiting, on the socket.
            assert session.answered_at is not None, "an echo without an answer"
            setups.append(Setup(session.answered_at - started, echoed - started))
            await session.wait_state("connected", timeout=SESSION_TIMEOUT)
            await all_echoed.arrive_and_wait()
            await client.delete_session(session.grant.id)
        await client.aclose()

    async def wait_for_towers(self, count: int) -> None:
        """Until the broker's ``/healthz`` reports ``count`` towers ready."""
        with trio.fail_after(START_TIMEOUT):
            while True:
                _, health = await self.client.request("GET", "/healthz")
                if isinstance(health, dict) and health.get("towers_ready", 0) >= count:
                    return
                await trio.sleep(0.1)

    async def settle(self) -> None:
        """Until the closed sessions have ended in the broker (they count against the API
        key's limit while they are still winding down): then it shows them as ended."""
        with trio.fail_after(GONE_TIMEOUT):
            for session_id in self.opened:
                while True:
                    status, shown = await self.client.request(
                        "GET", f"/v1/sessions/{session_id}")
                    if status == 404 or shown.get("state") in ("closed", "failed"):
                        break
                    await trio.sleep(0.02)
        self.opened.clear()


class FloorPath:
    """Sessions with ``benchmarks.echo_floor`` over plain HTTP/1.1."""

    name = "floor"

    def __init__(self, url: str) -> None:
        # One request per fresh connection, as ``BrokerClient`` does.
        self.request = FloorClient(url).request

    async def session(
        self, setups: list[Setup], all_ready: Countdown, all_echoed: Countdown
    ) -> None:
        await all_ready.arrive_and_wait()
        started = time.perf_counter()
        peer = await call_asyncio(new_peer)
        try:
            offer_sdp = await call_asyncio(peer.offer)
            _, created = await self.request("POST", "/peers", {"sdp": offer_sdp})
            answered = time.perf_counter()
            await call_asyncio(peer.accept, created["sdp"])
            with trio.fail_after(SESSION_TIMEOUT):
                await call_asyncio(peer.wait_open)
                await call_asyncio(peer.echo, PAYLOAD)
            setups.append(Setup(answered - started, time.perf_counter() - started))
            await all_echoed.arrive_and_wait()
            await self.request("DELETE", f"/peers/{created['id']}")
        finally:
            with trio.CancelScope(shield=True):
                await call_asyncio(peer.close)

    async def settle(self) -> None:
        """The floor closes its peer connection before it answers ``DELETE``."""


async def one_round(path: SessionPath, concurrency: int) -> list[Setup]:
    """Start ``concurrency`` sessions at once; returns each one's ``Setup``."""
    setups: list[Setup] = []
    all_ready, all_echoed = Countdown(concurrency), Countdown(concurrency)
    gc.collect()
    # A server that takes a request and never answers fails the round, not hangs it.
    with trio.fail_after(ROUND_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(path.session, setups, all_ready, all_echoed)
    await path.settle()
    return setups


def cpu_seconds(server: Server) -> float:
    """CPU time used so far by a server's process and its children (a broker's towers)."""
    process = psutil.Process(server.process.pid)
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


async def measure(
    broker: BrokerPath, floor: FloorPath, levels: tuple[Level, ...], servers: dict[str, Server]
) -> tuple[dict[int, dict[str, list[Setup]]], dict[str, float]]:
    """Every level's rounds on both paths, alternating which path goes first; and each
    server's CPU milliseconds per session over those rounds (its idle work during the
    other path's rounds included)."""
    await broker.wait_for_towers(TOWERS)
    paths: tuple[SessionPath, SessionPath] = (broker, floor)
    for path in paths:
        await one_round(path, 1)
    before = {name: cpu_seconds(server) for name, server in servers.items()}
    samples: dict[int, dict[str, list[Setup]]] = {}
    for level in levels:
        by_path: dict[str, list[Setup]] = {path.name: [] for path in paths}
        for round_number in range(level.rounds):
            order = paths if round_number % 2 == 0 else paths[::-1]
            for path in order:
                by_path[path.name] += await one_round(path, level.concurrency)
        samples[level.concurrency] = by_path
    sessions = sum(level.concurrency * level.rounds for level in levels)
    cpu = {name: round(1000 * (cpu_seconds(server) - before[name]) / sessions, 2)
           for name, server in servers.items()}
    return samples, cpu


# Figures


def percentiles(seconds: list[float]) -> dict[str, Any]:
    """p50, p95 and p99 in milliseconds (interpolated between samples, never beyond)."""
    milliseconds = sorted(value * 1000 for value in seconds)
    cuts = statistics.quantiles(milliseconds, n=100, method="inclusive")
    return {
        "samples": len(milliseconds),
        "p50_ms": round(statistics.median(milliseconds), 2),
        "p95_ms": round(cuts[94], 2),
        "p99_ms": round(cuts[98], 2),
        "samples_ms": [round(value, 2) for value in milliseconds],
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("aiortc", "aioice", "trio", "trio-websocket", "hypercorn", "h11"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_all(levels: tuple[Level, ...]) -> dict[str, Any]:
    began = time.perf_counter()
    stopped_cleanly = {}
    with tempfile.TemporaryDirectory(prefix="sessions-benchmark-") as directory:
        work = Path(directory)
        broker = floor = None
        try:
            broker = start_server("broker", [
                sys.executable, "-m", "broker", "serve", "--state-dir", str(work / "state"),
                "--https-port", "0", "--http-port", "0", "--shell-port", "0",
                "--towers", str(TOWERS), "--ready-json",
            ], work / "broker.log")
            floor = start_server(
                "floor", [sys.executable, "-m", "benchmarks.echo_floor"], work / "floor.log"
            )
            url = broker.announced["url"].rstrip("/")
            broker_path = BrokerPath(url, broker.announced["api_key"],
                                     broker.announced["certificate"])
            floor_path = FloorPath(floor.announced["url"])
            samples, cpu = bridge.run(measure, broker_path, floor_path, levels,
                                      {"broker": broker, "floor": floor})
        except bridge.Interrupted:
            raise
        except Exception:
            for server in (broker, floor):
                if server is not None:
                    print(f"--- {server.name} log (end) ---\n{log_tail(server.log)}",
                          file=sys.stderr)
            raise
        finally:
            for server in (broker, floor):
                if server is not None:
                    stopped_cleanly[server.name] = stop_server(server)
    results_levels = []
    for level in levels:
        by_path = samples[level.concurrency]
        broker_figures = percentiles([setup.echoed for setup in by_path["broker"]])
        floor_figures = percentiles([setup.echoed for setup in by_path["floor"]])
        # Where the time went: to the tower's answer (offer, POST, answer), and after it
        # (ICE, DTLS, SCTP, the data channel, the echo).
        phases = {
            phase: {name: percentiles([part(setup) for setup in setups])
                    for name, setups in by_path.items()}
            for phase, part in (("to_answer", lambda setup: setup.answered),
                                ("after_answer", lambda setup: setup.echoed - setup.answered))
        }
        ratio = broker_figures["p50_ms"] / floor_figures["p50_ms"]
        results_levels.append({
            "concurrency": level.concurrency,
            "rounds": level.rounds,
            "broker": broker_figures,
            "floor": floor_figures,
            "ratio_p50": round(ratio, 3),
            "ratio_p95": round(broker_figures["p95_ms"] / floor_figures["p95_ms"], 3),
            "ratio_p99": round(broker_figures["p99_ms"] / floor_figures["p99_ms"], 3),
            "target_met": ratio <= RATIO_TARGET,
            **phases,
        })
    return {
        "levels": results_levels,
        "cpu_ms_per_session": cpu,
        "ratio_target": RATIO_TARGET,
        "payload_bytes": len(PAYLOAD),
        "towers": TOWERS,
        "broker_transport": BROKER_TRANSPORT,
        "floor_transport": FLOOR_TRANSPORT,
        "stopped_cleanly": stopped_cleanly,
        "wall_seconds": round(time.perf_counter() - began, 1),
        **versions(),
    }


# Output


def print_table(results: dict[str, Any]) -> None:
    header = ("figure", "broker", "floor", "ratio", "target", "")
    rows = []
    for level in results["levels"]:
        count = level["concurrency"]
        sessions = "1 session" if count == 1 else f"{count} sessions at once"
        for name in ("p50", "p95", "p99"):
            ratio = level[f"ratio_{name}"]
            target = verdict_cell = ""
            if name == "p50":
                target = f"<= {RATIO_TARGET}x floor"
                verdict_cell = verdict(level["target_met"])
            rows.append((
                f"start -> first echo, {sessions}, {name} (ms)",
                f"{level['broker'][f'{name}_ms']:,.1f}",
                f"{level['floor'][f'{name}_ms']:,.1f}",
                f"{ratio:.2f}",
                target,
                verdict_cell,
            ))
        for phase, label in (("to_answer", "start -> answer"),
                             ("after_answer", "answer -> first echo")):
            broker_ms, floor_ms = (level[phase][path]["p50_ms"] for path in ("broker", "floor"))
            rows.append((f"  {label}, p50 (ms)", f"{broker_ms:,.1f}", f"{floor_ms:,.1f}",
                         f"{broker_ms / floor_ms:.2f}", "", ""))
    print_rows(header, rows)
    cpu = results["cpu_ms_per_session"]
    print(f"CPU per session: broker and its towers {cpu['broker']:.1f} ms, "
          f"floor {cpu['floor']:.1f} ms ({cpu['broker'] / cpu['floor']:.2f}x)")
    print()
    print(
        f"python {results['python']}, aiortc {results['aiortc']}, aioice {results['aioice']}, "
        f"trio {results['trio']}, trio-websocket {results['trio-websocket']}, "
        f"hypercorn {results['hypercorn']}, h11 {results['h11']}"
    )
    print(f"broker: {results['broker_transport']}")
    print(f"floor:  {results['floor_transport']}")
    rounds = ", ".join(
        f"{level['concurrency']} x {level['rounds']} round{'s' if level['rounds'] > 1 else ''}"
        for level in results["levels"]
    )
    print(
        f"sessions at once x rounds per path: {rounds}; broker and floor rounds alternate, "
        f"after one uncounted session each; {results['payload_bytes']}-byte text echo"
    )
    unclean = [name for name, clean in results["stopped_cleanly"].items() if not clean]
    if unclean:
        print(f"killed after SIGINT: what was left of the {' and '.join(unclean)}")
    print(f"run time {results['wall_seconds']:.1f} s")


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sessions",
        description="Measure session setup through the broker against a bare aiortc server.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    options = parser.parse_args(arguments)
    try:
        results = run_all(QUICK if options.quick else FULL)
    except (bridge.Interrupted, KeyboardInterrupt):
        print("interrupted; the servers are stopped", file=sys.stderr)
        sys.exit(130)
    if options.json:
        json.dump(results, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(results)


if __name__ == "__main__":
    main()
