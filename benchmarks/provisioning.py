"""Benchmark: how long a host takes to become a tower, alone and ten at once.

How it is measured: simulated hosts are real OpenSSH servers on loopback, each with its
own host key, and NGINX from the system (``tests/e2e/hosts.py``). The broker (its own
process, no local towers) has them all in its inventory with ``min_towers`` set to their
number, so it provisions them all at once as soon as it starts. Per host, the job's own
clock gives the time from its start (SSH connect) to the tower's hand-over (checked in
through NGINX over mutual TLS, and linked), and each step's share; the wall time is
from the broker's start to the last tower ready. Everything runs on this machine: the
broker, every host's sshd, NGINX and tower agent.

Run from the project root (needs /usr/sbin/sshd and /usr/sbin/nginx)::

    .venv/bin/python -m benchmarks.provisioning            # table
    .venv/bin/python -m benchmarks.provisioning --json     # one JSON object
    .venv/bin/python -m benchmarks.provisioning --quick    # 1 and 3 hosts
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from broker.state import provisioning_identity
from tests.e2e.conftest import run_shell, start_broker, stop_broker
from tests.e2e.hosts import NGINX, SSHD, SimulatedHost, root_tower_traces_removed

from ._report import print_rows

TOWER_COMMAND = str(Path(sys.executable).parent / "broker")
DEADLINE = 180.0
STEPS = ("connect", "prepare", "certificate", "nginx", "agent", "check-in", "hand-over")


def provision(count: int) -> dict:
    """Provision ``count`` hosts at once; returns their figures."""
    with (tempfile.TemporaryDirectory(prefix="provisioning-") as directory,
          root_tower_traces_removed()):
        base = Path(directory)
        key = Path(f"{provisioning_identity(base / 'state')}.pub").read_text().strip()
        hosts = [SimulatedHost(base / "hosts" / f"h{n}", key, f"h{n}") for n in range(count)]
        try:
            for host in hosts:
                host.start()
            inventory = [{
                "name": host.name, "address": host.address, "ssh_port": host.port,
                "user": host.user, "host_key": host.host_key, "tower_port": host.tower_port,
                "root": str(host.root), "tower_command": TOWER_COMMAND,
            } for host in hosts]  # fmt: skip
            began = time.monotonic()
            broker = start_broker(base, towers=0, min_towers=count, scale_interval=0.2,
                                  hosts=inventory)
            try:
                figures = wait_until_ready(broker, count)
                wall = time.monotonic() - began
            finally:
                stop_broker(broker)
        finally:
            for host in hosts:
                host.cleanup()
    seconds = [host["provisioned_in"] for host in figures]
    return {
        "hosts": count,
        "wall_seconds": round(wall, 2),
        "p50_seconds": round(statistics.median(seconds), 2),
        "max_seconds": round(max(seconds), 2),
        "step_p50_seconds": {
            step: round(statistics.median(host["step_seconds"].get(step, 0.0)
                                          for host in figures), 3)
            for step in STEPS
        },
    }


def wait_until_ready(broker, count: int) -> list[dict]:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        [jobs] = run_shell(broker, "jobs --json")
        hosts = json.loads(jobs.stdout)["hosts"]
        failed = [host for host in hosts if host["state"] == "failed"]
        if failed:
            raise RuntimeError(f"provisioning failed: {failed}")
        if sum(host["state"] == "ready" for host in hosts) == count:
            return hosts
        time.sleep(0.2)
    raise TimeoutError(f"{count} hosts not ready within {DEADLINE:g} s")


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args(arguments)
    for program in (SSHD, NGINX):
        if not program.exists():
            sys.exit(f"needs {program} (Debian: openssh-server, nginx)")
    results = {"runs": [provision(count) for count in ((1, 3) if options.quick else (1, 10))]}
    if options.json:
        print(json.dumps(results))
        return
    print("host to linked tower (SSH connect to check-in and hand-over), all on this machine")
    print_rows(
        ["hosts at once", "p50", "max", "all ready (wall)"],
        [[str(run["hosts"]), f"{run['p50_seconds']:.2f} s", f"{run['max_seconds']:.2f} s",
          f"{run['wall_seconds']:.2f} s"] for run in results["runs"]],
    )
    print()
    print_rows(
        ["step (p50)", *(f"{run['hosts']} at once" for run in results["runs"])],
        [[step, *(f"{run['step_p50_seconds'][step]:.3f} s" for run in results["runs"])]
         for step in STEPS],
    )


if __name__ == "__main__":
    main()
