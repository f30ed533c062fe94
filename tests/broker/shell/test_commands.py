"""The operators' shell commands, driven against a real actor system on trio's virtual clock.

The view is a real actor tree (``/broker`` with towers and sessions supervisors and a few
workers), so every snapshot the shell formats is one the runtime made; towers, sessions,
inventory hosts and events are plain lists, provisioning answers are scripted, and traces
are scripted.
"""

from __future__ import annotations

import json
import os
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
import trio.testing

from actors import (
    Actor,
    ActorRef,
    ActorSystem,
    ChildSpec,
    Restart,
    Strategy,
    Supervisor,
    SupervisorFlags,
    SupervisorRef,
    open_system,
)
from broker.metrics import ProcessUsage
from broker.provisioning import HostBoard
from broker.shell import commands
from broker.shell.commands import (
    COMPLETION_PATHS,
    INSPECT_CHILDREN_SHOWN,
    HostView,
    Output,
    Role,
    SessionView,
    Shell,
    Status,
    TowerView,
    _more,
    _path_segments,
)
from broker.shell.server import LiveView
from broker.towers import TowerDirectory

EPOCH = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC, the wall clock at virtual time 0


class Worker(Actor):
    """Answers what it is asked; crashes on "crash"; "hold" keeps it busy until the gate opens."""

    def __init__(self, gate: trio.Event) -> None:
        self.gate = gate

    async def receive(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError("worker asked to crash")
        if message == "hold":
            await self.gate.wait()
        return message


@dataclass(frozen=True)
class Ping:
    number: int


@dataclass(frozen=True)
class Traced:
    at: float
    path: str
    kind: str
    message_type: str
    summary: str


class ScriptedTrace:
    """A trace that plays a script: each step waits its delay, then yields its message.

    After the last step it ends, as a trace does when its actor ends, or waits forever.
    """

    def __init__(
        self, path: str, steps: list[tuple[float, str, Any]], *, ends: bool, dropped: int = 0
    ) -> None:
        self.path = path
        self.steps = list(steps)
        self.ends = ends
        self.dropped = dropped
        self.entered = False
        self.exited = False

    async def __aenter__(self) -> ScriptedTrace:
        self.entered = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.exited = True

    def __aiter__(self) -> ScriptedTrace:
        return self

    async def __anext__(self) -> Traced:
        if not self.steps:
            if self.ends:
                raise StopAsyncIteration
            await trio.sleep_forever()
        delay, kind, message = self.steps.pop(0)
        await trio.sleep(delay)
        return Traced(trio.current_time(), self.path, kind, type(message).__name__, repr(message))


CERTIFICATE_EXPIRES = datetime.fromtimestamp(EPOCH, UTC) + timedelta(days=30, hours=2)
HOST_KEY_ERROR = (
    "connect: the host key of 10.0.0.3 is not the pinned one "
    "(ssh-ed25519 SHA256:0123456789abcdefghijklmnopqrstuvwxyzABCDEFG)"
)


def at(seconds: float) -> datetime:
    """The wall-clock time ``seconds`` after virtual time 0."""
    return datetime.fromtimestamp(EPOCH + seconds, UTC)


def inventory() -> list[HostView]:
    return [
        HostView("host-1", "10.0.0.1:22", "ready", "provision", "done", 1, "", None, 41.5),
        HostView("host-2", "10.0.0.2:2222", "provisioning", "provision", "nginx", 2,
                 "nginx: the configuration does not load", 3.25, None),
        HostView("host-3", "[fd00::3]:22", "failed", "provision", "connect", 1, HOST_KEY_ERROR,
                 None, None),
        HostView("host-4", "10.0.0.4:22", "free", "", "", 0, "", None, None),
    ]


class SystemView(LiveView):
    """The shell's own view over a real actor system; towers and sessions are given
    lists, and traces are scripted."""

    def __init__(self, system: ActorSystem) -> None:
        super().__init__(system, TowerDirectory(stale_after=3.0), HostBoard(()))
        self.tower_list = [
            TowerView("tower-2", "draining", 0, 500, None, None),
            TowerView("tower-1", "ready", 12, 500, 0.4, CERTIFICATE_EXPIRES,
                      ProcessUsage(83.5, 150 * 2**20), used=60, unanswered_offers=64,
                      waiting_offers=436),
        ]
        self.session_list = [
            SessionView("s1", "connected", "tower-1", 1, 1, "", 12.5),
            SessionView("s2", "failed", "", 3, 2, "no tower could take it", 125.0),
            SessionView("s3", "connected", "tower-1", 2, 1, "", 3.0),
        ]
        self.host_list = inventory()
        self.event_list = [(at(-60 + number), f"event {number}") for number in range(12)]
        # What provisioning and the scaler refuse, and why; what they were asked.
        self.refusals: dict[Any, str] = {}
        self.asked: list[tuple[str, Any]] = []
        self.drained: list[str] = []
        self.traces: list[tuple[str, int]] = []
        self.next_trace: ScriptedTrace | None = None

    def towers(self) -> list[TowerView]:
        return list(self.tower_list)

    async def sessions(self) -> list[SessionView]:
        await trio.lowlevel.checkpoint()
        return list(self.session_list)

    def actor_paths(self) -> list[str]:
        self.refresh()
        return super().actor_paths()

    async def drain(self, tower: str) -> None:
        if tower not in [view.name for view in self.tower_list]:
            raise LookupError(tower)
        self.drained.append(tower)

    def has_inventory(self) -> bool:
        return bool(self.host_list)

    def hosts(self) -> list[HostView]:
        return list(self.host_list)

    def events(self) -> list[tuple[datetime, str]]:
        return list(self.event_list)

    async def _answer(self, request: str, subject: Any, answer: str) -> str:
        await trio.lowlevel.checkpoint()
        self.asked.append((request, subject))
        if request != "scale" and subject not in [host.name for host in self.host_list]:
            raise LookupError(f"no host {subject} in the inventory")
        if subject in self.refusals:
            raise ValueError(self.refusals[subject])
        return answer

    async def provision(self, host: str) -> str:
        return await self._answer("provision", host, f"provision {host}: started")

    async def cancel(self, host: str) -> str:
        return await self._answer("cancel", host, f"{host}: cancelling")

    async def decommission(self, host: str) -> str:
        return await self._answer("decommission", host, f"decommission {host}: started")

    async def scale(self, count: int) -> str:
        return await self._answer("scale", count, f"scaling to {count} towers")

    def trace(self, path: str, capacity: int) -> ScriptedTrace:
        self._ref(path)
        self.traces.append((path, capacity))
        assert self.next_trace is not None
        return self.next_trace


@dataclass
class Harness:
    system: ActorSystem
    view: SystemView
    gate: trio.Event

    def shell(self, role: Role = Role.ADMIN) -> Shell:
        return Shell(self.view, role, clock=lambda: EPOCH + trio.current_time())

    def ref(self, path: str) -> ActorRef:
        ref = self.system.lookup(path)
        assert ref is not None, path
        return ref

    async def clog(self, path: str, waiting: int) -> None:
        """Keep the actor at ``path`` busy, with ``waiting`` messages in its mailbox."""
        ref = self.ref(path)
        await ref.tell("hold")
        await trio.testing.wait_all_tasks_blocked()
        for number in range(waiting):
            await ref.tell(number)


@pytest.fixture
async def broker():
    gate = trio.Event()

    def worker(name: str) -> ChildSpec:
        return ChildSpec(name, lambda: Worker(gate))

    towers = ChildSpec(
        "towers",
        lambda: Supervisor(
            [worker("tower-1"), worker("tower-2")], SupervisorFlags(intensity=10, period=5)
        ),
    )
    sessions = ChildSpec(
        "sessions",
        lambda: Supervisor(
            [worker("session:s1"), worker("session:s2")],
            SupervisorFlags(Strategy.ONE_FOR_ONE, intensity=3, period=10),
        ),
    )
    async with open_system(
        "broker", children=[towers, sessions], flags=SupervisorFlags(intensity=100)
    ) as system:
        harness = Harness(system, SystemView(system), gate)
        for _ in range(5):
            await harness.ref("/broker/towers/tower-1").ask("ping")
        for _ in range(2):
            await harness.ref("/broker/sessions/session:s1").ask("ping")
        yield harness
        gate.set()


def lines(output: Output) -> list[str]:
    assert output.text.endswith("\n")
    return output.text.splitlines()


def parsed(output: Output) -> Any:
    assert output.status == Status.OK, output.text
    return json.loads(output.text)


# tree


async def test_tree_shows_the_supervision_tree_with_states_and_flags(autojump_clock, broker):
    await broker.clog("/broker/sessions/session:s2", 2)
    output = await broker.shell().run("tree")
    assert output.status == Status.OK
    assert lines(output) == [
        "/broker (Supervisor, running)  [one_for_one, intensity 100 in 5s]",
        "├── towers (Supervisor, running)  [one_for_one, intensity 10 in 5s]",
        "│   ├── tower-1 (Worker, running)",
        "│   └── tower-2 (Worker, running)",
        "└── sessions (Supervisor, running)  [one_for_one, intensity 3 in 10s]",
        "    ├── session:s1 (Worker, running)",
        "    └── session:s2 (Worker, running)  mailbox 2/1000",
    ]


async def test_tree_depth_and_subtree(autojump_clock, broker):
    shallow = await broker.shell().run("tree --depth 1")
    assert lines(shallow) == [
        "/broker (Supervisor, running)  [one_for_one, intensity 100 in 5s]",
        "├── towers (Supervisor, running)  [one_for_one, intensity 10 in 5s]  +2 children",
        "└── sessions (Supervisor, running)  [one_for_one, intensity 3 in 10s]  +2 children",
    ]
    subtree = await broker.shell().run("tree /broker/towers/")
    assert lines(subtree) == [
        "/broker/towers (Supervisor, running)  [one_for_one, intensity 10 in 5s]",
        "├── tower-1 (Worker, running)",
        "└── tower-2 (Worker, running)",
    ]
    root_only = await broker.shell().run("tree --depth=0")
    assert lines(root_only) == [
        "/broker (Supervisor, running)  [one_for_one, intensity 100 in 5s]  +2 children"
    ]


async def test_tree_shows_so_many_children_of_each_actor(autojump_clock, broker):
    shell = broker.shell()
    capped = await shell.run("tree --children 1")
    assert lines(capped) == [
        "/broker (Supervisor, running)  [one_for_one, intensity 100 in 5s]",
        "├── towers (Supervisor, running)  [one_for_one, intensity 10 in 5s]",
        "│   ├── tower-1 (Worker, running)",
        "│   └── and 1 more (tree /broker/towers --depth 1 --children 2)",
        "└── and 1 more (tree /broker --depth 1 --children 2)",
    ]
    document = parsed(await shell.run("tree /broker/towers --children 1 --json"))
    assert document["child_count"] == 2 and len(document["children"]) == 1
    assert (await shell.run("tree --children 0")).status == Status.USAGE


async def test_tree_json_is_the_nested_snapshot(autojump_clock, broker):
    tree = parsed(await broker.shell().run("tree --json"))
    assert tree["path"] == "/broker"
    assert tree["supervisor"] == {"strategy": "one_for_one", "intensity": 100, "period": 5.0}
    towers, sessions = tree["children"]
    assert [child["path"] for child in towers["children"]] == [
        "/broker/towers/tower-1",
        "/broker/towers/tower-2",
    ]
    assert towers["children"][0]["messages_handled"] == 5
    assert towers["children"][0]["supervisor"] is None
    shallow = parsed(await broker.shell().run("tree /broker/sessions --depth 0 --json"))
    assert shallow["path"] == "/broker/sessions"
    assert shallow["child_count"] == 2 and shallow["children"] == []


# ps and top


async def test_ps_sorts_by_mailbox_depth_then_messages_handled(autojump_clock, broker):
    await broker.clog("/broker/towers/tower-2", 3)
    output = await broker.shell().run("ps")
    assert output.status == Status.OK
    assert lines(output) == [
        "PATH                         CLASS       STATE    MAILBOX  HANDLED  RESTARTS  UPTIME",
        "/broker/towers/tower-2       Worker      running   3/1000        0         0    0.0s",
        "/broker/towers/tower-1       Worker      running   0/1000        5         0    0.0s",
        "/broker/sessions/session:s1  Worker      running   0/1000        2         0    0.0s",
        "/broker                      Supervisor  running   0/1000        0         0    0.0s",
        "/broker/sessions             Supervisor  running   0/1000        0         0    0.0s",
        "/broker/sessions/session:s2  Worker      running   0/1000        0         0    0.0s",
        "/broker/towers               Supervisor  running   0/1000        0         0    0.0s",
    ]


async def test_ps_sort_and_limit(autojump_clock, broker):
    await broker.clog("/broker/towers/tower-2", 3)
    await broker.ref("/broker/sessions/session:s2").tell("crash")
    await broker.ref("/broker/sessions/session:s2").ask("ping")
    shell = broker.shell()

    def paths(output: Output) -> list[str]:
        return [line.split()[0] for line in lines(output)[1:]]

    by_handled = await shell.run("ps --sort handled --limit 3")
    assert paths(by_handled)[:3] == [
        "/broker/towers/tower-1",
        "/broker/sessions/session:s1",
        "/broker/sessions/session:s2",
    ]
    assert lines(by_handled)[-1] == "3 of 7 actors shown; --limit shows more"
    by_restarts = await shell.run("ps --sort=restarts --limit 1")
    assert paths(by_restarts)[0] == "/broker/sessions/session:s2"
    rows = parsed(await shell.run("ps --json --limit 2"))
    assert [row["path"] for row in rows] == ["/broker/towers/tower-2", "/broker/towers/tower-1"]
    assert rows[0]["mailbox_depth"] == 3 and rows[0]["mailbox_capacity"] == 1000
    assert rows[1]["messages_handled"] == 5 and rows[1]["class"] == "Worker"


async def test_top_refreshes_with_rates_on_the_virtual_clock(autojump_clock, broker):
    shell = broker.shell()
    tower = broker.ref("/broker/towers/tower-1")
    start = trio.current_time()
    frames = []
    stream = shell.stream("top --count 2 --interval 0.5 --limit 2")
    async with aclosing(stream):
        async for frame in stream:
            frames.append(frame)
            for _ in range(10):
                await tower.ask("ping")
    assert stream.status == Status.OK
    assert trio.current_time() - start == pytest.approx(0.5)
    first, second = frames
    assert first.splitlines() == [
        "top at 22:13:20.000: refresh 1 of 2, every 0.5s",
        "PATH                         CLASS   STATE    MAILBOX  HANDLED  RATE  RESTARTS  UPTIME",
        "/broker/towers/tower-1       Worker  running   0/1000        5     -         0    0.0s",
        "/broker/sessions/session:s1  Worker  running   0/1000        2     -         0    0.0s",
        "2 of 7 actors shown; --limit shows more",
    ]
    assert second.splitlines()[:3] == [
        "",
        "top at 22:13:20.500: refresh 2 of 2, every 0.5s",
        "PATH                         CLASS   STATE    MAILBOX  HANDLED    RATE  RESTARTS  UPTIME",
    ]
    assert second.splitlines()[3] == (
        "/broker/towers/tower-1       Worker  running   0/1000       15  20.0/s         0    0.5s"
    )


async def test_top_json_and_its_bounds(autojump_clock, broker):
    shell = broker.shell()
    output = await shell.run("top --count 2 --interval 0.2 --sort rate --json")
    first, second = [json.loads(line) for line in lines(output)]
    assert first["refresh"] == 1 and first["at"] == "2023-11-14T22:13:20.000+00:00"
    assert all(row["rate"] is None for row in first["actors"])
    assert second["refresh"] == 2 and all(row["rate"] == 0.0 for row in second["actors"])
    too_fast = await shell.run("top --interval 0.1")
    assert too_fast.status == Status.USAGE
    assert lines(too_fast)[0] == "top: --interval: must be from 0.2 to 3600 seconds, not 0.1"
    # Past the maximum, a shell without a terminal would never refresh again.
    too_slow = await shell.run("top --interval 1e300 --count 2")
    assert lines(too_slow)[0] == "top: --interval: must be from 0.2 to 3600 seconds, not 1e300"


async def test_tree_and_inspect_snapshot_only_what_they_show(
    autojump_clock, broker, monkeypatch
):
    # Each took a snapshot of everything under it: a third of a second of the broker's
    # thread at 50,000 actors, for a tree of 74 characters.
    asked: list[tuple] = []
    tree, snapshot_of = broker.view.tree, broker.view.snapshot_of

    def bounded_tree(depth=None, children=None):
        asked.append(("tree", depth, children))
        return tree(depth, children)

    def bounded_snapshot(path, depth=None, children=None):
        asked.append((path, depth, children))
        return snapshot_of(path, depth, children)

    monkeypatch.setattr(broker.view, "tree", bounded_tree)
    monkeypatch.setattr(broker.view, "snapshot_of", bounded_snapshot)
    shell = broker.shell()
    assert (await shell.run("tree --depth 0")).status == Status.OK
    assert (await shell.run("tree /broker/towers --children 1")).status == Status.OK
    assert (await shell.run("inspect /broker/sessions")).status == Status.OK
    assert asked == [("tree", 0, 50), ("/broker/towers", None, 1),
                     ("/broker/sessions", 1, INSPECT_CHILDREN_SHOWN)]


async def test_top_views_together_refresh_within_their_share_of_the_broker(
    autojump_clock, broker, monkeypatch
):
    # 24 read-only tops at 0.2 s each read every actor five times a second each: at
    # 50,000 actors the broker's timers ran 2.6 s late.
    monkeypatch.setattr(commands, "TOP_COST_PER_ACTOR", 0.1 / 7)  # 7 actors: 0.1 s a read
    shell = broker.shell()
    began = trio.current_time()
    alone = await shell.run("top --count 3 --interval 0.5")
    assert trio.current_time() - began == pytest.approx(2.0)  # every 1.0 s, not 0.5
    assert "every 0.5s (every 1.0s for now: 7 actors, 1 top views open)" in alone.text
    assert commands.Shell.tops_running == 0
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(shell.run, "top --count 3 --interval 0.5")
    assert trio.current_time() - began == pytest.approx(4.0)  # two views: every 2.0 s


async def test_ps_top_and_stats_snapshot_only_the_actors_they_show(
    autojump_clock, broker, monkeypatch
):
    # A snapshot of a large tree costs the broker's thread milliseconds for each thousand
    # actors, on every refresh: these read each actor's counters, then snapshot the rows.
    taken: list[tuple[str, int | None]] = []
    snapshot_of = broker.view.snapshot_of

    def counted(path: str, depth: int | None = None, children: int | None = None) -> Any:
        taken.append((path, depth))
        return snapshot_of(path, depth, children)

    def whole_tree() -> Any:
        raise AssertionError("the whole tree was snapshot")

    monkeypatch.setattr(broker.view, "snapshot_of", counted)
    monkeypatch.setattr(broker.view, "tree", whole_tree)
    shell = broker.shell()
    ps = await shell.run("ps --limit 2 --sort handled")
    assert [line.split()[0] for line in lines(ps)[1:3]] == [
        "/broker/towers/tower-1", "/broker/sessions/session:s1"]
    assert taken == [("/broker/towers/tower-1", 0), ("/broker/sessions/session:s1", 0)]
    taken.clear()
    top = await shell.run("top --count 2 --interval 0.5 --limit 3 --json")
    assert [len(json.loads(frame)["actors"]) for frame in lines(top)] == [3, 3]
    assert len(taken) == 6 and all(depth == 0 for _, depth in taken)
    taken.clear()
    assert lines(await shell.run("stats"))[0] == "actors     7: 7 running"
    assert taken == []
    # A supervisor's row is its own, without its children's snapshots.
    rows = {row["path"]: row for row in parsed(await shell.run("ps --json"))}
    assert rows["/broker/sessions"]["supervisor"] == {
        "strategy": "one_for_one", "intensity": 3, "period": 10}


# inspect


async def test_inspect_shows_a_real_failure_with_its_traceback(autojump_clock, broker):
    tower = broker.ref("/broker/towers/tower-1")
    await trio.sleep(2)
    await tower.tell("crash")
    await tower.ask("ping")  # answered by the restarted worker
    await trio.sleep(3)
    output = await broker.shell().run("inspect /broker/towers/tower-1")
    assert output.status == Status.OK
    text = lines(output)
    assert text[:14] == [
        "path              /broker/towers/tower-1",
        "name              tower-1",
        "class             Worker",
        "kind              actor",
        "state             running",
        "mailbox           0 of 1000",
        "overflow          backpressure",
        "messages handled  6",
        "messages dropped  0",
        "restarts          1",
        "uptime            3.0s",
        "traces open       0",
        "children          0",
        "failures          1",
    ]
    assert text[14:17] == [
        "",
        "failure 1 of 1, 2023-11-14 22:13:22.000 UTC (3.0s ago):",
        "  crashed: RuntimeError('worker asked to crash')",
    ]
    assert text[17] == "  Traceback (most recent call last):"
    assert 'raise RuntimeError("worker asked to crash")' in [row.strip() for row in text]
    assert text[-1] == "  RuntimeError: worker asked to crash"


async def test_inspect_a_supervisor_and_as_json(autojump_clock, broker):
    shell = broker.shell()
    output = await shell.run("inspect /broker/sessions")
    text = lines(output)
    assert "supervisor        one_for_one, intensity 3 in 10s" in text
    assert text[text.index("children:") :] == [
        "children:",
        "  NAME        CLASS   STATE    RESTARTS",
        "  session:s1  Worker  running         0",
        "  session:s2  Worker  running         0",
    ]
    session = broker.ref("/broker/sessions/session:s2")
    await session.tell("crash")
    await session.ask("ping")
    document = parsed(await shell.run("inspect /broker/sessions/session:s2 --json"))
    assert document["restarts"] == 1 and document["children"] == []
    [failure] = document["failures"]
    assert failure["kind"] == "crashed"
    assert failure["reason"] == "crashed: RuntimeError('worker asked to crash')"
    assert failure["at"] == "2023-11-14T22:13:20.000+00:00"
    assert "RuntimeError: worker asked to crash" in failure["traceback"]
    supervisor = parsed(await shell.run("inspect /broker/sessions --json"))
    assert supervisor["children"] == ["session:s1", "session:s2"]
    assert supervisor["supervisor"] == {"strategy": "one_for_one", "intensity": 3, "period": 10}


async def test_inspect_counts_the_traces_open_on_an_actor(autojump_clock, broker):
    shell = broker.shell()
    tower = broker.ref("/broker/towers/tower-1")

    async def traces_open() -> tuple[str, int]:
        text = lines(await shell.run("inspect /broker/towers/tower-1"))
        [row] = [row for row in text if row.startswith("traces open")]
        document = parsed(await shell.run("inspect /broker/towers/tower-1 --json"))
        return row.split()[-1], document["traces"]

    assert await traces_open() == ("0", 0)
    async with tower.trace(), tower.trace():
        assert await traces_open() == ("2", 2)
    assert await traces_open() == ("0", 0)


# sessions, towers, stats, jobs


async def test_sessions_table_filter_and_json(autojump_clock, broker):
    shell = broker.shell()
    output = await shell.run("sessions")
    assert lines(output) == [
        "ID  STATE      TOWER    NEGOTIATION  PLACEMENTS    AGE  REASON",
        "s2  failed     -                  3           2  2m05s  no tower could take it",
        "s1  connected  tower-1            1           1  12.5s  -",
        "s3  connected  tower-1            2           1   3.0s  -",
    ]
    connected = await shell.run("sessions --state connected")
    assert [line.split()[0] for line in lines(connected)[1:]] == ["s1", "s3"]
    assert lines(await shell.run("sessions --state closed")) == ["no sessions closed"]
    rows = parsed(await shell.run("sessions --state failed --json"))
    assert rows == [
        {
            "id": "s2",
            "state": "failed",
            "tower": "",
            "negotiation": 3,
            "placements": 2,
            "reason": "no tower could take it",
            "age": 125.0,
        }
    ]
    unknown_state = await shell.run("sessions --state sleepy")
    assert unknown_state.status == Status.USAGE
    broker.view.session_list = []
    assert lines(await shell.run("sessions")) == ["no sessions"]
    assert parsed(await shell.run("sessions --json")) == []


async def test_text_from_the_system_cannot_drive_the_terminal(autojump_clock, broker):
    broker.view.session_list = [SessionView("s9", "failed", "", 1, 1, "bad\x1b[2Jthing", 1.0)]
    output = await broker.shell().run("sessions")
    assert "\x1b" not in output.text
    assert lines(output)[1].endswith("bad\\x1b[2Jthing")
    assert parsed(await broker.shell().run("sessions --json"))[0]["reason"] == "bad\x1b[2Jthing"


async def test_towers_table_and_json(autojump_clock, broker):
    shell = broker.shell()
    assert lines(await shell.run("towers")) == [
        "NAME     STATE             SESSIONS            OFFERS  HEARTBEAT  CPU TIME   MEMORY  "
        "CERTIFICATE EXPIRES",
        "tower-1  ready     12/500 (60 used)  64 (436 waiting)   0.4s ago     1m23s  150 MiB  "
        "2023-12-15 00:13 UTC (in 30d02h)",
        "tower-2  draining             0/500                 0          -         -        -  -",
    ]
    towers = parsed(await shell.run("towers --json"))
    assert towers[0] == {
        "name": "tower-1",
        "state": "ready",
        "sessions": 12,
        "used": 60,
        "capacity": 500,
        "unanswered_offers": 64,
        "waiting_offers": 436,
        "heartbeat_age": 0.4,
        "cpu_seconds": 83.5,
        "resident_bytes": 150 * 2**20,
        "certificate_expires": "2023-12-15T00:13:20+00:00",
        "certificate_expires_in": 30 * 86400 + 2 * 3600,
    }
    assert towers[1]["certificate_expires"] is None and towers[1]["cpu_seconds"] is None
    broker.view.tower_list = [
        TowerView("old", "stale", 0, 10, 9.0, datetime(2023, 11, 12, 22, 13, 20))
    ]
    assert lines(await shell.run("towers"))[1].endswith("2023-11-12 22:13 UTC (expired 2d00h ago)")
    broker.view.tower_list = []
    assert lines(await shell.run("towers")) == ["no towers"]


async def test_stats_totals(autojump_clock, broker):
    await broker.clog("/broker/towers/tower-2", 4)
    shell = broker.shell()
    assert lines(await shell.run("stats")) == [
        "actors     7: 7 running",
        "restarts   0",
        "mailboxes  4 queued, deepest 4 at /broker/towers/tower-2",
        "messages   7 handled, 0 dropped",
        "sessions   3: 2 connected, 1 failed",
        "towers     2: 1 draining, 1 ready",
    ]
    stats = parsed(await shell.run("stats --json"))
    assert stats["actors"]["total"] == 7 and stats["actors"]["by_state"]["running"] == 7
    assert stats["actors"]["by_state"]["restarting"] == 0
    assert stats["mailbox"] == {"total": 4, "max": 4, "max_path": "/broker/towers/tower-2"}
    assert stats["messages"] == {"handled": 7, "dropped": 0}
    assert stats["sessions"] == {"total": 3, "by_state": {"connected": 2, "failed": 1}}
    assert stats["towers"] == {"total": 2, "by_state": {"draining": 1, "ready": 1}}


JOBS_TABLE = [
    "NAME    ADDRESS        STATE         PLAN       STEP     ATTEMPTS  NEXT RETRY  ERROR",
    "host-1  10.0.0.1:22    ready         provision  done            1  -           -",
    "host-2  10.0.0.2:2222  provisioning  provision  nginx           2  in 3.2s     "
    "nginx: the configuration does not load",
    "host-3  [fd00::3]:22   failed        provision  connect         1  -           "
    "connect: the host key of 10.0.0.3 is not the pinned one (...",
    "host-4  10.0.0.4:22    free          -          -               0  -           -",
]


async def test_jobs_shows_every_host_then_the_last_events(autojump_clock, broker):
    shell = broker.shell(Role.READ_ONLY)
    output = await shell.run("jobs")
    assert output.status == Status.OK
    assert lines(output) == [
        *JOBS_TABLE,
        "",
        "events (last 10 of 12):",
        *[f"2023-11-14 22:12:{20 + number}.000 UTC  event {number}" for number in range(2, 12)],
    ]
    assert lines(await shell.run("jobs --events 0")) == JOBS_TABLE
    every = lines(await shell.run("jobs --events=20"))[len(JOBS_TABLE) :]
    assert every[:3] == ["", "events (all):", "2023-11-14 22:12:20.000 UTC  event 0"]
    assert len(every) == 2 + 12
    broker.view.event_list = []
    assert lines(await shell.run("jobs"))[len(JOBS_TABLE) :] == ["", "no events"]


async def test_jobs_json_has_every_field_and_the_whole_error(autojump_clock, broker):
    document = parsed(await broker.shell().run("jobs --json --events 2"))
    assert [host["name"] for host in document["hosts"]] == ["host-1", "host-2", "host-3", "host-4"]
    ready, restarting, failed, free = document["hosts"]
    assert restarting == {
        "name": "host-2",
        "address": "10.0.0.2:2222",
        "state": "provisioning",
        "plan": "provision",
        "step": "nginx",
        "attempts": 2,
        "error": "nginx: the configuration does not load",
        "restart_in": 3.25,
        "provisioned_in": None,
        "step_seconds": {},
    }
    assert ready["provisioned_in"] == 41.5 and ready["restart_in"] is None
    assert failed["state"] == "failed" and failed["error"] == HOST_KEY_ERROR
    assert free["plan"] == "" and free["attempts"] == 0
    assert document["events"] == [
        {"at": "2023-11-14T22:12:30.000+00:00", "text": "event 10"},
        {"at": "2023-11-14T22:12:31.000+00:00", "text": "event 11"},
    ]
    assert parsed(await broker.shell().run("jobs --json --events 0"))["events"] == []
    every = parsed(await broker.shell().run("jobs --json"))["events"]
    assert [event["text"] for event in every] == [f"event {number}" for number in range(12)]


async def test_jobs_escapes_what_hosts_and_events_say(autojump_clock, broker):
    broker.view.host_list = [
        HostView("host-1", "10.0.0.1:22", "failed", "provision", "prepare", 3,
                 "prepare: no NGINX\n\x1b[2Jthere", None, None),
    ]
    broker.view.event_list = [(at(0), "host-1: failed (\x1b]0;owned\x07)")]
    output = await broker.shell().run("jobs")
    assert "\x1b" not in output.text and "\x07" not in output.text
    assert lines(output)[1].endswith("prepare: no NGINX\\n\\x1b[2Jthere")
    assert lines(output)[-1] == "2023-11-14 22:13:20.000 UTC  host-1: failed (\\x1b]0;owned\\x07)"
    assert parsed(await broker.shell().run("jobs --json"))["hosts"][0]["error"] == (
        "prepare: no NGINX\n\x1b[2Jthere"
    )


async def test_provision_answers_for_each_host(autojump_clock, broker):
    shell = broker.shell()
    assert await shell.run("provision host-4") == Output("provision host-4: started\n")
    broker.view.refusals = {"host-1": "host-1 is ready"}
    output = await shell.run("provision host-3 host-1 host-9")
    assert output == Output(
        "provision host-3: started\n"
        "cannot provision host-1: host-1 is ready\n"
        "cannot provision host-9: no host host-9 in the inventory\n",
        Status.ERROR,
    )
    assert broker.view.asked == [
        ("provision", "host-4"),
        ("provision", "host-3"),
        ("provision", "host-1"),
        ("provision", "host-9"),
    ]
    refused = await shell.run("provision host-1 --json")
    assert refused.status == Status.ERROR
    assert json.loads(refused.text) == [
        {"host": "host-1", "ok": False, "answer": "host-1 is ready"}
    ]
    assert parsed(await shell.run("provision --json host-2 host-4")) == [
        {"host": "host-2", "ok": True, "answer": "provision host-2: started"},
        {"host": "host-4", "ok": True, "answer": "provision host-4: started"},
    ]


async def test_decommission_and_its_refusal(autojump_clock, broker):
    shell = broker.shell()
    assert await shell.run("decommission host-1") == Output("decommission host-1: started\n")
    broker.view.refusals = {"host-4": "host-4 is free"}
    assert await shell.run("decommission host-4") == Output(
        "cannot decommission host-4: host-4 is free\n", Status.ERROR
    )
    assert broker.view.asked == [("decommission", "host-1"), ("decommission", "host-4")]
    refused = await broker.shell(Role.READ_ONLY).run("decommission host-1")
    assert refused.status is Status.REFUSED


async def test_cancel_and_its_refusal(autojump_clock, broker):
    shell = broker.shell()
    assert await shell.run("cancel host-2") == Output("host-2: cancelling\n")
    assert parsed(await shell.run("cancel host-2 --json")) == {
        "host": "host-2",
        "answer": "host-2: cancelling",
    }
    broker.view.refusals = {"host-4": "no job runs for host-4"}
    assert await shell.run("cancel host-4") == Output(
        "cannot cancel host-4: no job runs for host-4\n", Status.ERROR
    )
    assert await shell.run("cancel host-9 --json") == Output(
        "cannot cancel host-9: no host host-9 in the inventory\n", Status.ERROR
    )
    assert broker.view.asked[0] == ("cancel", "host-2")


async def test_scale_and_its_refusal(autojump_clock, broker):
    shell = broker.shell()
    assert await shell.run("scale 3") == Output("scaling to 3 towers\n")
    assert parsed(await shell.run("scale 0 --json")) == {
        "scale": 0,
        "answer": "scaling to 0 towers",
    }
    broker.view.refusals = {5: "/broker/scaler did not answer: it stopped"}
    assert await shell.run("scale 5") == Output(
        "cannot scale to 5: /broker/scaler did not answer: it stopped\n", Status.ERROR
    )
    assert broker.view.asked == [("scale", 3), ("scale", 0), ("scale", 5)]

# trace


def scripted(path: str, *steps: tuple[float, str, Any], ends: bool = False, dropped: int = 0):
    return ScriptedTrace(path, list(steps), ends=ends, dropped=dropped)


async def test_trace_prints_messages_and_stops_at_its_deadline(autojump_clock, broker):
    path = "/broker/towers/tower-1"
    trace = scripted(path, (1, "ask", Ping(1)), (0.5, "tell", Ping(2)), (20, "tell", Ping(3)))
    broker.view.next_trace = trace
    start = trio.current_time()
    chunks = []
    stream = broker.shell().stream(f"trace {path} --seconds 5")
    async with aclosing(stream):
        async for chunk in stream:
            chunks.append(chunk)
    assert trio.current_time() - start == pytest.approx(5)
    assert chunks == [
        "tracing /broker/towers/tower-1 for 5s, at most 1000 messages\n",
        "22:13:21.000 ask Ping(number=1)\n",
        "22:13:21.500 tell Ping(number=2)\n",
        "-- 5s elapsed: 2 messages, 0 dropped\n",
    ]
    assert stream.status == Status.OK
    assert broker.view.traces == [(path, 1000)]
    assert trace.entered and trace.exited


async def test_trace_ends_with_the_actor_and_counts_drops(autojump_clock, broker):
    path = "/broker/sessions/session:s1"
    broker.view.next_trace = scripted(path, (2, "ask", Ping(1)), ends=True, dropped=7)
    start = trio.current_time()
    output = await broker.shell().run(f"trace {path}")
    assert trio.current_time() - start == pytest.approx(2)
    assert lines(output)[1:] == [
        "22:13:22.000 ask Ping(number=1)",
        "-- /broker/sessions/session:s1 ended: 1 message, 7 dropped",
    ]


async def test_trace_limit_and_json(autojump_clock, broker):
    path = "/broker/towers/tower-2"
    steps = [(0.1, "tell", Ping(number)) for number in range(5)]
    broker.view.next_trace = scripted(path, *steps)
    limited = await broker.shell().run(f"trace {path} --limit 3")
    assert lines(limited)[-1] == "-- limit of 3 reached: 3 messages, 0 dropped"
    assert broker.view.traces[-1] == (path, 3)
    broker.view.next_trace = scripted(path, (1, "tell", Ping(1)), dropped=2)
    output = await broker.shell().run(f"trace {path} --seconds 2 --json")
    event, end = [json.loads(line) for line in lines(output)]
    assert event == {
        "at": "2023-11-14T22:13:21.300+00:00",
        "path": path,
        "kind": "tell",
        "message_type": "Ping",
        "summary": "Ping(number=1)",
    }
    assert end == {"end": "deadline", "messages": 1, "dropped": 2}


async def test_a_trace_left_early_is_closed(autojump_clock, broker):
    path = "/broker/towers/tower-1"
    trace = scripted(path, (1, "tell", Ping(1)), (1, "tell", Ping(2)))
    broker.view.next_trace = trace
    stream = broker.shell().stream(f"trace {path}")
    async with aclosing(stream):
        async for chunk in stream:
            if "Ping" in chunk:
                break
    assert trace.exited
    assert stream.status is None


async def test_trace_refuses_bad_bounds_and_unknown_actors(autojump_clock, broker):
    shell = broker.shell()
    too_long = await shell.run("trace /broker --seconds 61")
    assert too_long.status == Status.USAGE
    assert lines(too_long)[0] == "trace: --seconds: must be from 0.1 to 60 seconds, not 61"
    assert (await shell.run("trace /broker --limit 0")).status == Status.USAGE
    assert await shell.run("trace /broker/nowhere") == Output(
        "no actor at /broker/nowhere\n", Status.ERROR
    )


# admin commands


async def test_kill_goes_through_the_view_and_the_supervisor_restarts(autojump_clock, broker):
    shell = broker.shell()
    output = await shell.run("kill /broker/sessions/session:s1 'operator test' now")
    assert output == Output("killed /broker/sessions/session:s1: operator test now\n")
    await broker.ref("/broker/sessions/session:s1").ask("ping")
    tree = await shell.run("tree /broker/sessions")
    assert "├── session:s1 (Worker, running)  restarts 1" in lines(tree)
    document = parsed(await shell.run("inspect /broker/sessions/session:s1 --json"))
    assert document["failures"][0]["reason"] == "killed: operator test now"
    default = parsed(await shell.run("kill /broker/towers/tower-2 --json"))
    assert default == {
        "killed": "/broker/towers/tower-2",
        "reason": "killed from the operators' shell",
    }
    assert await shell.run("kill /broker/nowhere") == Output(
        "no actor at /broker/nowhere\n", Status.ERROR
    )


async def test_a_restart_that_does_not_start_again_is_said(autojump_clock, broker):
    starts = [Worker(broker.gate)]

    def start_once() -> Worker:
        if not starts:
            raise RuntimeError("runs once")
        return starts.pop()

    sessions = broker.ref("/broker/sessions")
    await sessions.start_child(ChildSpec("session:s3", start_once, Restart.TEMPORARY))
    assert await broker.shell().run("restart /broker/sessions/session:s3") == Output(
        "/broker/sessions/session:s3 stopped and did not start again: "
        "RuntimeError: runs once\n", Status.ERROR
    )
    await trio.testing.wait_all_tasks_blocked()
    assert broker.system.lookup("/broker/sessions/session:s3") is None


async def test_restart_and_drain(autojump_clock, broker):
    shell = broker.shell()
    assert await shell.run("restart /broker/towers/tower-2") == Output(
        "restarted /broker/towers/tower-2\n"
    )
    assert broker.ref("/broker/towers/tower-2").snapshot().restarts == 1
    assert await shell.run("restart /broker") == Output(
        "cannot restart /broker: it has no supervisor\n", Status.ERROR
    )
    assert (await shell.run("restart /broker/nowhere")).status == Status.ERROR
    assert await shell.run("drain tower-1") == Output(
        "draining tower-1: it takes no new sessions\n"
    )
    assert parsed(await shell.run("drain tower-2 --json")) == {"draining": "tower-2"}
    assert broker.view.drained == ["tower-1", "tower-2"]
    assert await shell.run("drain tower-9") == Output("no tower named tower-9\n", Status.ERROR)


@pytest.mark.parametrize(
    "line",
    [
        "kill /broker/towers/tower-1",
        "restart /broker/towers/tower-1",
        "drain tower-1",
        "provision host-1",
        "cancel job-1",
        "scale 3",
    ],
)
async def test_a_read_only_role_is_refused_admin_commands(autojump_clock, broker, line):
    output = await broker.shell(Role.READ_ONLY).run(line)
    command = line.split()[0]
    assert output == Output(f"refused: {command!r} needs an admin key\n", Status.REFUSED)
    assert broker.ref("/broker/towers/tower-1").snapshot().restarts == 0
    assert broker.view.drained == []
    assert broker.view.asked == []


@pytest.mark.parametrize(
    "command", ["jobs", "jobs --json", "provision host-1", "cancel host-1", "scale 3"]
)
async def test_without_a_host_inventory_provisioning_is_not_available(
    autojump_clock, broker, command
):
    broker.view.host_list = []
    output = await broker.shell().run(command)
    assert output == Output("not available: this broker has no host inventory\n", Status.ERROR)
    assert broker.view.asked == []


# the line itself


async def test_unknown_commands_and_paths(autojump_clock, broker):
    shell = broker.shell()
    assert await shell.run("dance") == Output("unknown command 'dance'; try help\n", Status.USAGE)
    for line in ("inspect /broker/nowhere", "tree /nowhere", "inspect broker"):
        path = line.split()[1]
        assert await shell.run(line) == Output(f"no actor at {path}\n", Status.ERROR)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("ps --limit x", "ps: --limit: expected a whole number, not 'x'"),
        ("ps --limit 0", "ps: --limit: must be at least 1, not 0"),
        ("ps --sort size", "ps: --sort: expected one of depth, handled, restarts, not 'size'"),
        ("ps --frobnicate", "ps: unknown option '--frobnicate'"),
        ("ps --json=yes", "ps: --json takes no value"),
        ("ps extra", "ps: unexpected argument 'extra'"),
        ("tree --depth", "tree: --depth needs a value (N)"),
        ("tree --depth -1", "tree: --depth: must be at least 0, not -1"),
        ("inspect", "inspect: missing PATH"),
        ("inspect /broker /broker/towers", "inspect: unexpected argument '/broker/towers'"),
        ("top --count 0", "top: --count: must be at least 1, not 0"),
        ("top --interval soon", "top: --interval: expected a number of seconds, not 'soon'"),
        ("trace / --seconds nan", "trace: --seconds: expected a number of seconds, not 'nan'"),
        ("trace / --seconds 1_0", "trace: --seconds: expected a number of seconds, not '1_0'"),
        ("ps --limit \u0663", "ps: --limit: expected a whole number, not '\u0663'"),
        ("ps --limit +3", "ps: --limit: expected a whole number, not '+3'"),
        ("scale \u00b2", "scale: N: expected a whole number, not '\u00b2'"),
        ("drain", "drain: missing TOWER"),
        ("provision", "provision: missing HOST"),
        ("provision --json", "provision: missing HOST"),
        ("cancel", "cancel: missing HOST"),
        ("cancel host-1 host-2", "cancel: unexpected argument 'host-2'"),
        ("scale", "scale: missing N"),
        ("scale -1", "scale: N: must be at least 0, not -1"),
        ("scale x", "scale: N: expected a whole number, not 'x'"),
        ("scale 2.5", "scale: N: expected a whole number, not '2.5'"),
        ("scale 3 4", "scale: unexpected argument '4'"),
        ("jobs --events -2", "jobs: --events: must be at least 0, not -2"),
        ("jobs host-1", "jobs: unexpected argument 'host-1'"),
    ],
)
async def test_bad_arguments_print_the_error_and_the_usage(autojump_clock, broker, line, error):
    output = await broker.shell().run(line)
    assert output.status == Status.USAGE
    command = line.split()[0]
    first, usage = lines(output)
    assert first == error
    assert usage.startswith(f"usage: {command} ") and usage.endswith("[--json]")


