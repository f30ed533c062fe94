"""Provisioning jobs on trio's virtual clock, with their steps stood in for; and the
shell conditions the steps run on a host, run by a local shell."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
import trio

from actors import (
    Actor,
    ActorRef,
    ActorSystem,
    ChildSpec,
    Supervisor,
    SupervisorFlags,
    SupervisorRef,
    open_system,
)
from broker import provisioning, remote
from broker.config import Settings
from broker.inventory import Host
from broker.issuer import Issuer
from broker.pki import CertificateAuthority, generate_key_and_csr
from broker.provisioning import (
    Cancel,
    Decommission,
    HostBoard,
    HostState,
    JobSteps,
    Provision,
    ProvisioningContext,
    StepFailed,
    _agent_running,
    _nginx_running,
    provisioning_specs,
)
from broker.site import TowerPaths

Plan = list[tuple[str, Callable[[], Awaitable[None]]]]


def tower_host() -> Host:
    return Host(name="tower-a", address="192.0.2.7", user="tower", trust_on_first_use=True)


@dataclass
class Jobs:
    system: ActorSystem
    board: HostBoard
    issuer: Issuer
    provisioning: ActorRef

    def job(self) -> ActorRef | None:
        return self.system.lookup("/broker/jobs/job:tower-a")


@pytest.fixture
def plan(monkeypatch) -> Callable[[Callable[[JobSteps], Plan]], None]:
    """Stand in for the steps of every job: ``plan(lambda steps: [(name, action)])``."""
    return lambda make: monkeypatch.setattr(JobSteps, "_plan", make)


@pytest.fixture
async def jobs(tmp_path, request) -> AsyncIterator[Jobs]:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    issuer = Issuer(ca, tmp_path / "ca", timedelta(hours=24))
    board = HostBoard((tower_host(),))
    settings = Settings(state_dir=tmp_path, **getattr(request, "param", {}))
    context = ProvisioningContext(settings, board, tmp_path / "id", tmp_path / "known_hosts",
                                  issuer, None)  # type: ignore[arg-type]
    async with open_system("broker", children=provisioning_specs(context),
                           flags=SupervisorFlags(intensity=100)) as system:
        provisioning_ref = system.lookup("/broker/provisioning")
        assert provisioning_ref is not None
        yield Jobs(system, board, issuer, provisioning_ref)


# Giving up.


@pytest.mark.parametrize("jobs", [
    {"provision_step_timeout": 60},
    # Each attempt takes longer than the restart window's share of its period.
    {"provision_step_timeout": 200},
], indirect=True)  # fmt: skip
async def test_a_host_failing_at_any_pace_is_failed_past_its_restarts(autojump_clock, jobs, plan):
    async def certificate() -> None:
        _key, csr = generate_key_and_csr("tower-a")
        jobs.issuer.sign(csr, "tower-a")

    plan(lambda steps: [("certificate", certificate), ("check-in", trio.sleep_forever)])
    assert (await jobs.provisioning.ask(Provision("tower-a"))).ok
    await trio.sleep(6 * 3600)
    record = jobs.board.get("tower-a")
    assert record.state is HostState.FAILED
    assert record.attempts == Settings().provision_restarts + 1
    assert record.error.startswith("gave up after 4 attempts; last: check-in: no progress")
    assert jobs.job() is None
    issued = jobs.issuer.records()
    assert len(issued) == 4 and all(certificate.revoked for certificate in issued)


async def test_a_host_provisioned_after_a_failed_attempt_keeps_one_valid_certificate(
    autojump_clock, jobs, plan
):
    attempts = 0

    async def certificate() -> None:
        _key, csr = generate_key_and_csr("tower-a")
        jobs.issuer.sign(csr, "tower-a")

    async def check_in() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise StepFailed("check-in: the tower did not answer")

    plan(lambda steps: [("certificate", certificate), ("check-in", check_in)])
    assert (await jobs.provisioning.ask(Provision("tower-a"))).ok
    await trio.sleep(600)
    assert jobs.board.get("tower-a").state is HostState.READY
    first, second = jobs.issuer.records()
    assert (first.revoked, second.revoked) == (True, False)
    assert jobs.issuer.newest("tower-a") == second


# A job that ends without saying how.


async def test_a_job_killed_from_the_shell_leaves_its_host_cancelled(autojump_clock, jobs, plan):
    plan(lambda steps: [("connect", trio.sleep_forever)])
    await jobs.provisioning.ask(Provision("tower-a"))
    await trio.sleep(1)
    job = jobs.job()
    assert job is not None
    job.kill("killed from the operators' shell")
    await trio.sleep(1)
    record = jobs.board.get("tower-a")
    assert record.state is HostState.CANCELLED
    assert record.error == "its job is gone (at connect)"


async def test_a_job_restarted_from_the_shell_keeps_its_host_provisioning(
    autojump_clock, jobs, plan
):
    plan(lambda steps: [("connect", trio.sleep_forever)])
    await jobs.provisioning.ask(Provision("tower-a"))
    await trio.sleep(1)
    job_supervisor = jobs.system.lookup("/broker/jobs")
    assert isinstance(job_supervisor, SupervisorRef)
    await job_supervisor.restart_child("job:tower-a")
    await trio.sleep(1)
    assert jobs.board.get("tower-a").state is HostState.PROVISIONING
    assert jobs.job() is not None


# Where towers go.


def test_two_hosts_cannot_put_their_towers_in_one_directory_of_one_machine():
    first, second = tower_host(), replace(tower_host(), name="tower-b", address="192.0.2.8")
    board = HostBoard((first, second))
    machine, other_machine = "ssh-ed25519 AAAAone", "ssh-ed25519 AAAAtwo"
    board.claim_site("tower-a", machine, "/home/tower/session-tower")
    board.claim_site("tower-a", machine, "/home/tower/session-tower")  # its own, again
    # The same machine by another address: the same directory, one inside it, around it.
    for root in ("/home/tower/session-tower", "/home/tower/session-tower/b", "/home/tower"):
        with pytest.raises(provisioning.SiteTaken, match="is tower-a's"):
            board.claim_site("tower-b", machine, root)
    assert board.get("tower-b").site is None
    board.claim_site("tower-b", machine, "/home/tower/session-tower-b")
    board.claim_site("tower-b", other_machine, "/home/tower/session-tower")


async def test_a_decommissioned_tower_s_directory_may_be_another_host_s(
    autojump_clock, jobs, plan
):
    jobs.board.set("tower-a", HostState.READY)

    def connect(steps: JobSteps) -> Plan:
        async def claim() -> None:
            jobs.board.claim_site("tower-a", "ssh-ed25519 AAAAone", "/home/tower/t")

        return [("connect", claim)]

    plan(connect)
    assert (await jobs.provisioning.ask(Decommission("tower-a"))).ok
    await trio.sleep(1)
    record = jobs.board.get("tower-a")
    assert record.state is HostState.FREE and record.site is None


# Commands cut off on the broker's side.


async def test_an_attempt_begins_once_the_last_one_s_commands_have_ended_on_the_host(
    autojump_clock, jobs, plan, monkeypatch
):
    """A job cancelled while a command of its ran on a host that does not answer: the
    host ends that command at the step's time, and the next job waits until then."""
    commands: list[tuple[float, int]] = []

    async def host_not_answering(function, *args):
        if getattr(function, "func", None) is remote.run:
            commands.append((trio.current_time(), function.keywords["within"]))
        await trio.sleep_forever()

    monkeypatch.setattr(provisioning, "call_asyncio", host_not_answering)

    def steps_running_a_command(steps: JobSteps) -> Plan:
        async def connect() -> None:
            steps.connection = object()  # type: ignore[assignment]
            await trio.sleep(10)
            await steps._run_remote("true")

        return [("connect", connect)]

    plan(steps_running_a_command)
    assert (await jobs.provisioning.ask(Provision("tower-a"))).ok
    await trio.sleep(20)
    cancelled_at = trio.current_time()
    assert (await jobs.provisioning.ask(Cancel("tower-a"))).ok
    await trio.sleep(5)
    assert (await jobs.provisioning.ask(Provision("tower-a"))).ok
    await trio.sleep(1)
    assert jobs.board.get("tower-a").step == "wait"
    await trio.sleep(120)
    (_, within), (second, _) = commands
    # What was left of the step's 60 s, from the cut-off (with a margin for a command
    # asked for just before it), then the host's grace between SIGTERM and SIGKILL.
    assert within == 50
    assert second == pytest.approx(
        cancelled_at + remote.CONNECT_TIMEOUT + within + remote.KILL_GRACE + 10)


