"""Provisioning: inventory hosts become linked towers over SSH, each job an actor.

    /broker/jobs                one_for_one; a job:<host> per running job
    └── job:<host>              Job: supervises its steps; restarts them with backoff
        └── steps               JobSteps (transient): the plan's steps, in order
    /broker/provisioning        Provisioning: starts and cancels jobs (scaler, shell)

A provisioning plan takes a host from the inventory to a linked tower:

1. ``connect``: SSH with the broker's key; the host key must be the pinned one.
2. ``prepare``: the tower's directory (0700); NGINX and the tower software are there.
   For the root user, also NGINX's worker user and its socket directory (``site``).
3. ``certificate``: the host makes its key and request (``broker tower csr``); the
   broker checks the request names this tower, signs it, and uploads the certificate,
   the CA and the agent's settings (0600).
4. ``nginx``: the tower's NGINX configuration is tested, then NGINX is started or
   reloaded.
5. ``agent``: the agent is started detached (a second start finds it running).
6. ``check-in``: the broker links to the tower through NGINX over mutual TLS and gets
   its hello.
7. ``hand-over``: the tower joins the towers supervisor and takes sessions.

A decommission plan does the reverse for a drained tower: the certificates are revoked
and the link dropped (in that order: a cancel cannot land in between), the agent and
NGINX stopped, the tower's directory removed (site, credentials, the agent's log).

Every step is idempotent and has a deadline (``provision_step_timeout``); a failed step
crashes the steps actor and its job restarts it (all steps again) with exponential
backoff spread over ``provision_restart_period`` (the first wait a 40th of it, each next
twice as long: 15, 30, 60 s by default), so that a host rebooting under a ready tower
is provisioned again once it is back. A command on the host ends there with its step's
time (``remote.run``) even when the broker's side is gone, and an attempt begins only
once every command of the one before has ended. Past ``provision_restarts`` restarts,
however long each attempt took, the host is marked failed with the reason. A host key that
is not the pinned one fails the host at once: retrying cannot fix it. Each attempt's
certificate revokes those of the attempts before it, and a provisioning that does not
finish revokes the tower's certificates. Jobs are independent: one
failing, hanging or cancelled job does nothing to another, or to the towers already
linked.

``HostBoard`` is where each host stands (free, provisioning, ready, draining,
decommissioning, failed, cancelled), with the current step, attempts, last error and the
events of provisioning and scaling; the operators' shell shows it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import trio

from actors import (
    Actor,
    ActorError,
    ActorRef,
    Backoff,
    ActorState,
    ActorStopped,
    ChildSpec,
    Down,
    Exit,
    MailboxFull,
    Restart,
    Supervisor,
    SupervisorFlags,
    SupervisorRef,
)
from actors.bridge import call_asyncio

from . import remote
from .config import Settings
from .inventory import Host, nested
from .issuer import Issuer
from .pki import CertificateError
from .site import (
    LOGIN_QUERY,
    TowerPaths,
    agent_settings,
    nginx_command,
    nginx_configuration,
    parse_login,
    prepare_directories,
    quote,
    tower_paths,
)
from .towers import (
    LinkContext,
    RemoteTower,
    TowerLinkLost,
    is_ip_address,
    probe_tower,
    remote_tower_spec,
)

logger = logging.getLogger(__name__)

CHECK_IN_RETRY = 0.5
HAND_OVER_POLL = 0.05
# A stopping agent or NGINX has this many 0.1 s polls before it is killed.
STOP_POLLS = 100
MAX_SOCKET_PATH = 107
# Where the serving tree keeps its towers (``broker.serve``), whose children jobs hand
# their towers to.
TOWERS_PATH = "/broker/towers"
EVENTS_KEPT = 200
# The agent has this long to create its socket once started, within the step's deadline.
AGENT_START_POLLS = 300  # of 0.1 s


class HostState(Enum):
    FREE = "free"
    PROVISIONING = "provisioning"
    READY = "ready"
    DRAINING = "draining"
    DECOMMISSIONING = "decommissioning"
    FAILED = "failed"
    CANCELLED = "cancelled"


_WORKING = (HostState.PROVISIONING, HostState.DECOMMISSIONING)
_TOO_LATE_TO_CANCEL = ("hand-over", "done")
# A decommission's steps once its tower is unlinked (see ``JobSteps._plan``).
_AFTER_UNLINK = ("connect", "stop")


@dataclass
class HostRecord:
    host: Host
    state: HostState = HostState.FREE
    plan: str = ""
    step: str = ""
    attempts: int = 0
    error: str = ""
    # Seconds from the job's start to the tower's hand-over, when it last provisioned.
    provisioned_in: float | None = None
    job_started_at: float | None = None
    # Seconds each step of the last attempt took.
    step_seconds: dict[str, float] = field(default_factory=dict)
    # When every command an attempt cut off has ended on the host at the latest (on
    # trio's clock): the next attempt waits for it.
    scripts_end_by: float = -math.inf
    # Where its tower's directory is, once its job has connected: the machine (the key
    # its SSH server showed) and the directory's absolute path there.
    site: tuple[str, str] | None = None


@dataclass(frozen=True)
class Event:
    at: datetime
    text: str


class HostBoard:
    """Every inventory host and where it stands, and the events of provisioning and
    scaling (the last ``EVENTS_KEPT``)."""

    def __init__(self, hosts: tuple[Host, ...]) -> None:
        self.records = {host.name: HostRecord(host) for host in hosts}
        self.events: deque[Event] = deque(maxlen=EVENTS_KEPT)

    def get(self, name: str) -> HostRecord:
        """Raises LookupError when ``name`` is not in the inventory."""
        record = self.records.get(name)
        if record is None:
            raise LookupError(f"no host {name} in the inventory")
        return record

    def set(self, name: str, state: HostState, error: str = "") -> None:
        record = self.get(name)
        record.state = state
        record.error = error
        self.event(f"{name}: {state.value}" + (f" ({error})" if error else ""))

    def event(self, text: str) -> None:
        logger.info("%s", text)
        self.events.append(Event(datetime.now(timezone.utc), text))

    def in_state(self, *states: HostState) -> list[str]:
        return [name for name, record in self.records.items() if record.state in states]

    def claim_site(self, name: str, host_key: str, root: str) -> None:
        """Record that ``name``'s tower directory is ``root`` on the machine whose SSH
        server shows ``host_key``.

        Raises:
            SiteTaken: another host's tower is there, or in or around it. The inventory
                checks what it can from names alone; this is what it cannot: one machine
                under two addresses, or one directory written as an absolute path and as
                one relative to the home.
        """
        for other, record in self.records.items():
            if other != name and record.site is not None and record.site[0] == host_key \
                    and nested(record.site[1], root):
                raise SiteTaken(f"its tower's directory {root} is {other}'s ({record.site[1]}),"
                                " or in or around it, on the same machine (the same host "
                                "key): give one of them another root")
        self.get(name).site = (host_key, root)


class SiteTaken(Exception):
    """Two inventory hosts would put their towers in one directory of one machine."""


@dataclass(frozen=True)
class ProvisioningContext:
    """What every job uses: the broker's SSH identity and pinned keys, the issuer, and
    the tower links' context."""

    settings: Settings
    board: HostBoard
    identity: Path
    known_hosts: Path
    issuer: Issuer
    links: LinkContext