async def test_quoting(autojump_clock, broker):
    shell = broker.shell()
    assert await shell.run('kill "/broker/towers/tower-1') == Output(
        "cannot split the line into words: no closing quotation\n", Status.USAGE
    )
    assert (await shell.run("ps \\")).status == Status.USAGE
    assert not shell.is_streaming("trace '/broker")
    quoted = await shell.run("kill '/broker/towers/tower-1' \"it hung\" -- --really")
    assert quoted == Output("killed /broker/towers/tower-1: it hung --really\n")


async def test_empty_lines_exit_and_help(autojump_clock, broker):
    shell = broker.shell(Role.READ_ONLY)
    assert await shell.run("") == Output("")
    assert await shell.run("   ") == Output("")
    assert await shell.run("exit") == Output("", Status.CLOSE)
    assert await shell.run("quit") == Output("", -1)
    listing = lines(await shell.run("help"))
    assert listing[0] == "commands (* needs an admin key):"
    assert "  tree          the live supervision tree, with states" in listing
    assert " *kill          kill an actor; its supervisor decides what follows" in listing
    usage = await shell.run("help trace")
    assert lines(usage)[0] == "usage: trace PATH [--seconds N] [--limit M] [--json]"
    assert await shell.run("trace --help") == usage
    assert lines(await shell.run("help kill"))[0] == "usage: kill PATH [REASON...] [--json]"
    commands = parsed(await shell.run("help --json"))
    [kill] = [command for command in commands if command["name"] == "kill"]
    assert kill["usage"] == "kill PATH [REASON...] [--json]" and kill["admin"]
    assert [command["name"] for command in commands if command["streaming"]] == ["top", "trace"]
    details = parsed(await shell.run("help ps --json"))
    assert [option["name"] for option in details["options"]] == ["--sort", "--limit"]
    assert await shell.run("help dance") == Output(
        "unknown command 'dance'; try help\n", Status.USAGE
    )