async def test_a_command_after_its_step_s_time_is_up_is_not_run(autojump_clock, jobs, plan,
                                                                monkeypatch):
    run: list[object] = []

    async def host(function, *args):
        run.append(function)

    monkeypatch.setattr(provisioning, "call_asyncio", host)

    def late_step(steps: JobSteps) -> Plan:
        async def connect() -> None:
            steps.connection = object()  # type: ignore[assignment]
            with trio.CancelScope(shield=True):  # an operation that finished anyway
                await trio.sleep(70)
            await steps._run_remote("true")

        return [("connect", connect)]

    plan(late_step)
    assert (await jobs.provisioning.ask(Provision("tower-a"))).ok
    await trio.sleep(75)
    assert jobs.board.get("tower-a").error == "connect: no progress within 60 s"
    assert not [function for function in run if getattr(function, "func", None) is remote.run]


# Cancelling at hand-over.


async def test_a_job_waiting_to_retry_its_hand_over_can_be_cancelled(autojump_clock, jobs, plan):
    async def hand_over() -> None:
        raise StepFailed("hand-over: the link to tower-a failed for good")

    plan(lambda steps: [("hand-over", hand_over)])
    await jobs.provisioning.ask(Provision("tower-a"))
    await trio.sleep(5)  # the first attempt failed; the job waits 15 s to retry
    assert jobs.board.get("tower-a").step == "hand-over"
    assert (await jobs.provisioning.ask(Cancel("tower-a"))).ok
    await trio.sleep(1)
    assert jobs.board.get("tower-a").state is HostState.CANCELLED
    assert (await jobs.provisioning.ask(Decommission("tower-a"))).ok