# What the provisioning supervisor is asked; each answer is a one-line result.


@dataclass(frozen=True)
class Provision:
    host: str


@dataclass(frozen=True)
class Decommission:
    host: str


@dataclass(frozen=True)
class Cancel:
    host: str


@dataclass(frozen=True)
class Repair:
    """A provisioned tower's link failed for good: provision its host again."""

    host: str
    reason: str


@dataclass(frozen=True)
class Answer:
    ok: bool
    text: str


@dataclass(frozen=True)
class _JobDone:
    pass


@dataclass(frozen=True)
class _CancelJob:
    pass


@dataclass(frozen=True)
class _Unfinished:
    """A provisioning job ended without its host ready (its certificates revoked)."""

    host: str


class Provisioning(Actor):
    """Starts and cancels jobs (children of the ``jobs`` supervisor), one per host."""

    def __init__(self, context: ProvisioningContext) -> None:
        self.context = context
        self.board = context.board

    async def started(self) -> None:
        jobs = self.system.lookup(f"{self.path.rsplit('/', 1)[0]}/jobs")
        assert isinstance(jobs, SupervisorRef)
        self.jobs = jobs

    async def receive(self, message: Any) -> Answer | None:
        if isinstance(message, (Provision, Decommission)):
            return await self._start(message)
        if isinstance(message, Cancel):
            return await self._cancel(message.host)
        if isinstance(message, Repair):
            return await self._repair(message)
        if isinstance(message, Down):
            # A job ended for good; one killed from the shell left its host working.
            with contextlib.suppress(LookupError):  # a host no longer in the inventory
                self._forget_lost_job(self.board.get(message.ref.path.rsplit("/job:", 1)[1]))
            return None
        if isinstance(message, _Unfinished):
            await self._unlink(message.host)
            return None
        raise TypeError(f"provisioning does not take {type(message).__name__}")

    async def _repair(self, message: Repair) -> Answer:
        record = self.board.get(message.host)
        if record.state is not HostState.READY:
            return Answer(False, f"{message.host} is {record.state.value}")
        if self._revoked(message.host):
            # Its link fails because it was revoked: only an operator re-admits it.
            self.board.set(message.host, HostState.FAILED, "its certificate was revoked; "
                           "'provision' it to admit it again with a new key")
            return Answer(False, f"{message.host} was revoked")
        self.board.set(message.host, HostState.FREE,
                       f"its link failed for good ({message.reason}); provisioning it again")
        return await self._start(Provision(message.host))

    def _revoked(self, host: str) -> bool:
        # Its newest certificate only: one provisioned again after a decommission has
        # a new one, while those revoked then stay in the ledger until they expire.
        newest = self.context.issuer.newest(host)
        return newest is not None and newest.revoked

    def _job(self, host: str) -> ActorRef | None:
        return self.system.lookup(f"{self.jobs.path}/job:{host}")

    def _forget_lost_job(self, record: HostRecord) -> None:
        """A host whose job is gone without finishing (killed from the shell, say) is
        no longer being worked on."""
        if record.state in _WORKING and self._job(record.host.name) is None:
            self.board.set(record.host.name, HostState.CANCELLED,
                           f"its job is gone (at {record.step or 'start'})")

    async def _unlink(self, host: str) -> None:
        """A provisioning that ended unfinished (cancelled, or failed while its hand-over
        waited to be retried) had its certificates revoked: the tower its hand-over
        started stops trying to link with them."""
        towers = self.system.lookup(TOWERS_PATH)
        if isinstance(towers, SupervisorRef):
            with contextlib.suppress(LookupError):  # never handed over
                await towers.terminate_child(f"tower:{host}")

    async def _start(self, request: Provision | Decommission) -> Answer:
        try:
            record = self.board.get(request.host)
        except LookupError as error:
            return Answer(False, str(error))
        self._forget_lost_job(record)
        provision = isinstance(request, Provision)
        allowed = (
            (HostState.FREE, HostState.FAILED, HostState.CANCELLED) if provision
            else (HostState.DRAINING, HostState.READY, HostState.FAILED, HostState.CANCELLED)
        )  # fmt: skip
        if record.state not in allowed:
            return Answer(False, f"{request.host} is {record.state.value}")
        plan = "provision" if provision else "decommission"
        host, context = record.host, self.context
        name = f"job:{host.name}"
        # The host's last job may be on its way out (cancelled, failed, done).
        with contextlib.suppress(LookupError):
            await self.jobs.terminate_child(name)
        record.plan, record.attempts, record.step = plan, 0, ""
        record.job_started_at = trio.current_time()
        state = HostState.PROVISIONING if provision else HostState.DECOMMISSIONING
        self.board.set(request.host, state)
        spec = ChildSpec(name, lambda: Job(host, plan, context), Restart.TEMPORARY)
        try:
            job = await self.jobs.start_child(spec)
        except ActorError as error:
            self.board.set(host.name, HostState.FAILED, f"the job did not start: {error}")
            return Answer(False, f"{plan} {host.name}: the job did not start")
        self.monitor(job)
        return Answer(True, f"{plan} {host.name}: started")

    async def _cancel(self, name: str) -> Answer:
        record = self.board.records.get(name)
        if record is not None:
            self._forget_lost_job(record)
        job = self._job(name)
        if job is None or record is None or record.state not in _WORKING:
            return Answer(False, f"no job runs for {name}")
        if _joining(record, self.system.lookup(f"{job.path}/steps")):
            return Answer(False, f"{name} is joining the towers; decommission it instead")
        job.tell_nowait(_CancelJob())
        return Answer(True, f"{name}: cancelling")


