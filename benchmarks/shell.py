"""Benchmark: do 30 operators in the SSH shell slow session signaling down?

How it is measured: the embedded broker (two tower agents) in its own process; session
setup (``start_session`` to the first echo, the figure of ``benchmarks.sessions``) is
timed in rounds of 1 and of 10 sessions at once, first with no shell session open, then
with 30 SSH sessions (the shell holds 32) each running ``top --interval 1`` (a separate process:
``benchmarks.shell_load``), then with none again, so that drift shows. The ratio is the
p50 with the operators over the p50 without (both quiet phases together).

Run from the project root::

    .venv/bin/python -m benchmarks.shell            # table
    .venv/bin/python -m benchmarks.shell --json     # one JSON object
    .venv/bin/python -m benchmarks.shell --quick    # fewer rounds and operators
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from actors import bridge

from .sessions import (
    ROOT,
    TOWERS,
    BrokerPath,
    log_tail,
    one_round,
    start_server,
    stop_server,
)

OPERATORS = 30


async def phase(broker: BrokerPath, rounds: int) -> dict[int, list[float]]:
    samples: dict[int, list[float]] = {1: [], 10: []}
    for _ in range(rounds):
        for concurrency in samples:
            setups = await one_round(broker, concurrency)
            samples[concurrency] += [setup.echoed for setup in setups]
    return samples


async def warm_up(broker: BrokerPath) -> None:
    await broker.wait_for_towers(TOWERS)
    await one_round(broker, 1)


def p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def run(operators: int, rounds: int) -> dict:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shell-benchmark-") as directory:
        work = Path(directory)
        server = start_server("broker", [
            sys.executable, "-m", "broker", "serve", "--state-dir", str(work / "state"),
            "--https-port", "0", "--http-port", "0", "--shell-port", "0",
            "--towers", str(TOWERS), "--ready-json",
        ], work / "broker.log")
        try:
            announced = server.announced
            broker = BrokerPath(announced["url"].rstrip("/"), announced["api_key"],
                                announced["certificate"])
            bridge.run(warm_up, broker, handle_signals=False)
            quiet = bridge.run(phase, broker, rounds, handle_signals=False)
            key = work / "state" / "shell" / "operator-key"
            load = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.shell_load", str(announced["shell_port"]),
                 str(key), str(operators)],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            try:
                if load.stdout.readline().strip() != "ready":
                    raise RuntimeError("the shell load did not start")
                busy = bridge.run(phase, broker, rounds, handle_signals=False)
            finally:
                load.stdin.close()
                load.wait(30)
            quiet_again = bridge.run(phase, broker, rounds, handle_signals=False)
        except Exception:
            print(f"--- broker log (end) ---\n{log_tail(server.log)}", file=sys.stderr)
            raise
        finally:
            stop_server(server)
    figures = {}
    for concurrency in (1, 10):
        without = quiet[concurrency] + quiet_again[concurrency]
        with_operators = busy[concurrency]
        figures[concurrency] = {
            "without_operators_p50_ms": p50_ms(without),
            "with_operators_p50_ms": p50_ms(with_operators),
            "ratio": round(p50_ms(with_operators) / p50_ms(without), 3),
            "before_p50_ms": p50_ms(quiet[concurrency]),
            "after_p50_ms": p50_ms(quiet_again[concurrency]),
            "samples": len(with_operators),
        }
    return {"operators": operators, "rounds": rounds, "figures": figures,
            "run_seconds": round(time.perf_counter() - began, 1)}


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args(arguments)
    results = run(operators=10 if options.quick else OPERATORS,
                  rounds=2 if options.quick else 8)
    if options.json:
        print(json.dumps(results))
        return
    print(f"session setup with {results['operators']} operators running top, "
          f"against none (before and after)")
    print(f"{'sessions at once':>17}  {'without p50':>12}  {'with p50':>9}  {'ratio':>6}  "
          f"{'before':>7}  {'after':>7}")
    for concurrency, figure in results["figures"].items():
        print(f"{concurrency:>17}  {figure['without_operators_p50_ms']:>10.1f}ms  "
              f"{figure['with_operators_p50_ms']:>7.1f}ms  {figure['ratio']:>6.2f}  "
              f"{figure['before_p50_ms']:>5.1f}ms  {figure['after_p50_ms']:>5.1f}ms")
    print(f"run time {results['run_seconds']} s")


if __name__ == "__main__":
    main()
