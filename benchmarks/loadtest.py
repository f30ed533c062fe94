"""Benchmark: sessions one tower holds, against a bare aiortc echo server, side by side.

How it is measured: the same load generator (``broker loadtest``: worker processes of
aiortc clients) runs the same plan against two servers started here, one after the
other in the same run (which goes first alternates from one level to the next, so
that a machine getting busier does not always fall on the same one): the bare aiortc
echo server (``benchmarks.echo_floor``, one process, plain HTTP) and the embedded
broker with one tower agent (HTTPS, WSS signaling, the link, and a heartbeat ping to
any client quiet for 2 s). Each level
ramps to N sessions at ``--rate`` per second, holds them for ``--duration`` seconds at
one 100-byte message per second each, then ends them. Figures with all sessions up:
round trip p50/p99; echoed messages per second per core of the serving process (the
tower agent, or the floor); resident memory per session of that process (its peak
over its idle size, divided by N). Everything, load generator included, shares this
machine's cores; the generator's own CPU is reported.

``--chaos`` instead runs the broker with two towers and kills one (``kill -9``) in the
middle of the hold: how many sessions were repaired, how long each took, how many lost.

Run from the project root::

    .venv/bin/python -m benchmarks.loadtest                    # 1,000 and 2,000 sessions
    .venv/bin/python -m benchmarks.loadtest --sessions 500 3000
    .venv/bin/python -m benchmarks.loadtest --pin              # the server alone on a core
    .venv/bin/python -m benchmarks.loadtest --chaos            # repairs after a tower dies
    .venv/bin/python -m benchmarks.loadtest --quick --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from broker.cli import raise_open_file_limit
from broker.loadtest.run import LoadPlan, run_load

from ._report import print_rows
from .sessions import Server, start_server, stop_server

WORKERS = 3


def start_floor(directory: Path) -> Server:
    return start_server("floor", [sys.executable, "-m", "benchmarks.echo_floor", "--port", "0"],
                        directory / "floor.log")


def start_broker(directory: Path, towers: int) -> Server:
    config = directory / "broker.toml"
    config.write_text("max_sessions_per_key = 100000\ntower_capacity = 100000\n")
    return start_server("broker", [
        sys.executable, "-m", "broker", "serve", "--config", str(config),
        "--state-dir", str(directory / "state"), "--https-port", "0", "--http-port", "0",
        "--shell-port", "0", "--towers", str(towers), "--ready-json",
    ], directory / "broker.log")


def serving_process(server: Server, floor: bool) -> psutil.Process:
    """The process that holds the peer connections: the floor, or the tower agent."""
    process = psutil.Process(server.process.pid)
    if floor:
        return process
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        towers = [child for child in process.children(recursive=True)
                  if "run" in child.cmdline() and "tower" in child.cmdline()]
        if towers:
            return towers[0]
        time.sleep(0.1)
    raise RuntimeError("no tower agent")


def level(
    server: Server, floor: bool, sessions: int, rate: float, duration: float, pin: bool
) -> dict:
    announced = server.announced
    url = announced["url"].rstrip("/")
    serving = serving_process(server, floor)
    # As FACTS.md measured the floor: the serving process alone on the first CPU,
    # everything else (broker, load generator) on the others.
    others = [cpu for cpu in range(psutil.cpu_count() or 1) if cpu != 0]
    if pin:
        serving.cpu_affinity([0])
        if not floor:
            psutil.Process(server.process.pid).cpu_affinity(others)
    time.sleep(2 if floor else 4)  # the tower links and reports load
    idle_rss = serving.memory_info().rss
    plan = LoadPlan(
        url=url, api_key=announced.get("api_key", ""),
        certificate=announced.get("certificate", ""), sessions=sessions, rate=rate,
        duration=duration, workers=WORKERS, floor=floor,
        generator_cpus=tuple(others) if pin else (),
    )
    report = complete(run_load(plan, show_progress=False))
    # None: the server's memory was never read (a broker whose page has no tower's).
    peak_mib = report["rss_mib_peak"]["broker" if floor else "towers"]
    peak_rss = None if peak_mib is None else max(peak_mib * 2**20, idle_rss)
    cpu = report["cpu_share_of_a_core_steady"]["broker" if floor else "towers"]
    echoed = report["messages"]["echoed_per_second_steady"]
    return {
        "sessions": sessions,
        "connected": report["sessions"]["connected"],
        "failed": report["sessions"]["failed"],
        "failed_by_reason": report["sessions"]["failed_by_reason"],
        "setup_p50_ms": report["setup_ms"]["p50"],
        "rtt_p50_ms": report["round_trip_steady_ms"]["p50"],
        "rtt_p99_ms": report["round_trip_steady_ms"]["p99"],
        "echoed_per_second": echoed,
        "server_cores": cpu,
        "echoed_per_core_second": round(echoed / cpu) if cpu else None,
        # Over the sessions that were up together, not those asked for.
        "kib_per_session": (round((peak_rss - idle_rss) / 1024 / report["sessions"]["peak_up"], 1)
                            if report["sessions"]["peak_up"] and peak_rss is not None
                            else None),
        "generator_cores": report["cpu_share_of_a_core_steady"]["generator"],
        "broker_cores": None if floor else report["cpu_share_of_a_core_steady"]["broker"],
    }


def complete(report: dict[str, Any]) -> dict[str, Any]:
    """The report of a run that had all its sessions: figures missing a worker's are not a
    result (raises RuntimeError)."""
    if report["interrupted"]:
        raise KeyboardInterrupt
    failed = report["workers"]["failed"]
    if failed:
        raise RuntimeError("load generator workers failed, their sessions missing: "
                           + "; ".join(f"worker {index} {why}" for index, why in failed.items()))
    return report


def side_by_side(
    sessions: list[int], rate: float, duration: float, pin: bool
) -> dict[str, Any]:
    results: dict[str, Any] = {"levels": [], "pinned": pin}
    with tempfile.TemporaryDirectory(prefix="loadtest-") as directory:
        base = Path(directory)
        for index, count in enumerate(sessions):
            row = {}
            servers = (("floor", True), ("broker", False))
            for name, floor in servers if index % 2 == 0 else servers[::-1]:
                run_directory = base / f"{name}-{count}"
                run_directory.mkdir()
                server = start_floor(run_directory) if floor else start_broker(run_directory, 1)
                try:
                    row[name] = level(server, floor, count, rate, duration, pin)
                finally:
                    stop_server(server)
            results["levels"].append(row)
    return results


def chaos(sessions: int, rate: float, duration: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="loadtest-") as directory:
        server = start_broker(Path(directory), towers=2)
        try:
            time.sleep(4)
            announced = server.announced
            plan = LoadPlan(
                url=announced["url"].rstrip("/"), api_key=announced["api_key"],
                certificate=announced["certificate"], sessions=sessions, rate=rate,
                duration=duration, workers=WORKERS,
                kill_tower_at=sessions / rate + duration / 2,
            )
            report = complete(run_load(plan, show_progress=False))
        finally:
            stop_server(server)
    return {"sessions": report["sessions"], "repairs": report["repairs"],
            "chaos": report["chaos"], "round_trip_ms": report["round_trip_ms"]}


def print_levels(results: dict[str, Any]) -> None:
    print("one tower agent against the bare aiortc echo server; 1 message/s of 100 B per "
          "session; figures with all sessions up")
    rows = []
    for row in results["levels"]:
        for name in ("floor", "broker"):
            figures = row[name]
            rows.append([
                f"{figures['sessions']} {name}",
                f"{figures['connected']}/{figures['sessions']}",
                f"{figures['rtt_p50_ms']} ms", f"{figures['rtt_p99_ms']} ms",
                f"{figures['setup_p50_ms']} ms",
                str(figures["echoed_per_core_second"]),
                f"{figures['kib_per_session']}",
                _cores(figures["server_cores"]), _cores(figures["generator_cores"]),
            ])
    print_rows(["sessions", "up", "rtt p50", "rtt p99", "setup p50", "echoes/core-s",
                "KiB/session", "server cores", "generator cores"], rows)
    for row in results["levels"]:
        for name in ("floor", "broker"):
            figures = row[name]
            if figures["failed_by_reason"]:
                reasons = ", ".join(f"{reason}: {count}"
                                    for reason, count in figures["failed_by_reason"].items())
                print(f"{figures['sessions']} {name} failed: {reasons}")


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+",
                        help="one run per number (default: 1000 2000; with --chaos: 200)")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float,
                        help="seconds held once all are up (default: 30; with --chaos: 20)")
    parser.add_argument("--chaos", action="store_true",
                        help="kill a tower under load: the first --sessions number only")
    parser.add_argument("--pin", action="store_true",
                        help="the tower (or floor) alone on CPU 0, the rest on the others")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="50 sessions, 5 s")
    options = parser.parse_args(arguments)
    raise_open_file_limit()  # for the floor server and the generator, as the broker has
    if options.quick:
        options.sessions, options.rate, options.duration = [50], 25.0, 5.0
    if options.sessions is None:
        options.sessions = [200] if options.chaos else [1000, 2000]
    if options.duration is None:
        options.duration = 20.0 if options.chaos else 30.0
    if options.chaos:
        results = chaos(options.sessions[0], options.rate, options.duration)
    else:
        results = side_by_side(options.sessions, options.rate, options.duration, options.pin)
    if options.json:
        print(json.dumps(results))
    elif options.chaos:
        print(json.dumps(results, indent=1))
    else:
        print_levels(results)


if __name__ == "__main__":
    main()
