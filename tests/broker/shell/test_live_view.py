"""``LiveView``'s provisioning side over a real host board and a real actor tree.

The tree has the paths the broker's has: ``/broker/jobs`` with a job whose ``steps``
crash and wait out a backoff, and stand-ins for ``/broker/provisioning`` (answers
``Answer``s as scripted) and ``/broker/scaler`` (answers a line). The shell run over the
view shows what the board and the snapshots hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from typing import Any

import pytest
import trio

from actors import (
    Actor,
    ActorSystem,
    Backoff,
    ChildSpec,
    Supervisor,
    SupervisorFlags,
    open_system,
)
from broker.inventory import Host
from broker.provisioning import Answer, Cancel, HostBoard, HostState, Provision
from broker.scaling import ScaleTo
from broker.sessions import Describe, session_name
from broker.shell.commands import HostView, Role, Shell, Status
from broker.shell.server import LiveView
from broker.link import TowerHello, TowerLoadReport
from broker.towers import TowerConnection, TowerDirectory

from ..test_sessions import RecordingSocket

EPOCH = 1_700_000_000.0
BACKOFF = 30.0


class Steps(Actor):
    """A job's steps: crash when told to."""

    async def receive(self, message: Any) -> None:
        raise RuntimeError(f"step failed: {message}")


class Provisioning(Actor):
    """Answers as scripted (ok unless ``refusals`` names the host); crashes on "crash"."""

    def __init__(self, asked: list[Any], refusals: dict[str, str]) -> None:
        self.asked = asked
        self.refusals = refusals

    async def receive(self, message: Any) -> Answer:
        self.asked.append(message)
        if message.host == "crash":
            raise RuntimeError("provisioning crashed")
        if message.host in self.refusals:
            return Answer(False, self.refusals[message.host])
        verb = "provision" if isinstance(message, Provision) else "cancel"
        return Answer(True, f"{verb} {message.host}: done")


class Scaler(Actor):
    def __init__(self, asked: list[Any]) -> None:
        self.asked = asked

    async def receive(self, message: Any) -> Answer:
        self.asked.append(message)
        return Answer(True, f"scaling to {message.count} towers")


def host(name: str, address: str, port: int = 22) -> Host:
    return Host(name, address, "tower", host_key="ssh-ed25519 AAAA", ssh_port=port)


@dataclass
class Live:
    system: ActorSystem
    board: HostBoard
    view: LiveView
    asked: list[Any]
    refusals: dict[str, str]


def job_spec(name: str) -> ChildSpec:
    flags = SupervisorFlags(intensity=5, period=60, backoff=Backoff(BACKOFF, BACKOFF, jitter=0))
    return ChildSpec(f"job:{name}", lambda: Supervisor([ChildSpec("steps", Steps)], flags))


@pytest.fixture
async def live():
    board = HostBoard((
        host("host-1", "10.0.0.1"),
        host("host-2", "10.0.0.2", 2222),
        host("host-3", "fd00::3"),
        host("host-4", "10.0.0.4"),
    ))  # fmt: skip
    asked: list[Any] = []
    refusals: dict[str, str] = {}
    children = [
        ChildSpec("jobs", lambda: Supervisor([job_spec("host-2")], SupervisorFlags())),
        ChildSpec("provisioning", lambda: Provisioning(asked, refusals)),
        ChildSpec("scaler", lambda: Scaler(asked)),
    ]
    async with open_system("broker", children=children) as system:
        view = LiveView(system, TowerDirectory(stale_after=3.0), board)
        yield Live(system, board, view, asked, refusals)


def stand(board: HostBoard) -> None:
    """host-1 ready, host-2 provisioning (its steps failed at nginx), host-3 failed."""
    ready = board.get("host-1")
    ready.plan, ready.step, ready.attempts, ready.provisioned_in = "provision", "done", 1, 41.5
    board.set("host-1", HostState.READY)
    restarting = board.get("host-2")
    restarting.plan, restarting.step, restarting.attempts = "provision", "nginx", 2
    board.set("host-2", HostState.PROVISIONING)
    restarting.error = "nginx: the configuration does not load"
    failed = board.get("host-3")
    failed.plan, failed.step, failed.attempts = "provision", "connect", 1
    board.set("host-3", HostState.FAILED, "connect: host key refused")