async def test_streaming_and_plain_commands_through_both_entry_points(autojump_clock, broker):
    shell = broker.shell()
    assert shell.is_streaming("top --count 1")
    assert shell.is_streaming("trace /broker")
    assert not shell.is_streaming("tree")
    assert not shell.is_streaming("help top")
    assert not shell.is_streaming("")
    stream = shell.stream("towers")
    assert [chunk async for chunk in stream] == [(await shell.run("towers")).text]
    assert stream.status == Status.OK
    refused = broker.shell(Role.READ_ONLY).stream("kill /broker")
    assert [chunk async for chunk in refused] == ["refused: 'kill' needs an admin key\n"]
    assert refused.status == Status.REFUSED
    bad = shell.stream("trace /broker --limit lots")
    assert len([chunk async for chunk in bad]) == 1
    assert bad.status == Status.USAGE
    one_frame = await shell.run("top --count 1 --limit 1")
    assert lines(one_frame)[0] == "top at 22:13:20.000: refresh 1 of 1, every 1s"


# completion


async def test_completion(autojump_clock, broker):
    shell = broker.shell()
    everything = ("cancel decommission drain exit help inspect jobs kill provision ps quit "
                  "restart scale")
    assert shell.complete("") == (
        everything + " sessions stats top towers trace tree undrain"
    ).split()
    assert shell.complete("tr") == ["trace", "tree"]
    # A path with actors under it ends in "/": completion goes on into them.
    assert shell.complete("inspect ") == ["/broker/"]
    assert shell.complete("inspect /") == ["/broker/"]
    assert shell.complete("inspect /broker") == ["/broker/"]
    assert shell.complete("inspect /broker/") == ["/broker/sessions/", "/broker/towers/"]
    assert shell.complete("tree --depth 2 /broker/t") == ["/broker/towers/"]
    assert shell.complete("kill /broker/towers/") == [
        "/broker/towers/tower-1",
        "/broker/towers/tower-2",
    ]
    assert shell.complete("trace /broker/sessions/session:s") == [
        "/broker/sessions/session:s1",
        "/broker/sessions/session:s2",
    ]
    assert shell.complete("kill /broker/towers/tower-1 ") == []
    assert shell.complete("inspect /broker ") == []
    assert shell.complete("drain ") == ["tower-1", "tower-2"]
    assert shell.complete("drain tower-2") == ["tower-2"]
    assert shell.complete("provision ") == ["host-1", "host-2", "host-3", "host-4"]
    assert shell.complete("provision host-2 host-") == ["host-1", "host-3", "host-4"]
    assert shell.complete("cancel host-3") == ["host-3"]
    assert shell.complete("cancel host-3 ") == []
    assert shell.complete("scale ") == []
    assert shell.complete("jobs --") == ["--events", "--json"]
    assert shell.complete("help k") == ["kill"]
    assert shell.complete("ps --") == ["--json", "--limit", "--sort"]
    assert shell.complete("ps --sort ") == ["depth", "handled", "restarts"]
    assert shell.complete("ps --sort=h") == ["--sort=handled"]
    assert shell.complete("sessions --state c") == ["closed", "connected"]
    assert shell.complete("dance ") == []
    assert shell.complete('inspect "/bro') == []


