"""Benchmark of the ``actors`` runtime against bare trio, in one run.

What it measures:

1. tell throughput (messages/s): one producer task does ``await ref.tell(i)`` N times
   to an actor whose ``receive`` counts; the clock stops when the actor has handled all
   N. Baseline: a bare ``trio.open_memory_channel`` producer and consumer, with the same
   buffer size as the actor's mailbox capacity.
2. ask round trips/s: one task does sequential ``await ref.ask(i)`` to an echo actor.
   Baseline: bare trio request/reply over two memory channels (requests to a responder
   task, replies back).
3. spawn rate (actors/s): ``await system.spawn(ChildSpec(...))`` for many idle actors
   under one supervisor, and the rate at which the system then stops them all.
4. resident memory per idle actor: growth of the process's resident set size while
   100,000 idle actors (2,000 with ``--quick``) are spawned under one supervisor
   (after ``gc.collect()``), divided by their number, and how many of them were alive.
5. crash to restart: an actor records the time just before it raises, its next
   incarnation records the time its ``started`` hook runs (no backoff); median and
   99th percentile in microseconds.
6. reading a large system (20,000 actors, each having handled 0-2 messages; 1,000 with
   ``--quick``): milliseconds for the operators' shell's ``ps`` (run by the shell over
   the live system: every actor's ``system.activity()``, the 20 first rows' snapshots,
   the table), against ``system.snapshot()`` of the whole tree alone, where ``ps``,
   ``top`` and ``stats`` used to start on every refresh; best of rounds.

Throughput figures are the best of several rounds, actor and bare measured alternately
so that noise hits both. Wall time is ``time.perf_counter``.

Run from the project root::

    .venv/bin/python -m benchmarks.actors            # full run, prints a table
    .venv/bin/python -m benchmarks.actors --json     # one JSON object, nothing else
    .venv/bin/python -m benchmarks.actors --quick    # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import trio

from actors import Actor, ActorRef, ChildSpec, SupervisorFlags, open_system

from ._report import print_rows, verdict

try:
    import psutil
except ImportError:  # psutil is a test dependency; /proc works on Linux without it
    psutil = None

MAILBOX_CAPACITY = Actor.mailbox_capacity
# A supervisor that never gives up: the restart benchmark crashes its child thousands
# of times within the default period.
NEVER_GIVE_UP = SupervisorFlags(intensity=1_000_000)

TELL_RATIO_TARGET = 0.5
ASK_RATIO_TARGET = 0.5
IDLE_ACTORS_TARGET = 100_000
RESTART_MEDIAN_TARGET_US = 1000.0


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    messages: int
    asks: int
    spawns: int
    idle_actors: int
    crashes: int
    read_actors: int
    rounds: int


FULL = Sizes(
    messages=200_000, asks=50_000, spawns=20_000, idle_actors=100_000, crashes=2_000,
    read_actors=20_000, rounds=5,
)
QUICK = Sizes(messages=10_000, asks=2_000, spawns=1_000, idle_actors=2_000, crashes=100,
              read_actors=1_000, rounds=2)
# The rows of the shell's ``ps`` and ``top`` by default.
SHOWN = 20


# Actors and bare trio counterparts


class Tally:
    """Counts handled messages and sets ``done`` when ``target`` were handled."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = trio.Event()

    def reset(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.done = trio.Event()

    def add_one(self) -> None:
        self.count += 1
        if self.count == self.target:
            self.done.set()


class Counter(Actor):
    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def receive(self, message: Any) -> None:
        self.tally.add_one()


class Echo(Actor):
    async def receive(self, message: Any) -> Any:
        return message


class Idle(Actor):
    async def receive(self, message: Any) -> None:
        return None


class CrashOnPurpose(Exception):
    pass


class RestartRecord:
    """Times of the last crash and of the last start of the crashing actor."""

    def __init__(self) -> None:
        self.crashed_at = 0.0
        self.started_at = 0.0
        self.started = trio.Event()


class Crasher(Actor):
    def __init__(self, record: RestartRecord) -> None:
        self.record = record

    async def started(self) -> None:
        self.record.started_at = time.perf_counter()
        self.record.started.set()

    async def receive(self, message: Any) -> None:
        self.record.crashed_at = time.perf_counter()
        raise CrashOnPurpose(message)


async def bare_consumer(
    receive_channel: trio.MemoryReceiveChannel[int],
    tally: Tally,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    async for _message in receive_channel:
        tally.add_one()


async def bare_responder(
    requests: trio.MemoryReceiveChannel[int],
    replies: trio.MemorySendChannel[int],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    async for request in requests:
        await replies.send(request)


# Measurements


async def actor_tell_rate(ref: ActorRef, tally: Tally, count: int) -> float:
    tally.reset(count)
    gc.collect()
    started = time.perf_counter()
    for number in range(count):
        await ref.tell(number)
    await tally.done.wait()
    return count / (time.perf_counter() - started)


async def bare_tell_rate(count: int) -> float:
    tally = Tally()
    tally.reset(count)
    send_channel, receive_channel = trio.open_memory_channel[int](MAILBOX_CAPACITY)
    async with trio.open_nursery() as nursery:
        await nursery.start(bare_consumer, receive_channel, tally)
        gc.collect()
        started = time.perf_counter()
        for number in range(count):
            await send_channel.send(number)
        await tally.done.wait()
        elapsed = time.perf_counter() - started
        await send_channel.aclose()
    return count / elapsed


async def actor_ask_rate(ref: ActorRef, count: int) -> float:
    gc.collect()
    started = time.perf_counter()
    for number in range(count):
        await ref.ask(number)
    return count / (time.perf_counter() - started)


async def bare_ask_rate(count: int) -> float:
    request_send, request_receive = trio.open_memory_channel[int](MAILBOX_CAPACITY)
    reply_send, reply_receive = trio.open_memory_channel[int](MAILBOX_CAPACITY)
    async with trio.open_nursery() as nursery:
        await nursery.start(bare_responder, request_receive, reply_send)
        gc.collect()
        started = time.perf_counter()
        for number in range(count):
            await request_send.send(number)
            await reply_receive.receive()
        elapsed = time.perf_counter() - started
        await request_send.aclose()
    return count / elapsed


async def throughput(sizes: Sizes) -> dict[str, float]:
    """Best tell and ask rates of the actor and of bare trio, measured alternately."""
    tally = Tally()
    best = {"tell": 0.0, "bare_tell": 0.0, "ask": 0.0, "bare_ask": 0.0}
    async with open_system("throughput", flags=NEVER_GIVE_UP) as system:
        counter = await system.spawn(ChildSpec("counter", lambda: Counter(tally)))
        echo = await system.spawn(ChildSpec("echo", Echo))
        for _round in range(sizes.rounds):
            measured = {
                "tell": await actor_tell_rate(counter, tally, sizes.messages),
                "bare_tell": await bare_tell_rate(sizes.messages),
                "ask": await actor_ask_rate(echo, sizes.asks),
                "bare_ask": await bare_ask_rate(sizes.asks),
            }
            for name, rate in measured.items():
                best[name] = max(best[name], rate)
    return best


async def spawn_and_stop_rates(count: int, rounds: int) -> tuple[float, float]:
    """Best rates of spawning ``count`` idle actors, and of stopping them with the system."""
    best_spawn = best_stop = 0.0
    for _round in range(rounds):
        gc.collect()
        async with open_system("spawn", flags=NEVER_GIVE_UP) as system:
            started = time.perf_counter()
            for number in range(count):
                await system.spawn(ChildSpec(f"a{number}", Idle))
            best_spawn = max(best_spawn, count / (time.perf_counter() - started))
            stopping_started = time.perf_counter()
        best_stop = max(best_stop, count / (time.perf_counter() - stopping_started))
    return best_spawn, best_stop


def resident_bytes() -> int:
    """The resident set size of this process."""
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


async def idle_actor_memory(count: int) -> tuple[float, int]:
    """Resident bytes per idle actor, and how many idle actors were alive at the end."""
    async with open_system("idle", flags=NEVER_GIVE_UP) as system:
        gc.collect()
        before = resident_bytes()
        for number in range(count):
            await system.spawn(ChildSpec(f"idle{number}", Idle))
        gc.collect()
        after = resident_bytes()
        # The registry also holds the root supervisor.
        alive = system.statistics().actors - 1
    return (after - before) / count, alive


async def restart_latencies(count: int) -> list[float]:
    """Seconds from each crash to the ``started`` hook of the next incarnation."""
    record = RestartRecord()
    latencies = []
    async with open_system("restart", flags=NEVER_GIVE_UP) as system:
        crasher = await system.spawn(ChildSpec("crasher", lambda: Crasher(record)))
        gc.collect()
        for number in range(count):
            record.started = trio.Event()
            await crasher.tell(number)
            await record.started.wait()
            latencies.append(record.started_at - record.crashed_at)
    return latencies


async def reading_times(count: int, rounds: int) -> tuple[float, float]:
    """Best seconds for a whole-tree snapshot, and for the shell's ``ps``, over ``count``
    actors that have handled messages."""
    # The broker's shell, imported here: the rest of this benchmark is the runtime alone.
    from broker.provisioning import HostBoard
    from broker.shell.commands import Role, Shell
    from broker.shell.server import LiveView
    from broker.towers import TowerDirectory

    async with open_system("read", flags=NEVER_GIVE_UP) as system:
        shell = Shell(LiveView(system, TowerDirectory(stale_after=3.0), HostBoard(())),
                      Role.READ_ONLY)
        refs = [await system.spawn(ChildSpec(f"a{number}", Idle)) for number in range(count)]
        for number, ref in enumerate(refs):
            for _ in range(number % 3):
                ref.tell_nowait(number)
        await trio.sleep(0.1)
        gc.collect()
        whole = busiest = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            tree = system.snapshot()
            assert sum(1 for _ in tree.walk()) == count + 1
            whole = min(whole, time.perf_counter() - started)
            started = time.perf_counter()
            output = await shell.run(f"ps --limit {SHOWN}")
            busiest = min(busiest, time.perf_counter() - started)
            assert output.text.endswith(f"{SHOWN} of {count + 1} actors shown; "
                                        "--limit shows more\n"), output.text[-200:]
    return whole, busiest


async def run_all(sizes: Sizes) -> dict[str, Any]:
    # Memory first, while the process heap has not yet been grown and freed by others.
    idle_bytes, idle_alive = await idle_actor_memory(sizes.idle_actors)
    spawn_rate, stop_rate = await spawn_and_stop_rates(sizes.spawns, rounds=3)
    latencies = await restart_latencies(sizes.crashes)
    rates = await throughput(sizes)
    whole, busiest = await reading_times(sizes.read_actors, sizes.rounds)
    return {
        "tell_per_second": round(rates["tell"]),
        "bare_tell_per_second": round(rates["bare_tell"]),
        "tell_ratio": round(rates["tell"] / rates["bare_tell"], 3),
        "ask_per_second": round(rates["ask"]),
        "bare_ask_per_second": round(rates["bare_ask"]),
        "ask_ratio": round(rates["ask"] / rates["bare_ask"], 3),
        "spawn_per_second": round(spawn_rate),
        "stop_per_second": round(stop_rate),
        "idle_actor_bytes": round(idle_bytes),
        "idle_actors_alive": idle_alive,
        "restart_median_us": round(statistics.median(latencies) * 1e6, 1),
        "restart_p99_us": round(statistics.quantiles(latencies, n=100)[98] * 1e6, 1),
        "snapshot_whole_tree_ms": round(whole * 1000, 2),
        "shell_ps_ms": round(busiest * 1000, 2),
        "reading_ratio": round(busiest / whole, 3),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "mailbox_capacity": MAILBOX_CAPACITY,
        "sizes": {
            "messages": sizes.messages,
            "asks": sizes.asks,
            "spawns": sizes.spawns,
            "idle_actors": sizes.idle_actors,
            "crashes": sizes.crashes,
            "read_actors": sizes.read_actors,
            "rounds": sizes.rounds,
        },
    }


# Output


def print_table(results: dict[str, Any], quick: bool) -> None:
    def number(value: float) -> str:
        return f"{value:,.0f}"

    def microseconds(value: float) -> str:
        return f"{value:,.1f}"

    alive = results["idle_actors_alive"]
    alive_verdict = "not checked (--quick)" if quick else verdict(alive >= IDLE_ACTORS_TARGET)
    tell_ratio = results["tell_ratio"]
    ask_ratio = results["ask_ratio"]
    restart_median = results["restart_median_us"]
    header = ("figure", "actor", "bare trio", "ratio", "target", "")
    rows = [
        (
            "tell (messages/s)",
            number(results["tell_per_second"]),
            number(results["bare_tell_per_second"]),
            f"{tell_ratio:.2f}",
            f">= {TELL_RATIO_TARGET}x bare",
            verdict(tell_ratio >= TELL_RATIO_TARGET),
        ),
        (
            "ask (round trips/s)",
            number(results["ask_per_second"]),
            number(results["bare_ask_per_second"]),
            f"{ask_ratio:.2f}",
            f">= {ASK_RATIO_TARGET}x bare",
            verdict(ask_ratio >= ASK_RATIO_TARGET),
        ),
        ("spawn (actors/s)", number(results["spawn_per_second"]), "", "", "", ""),
        ("stop with the system (actors/s)", number(results["stop_per_second"]), "", "", "", ""),
        ("memory per idle actor (bytes)", number(results["idle_actor_bytes"]), "", "", "", ""),
        (
            "idle actors alive",
            number(alive),
            "",
            "",
            f"{IDLE_ACTORS_TARGET:,} alive",
            alive_verdict,
        ),
        (
            "crash to restarted, median (us)",
            microseconds(restart_median),
            "",
            "",
            f"< {RESTART_MEDIAN_TARGET_US:,.0f} us",
            verdict(restart_median < RESTART_MEDIAN_TARGET_US),
        ),
        ("crash to restarted, p99 (us)", microseconds(results["restart_p99_us"]), "", "", "", ""),
    ]
    print_rows(header, rows)
    sizes = results["sizes"]
    print()
    print(f"python {results['python']}, trio {results['trio']}")
    print(
        f"mailbox capacity {results['mailbox_capacity']}; per round {sizes['messages']:,} tells "
        f"and {sizes['asks']:,} asks, best of {sizes['rounds']} rounds; "
        f"{sizes['spawns']:,} spawns; {sizes['idle_actors']:,} idle actors; "
        f"{sizes['crashes']:,} crashes"
    )
    print()
    print_rows(
        (f"reading {sizes['read_actors']:,} actors", "ms", "ratio"),
        [
            ("a snapshot of the whole tree", f"{results['snapshot_whole_tree_ms']:,.2f}", ""),
            (
                f"the shell's ps: each one's activity, {SHOWN} rows' snapshots",
                f"{results['shell_ps_ms']:,.2f}",
                f"{results['reading_ratio']:.2f}",
            ),
        ],
    )


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.actors",
        description="Measure the actors runtime against bare trio.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    options = parser.parse_args(arguments)
    sizes = QUICK if options.quick else FULL
    results = trio.run(run_all, sizes)
    if options.json:
        json.dump(results, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(results, options.quick)


if __name__ == "__main__":
    main()
