"""``broker loadtest``: simulated browsers against a running broker, with a report.

The coordinator (this module, no event loop) plans the arrivals (``sessions`` at
``rate`` per second), deals them to worker processes (``broker.loadtest.worker``), reads
their figures every second, samples the CPU and resident memory of the broker and its
towers (from the broker's metrics page, so remote towers count too; the floor's from
its process), and of the workers themselves, shows progress, and optionally kills a
local tower agent at a chosen moment (chaos). At the end it reports, as text or one
JSON document, and can draw the time series with matplotlib.
"""

from __future__ import annotations

import bisect
import http.client
import ipaddress
import json
import math
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psutil

from ..metrics import process_usage
from .traffic import ECHO_TIMEOUT
from .worker import CLOSE_TIMEOUT, SETUP_TIMEOUT, STOP_GRACE

# A worker's first report may wait for its imports; later ones come every second, and a
# worker silent for WORKER_SILENCE is hung.
WORKER_START_TIMEOUT = 30.0
METRICS_TIMEOUT = 2.0
# The one request that checks the target before a run.
TARGET_TIMEOUT = 10.0
# After the planned end, how long workers have to close their sessions and report: a
# setup that began just before the end has its whole time, then its DELETE.
WIND_DOWN = SETUP_TIMEOUT + CLOSE_TIMEOUT + 5.0
# Once asked to stop and past its grace, what a worker has to close its clients and
# peer connections, and report.
WORKER_EXIT = 10.0
WORKER_SILENCE = 15.0
# A reading of the servers older than this is none.
READING_STALE = 3.0
# The largest message a tower takes (PROTOCOL.md, "Data channels").
MAX_MESSAGE_SIZE = 262_144
# More worker processes than this would be the machine's limit, not the server's.
MAX_WORKERS = 64
# Why sessions of a worker that died or hung count as failed or lost.
WITH_ITS_WORKER = "with its worker"
# Past either, with all sessions up, the load generator is the limit: its busiest
# worker's share of its one core, and the 99th percentile of how late (seconds) its
# messages went out against their timetable.
GENERATOR_BUSY = 0.9
GENERATOR_LATE = 0.05
# Chaos: what a run leaves after the kill for its sessions' repairs to be seen (a repair
# takes a few seconds at 1,000 sessions, BENCHMARKS.md "Chaos").
REPAIR_TIME = 10.0


@dataclass(frozen=True)
class LoadPlan:
    url: str
    api_key: str
    certificate: str
    sessions: int = 100
    rate: float = 20.0  # arrivals per second
    duration: float = 30.0  # seconds every session lives on after the last arrival
    message_rate: float = 1.0  # per session, per second
    message_size: int = 100
    workers: int = 2
    application: str = "echo"  # "demo" adds the tower's video
    kill_tower_at: float | None = None  # seconds from the start
    floor: bool = False  # ``url`` is the bare aiortc echo server (benchmarks.echo_floor)
    # CPUs the worker processes may run on (all when empty), to keep them off the server's.
    generator_cpus: tuple[int, ...] = ()

    @property
    def ramp(self) -> float:
        return self.sessions / self.rate

    @property
    def end(self) -> float:
        return self.ramp + self.duration


@dataclass
class Second:
    """The figures of one second of the run: counts over ``seconds`` of wall-clock time,
    more than one when the coordinator was held up (a slow metrics page), so rates are
    counts over ``seconds``."""

    at: float
    seconds: float = 1.0
    up: int = 0
    # Of those up, how many were being repaired.
    repairing: int = 0
    arrivals: int = 0
    connected: int = 0
    # The round trips of the messages sent in this second.
    rtt: list[float] = field(default_factory=list)
    sent: int = 0
    echoed: int = 0
    bytes: int = 0
    video_frames: int = 0
    video_packets: int = 0
    video_packets_lost: int = 0
    video_bytes: int = 0
    video_jitter: list[float] = field(default_factory=list)
    generator_cpu: float = 0.0  # share of one core
    # The busiest worker's share of its one core, and how late messages went out.
    busiest_worker_cpu: float = 0.0
    late: list[float] = field(default_factory=list)
    # None: the servers could not be read that second.
    broker_cpu: float | None = None
    towers_cpu: float | None = None
    broker_rss: int | None = None
    towers_rss: int | None = None


# One reading of the servers: CPU of the broker and of its towers (shares of one core
# since the previous reading; None when not known yet) and their resident bytes.
Reading = tuple[float | None, float | None, int | None, int | None]


class CpuShares:
    """Turns CPU-seconds counters into shares of one core since the previous reading.

    A tower's counter moves once a second, with its report: one second may see two of its
    reports and the next none; the mean over many readings evens that out. (A reading
    that stays the latest over two of the run's seconds, the page being slow, counts in
    both: the mean over many seconds is near, not exact.)
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}

    def share(self, key: str, cpu_seconds: float, now: float) -> float | None:
        """None for a counter's first reading."""
        previous = self._last.get(key)
        self._last[key] = (cpu_seconds, now)
        if previous is None or now <= previous[1]:
            return None
        used = cpu_seconds - previous[0]
        if used < 0:  # a new process under the same name: all it used is since
            used = cpu_seconds
        return used / (now - previous[1])