class Job(Supervisor):
    """One host's job: runs its steps, restarting them with backoff until they succeed or
    ``provision_restarts`` retries have failed too (the host is then failed with the
    reason)."""

    def __init__(self, host: Host, plan: str, context: ProvisioningContext) -> None:
        settings = context.settings
        period = settings.provision_restart_period
        flags = SupervisorFlags(
            intensity=settings.provision_restarts,
            period=period,
            backoff=Backoff(initial=period / 40, maximum=period / 5, reset_after=period),
        )
        super().__init__([ChildSpec("steps", self._steps, Restart.TRANSIENT)], flags)
        self.host = host
        self.plan = plan
        self.context = context

    def _steps(self) -> JobSteps:
        return JobSteps(self.host, self.plan, self.context, self.ref)

    async def receive(self, message: Any) -> None:
        if isinstance(message, _CancelJob):
            record = self.context.board.get(self.host.name)
            if _joining(record, self.system.lookup(f"{self.path}/steps")):
                # The tower joined while the request was on its way: it stays.
                self.context.board.event(f"{self.host.name}: too late to cancel, it joined")
                return
            if record.state in _WORKING:  # not finished in the meantime
                self.context.board.set(self.host.name, HostState.CANCELLED,
                                       f"cancelled at {record.step or 'start'}")
            self.stop()
        elif isinstance(message, _JobDone):
            self.stop()

    def release(self, exit: Exit) -> None:
        # A provisioning that did not finish (failed, cancelled, killed, cut short) leaves
        # the tower no valid certificate: each attempt may have had one issued. So does
        # a decommission stopped once its tower was unlinked: the agent may run on.
        name, board = self.host.name, self.context.board
        record = board.get(name)
        if self.plan == "provision":
            if record.state is HostState.READY:
                return
            provisioning = _provisioning_of(self)
            if provisioning is not None:
                with contextlib.suppress(ActorStopped, MailboxFull):  # the broker stopping
                    provisioning.tell_nowait(_Unfinished(name))
        elif record.state is HostState.FREE or record.step not in _AFTER_UNLINK:
            return
        try:
            revoked = self.context.issuer.revoke(name)
        except (OSError, CertificateError) as error:
            board.event(f"{name}: its certificates could not be revoked: {error}")
            return
        if revoked:
            job = "provisioning" if self.plan == "provision" else "decommission"
            board.event(f"{name}: revoked {len(revoked)} certificate(s): its {job} "
                        "did not finish")

    async def escalate(self, child: str, exit: Exit) -> bool:
        _give_up(self.context.board, self.host.name)
        self.stop()
        return False