async def test_a_tower_whose_job_ended_unfinished_stops_linking(autojump_clock, jobs, plan):
    # The towers supervisor of the serving tree, with the tower a hand-over started.
    root = jobs.system.lookup("/broker")
    assert isinstance(root, SupervisorRef)
    towers = await root.start_child(ChildSpec("towers", lambda: Supervisor((), SupervisorFlags())))
    assert towers.path == provisioning.TOWERS_PATH

    async def hand_over() -> None:
        with contextlib.suppress(ValueError):  # a retry: it is there already
            await towers.start_child(ChildSpec("tower:tower-a", Linking))
        raise StepFailed("hand-over: the link to tower-a failed for good")

    plan(lambda steps: [("hand-over", hand_over)])
    await jobs.provisioning.ask(Provision("tower-a"))
    await trio.sleep(5)  # the first attempt failed; the job waits 15 s to retry
    assert jobs.system.lookup("/broker/towers/tower:tower-a") is not None
    assert (await jobs.provisioning.ask(Cancel("tower-a"))).ok
    await trio.sleep(1)
    assert jobs.board.get("tower-a").state is HostState.CANCELLED
    assert jobs.system.lookup("/broker/towers/tower:tower-a") is None


async def test_a_decommission_cancelled_once_its_tower_is_unlinked_revokes_it(
    autojump_clock, jobs, plan
):
    # The tower no longer linked, its agent running on: its certificate must not link.
    _key, csr = generate_key_and_csr("tower-a")
    jobs.issuer.sign(csr, "tower-a")
    jobs.board.set("tower-a", HostState.READY)

    async def unlink() -> None:
        pass

    plan(lambda steps: [("unlink", unlink), ("connect", trio.sleep_forever)])
    assert (await jobs.provisioning.ask(Decommission("tower-a"))).ok
    await trio.sleep(1)
    assert (await jobs.provisioning.ask(Cancel("tower-a"))).ok
    await trio.sleep(1)
    assert jobs.board.get("tower-a").state is HostState.CANCELLED
    [record] = jobs.issuer.records()
    assert record.revoked


async def test_a_decommission_cancelled_before_its_tower_is_unlinked_keeps_it(
    autojump_clock, jobs, plan
):
    _key, csr = generate_key_and_csr("tower-a")
    jobs.issuer.sign(csr, "tower-a")
    jobs.board.set("tower-a", HostState.READY)
    plan(lambda steps: [("unlink", trio.sleep_forever)])
    assert (await jobs.provisioning.ask(Decommission("tower-a"))).ok
    await trio.sleep(1)
    assert (await jobs.provisioning.ask(Cancel("tower-a"))).ok
    await trio.sleep(1)
    [record] = jobs.issuer.records()
    assert not record.revoked


class SlowToStop(Actor):
    """A linked tower whose link takes a while to close."""

    async def finishing(self, exit) -> None:
        await trio.sleep(5)


async def test_a_decommission_cancelled_while_its_tower_is_unlinked_revokes_it(
    autojump_clock, tmp_path, plan
):
    # The unlink goes on once asked for: cut off before the revoke, it left the agent a
    # valid certificate to link again with.
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    issuer = Issuer(ca, tmp_path / "ca", timedelta(hours=24))
    board = HostBoard((tower_host(),))
    context = ProvisioningContext(Settings(state_dir=tmp_path), board, tmp_path / "id",
                                  tmp_path / "known_hosts", issuer, None)  # type: ignore[arg-type]
    _key, csr = generate_key_and_csr("tower-a")
    issuer.sign(csr, "tower-a")
    board.set("tower-a", HostState.READY)
    plan(lambda steps: [("unlink", steps._unlink), ("connect", trio.sleep_forever)])
    towers = ChildSpec("towers", lambda: Supervisor([ChildSpec("tower:tower-a", SlowToStop)],
                                                    SupervisorFlags()))
    async with open_system("broker", children=[towers, *provisioning_specs(context)],
                           flags=SupervisorFlags(intensity=100)) as system:
        provisioning_ref = system.lookup("/broker/provisioning")
        assert (await provisioning_ref.ask(Decommission("tower-a"))).ok
        await trio.sleep(1)
        assert board.get("tower-a").step == "unlink"
        assert (await provisioning_ref.ask(Cancel("tower-a"))).ok
        await trio.sleep(10)
        assert system.lookup("/broker/towers/tower:tower-a") is None
        [record] = issuer.records()
        assert record.revoked