class BrokerMetrics:
    """The broker's and its towers' CPU and resident memory, from the broker's metrics
    page: its own process, and each tower's agent as it reports itself, wherever the
    towers run."""

    def __init__(self, url: str, certificate: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 443
        self.context = ssl.create_default_context(cafile=certificate or None)
        self.connection: http.client.HTTPSConnection | None = None
        self.shares = CpuShares()

    def sample(self) -> Reading | None:
        """The servers now; None when the page cannot be read."""
        page = self._page()
        if page is None:
            return None
        samples = parse_metrics(page)
        now = time.monotonic()
        towers_cpu: float | None = None  # until a tower's counter has moved once
        towers_rss: float | None = None  # until a tower has reported its memory
        for name, value in samples.items():
            if name.startswith("broker_tower_cpu_seconds_total{"):
                share = self.shares.share(name, value, now)
                if share is not None:
                    towers_cpu = (towers_cpu or 0.0) + share
            elif name.startswith("broker_tower_resident_memory_bytes{"):
                towers_rss = (towers_rss or 0.0) + value
        broker_cpu = samples.get("process_cpu_seconds_total")
        broker_rss = samples.get("process_resident_memory_bytes")
        return (None if broker_cpu is None else self.shares.share("broker", broker_cpu, now),
                towers_cpu, None if broker_rss is None else int(broker_rss),
                None if towers_rss is None else int(towers_rss))

    def tower_sessions(self, tower: str) -> int | None:
        """The sessions ``tower`` last reported, or None if the page does not say."""
        page = self._page()
        count = None if page is None else parse_metrics(page).get(
            f'broker_tower_sessions{{tower="{tower}"}}')
        return None if count is None else int(count)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def _page(self) -> str | None:
        # Once more on a new connection when a kept-alive one was closed meanwhile.
        for _attempt in range(2):
            reused = self.connection is not None
            try:
                if self.connection is None:
                    self.connection = http.client.HTTPSConnection(
                        self.host, self.port, context=self.context, timeout=METRICS_TIMEOUT)
                self.connection.request("GET", "/metrics")
                response = self.connection.getresponse()
                body = response.read()
                return body.decode(errors="replace") if response.status == 200 else None
            except (OSError, http.client.HTTPException):
                if self.connection is not None:
                    self.connection.close()
                self.connection = None
                if not reused:
                    return None
        return None


def parse_metrics(page: str) -> dict[str, float]:
    """The samples of a Prometheus text page, by name with labels; lines that are not
    a sample, or whose value is not a finite number, are skipped."""
    samples = {}
    for line in page.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isfinite(number):
            samples[name] = number
    return samples


def check_target(url: str, certificate: str, api_key: str) -> None:
    """That ``url`` is a broker's HTTPS root this machine reaches, trusting
    ``certificate``, which takes ``api_key``: one ``GET /v1/ice-servers``, before any
    worker starts.

    Raises:
        ValueError: what is wrong, said for the command line.
    """
    try:
        parts = urlsplit(url)
        port = 443 if parts.port is None else parts.port
    except ValueError as error:
        raise ValueError(f"{url!r} is not a URL: {error}") from None
    if parts.scheme != "https" or not parts.hostname or not port or parts.path.strip("/") or (
            parts.query or parts.fragment):
        raise ValueError(f"{url!r} is not a broker's HTTPS URL, such as "
                         "https://127.0.0.1:8443")
    try:
        context = ssl.create_default_context(cafile=certificate)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot use the certificate {certificate}: {error}") from None
    connection = http.client.HTTPSConnection(parts.hostname, port, context=context,
                                             timeout=TARGET_TIMEOUT)
    try:
        connection.request("GET", "/v1/ice-servers",
                           headers={"Authorization": f"Bearer {api_key}"})
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as error:
        raise ValueError(f"cannot reach a broker at {url}: {error}") from None
    finally:
        connection.close()
    if response.status in (401, 403):
        raise ValueError(f"the broker at {url} refused the API key ({response.status})")
    if response.status != 200:
        raise ValueError(f"{url} answered GET /v1/ice-servers with {response.status}: "
                         "not a broker's API")


class Sampler:
    """Reads the servers' figures about once a second, on a thread of its own.

    A slow ``/metrics`` then never holds up the reading of the workers' reports: held
    up, their pipes would fill, and their event loops stall on the writes, a delay that
    would show as the server's round trips."""

    def __init__(self, servers: BrokerMetrics | LocalProcess) -> None:
        self.servers = servers
        self.latest: tuple[float, Reading | None] | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.latest = (time.monotonic(), self.servers.sample())
            self.stopping.wait(1.0)

    def take(self) -> Reading | None:
        """The latest reading, or None when there is no recent one."""
        latest = self.latest
        if latest is None or time.monotonic() - latest[0] > READING_STALE:
            return None
        return latest[1]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(METRICS_TIMEOUT)  # a daemon: one stuck in a read is left


class LocalProcess:
    """The process listening on the URL's port on this machine: the floor, which has no
    metrics page."""

    def __init__(self, url: str) -> None:
        self.process = _listener(url)
        self.shares = CpuShares()

    def sample(self) -> Reading | None:
        """The process now; None when it cannot be read."""
        if self.process is None:
            return None
        try:
            usage = process_usage(self.process)
        except psutil.Error:
            return None
        share = self.shares.share("server", usage.cpu_seconds, time.monotonic())
        return share, None, usage.resident_bytes, None


def local_towers(url: str) -> list[tuple[psutil.Process, list[str]]]:
    """The tower agents the broker on the URL's port runs on this machine, with their
    command lines (for chaos)."""
    broker = _listener(url)
    if broker is None:
        return []
    found = []
    for child in broker.children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if "tower" in command and "run" in command:
            found.append((child, command))
    return found


def _listener(url: str) -> psutil.Process | None:
    """The process listening on the URL's port, when the URL's host is this machine."""
    parts = urlsplit(url)
    port = parts.port or 443
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port)}
    except (OSError, UnicodeError):
        return None
    mine = {address.address.split("%")[0]
            for addresses_of in psutil.net_if_addrs().values() for address in addresses_of}
    if not any(ipaddress.ip_address(address.split("%")[0]).is_loopback or address in mine
               for address in addresses):
        return None
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            if connection.pid is not None:
                return psutil.Process(connection.pid)
    return None