def _provisioning_of(actor: Actor) -> ActorRef | None:
    """The ``provisioning`` actor beside the ``jobs`` supervisor a job's actor is under."""
    return actor.system.lookup(f"{actor.path.split('/jobs/')[0]}/provisioning")


def _give_up(board: HostBoard, name: str) -> None:
    record = board.get(name)
    board.set(name, HostState.FAILED,
              f"gave up after {record.attempts} attempts; last: {record.error}")


def _joining(record: HostRecord, steps: ActorRef | None) -> bool:
    """Whether the host's tower joins the towers (or joined): too late to cancel its job.
    A hand-over that failed and waits for its retry does not."""
    waiting = steps is not None and steps.snapshot().state is ActorState.RESTARTING
    return record.step in _TOO_LATE_TO_CANCEL and not waiting


class StepFailed(Exception):
    """A step of a job failed; the message names the step and says why."""


class JobSteps(Actor):
    """The steps of one attempt, in order; the first failure crashes this actor."""

    runs_tasks = True

    def __init__(
        self, host: Host, plan: str, context: ProvisioningContext, job: ActorRef
    ) -> None:
        self.host = host
        self.plan = plan
        self.context = context
        self.settings = context.settings
        self.board = context.board
        self.job = job
        self.connection: remote.HostConnection | None = None
        self.paths: TowerPaths | None = None
        # What a step is waiting for, told when its deadline passes.
        self.waiting_for = ""
        self.agent_found_running = False

    async def started(self) -> None:
        self.start_soon(self._run)

    def _plan(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        if self.plan == "provision":
            return [
                ("connect", self._connect),
                ("prepare", self._prepare),
                ("certificate", self._certificate),
                ("nginx", self._nginx),
                ("agent", self._agent),
                ("check-in", self._check_in),
                ("hand-over", self._hand_over),
            ]
        # Revoked first: a host that cannot be reached keeps no valid certificate.
        return [
            ("unlink", self._unlink),
            ("connect", self._connect),
            ("stop", self._stop_tower),
        ]

    async def _run(self) -> None:
        name = self.host.name
        record = self.board.get(name)
        record.attempts += 1
        record.step_seconds = {}
        failure: StepFailed | None = None
        try:
            for step, action in self._plan():
                if step == "connect":
                    await self._after_earlier_commands(record)
                record.step = step
                self.waiting_for = ""
                began = trio.current_time()
                with trio.move_on_after(self.settings.provision_step_timeout) as deadline:
                    await action()
                record.step_seconds[step] = trio.current_time() - began
                if deadline.cancelled_caught:
                    waiting = f" (waiting for: {self.waiting_for})" if self.waiting_for else ""
                    raise StepFailed(f"{step}: no progress within "
                                     f"{self.settings.provision_step_timeout:g} s{waiting}")
        except (remote.HostKeyRefused, SiteTaken) as error:  # retrying cannot help
            self.board.set(name, HostState.FAILED, f"{record.step}: {error}")
            self.job.tell_nowait(_JobDone())
            return
        except StepFailed as error:
            failure = error
        except (remote.RemoteError, CertificateError, TowerLinkLost, OSError) as error:
            failure = StepFailed(f"{record.step}: {error}")
        except Exception as error:
            failure = StepFailed(f"{record.step}: {error!r}")
        finally:
            await self._disconnect()
        if failure is not None:
            record.error = str(failure)
            self.board.event(f"{name}: attempt {record.attempts} failed at {failure}")
            if record.attempts > self.settings.provision_restarts:
                # The job's restart window alone would let attempts that each take
                # longer than its share of the period go on for good.
                _give_up(self.board, name)
                self.job.tell_nowait(_JobDone())
                return
            raise failure
        record.step = "done"
        if self.plan == "provision":
            assert record.job_started_at is not None
            record.provisioned_in = trio.current_time() - record.job_started_at
            self.board.set(name, HostState.READY)
        else:
            record.site = None  # its directory is gone: another entry may use it
            self.board.set(name, HostState.FREE)
        self.job.tell_nowait(_JobDone())

    # The steps.

    async def _connect(self) -> None:
        context = self.context
        self.connection = await call_asyncio(
            remote.connect, self.host, context.identity, context.known_hosts
        )
        try:
            login = parse_login(await self._run_remote(LOGIN_QUERY))
        except ValueError as error:
            raise StepFailed(f"connect: {error}") from None
        self.paths = tower_paths(self.host, login)
        self.board.claim_site(self.host.name, self.connection.host_key, self.paths.root)
        if len(self.paths.socket.encode()) > MAX_SOCKET_PATH:
            raise StepFailed(f"connect: the agent's socket {self.paths.socket} is longer than "
                             f"a Unix socket path may be ({MAX_SOCKET_PATH} bytes); "
                             "give the host a shorter root")

    async def _prepare(self) -> None:
        paths, host = self._paths(), self.host
        await self._run_remote(
            f"{prepare_directories(paths)}"
            f" && {{ test -x {host.nginx} || {{ echo 'no NGINX at {host.nginx}' >&2; exit 1; }}; }}"
        )
        version = await self._run_remote(f"{host.tower_command} --version")
        if not version.startswith("broker "):
            raise StepFailed(f"prepare: {host.tower_command} is not the tower software "
                             f"(it says {version.strip()[:80]!r})")

    async def _certificate(self) -> None:
        paths, host, issuer = self._paths(), self.host, self.context.issuer
        csr = await self._run_remote(
            f"{host.tower_command} tower csr --directory {paths.tls} --name {host.name}"
            f" --key-type {issuer.key_type}"
        )
        addresses = [host.link_address] if is_ip_address(host.link_address) else []
        # A retried job's tower may be linked already, with its sessions: its link stays.
        linked = self.context.links.directory.get(host.name)
        in_use = None if linked is None or linked.certificate is None else (
            linked.certificate.serial_number)
        certificate = issuer.sign(csr.encode(), host.name, addresses, in_use=in_use)
        await self._put(f"{paths.tls}/certificate.pem", certificate)
        await self._put(paths.ca, issuer.authority.certificate_pem)
        await self._run_remote(
            f"umask 077 && cat {paths.tls}/pending-key.pem {paths.tls}/certificate.pem"
            f" > {paths.identity}.new && mv {paths.identity}.new {paths.identity}"
            # The next provisioning makes a new key (one that was revoked stays out).
            f" && rm {paths.tls}/pending-key.pem"
        )
        await self._put(paths.settings, agent_settings(host, paths, self.settings).encode())

    async def _nginx(self) -> None:
        paths, host = self._paths(), self.host
        await self._put(f"{paths.nginx}/nginx.conf.new", nginx_configuration(host, paths).encode())
        test = nginx_command(host, paths, "-t")
        test[test.index("-c") + 1] += ".new"
        try:
            await self._run_remote(quote(test))
        except remote.RemoteError as error:
            raise StepFailed(f"nginx: the configuration does not load: {error}") from None
        await self._run_remote("\n".join([
            f"mv {paths.nginx}/nginx.conf.new {paths.nginx}/nginx.conf",
            f"if {_nginx_running(host, paths)}",
            f"then {quote(nginx_command(host, paths, '-s', 'reload'))}",
            f"else {quote(nginx_command(host, paths))}",
            "fi",
        ]))  # fmt: skip

    async def _agent(self) -> None:
        paths, host = self._paths(), self.host
        self.waiting_for = f"the agent's socket {paths.socket}"
        # An agent found running is kept (with its sessions) when it runs with the
        # settings just written; one started with others would keep them, so it is
        # stopped and started again. A lock holder that left no pid is not ours to stop:
        # the check-in then says what holds the lock.
        said = await self._run_remote("\n".join([
            f"cd {paths.root}",
            f"if {_agent_running(paths)}; then",
            f"  if cmp -s {paths.settings} {paths.running_settings} || [ ! -s {paths.pid} ]; then",
            "    echo running; exit 0",
            "  fi",
            *_stop_agent(paths),
            "  echo restarted",
            "fi",
            f"cp {paths.settings} {paths.running_settings}",
            f"setsid {host.tower_command} tower run --config {paths.settings}"
            f" >> {paths.log} 2>&1 < /dev/null &",
            "agent=$!",
            f"for i in $(seq {AGENT_START_POLLS}); do",
            f'  [ -S {paths.socket} ] && [ "$(cat {paths.pid} 2>/dev/null)" = "$agent" ] && exit 0',
            '  kill -0 "$agent" 2>/dev/null || break',
            "  sleep 0.1",
            "done",
            f"echo 'the agent did not start; the end of {paths.log}:' >&2",
            f"tail -n 5 {paths.log} >&2",
            "exit 1",
        ]))  # fmt: skip
        self.agent_found_running = said.strip() == "running"
        if said.strip() == "restarted":
            self.board.event(f"{host.name}: agent restarted: its settings changed")

    async def _check_in(self) -> None:
        host = self.host
        if self.context.links.directory.get(host.name) is not None:
            return  # linked already (a retried job): a probe would take the agent over
        while True:
            try:
                await probe_tower(host.link_address, host.tower_port, host.name,
                                  self.context.links.tls, self.settings.tower_silence)
                return
            except TowerLinkLost as error:
                self.waiting_for = f"a link through NGINX: {error}"
                if self.agent_found_running:
                    self.waiting_for += (f"; the agent found running (it holds "
                                         f"{self._paths().root}/agent.lock) does not answer")
            await trio.sleep(CHECK_IN_RETRY)

    async def _hand_over(self) -> None:
        host = self.host
        links = self.context.links
        towers = self._towers()
        provisioning = _provisioning_of(self)
        assert provisioning is not None

        def lost(name: str, reason: str) -> None:
            provisioning.tell_nowait(Repair(name, reason))

        spec = remote_tower_spec(host.name, host.link_address, host.tower_port, links, lost)
        # A host provisioned again after a scale-in comes back ready for sessions.
        links.directory.draining.discard(host.name)
        try:
            tower = await towers.start_child(spec)
        except ValueError:
            # A retried job: the tower is there already (or still on its way out).
            tower = self.system.lookup(f"{towers.path}/tower:{host.name}")
            if tower is not None and tower.snapshot().actor_class != RemoteTower.__name__:
                raise StepFailed(f"hand-over: a tower named {host.name} that is not this "
                                 "host's is linked") from None
        self.waiting_for = "the tower's link to come up"
        while links.directory.get(host.name) is None:
            if tower is None or tower.snapshot().state is ActorState.STOPPED:
                raise StepFailed(f"hand-over: the link to {host.name} failed for good")
            await trio.sleep(HAND_OVER_POLL)

    async def _unlink(self) -> None:
        """Revoke the tower's certificates, then take it out of the towers. In that order,
        and never the first without the second: the supervisor finishes taking a tower
        out once asked, whether or not this step is there to see it, and an agent taken
        out with a valid certificate could link again."""
        revoked = self.context.issuer.revoke(self.host.name)
        self.board.event(f"{self.host.name}: revoked {len(revoked)} certificate(s)")
        # Asked for even if a cancel is already pending (it would be checked before the
        # asking): the tower's own shutdown deadline bounds the wait, and this one too.
        with trio.CancelScope(shield=True), trio.move_on_after(
                self.settings.provision_step_timeout), contextlib.suppress(LookupError):
            await self._towers().terminate_child(f"tower:{self.host.name}")

    async def _stop_tower(self) -> None:
        paths, host = self._paths(), self.host
        nginx_pid = f"{paths.nginx}/nginx.pid"
        await self._run_remote("\n".join([
            f"if {_agent_running(paths)}; then",
            *_stop_agent(paths),
            "fi",
            f"if {_nginx_running(host, paths)}; then",
            f"  {quote(nginx_command(host, paths, '-s', 'quit'))}",
            f"  {_wait_while(f'[ -f {nginx_pid} ]', STOP_POLLS)}"
            f" || {{ {quote(nginx_command(host, paths, '-s', 'stop'))};"
            f" {_wait_while(f'[ -f {nginx_pid} ]', STOP_POLLS)}; }}",
            "fi",
            f"if {_agent_running(paths)}; then echo 'the agent did not stop' >&2; exit 1; fi",
            f"if {_nginx_running(host, paths)}; then echo 'NGINX did not stop' >&2; exit 1; fi",
            f"rm -rf {paths.nginx} {paths.tls} {paths.settings} {paths.running_settings}"
            # The socket's directory, and where a root tower's socket was before it.
            f" {paths.socket} {paths.pid} {paths.run or ''} {paths.root}/agent.sock"
            # The agent's log (sessions' traces), its lock, an upload cut short.
            f" {paths.log} {paths.root}/agent.lock {paths.settings}.new",
            f"rmdir {paths.root} 2>/dev/null || true",  # unless something else is there
        ]))  # fmt: skip

    # Helpers.

    async def _after_earlier_commands(self, record: HostRecord) -> None:
        """Wait until every command an earlier attempt cut off has ended on the host: a
        cancelled job's connection was dropped, not its commands (``remote.run``), and
        one could undo what this attempt does (a decommission's stop removes the
        tower's directory)."""
        if (wait := record.scripts_end_by - trio.current_time()) > 0:
            record.step = "wait"
            self.board.event(f"{record.host.name}: waiting {wait:.0f} s for the last "
                             "attempt's commands to end on the host")
            await trio.sleep(wait)

    def _paths(self) -> TowerPaths:
        assert self.paths is not None
        return self.paths

    def _towers(self) -> SupervisorRef:
        towers = self.system.lookup(TOWERS_PATH)
        assert isinstance(towers, SupervisorRef)
        return towers

    async def _run_remote(self, command: str) -> str:
        """Run ``command`` on the host for what is left of the step's time. One cut off
        here (cancelled, or its connection broken) may run on there until then: noted on
        the host's record for the next attempt."""
        assert self.connection is not None
        await trio.lowlevel.checkpoint_if_cancelled()  # its deadline may have passed
        now = trio.current_time()
        left = max(0.0, trio.current_effective_deadline() - now)
        within = max(1, math.ceil(min(left, self.settings.provision_step_timeout)))
        try:
            return await call_asyncio(partial(remote.run, within=within), self.connection,
                                      command)
        except (trio.Cancelled, remote.CutOff):
            record = self.board.get(self.host.name)
            # Its time runs from its start there, at the latest just after this moment
            # (a request already on its way): with a margin for that.
            ends_by = trio.current_time() + remote.CONNECT_TIMEOUT + within + remote.KILL_GRACE
            record.scripts_end_by = max(record.scripts_end_by, ends_by)
            raise

    async def _put(self, path: str, data: bytes) -> None:
        assert self.connection is not None
        await call_asyncio(remote.put, self.connection, path, data)

    async def _disconnect(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await call_asyncio(remote.close, connection)


def _agent_running(paths: TowerPaths) -> str:
    """A shell condition: an agent holds the tower's lock (a stale pid file says nothing:
    its pid may be another process's by now). Without the lock file (the tower's
    directory removed already) none does: flock would fail to open it."""
    lock = f"{paths.root}/agent.lock"
    return f"[ -e {lock} ] && ! flock -n {lock} true"


def _stop_agent(paths: TowerPaths) -> list[str]:
    """Shell lines: stop the running agent (SIGTERM, then SIGKILL if it lingers, and
    wait for that too: its lock goes only once it has exited)."""
    running = _agent_running(paths)
    return [
        f'  kill "$(cat {paths.pid})"',
        f"  {_wait_while(running, STOP_POLLS)} || {{ kill -9 \"$(cat {paths.pid})\";"
        f" {_wait_while(running, STOP_POLLS)}; }}",
    ]


def _nginx_running(host: Host, paths: TowerPaths) -> str:
    """A shell condition: the tower's NGINX master runs (its pid is an NGINX that runs
    this tower's configuration: a stale pid file's may be another tower's by now). A
    master started before NGINX was upgraded runs a binary that reads as deleted."""
    pid = f"{paths.nginx}/nginx.pid"
    exe = f"readlink /proc/$(cat {pid})/exe | sed 's/ (deleted)$//'"
    return (f'[ -f {pid} ] && [ "$({exe})" = "$(readlink -f {host.nginx})" ]'
            f" && tr '\\0' ' ' < /proc/$(cat {pid})/cmdline"
            f" | grep -qF -- ' -c {paths.nginx}/nginx.conf'")


def _wait_while(condition: str, polls: int) -> str:
    """A shell command: wait (0.1 s steps, ``polls`` at most) while ``condition``
    holds; fails if it still does."""
    return (f"i=0; while {condition} && [ $i -lt {polls} ]; do sleep 0.1; i=$((i+1)); done; "
            f"! {{ {condition}; }}")


def provisioning_specs(context: ProvisioningContext) -> list[ChildSpec]:
    """``jobs``, then ``provisioning`` (which starts jobs there)."""
    flags = SupervisorFlags(intensity=1_000_000, period=1)
    return [
        ChildSpec("jobs", lambda: Supervisor((), flags)),
        ChildSpec("provisioning", lambda: Provisioning(context)),
    ]