def test_completion_among_many_actors_looks_at_a_bounded_few():
    # Each key cost a pass over every actor (17-65 ms at 50,000), and a client sending
    # Tabs kept the broker's thread for as long as it liked.
    paths = sorted([f"/broker/sessions/session:{number:05d}" for number in range(5000)]
                   + ["/broker", "/broker/sessions", "/broker/towers", "/broker/towers/tower-1"])
    assert sorted(_path_segments(paths, "/broker/")) == ["/broker/sessions/", "/broker/towers/"]
    many = _path_segments(paths, "/broker/sessions/session:0")
    assert len(many) == COMPLETION_PATHS + 1
    assert os.path.commonprefix(many) == "/broker/sessions/session:0"
    assert max(many) == "/broker/sessions/session:04999"
    assert _path_segments(paths, "/broker/sessions/session:04999") == [
        "/broker/sessions/session:04999"]


def test_ps_says_more_are_left_out_only_when_the_limit_left_them_out():
    assert _more(3, 5, limit=10) == ""  # two ended between the count and the snapshots
    assert _more(3, 7, limit=3) == "\n3 of 7 actors shown; --limit shows more"


async def test_completion_quotes_and_follows_the_role(autojump_clock, broker):
    gate = broker.gate
    towers = broker.ref("/broker/towers")
    assert isinstance(towers, SupervisorRef)
    await towers.start_child(ChildSpec("tower 3", lambda: Worker(gate)))
    shell = broker.shell(Role.READ_ONLY)
    assert shell.complete("inspect /broker/towers/tower ") == []
    assert shell.complete("inspect /broker/towers/tower") == [
        "'/broker/towers/tower 3'",
        "/broker/towers/tower-1",
        "/broker/towers/tower-2",
    ]
    assert "kill" not in shell.complete("")
    assert shell.complete("k") == []
    assert shell.complete("kill /broker/") == []
    assert shell.complete("provision ") == []
    assert shell.complete("help k") == ["kill"]