async def test_hosts_read_the_board_and_the_job_backoff(autojump_clock, live):
    stand(live.board)
    assert live.view.has_inventory()
    assert live.view.hosts()[1].restart_in is None
    steps = live.system.lookup("/broker/jobs/job:host-2/steps")
    assert steps is not None
    await steps.tell("nginx")
    await trio.sleep(1)
    assert live.view.hosts() == [
        HostView("host-1", "10.0.0.1:22", "ready", "provision", "done", 1, "", None, 41.5),
        HostView("host-2", "10.0.0.2:2222", "provisioning", "provision", "nginx", 2,
                 "nginx: the configuration does not load", pytest.approx(BACKOFF - 1), None),
        HostView("host-3", "[fd00::3]:22", "failed", "provision", "connect", 1,
                 "connect: host key refused", None, None),
        HostView("host-4", "10.0.0.4:22", "free", "", "", 0, "", None, None),
    ]  # fmt: skip
    shell = Shell(live.view, Role.READ_ONLY, clock=lambda: EPOCH + trio.current_time())
    table = (await shell.run("jobs --events 0")).text.splitlines()
    assert table[2].split()[5:8] == ["2", "in", "29.0s"]
    await trio.sleep(BACKOFF)
    assert live.view.hosts()[1].restart_in is None


async def test_events_are_the_boards_oldest_first(autojump_clock, live):
    live.board.event("scale: provision host-4 (0 towers, fewer than 1)")
    await trio.sleep(2)
    live.board.set("host-4", HostState.PROVISIONING)
    [(first, first_text), (second, second_text)] = live.view.events()
    assert first.tzinfo is UTC and first <= second
    assert (first_text, second_text) == (
        "scale: provision host-4 (0 towers, fewer than 1)",
        "host-4: provisioning",
    )


async def test_completion_outside_trio_gets_the_hosts_as_of_the_prompt(autojump_clock, live):
    live.view.refresh()
    live.board.records.pop("host-4")
    outside = await trio.to_thread.run_sync(live.view.hosts)
    assert [view.name for view in outside] == ["host-1", "host-2", "host-3", "host-4"]
    assert [view.name for view in live.view.hosts()] == ["host-1", "host-2", "host-3"]


async def test_requests_go_to_provisioning_and_the_scaler(autojump_clock, live):
    view = live.view
    assert await view.provision("host-4") == "provision host-4: done"
    assert await view.cancel("host-2") == "cancel host-2: done"
    assert await view.scale(3) == "scaling to 3 towers"
    assert live.asked == [Provision("host-4"), Cancel("host-2"), ScaleTo(3)]
    live.refusals["host-1"] = "host-1 is ready"
    with pytest.raises(ValueError, match="^host-1 is ready$"):
        await view.provision("host-1")
    with pytest.raises(LookupError, match="no host host-9 in the inventory"):
        await view.cancel("host-9")
    assert Cancel("host-9") not in live.asked


async def test_an_actor_that_cannot_answer_is_an_error_not_a_crash(autojump_clock, live):
    live.board.records["crash"] = live.board.records["host-4"]
    with pytest.raises(ValueError, match="^/broker/provisioning did not answer: "):
        await live.view.provision("crash")
    root = live.system.root
    await root.terminate_child("scaler")
    with pytest.raises(ValueError, match="^/broker/scaler is not running$"):
        await live.view.scale(2)
    shell = Shell(live.view, Role.ADMIN)
    output = await shell.run("scale 2")
    assert (output.text, output.status) == (
        "cannot scale to 2: /broker/scaler is not running\n",
        Status.ERROR,
    )


async def test_an_empty_inventory(autojump_clock, live):
    view = LiveView(live.system, TowerDirectory(stale_after=3.0), HostBoard(()))
    assert not view.has_inventory() and view.hosts() == []
    output = await Shell(view, Role.ADMIN).run("jobs")
    assert output.status == Status.ERROR
    assert output.text == "not available: this broker has no host inventory\n"


class DescribedSession(Actor):
    """Describes itself after ``delay`` seconds, as a busy session answers late."""

    def __init__(self, session_id: str, delay: float) -> None:
        self.session_id = session_id
        self.delay = delay

    async def receive(self, message: Any) -> dict[str, Any]:
        assert isinstance(message, Describe)
        await trio.sleep(self.delay)
        return {"id": self.session_id, "state": "connected", "tower": "tower-1",
                "negotiation": 1, "placements": 1, "reason": "", "age": 7.0}