class WorkerLines:
    """The lines a worker prints, read without Python's buffering (which would hide
    lines already read from ``select``)."""

    def __init__(self, worker: subprocess.Popen) -> None:
        assert worker.stdout is not None
        self.fd = worker.stdout.fileno()
        self.buffer = b""
        self.done = False
        # Whether its final report came (a worker that ends without it has died).
        self.finished = False
        self.started_at = time.monotonic()
        self.heard_at: float | None = None

    def read(self) -> list[bytes]:
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            self.done = True
            return []
        self.heard_at = time.monotonic()
        self.buffer += chunk
        *complete, self.buffer = self.buffer.split(b"\n")
        return [line for line in complete if line.strip()]


class Run:
    def __init__(self, plan: LoadPlan, show_progress: bool = True) -> None:
        self.plan = plan
        self.show_progress = show_progress
        self.seconds: list[Second] = []
        self.failed: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.not_closed: Counter[str] = Counter()
        self.setups: list[float] = []
        self.repairs: list[float] = []
        self.totals = Counter()
        self.chaos: dict[str, Any] | None = None
        self.worker_cpu: dict[int, float] = {}
        self.generator_cpu_seen = 0.0
        self.worker_cpu_seen: dict[int, float] = {}
        # Workers that died, hung or failed, and how: their sessions are missing.
        self.worker_failures: dict[int, str] = {}
        # Each worker's share of the sessions.
        self.planned: dict[int, int] = {}
        # When the run was stopped early (Ctrl-C), in seconds from its start: its figures
        # are those until then.
        self.interrupted_at: float | None = None
        # Every second opened, and when each opened (``time.monotonic``).
        self.timeline: list[Second] = []
        self.second_starts: list[float] = []
        # The round trips heard of since the last second closed (the progress line's).
        self.heard_rtt: list[float] = []

    def execute(self) -> dict[str, Any]:
        plan = self.plan
        self.sampler = Sampler(LocalProcess(plan.url) if plan.floor
                               else BrokerMetrics(plan.url, plan.certificate))
        try:
            workers = self._start_workers()
        except BaseException:
            self.sampler.stop()
            raise
        began = self.last_close = time.monotonic()
        self.latest: dict[int, dict[str, Any]] = {}
        lines = {index: WorkerLines(worker) for index, worker in enumerate(workers)}
        next_tick = began + 1.0
        self._next_second(began)

        def interrupt(signum: int, frame: Any) -> None:
            if self.interrupted_at is not None:  # a second time: no more waiting
                for worker in workers:
                    worker.kill()
                raise KeyboardInterrupt
            self.interrupted_at = time.monotonic() - began

        # The workers run in process groups of their own, so Ctrl-C reaches this one
        # alone: they close their sessions once their stdin closes, then report. (Only
        # the main thread may take signals; run elsewhere, Ctrl-C is the caller's.)
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, interrupt) if in_main_thread else None
        try:
            while any(not reader.done for reader in lines.values()):
                now = time.monotonic()
                if now - began > self.plan.end + WIND_DOWN:
                    break
                if self.interrupted_at is not None:
                    # What was measured until now, apart from the wind-down's second.
                    self._close_second(self.current, self.latest, began)
                    self._next_second(began)
                    break
                self._read(lines, max(0.0, next_tick - now))
                self._drop_hung(lines, workers)
                if time.monotonic() >= next_tick:
                    self._close_second(self.current, self.latest, began)
                    self._next_second(began)
                    # After a hold-up, the next second starts now, rather than several
                    # "seconds" of nothing being closed one after another to catch up.
                    while next_tick <= time.monotonic():
                        next_tick += 1.0
                    self._chaos_if_due(time.monotonic() - began)
        finally:
            try:
                self._wind_down(workers, lines)
            finally:
                if in_main_thread:
                    signal.signal(signal.SIGINT, previous)
                self.sampler.stop()
                if self.show_progress:
                    print(file=sys.stderr)
        self._close_second(self.current, self.latest, began)
        return self.report(time.monotonic() - began)

    def _wind_down(self, workers: list[subprocess.Popen], lines: dict[int, WorkerLines]
                   ) -> None:
        # Closing their stdin stops workers still running; each still says its last.
        for worker in workers:
            if worker.stdin is not None and not worker.stdin.closed:
                worker.stdin.close()
        # A worker ends its sessions (STOP_GRACE at most), closes its clients and peer
        # connections, then says its last and exits.
        deadline = time.monotonic() + STOP_GRACE + WORKER_EXIT
        while any(not reader.done for reader in lines.values()):
            if time.monotonic() > deadline:
                break
            self._read(lines, 0.5)
        killed = set()
        for index, worker in enumerate(workers):
            try:
                worker.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
                killed.add(index)
        # What the pipes still hold: a last report written as the deadline passed.
        while any(not reader.done for reader in lines.values()) and self._read(
                lines, 0.1, judge=False):
            pass
        for index, reader in lines.items():
            if not reader.finished:
                self._worker_ended(index, "killed: it did not stop" if index in killed
                                   else "ended without its final report")
            elif index in killed:  # its figures are all in
                print(f"worker {index} was killed after its final report", file=sys.stderr)
            elif workers[index].returncode:  # it crashed: its sessions may not all have run
                self._worker_ended(index, f"exited with status {workers[index].returncode}")

    def _read(self, lines: dict[int, WorkerLines], timeout: float, judge: bool = True) -> bool:
        """Take what the workers wrote within ``timeout``; whether any pipe had something
        (or its end). With ``judge``, a worker whose pipe ended without its final report
        is counted failed (else the caller says why)."""
        open_readers = {reader.fd: (index, reader) for index, reader in lines.items()
                        if not reader.done}
        readable, _, _ = select.select(list(open_readers), [], [], timeout)
        for fd in readable:
            index, reader = open_readers[fd]
            for line in reader.read():
                figures = json.loads(line)
                self._take(index, figures, self.current)
                self.latest[index] = figures
                if figures["final"]:
                    reader.done = reader.finished = True
            if judge and reader.done and not reader.finished:
                self._worker_ended(index, "ended without its final report")
        return bool(readable)

    def _drop_hung(self, lines: dict[int, WorkerLines], workers: list[subprocess.Popen]
                   ) -> None:
        for index, reader in lines.items():
            if reader.done:
                continue
            if reader.heard_at is None:
                since, limit = reader.started_at, WORKER_START_TIMEOUT
            else:
                since, limit = reader.heard_at, WORKER_SILENCE
            if time.monotonic() - since > limit:
                reader.done = True
                workers[index].kill()
                self._worker_ended(index, f"said nothing for {limit:g} s")

    def _worker_ended(self, index: int, why: str) -> None:
        """A worker that died or hung: its sessions that were up count as lost, and
        those it was setting up, or had not started yet, as failed."""
        if index in self.worker_failures:
            return
        self.worker_failures[index] = why
        figures = self.latest.get(index) or {
            "requested": 0, "connected": 0, "up": 0, "failed": {}, "lost": {}}
        planned = self.planned[index]
        settled = figures["connected"] + sum(figures["failed"].values())
        failed, lost = dict(figures["failed"]), dict(figures["lost"])
        if planned > settled:
            failed[WITH_ITS_WORKER] = failed.get(WITH_ITS_WORKER, 0) + planned - settled
        if figures["up"]:
            lost[WITH_ITS_WORKER] = lost.get(WITH_ITS_WORKER, 0) + figures["up"]
        self.latest[index] = {**figures, "requested": planned, "up": 0, "repairing": 0,
                              "failed": failed, "lost": lost}


    def _start_workers(self) -> list[subprocess.Popen]:
        plan = self.plan
        arrivals = [index / plan.rate for index in range(plan.sessions)]
        workers: list[subprocess.Popen] = []
        try:
            for number in range(plan.workers):
                mine = arrivals[number::plan.workers]
                self.planned[number] = len(mine)
                worker = subprocess.Popen(
                    [sys.executable, "-m", "broker.loadtest.worker"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    process_group=0,  # Ctrl-C is the coordinator's to take (``execute``)
                )
                workers.append(worker)
                assert worker.stdin is not None
                if plan.generator_cpus:
                    psutil.Process(worker.pid).cpu_affinity(list(plan.generator_cpus))
                worker.stdin.write(json.dumps({
                    "url": plan.url, "api_key": plan.api_key, "certificate": plan.certificate,
                    "arrivals": mine, "end": plan.end, "message_rate": plan.message_rate,
                    "message_size": plan.message_size, "application": plan.application,
                    "floor": plan.floor,
                }) + "\n")
                worker.stdin.flush()
        except BaseException:
            # Those started already would wait for a plan, or run one, unwatched.
            for worker in workers:
                worker.kill()
                worker.wait()
            raise
        return workers

    def _next_second(self, began: float) -> None:
        """Open the next second, from the close of the last (``time.monotonic``)."""
        self.current = Second(at=round(self.last_close - began))
        self.second_starts.append(self.last_close)
        self.timeline.append(self.current)

    def _sent_in(self, sent: float) -> Second:
        """The second a message sent at ``sent`` (``time.monotonic``) was sent in."""
        return self.timeline[max(0, bisect.bisect_right(self.second_starts, sent) - 1)]

    def _take(self, index: int, figures: dict[str, Any], second: Second) -> None:
        # A round trip counts in the second its message went out: a timeout, known 5 s
        # later, is the slowness of that second, as the steady figures need it.
        for sent, rtt in figures["rtt"]:
            self._sent_in(sent).rtt.append(rtt)
            self.heard_rtt.append(rtt)
        second.sent += figures["sent"]
        second.echoed += figures["echoed"]
        second.bytes += figures["bytes"]
        second.video_frames += figures["video_frames"]
        second.video_packets += figures["video_packets"]
        second.video_packets_lost += figures["video_packets_lost"]
        second.video_bytes += figures["video_bytes"]
        second.video_jitter += figures["video_jitter"]
        second.late += figures["late"]
        self.setups += figures["setup"]
        self.repairs += figures["repairs"]
        for key in ("sent", "unsent", "echoed", "bytes", "timeouts", "video_frames",
                    "video_packets", "video_packets_lost", "video_bytes"):
            self.totals[key] += figures[key]
        self.worker_cpu[index] = figures["cpu"]

    def _close_second(self, second: Second, latest: dict[int, dict], began: float) -> None:
        now = time.monotonic()
        second.seconds = max(now - self.last_close, 1e-3)
        self.last_close = now
        second.up = sum(figures["up"] for figures in latest.values())
        second.repairing = sum(figures.get("repairing", 0) for figures in latest.values())
        connected = sum(figures["connected"] for figures in latest.values())
        requested = sum(figures["requested"] for figures in latest.values())
        second.connected = connected
        second.arrivals = requested - self.totals["requested"]
        self.totals["requested"] = requested
        self.totals["connected"] = connected
        self.totals["sessions_repaired"] = sum(
            figures.get("sessions_repaired", 0) for figures in latest.values())
        self.failed, self.lost, self.not_closed = Counter(), Counter(), Counter()
        for figures in latest.values():
            self.failed.update(figures["failed"])
            self.lost.update(figures["lost"])
            self.not_closed.update(figures.get("not_closed", {}))
        cpu = sum(self.worker_cpu.values())
        second.generator_cpu = (cpu - self.generator_cpu_seen) / second.seconds
        self.generator_cpu_seen = cpu
        second.busiest_worker_cpu = max(
            ((used - self.worker_cpu_seen.get(index, 0.0)) / second.seconds
             for index, used in self.worker_cpu.items()), default=0.0)
        self.worker_cpu_seen = dict(self.worker_cpu)
        (second.broker_cpu, second.towers_cpu,
         second.broker_rss, second.towers_rss) = self.sampler.take() or (None,) * 4
        self.seconds.append(second)
        heard, self.heard_rtt = self.heard_rtt, []
        if self.show_progress:
            rtt = percentile(heard, 99)
            line = (f"{time.monotonic() - began:5.0f} s  up {second.up}/{self.plan.sessions}"
                    f" (repairing {second.repairing})"
                    f"  arrivals {second.arrivals}/s  failed {sum(self.failed.values())}"
                    f"  lost {sum(self.lost.values())}"
                    f"  echoes {second.echoed / second.seconds:.0f}/s"
                    f"  rtt p99 {_ms(rtt)}  cpu: generator {_share(second.generator_cpu)}"
                    f" broker {_share(second.broker_cpu)} towers {_share(second.towers_cpu)}")
            end = "\r" if sys.stderr.isatty() else "\n"
            print(line.ljust(120), end=end, file=sys.stderr, flush=True)

    def _chaos_if_due(self, elapsed: float) -> None:
        if self.plan.kill_tower_at is None or self.chaos is not None:
            return
        if elapsed < self.plan.kill_tower_at:
            return
        towers = local_towers(self.plan.url)
        if not towers:
            self.chaos = {"at": elapsed, "killed": None, "why": "no local tower agent found"}
            return
        victim, command = towers[0]
        name = _option(command, "--name")
        # What the killed tower last reported, read just before: the sessions the kill
        # takes down, for the repairs and losses to be checked against.
        on_it = None
        if name is not None and not self.plan.floor:
            metrics = BrokerMetrics(self.plan.url, self.plan.certificate)
            try:
                on_it = metrics.tower_sessions(name)
            finally:
                metrics.close()
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
        self.chaos = {"at": round(elapsed, 1), "killed": name, "pid": victim.pid,
                      "sessions_on_it": on_it}

    def report(self, seconds: float) -> dict[str, Any]:
        # With every session up: from the second after the ramp, or after the last late
        # setup if later, to the second before the end. (A second's ``up`` is counted as
        # it closes: the second whose close first sees them all still had setups in it.)
        peak_up = max((second.up for second in self.seconds), default=0)
        full_at = next((second.at for second in self.seconds if second.up == peak_up), 0)
        start = max(self.plan.ramp + 1, full_at + 1)
        # To the second before the end, or before the run was stopped.
        last = self.plan.end if self.interrupted_at is None else min(
            self.plan.end, self.interrupted_at)
        # None at all (setups still landing until the end): the "with all up" figures are
        # then empty, and say so (steady_seconds 0), rather than the ramp's averages.
        steady = [second for second in self.seconds if start <= second.at <= last - 1]
        all_rtt = [value for second in self.seconds for value in second.rtt]
        steady_rtt = [value for second in steady for value in second.rtt]
        generator_cpu = sum(self.worker_cpu.values())
        late = _percentiles([value for second in steady for value in second.late], (50, 99))
        busiest = _over_time(steady, "busiest_worker_cpu")
        report: dict[str, Any] = {
            "plan": asdict(self.plan) | {"api_key": "(hidden)"},
            "interrupted": self.interrupted_at is not None,
            "run_seconds": round(seconds, 1),
            "steady_seconds": round(sum(second.seconds for second in steady), 1),
            "sessions": {
                "requested": self.totals["requested"],
                "connected": self.totals["connected"],
                "failed": sum(self.failed.values()),
                "failed_by_reason": dict(self.failed),
                "lost": sum(self.lost.values()),
                "lost_by_state": dict(self.lost),
                # Their DELETE at the end failed.
                "not_closed": sum(self.not_closed.values()),
                "not_closed_by_reason": dict(self.not_closed),
                "peak_up": peak_up,
            },
            "setup_ms": _percentiles(self.setups, (50, 95, 99)),
            "round_trip_ms": _percentiles(all_rtt, (50, 99)),
            "round_trip_steady_ms": _percentiles(steady_rtt, (50, 99)),
            "messages": {
                "sent": self.totals["sent"],
                "echoed": self.totals["echoed"],
                "timeouts": self.totals["timeouts"],
                # Due while their channel was not open (repairing, or closed).
                "unsent": self.totals["unsent"],
                # What the sessions sent: as planned, unless they were repairing (they
                # send on a timetable, not after each echo).
                "sent_per_second_steady": _rate(steady, "sent"),
                "echoed_per_second_steady": _rate(steady, "echoed"),
                "bytes_per_second_steady": _rate(steady, "bytes"),
            },
            "video": self._video(steady),
            # Repairs (count), of how many sessions (sessions: one may be repaired twice).
            "repairs": {"count": len(self.repairs),
                        "sessions": self.totals["sessions_repaired"],
                        **_percentiles(self.repairs, (50, 100))},
            "chaos": self.chaos,
            "workers": {"count": self.plan.workers,
                        "failed": {str(index): why
                                   for index, why in sorted(self.worker_failures.items())},
                        # With all up: the busiest worker's share of its core, how late
                        # messages went out, and whether either says the generator was
                        # the limit (its lag then counts in the round trips).
                        "busiest_cpu_share_steady": busiest,
                        "send_late_ms_steady": late,
                        "behind": bool((busiest or 0) > GENERATOR_BUSY
                                       or (late["p99"] or 0) > GENERATOR_LATE * 1000)},
            # Seconds whose servers could not be read are left out.
            "cpu_share_of_a_core_steady": {
                "generator": _over_time(steady, "generator_cpu"),
                "broker": _over_time(steady, "broker_cpu"),
                "towers": _over_time(steady, "towers_cpu"),
            },
            "generator_cpu_seconds": round(generator_cpu, 1),
            "rss_mib_peak": {
                "broker": _mib_peak([second.broker_rss for second in self.seconds]),
                "towers": _mib_peak([second.towers_rss for second in self.seconds]),
            },
            "series": [asdict(second) | {"rtt": None, "late": None,
                                         "rtt_p50_ms": _round(percentile(second.rtt, 50)),
                                         "rtt_p99_ms": _round(percentile(second.rtt, 99)),
                                         "video_jitter": None,
                                         "video_kbit_per_session": _kbit_per_session(second)}
                       for second in self.seconds],
        }
        return report

    def _video(self, steady: list[Second]) -> dict[str, Any]:
        """The tower's video as the sessions received it: frames, RTP packets and their
        loss, the bitrate each session received, and the jitter the sessions saw."""
        packets, lost = self.totals["video_packets"], self.totals["video_packets_lost"]
        expected = packets + max(lost, 0)
        return {
            "frames": self.totals["video_frames"],
            "frames_per_second_steady": _rate(steady, "video_frames"),
            "packets": packets,
            "packets_lost": lost,
            "loss_percent": round(100 * max(lost, 0) / expected, 3) if expected else None,
            "kbit_per_second_per_session_steady": _mean(
                [_kbit_per_session(second) for second in steady])
            if self.totals["video_bytes"] else None,
            "jitter_ms": _percentiles(
                [value for second in self.seconds for value in second.video_jitter], (50, 99)),
        }


def percentile(values: list[float], which: float) -> float | None:
    """The ``which``-th percentile (nearest rank) of ``values`` in milliseconds, or None."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(which / 100 * len(ordered)))
    return ordered[rank - 1] * 1000


def _percentiles(values: list[float], which: tuple[float, ...]) -> dict[str, Any]:
    names = {100: "max"}
    return {names.get(p, f"p{p:g}"): _round(percentile(values, p)) for p in which}


def _kbit_per_session(second: Second) -> float | None:
    """The bitrate one session received in that second, on average over those up."""
    if not second.up:
        return None
    return round(second.video_bytes * 8 / 1000 / second.seconds / second.up, 1)


def _over_time(seconds: list[Second], share: str) -> float | None:
    """The mean of a share (of a core) over ``seconds``, each weighed by the time it
    covered; seconds without a reading (None) are left out. None: no reading at all.
    To a thousandth of a core: echoes per core-second are divided by it."""
    known = [(getattr(second, share), second.seconds) for second in seconds
             if getattr(second, share) is not None]
    elapsed = sum(covered for _, covered in known)
    return round(sum(value * covered for value, covered in known) / elapsed, 3) if elapsed else None


def _rate(seconds: list[Second], count: str) -> float:
    """A count per second of wall-clock time over ``seconds``."""
    elapsed = sum(second.seconds for second in seconds)
    return round(sum(getattr(second, count) for second in seconds) / elapsed, 2) if elapsed else 0.0


def _mean(values: list[float | None]) -> float:
    known = [value for value in values if value is not None]
    return round(sum(known) / len(known), 2) if known else 0.0


def _mib_peak(values: list[int | None]) -> float | None:
    peak = max((value for value in values if value is not None), default=None)
    return None if peak is None else round(peak / 2**20, 1)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:g} MiB"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _reasons(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{reason}: {count}" for reason, count in counts.items()) + ")"


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command[:-1] else None


def print_report(report: dict[str, Any]) -> None:
    sessions, setup = report["sessions"], report["setup_ms"]
    rtt, steady = report["round_trip_ms"], report["round_trip_steady_ms"]
    messages, repairs = report["messages"], report["repairs"]
    cpu = report["cpu_share_of_a_core_steady"]
    plan = report["plan"]
    print(f"load test: {plan['sessions']} sessions at {plan['rate']:g}/s, then "
          f"{plan['duration']:g} s; {plan['message_rate']:g} message(s)/s of "
          f"{plan['message_size']} bytes each; {plan['workers']} worker processes")
    print(f"sessions     requested {sessions['requested']}, connected {sessions['connected']}, "
          f"failed {sessions['failed']}{_reasons(sessions['failed_by_reason'])}, "
          f"lost {sessions['lost']}{_reasons(sessions['lost_by_state'])}, "
          f"peak up {sessions['peak_up']}")
    if sessions["not_closed"]:
        print(f"             {sessions['not_closed']} could not be deleted at the end"
              f"{_reasons(sessions['not_closed_by_reason'])}")
    print(f"first echo   p50 {_ms(setup['p50'])}  p95 {_ms(setup['p95'])}  "
          f"p99 {_ms(setup['p99'])}")
    print(f"round trip   p50 {_ms(rtt['p50'])}  p99 {_ms(rtt['p99'])}   "
          f"(all up: p50 {_ms(steady['p50'])}  p99 {_ms(steady['p99'])})")
    print(f"messages     {messages['echoed']} echoed of {messages['sent']}, "
          f"{messages['timeouts']} timed out (counted as {ECHO_TIMEOUT:g} s round trips), "
          f"{messages['unsent']} not sent (their channel not open); "
          f"{messages['sent_per_second_steady']:g}/s sent, "
          f"{messages['echoed_per_second_steady']:g}/s and "
          f"{messages['bytes_per_second_steady'] / 1024:.1f} KiB/s echoed with all up")
    if plan["application"] == "demo":
        video = report["video"]
        loss = "-" if video["loss_percent"] is None else f"{video['loss_percent']:g}%"
        rate = video["kbit_per_second_per_session_steady"]
        print(f"video        {video['frames']} frames received, "
              f"{video['frames_per_second_steady']:g}/s with all up; "
              f"{video['packets']} RTP packets, {video['packets_lost']} lost ({loss}); "
              f"{'-' if rate is None else f'{rate:g}'} kbit/s per session; "
              f"jitter p50 {_ms(video['jitter_ms']['p50'])}  "
              f"p99 {_ms(video['jitter_ms']['p99'])}")
    print(f"repairs      {repairs['count']} of {repairs['sessions']} session(s)  "
          f"p50 {_ms(repairs['p50'])}  max {_ms(repairs['max'])}")
    chaos = report["chaos"]
    if chaos is not None and chaos.get("killed"):
        on_it = chaos["sessions_on_it"]
        print(f"chaos        {chaos['killed']} killed at {chaos['at']:g} s, with "
              f"{'an unknown number of' if on_it is None else on_it} sessions on it "
              "(its last report)")
    elif chaos is not None:
        print(f"chaos        nothing killed: {chaos['why']}")
    failed = report["workers"]["failed"]
    if failed:
        print(f"workers      {len(failed)} of {report['workers']['count']} failed (their "
              f"sessions count as failed or lost, 'with its worker'): "
              + "; ".join(f"worker {index} {why}" for index, why in failed.items()))
    print(f"cpu (cores)  generator {_cores(cpu['generator'])}  broker {_cores(cpu['broker'])}"
          f"  towers {_cores(cpu['towers'])}  (mean with all up; -: not read)")
    workers = report["workers"]
    late = workers["send_late_ms_steady"]
    print(f"generator    busiest worker {_cores(workers['busiest_cpu_share_steady'])} of its "
          f"core; messages sent late p50 {_ms(late['p50'])}  p99 {_ms(late['p99'])} "
          "(against their timetable, with all up)")
    if workers["behind"]:
        print("             the load generator was the limit: its own lag counts in the round "
              "trips (more --workers, or a machine of its own)")
    if not report["steady_seconds"]:
        print("             (no second had every session up: the 'all up' figures are empty)")
    memory = report["rss_mib_peak"]
    print(f"memory       broker {_mib(memory['broker'])}, towers {_mib(memory['towers'])} "
          "(peak resident)")
    if report["interrupted"]:
        print("interrupted  the run was stopped early: these are its figures until then")


def plot(report: dict[str, Any], path: str) -> None:
    """Sessions up, round trip p50/p99, CPU and, with media, the video bitrate per
    session, second by second, as one PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["series"]
    at = [second["at"] for second in series]
    media = report["plan"]["application"] == "demo"
    figure, panels = plt.subplots(3 + media, 1, figsize=(10, 9 + 3 * media), sharex=True)
    sessions, latency, cpu = panels[:3]
    sessions.plot(at, [second["up"] for second in series], label="sessions up")
    sessions.plot(at, [second["repairing"] for second in series], label="of which repairing")
    sessions.set_ylabel("sessions")
    latency.plot(at, [second["rtt_p50_ms"] for second in series], label="round trip p50")
    latency.plot(at, [second["rtt_p99_ms"] for second in series], label="round trip p99")
    latency.set_ylabel("ms")
    latency.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    latency.yaxis.set_major_formatter(plain)
    latency.yaxis.set_minor_formatter(plain)
    for key, label in (("generator_cpu", "load generator"), ("broker_cpu", "broker"),
                       ("towers_cpu", "towers")):
        cpu.plot(at, [second[key] for second in series], label=label)
    cpu.set_ylabel("cores")
    if media:
        panels[3].plot(at, [second["video_kbit_per_session"] for second in series],
                       label="video received per session")
        panels[3].set_ylabel("kbit/s")
    panels[-1].set_xlabel("seconds")
    chaos = report.get("chaos")
    for axes in panels:
        axes.legend(loc="upper left")
        axes.grid(alpha=0.3)
        if chaos and chaos.get("killed"):
            axes.axvline(chaos["at"], color="red", linestyle="--")
    plan = report["plan"]
    figure.suptitle(f"{plan['sessions']} sessions at {plan['rate']:g}/s, "
                    f"{plan['message_rate']:g} msg/s of {plan['message_size']} B")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_load(plan: LoadPlan, *, show_progress: bool = True) -> dict[str, Any]:
    return Run(plan, show_progress).execute()
