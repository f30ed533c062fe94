"""Simulated tower hosts: real OpenSSH servers on loopback, one per host.

Each :class:`SimulatedHost` is a real ``/usr/sbin/sshd -D -e`` listening on
127.0.0.1 on a port of its own, with its own ed25519 host key, configuration,
pid file, log (``<directory>/sshd.log``) and ``authorized_keys`` holding one
public key: the broker's provisioning identity. Only public-key authentication
is accepted, and ``sftp`` is served by ``internal-sftp``. The login user is the
user running the tests (``getpass.getuser()``): sshd runs as root in CI, and
runs unprivileged for that same user otherwise.

What a command run over SSH sees: sshd is started with ``UsePAM no``, so the
environment is sshd's own: ``USER``, ``LOGNAME``, ``HOME``, ``SHELL``, ``MAIL``,
``SSH_*`` and a ``PATH`` compiled into Debian's sshd, before whatever the
login shell's startup files change (bash sources ``~/.bashrc`` for commands
run over SSH). With Debian's OpenSSH 9.2 that ``PATH`` is

- for root: ``/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin``
- for anyone else: ``/usr/local/bin:/usr/bin:/bin:/usr/games``

so a non-root login does not find ``nginx`` in ``/usr/sbin`` by name; callers
should use absolute paths.

A host's "filesystem" is ``<directory>/root`` (:attr:`SimulatedHost.root`),
which software installed on the host is expected to use as its prefix. That
is what makes :meth:`SimulatedHost.cleanup` possible: every process on the
machine whose command line mentions the host's directory (tower agents,
nginx masters and workers started detached with ``setsid``) belongs to it. A tower
provisioned as root also leaves, outside that directory, NGINX's workers' account and
its socket directory under /run: :func:`root_tower_traces_removed` (which
:func:`make_host` uses) removes them unless they were there before.

Tests use the :func:`make_host` fixture, imported into the test module
(``from .hosts import make_host``), and call :func:`require_sshd` /
:func:`require_nginx` to skip where those programs are not installed.
"""

from __future__ import annotations

import getpass
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from broker.site import NGINX_WORKER_USER, RUN_DIRECTORY

SSHD = Path("/usr/sbin/sshd")
NGINX = Path("/usr/sbin/nginx")
SSH_KEYGEN = Path("/usr/bin/ssh-keygen")
ADDRESS = "127.0.0.1"

# sshd's privilege separation directory, required when it runs as root.
PRIVSEP_DIR = Path("/run/sshd")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def require_sshd() -> None:
    """Skip the calling test where OpenSSH's server is not installed."""
    if not SSHD.exists():
        pytest.skip(f"{SSHD} is not installed (Debian package openssh-server)")
    if not SSH_KEYGEN.exists():
        pytest.skip(f"{SSH_KEYGEN} is not installed (Debian package openssh-client)")


def require_nginx() -> None:
    """Skip the calling test where nginx is not installed."""
    if not NGINX.exists():
        pytest.skip(f"{NGINX} is not installed (Debian package nginx)")