async def test_sessions_are_asked_at_once_and_a_busy_one_is_shown_not_left_out(
    autojump_clock,
):
    delays = {"quick": 0.0, **{f"slow-{n}": 0.5 for n in range(100)}, "busy": 60.0}
    children = [
        ChildSpec(session_name(name), lambda name=name, delay=delay: DescribedSession(name, delay))
        for name, delay in delays.items()
    ]
    sessions = ChildSpec("sessions", lambda: Supervisor(children, SupervisorFlags()))
    async with open_system("broker", children=[sessions]) as system:
        view = LiveView(system, TowerDirectory(stale_after=3.0), HostBoard(()))
        began = trio.current_time()
        views = {view.id: view for view in await view.sessions()}
        # 100 sessions taking half a second each, 64 at a time: a second or two on
        # trio's virtual clock, not 50 one after the other.
        assert trio.current_time() - began <= 2.0
        assert len(views) == 102
        assert views["quick"].state == "connected"
        busy = views["busy"]
        assert (busy.state, busy.reason) == ("unanswered", "did not answer: AskTimeout")
        output = await Shell(view, Role.ADMIN).run("stats")
        assert "sessions   102: 101 connected, 1 unanswered" in output.text
        listed = await Shell(view, Role.ADMIN).run("sessions --state unanswered")
        assert listed.status == Status.OK and "did not answer" in listed.text


async def test_the_root_is_neither_killed_nor_restarted_from_the_shell(autojump_clock, live):
    shell = Shell(live.view, Role.ADMIN)
    for command, verb in (("kill /broker", "kill"), ("restart /broker", "restart")):
        output = await shell.run(command)
        assert output.status == Status.ERROR
        assert output.text == f"cannot {verb} /broker: it has no supervisor\n"
    assert live.system.lookup("/broker/scaler") is not None


async def test_the_shell_is_neither_killed_nor_restarted_from_itself(autojump_clock, live):
    # Every operator's session ended with it, the one that asked included, without a word.
    view = LiveView(live.system, TowerDirectory(stale_after=3.0), HostBoard(()),
                    shell="/broker/scaler")
    shell = Shell(view, Role.ADMIN)
    for command, verb in (("kill /broker/scaler", "kill"), ("restart /broker/scaler/", "restart")):
        output = await shell.run(command)
        assert output.status == Status.ERROR
        assert output.text.startswith(f"cannot {verb} /broker/scaler")
        assert output.text.endswith(": it is the shell itself: every operator's session, "
                                    "this one too, would end with it\n")
    assert live.system.lookup("/broker/scaler").snapshot().restarts == 0


class SlowToStop(Actor):
    async def stopping(self, exit: Any) -> None:
        await trio.sleep(30)


async def test_a_restart_still_going_after_its_deadline_is_said(autojump_clock, live):
    await live.system.root.start_child(ChildSpec("slow", SlowToStop, shutdown=60))
    output = await Shell(live.view, Role.ADMIN).run("restart /broker/slow")
    assert (output.text, output.status) == (
        "/broker/slow is still restarting after 10 s; its supervisor goes on with it\n",
        Status.ERROR,
    )


async def test_undrain_undoes_a_drain_not_a_decommission(autojump_clock, live):
    directory = live.view.towers_directory
    hello = TowerHello("host-1", 100, "test")
    directory.connected(TowerConnection("host-1", RecordingSocket(), hello))
    directory.report("host-1", TowerLoadReport(0, 100))
    stand(live.board)
    shell = Shell(live.view, Role.ADMIN)
    await shell.run("drain host-1")
    live.board.set("host-1", HostState.DRAINING)  # as the scaler's drain does
    assert [tower.state for tower in live.view.towers()] == ["draining"]
    output = await shell.run("undrain host-1")
    assert output.text == "undrained host-1: it takes new sessions again\n"
    assert [tower.state for tower in live.view.towers()] == ["ready"]
    assert live.board.get("host-1").state is HostState.READY
    live.board.set("host-1", HostState.DECOMMISSIONING)
    refused = await shell.run("undrain host-1")
    assert (refused.text, refused.status) == (
        "cannot undrain host-1: its host is decommissioning\n", Status.ERROR
    )
    assert (await shell.run("undrain host-9")).text == "no tower named host-9\n"