class Linking(Actor):
    """Stands in for a remote tower that keeps trying to link."""


async def test_a_job_handing_over_cannot_be_cancelled(autojump_clock, jobs, plan):
    plan(lambda steps: [("hand-over", trio.sleep_forever)])
    await jobs.provisioning.ask(Provision("tower-a"))
    await trio.sleep(5)
    answer = await jobs.provisioning.ask(Cancel("tower-a"))
    assert not answer.ok and "decommission it instead" in answer.text
    assert jobs.board.get("tower-a").state is HostState.PROVISIONING


# The shell the steps run on the host.


def holds(condition: str) -> bool:
    return subprocess.run(["sh", "-c", condition]).returncode == 0


def stop_script(tmp_path: Path, monkeypatch) -> str:
    """The decommission's stop step, as it is sent to the host."""
    monkeypatch.setattr(provisioning, "STOP_POLLS", 2)
    host = Host(name="tower-a", address="192.0.2.7", user="tower", trust_on_first_use=True,
                nginx="/usr/sbin/nginx")
    context = ProvisioningContext(Settings(state_dir=tmp_path), HostBoard((host,)),
                                  tmp_path / "id", tmp_path / "known_hosts",
                                  None, None)  # type: ignore[arg-type]
    steps = JobSteps(host, "decommission", context, None)  # type: ignore[arg-type]
    steps.paths = TowerPaths(str(tmp_path / "home" / "session-tower"))
    sent: list[str] = []

    async def run_remote(command: str) -> str:
        sent.append(command)
        return ""

    steps._run_remote = run_remote  # type: ignore[method-assign]
    trio.run(steps._stop_tower)
    [script] = sent
    return script


def test_an_agent_runs_while_it_holds_the_tower_s_lock(tmp_path):
    paths = TowerPaths(str(tmp_path / "session-tower"))
    assert not holds(_agent_running(paths))  # no tower's directory at all
    os.makedirs(paths.root)
    assert not holds(_agent_running(paths))
    lock = f"{paths.root}/agent.lock"
    # The lock is held by flock itself (-o) until the command ends: its input closes.
    with subprocess.Popen(["flock", "-o", lock, "sh", "-c", "echo locked; read line"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as agent:
        assert agent.stdout is not None and agent.stdout.readline() == "locked\n"
        assert holds(_agent_running(paths))


def test_the_stop_step_runs_again_once_the_tower_s_directory_is_gone(tmp_path, monkeypatch):
    script = stop_script(tmp_path, monkeypatch)
    root = tmp_path / "home" / "session-tower"
    (root / "tls").mkdir(parents=True)
    first = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert not root.exists()
    # Its answer lost (the SSH connection dropped), the step is run again.
    again = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr


def test_a_running_nginx_is_found_after_its_binary_was_upgraded(tmp_path):
    binary = tmp_path / "nginx"
    shutil.copy("/bin/sh", binary)
    paths = TowerPaths(str(tmp_path / "session-tower"))
    os.makedirs(paths.nginx)
    host = Host(name="tower-a", address="192.0.2.7", user="tower", trust_on_first_use=True,
                nginx=str(binary))
    # Stands for the master: its command line has this tower's configuration.
    master = subprocess.Popen([str(binary), "-c", "read line", "nginx",
                               "-c", f"{paths.nginx}/nginx.conf"], stdin=subprocess.PIPE)
    try:
        Path(f"{paths.nginx}/nginx.pid").write_text(f"{master.pid}\n")
        assert holds(_nginx_running(host, paths))
        # A package upgrade renames the new binary over the old one.
        shutil.copy("/bin/sh", f"{binary}.dpkg-new")
        os.replace(f"{binary}.dpkg-new", binary)
        assert holds(_nginx_running(host, paths))
        # Another program under the pid is not this tower's NGINX.
        assert not holds(_nginx_running(replace(host, nginx="/bin/true"), paths))
    finally:
        master.kill()
        master.wait()