class SimulatedHost:
    """One simulated host: a real sshd on 127.0.0.1 that lets in one key.

    Everything the host has lives in ``directory``: its host key, its sshd
    configuration, pid file and log, its ``authorized_keys`` and its
    ``root`` (not created here). The port is chosen once, at construction,
    and kept across :meth:`stop` and :meth:`start`, as is the host key.
    """

    def __init__(self, directory: Path, authorized_key: str, name: str) -> None:
        self.name = name
        self.directory = Path(directory).resolve()
        self.address = ADDRESS
        self.user = getpass.getuser()
        self.root = self.directory / "root"
        self.port = listening_port()
        # Where the tower's NGINX will listen on this host.
        self.tower_port = listening_port()
        self.log = self.directory / "sshd.log"
        self._process: subprocess.Popen | None = None

        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.directory / "ssh_host_ed25519_key"
        if not key.exists():
            subprocess.run(
                [str(SSH_KEYGEN), "-q", "-t", "ed25519", "-N", "", "-C", f"{name}-host-key",
                 "-f", str(key)],
                check=True, stdin=subprocess.DEVNULL, capture_output=True,
            )
        key.chmod(0o600)
        public = key.with_name(key.name + ".pub").read_text().split()
        self.host_key = f"{public[0]} {public[1]}"

        self.authorized_keys = self.directory / "authorized_keys"
        self.authorized_keys.write_text(authorized_key.strip() + "\n")
        self.authorized_keys.chmod(0o600)

        self.pid_file = self.directory / "sshd.pid"
        self.config = self.directory / "sshd_config"
        options = {
            "ListenAddress": f"{self.address}:{self.port}",
            "HostKey": str(key),
            "PidFile": str(self.pid_file),
            "AuthorizedKeysFile": str(self.authorized_keys),
            "AuthenticationMethods": "publickey",
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "HostbasedAuthentication": "no",
            "UsePAM": "no",
            "StrictModes": "no",
            "AllowUsers": self.user,
            "PermitRootLogin": "prohibit-password",
            "Subsystem": "sftp internal-sftp",
            "LogLevel": "VERBOSE",
            "UseDNS": "no",
            "PrintMotd": "no",
            "PrintLastLog": "no",
            "X11Forwarding": "no",
            "MaxStartups": "100",
        }
        self.config.write_text("".join(f"{key} {value}\n" for key, value in options.items()))
        self.config.chmod(0o600)

    def __repr__(self) -> str:
        return f"<SimulatedHost {self.name} {self.user}@{self.address}:{self.port}>"

    @property
    def pid(self) -> int | None:
        """The listening sshd's pid, while it runs."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def start(self) -> None:
        """Start sshd; returns once the port accepts TCP connections."""
        if self.pid is not None:
            return
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"sshd for {self.name} exited at start:\n{self._log_tail()}")
            try:
                with socket.create_connection((self.address, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"sshd for {self.name} not listening on {self.port} after "
                    f"{START_TIMEOUT} s:\n{self._log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Terminate the listening sshd (sessions already open are left to sshd)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            _kill(process.pid, signal.SIGCONT)  # in case it is paused
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)

    def pause(self) -> None:
        """Freeze the host's sshd and everything under it, as a hung host."""
        self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self._signal_tree(signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop sshd and kill every process that belongs to this host.

        That is the sshd's sessions, and every process on the machine whose
        command line mentions the host's directory, wherever it was reparented, with
        its descendants.
        """
        sessions = _descendants(self.pid) if self.pid is not None else []
        self.stop()
        spared = _ancestors(os.getpid())
        marker = str(self.directory).encode()
        doomed = set(sessions)
        owners = [pid for pid in _all_pids()
                  if pid not in spared and marker in _read(f"/proc/{pid}/cmdline")]
        # Frozen first: an NGINX master whose worker is killed before it would start
        # another, and its workers do not name the directory; they are its children.
        for pid in owners:
            _kill(pid, signal.SIGSTOP)
        for pid in owners:
            doomed.add(pid)
            doomed.update(_descendants(pid))
        doomed -= spared
        doomed = {pid for pid in doomed if _kill(pid, signal.SIGKILL)}
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_alive(pid) for pid in doomed):
            if time.monotonic() > deadline:
                left = sorted(pid for pid in doomed if _alive(pid))
                raise TimeoutError(f"processes of {self.name} still alive: {left}")
            time.sleep(0.02)

    def _signal_tree(self, signum: int) -> None:
        if self.pid is None:
            raise RuntimeError(f"sshd for {self.name} is not running")
        # Stop from the top down, so that no parent spawns past the freeze.
        for pid in [self.pid, *_descendants(self.pid)]:
            _kill(pid, signum)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[Callable[[str, str], SimulatedHost]]:
    """A factory of started :class:`SimulatedHost`\\ s, all cleaned up at teardown.

    ``make_host(name, authorized_key)`` puts the host in ``tmp_path / "hosts" / name``.
    Skips the test where sshd is not installed.
    """
    require_sshd()
    hosts: list[SimulatedHost] = []

    def make(name: str, authorized_key: str) -> SimulatedHost:
        host = SimulatedHost(tmp_path / "hosts" / name, authorized_key, name)
        hosts.append(host)
        host.start()
        return host

    with root_tower_traces_removed():
        try:
            yield make
        finally:
            errors = []
            for host in reversed(hosts):
                try:
                    host.cleanup()
                except Exception as error:  # clean up the others regardless
                    errors.append(error)
            if errors:
                raise errors[0]


@contextmanager
def root_tower_traces_removed() -> Iterator[None]:
    """Afterwards, remove what towers provisioned as root leave on this machine outside
    their hosts' directories, unless it was there before: NGINX's workers' account and
    the socket directories under /run."""
    account_existed = _account_exists(NGINX_WORKER_USER)
    towers_before = _run_entries()
    try:
        yield
    finally:
        if towers_before is None:
            shutil.rmtree(RUN_DIRECTORY, ignore_errors=True)
        else:
            for name in (_run_entries() or set()) - towers_before:
                shutil.rmtree(f"{RUN_DIRECTORY}/{name}", ignore_errors=True)
        if not account_existed and _account_exists(NGINX_WORKER_USER):
            subprocess.run(["userdel", NGINX_WORKER_USER], capture_output=True, check=True,
                           timeout=30)


def _run_entries() -> set[str] | None:
    try:
        return set(os.listdir(RUN_DIRECTORY))
    except FileNotFoundError:
        return None


def _account_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


_HANDED_OUT: set[int] = set()


def listening_port() -> int:
    """A port free on ``ADDRESS`` now, for a server started later (an sshd, a tower's
    NGINX): below the ephemeral range, so that no outgoing connection, nor another
    server given port 0, takes it meanwhile; never the same one twice in a run."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            ephemeral = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    while True:
        port = random.randrange(max(1024, ephemeral - 12000), ephemeral)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((ADDRESS, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid, from ``/proc/<pid>/stat``."""
    text = _read(f"/proc/{pid}/stat").decode(errors="replace")
    # The command name, in parentheses, may itself contain spaces and parentheses.
    fields = text[text.rfind(")") + 2:].split()
    if len(fields) < 2:
        return None
    return fields[0], int(fields[1])


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _descendants(root: int) -> list[int]:
    """Every live descendant of ``root``, parents before their children."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found: list[int] = []
    pending = list(children.get(root, []))
    while pending:
        pid = pending.pop(0)
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _ancestors(pid: int) -> set[int]:
    """``pid`` and every process above it."""
    found = set()
    while pid > 0 and pid not in found:
        found.add(pid)
        stat = _stat(pid)
        if stat is None:
            break
        pid = stat[1]
    return found


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _kill(pid: int, signum: int) -> bool:
    """Signal ``pid``; False where it is gone or not ours to signal."""
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True
