"""The ``broker`` command: ``serve`` runs the broker, ``shell`` opens its operators' shell,
``ca`` shows and steers its certificate authority, ``tower run`` runs a tower agent and
``tower csr`` makes a tower's key and signing request on the tower's own host."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import resource
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker",
        description="Session broker for real-time WebRTC sessions.",
    )
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the broker with its local towers")
    serve.add_argument("--config", type=Path, help="a TOML file of settings (see README)")
    serve.add_argument("--state-dir", type=Path, help="where credentials are kept")
    serve.add_argument("--host", help="the address to listen on (default 127.0.0.1)")
    serve.add_argument("--https-port", type=int, help="default 8443; 0 picks a free port")
    serve.add_argument("--http-port", type=int, help="default 8080; 0 picks a free port")
    serve.add_argument("--shell-port", type=int, help="default 8022; 0 picks a free port")
    serve.add_argument("--towers", type=int, dest="local_towers",
                       help="local tower agents (default: one per core, at least two)")
    serve.add_argument("--ready-json", action="store_true",
                       help="announce the broker as one JSON line instead of text")

    shell = commands.add_parser(
        "shell", help="open the operators' shell of the local broker (over ssh)"
    )
    shell.add_argument("--state-dir", type=Path, help="the broker's state directory")
    shell.add_argument("--host", help="the shell's address (default: the one it listens on)")
    shell.add_argument("line", nargs=argparse.REMAINDER,
                       help="a command to run instead of the interactive shell")

    tower = commands.add_parser("tower", help="tower agent commands")
    tower_commands = tower.add_subparsers(dest="tower_command", metavar="COMMAND")
    run = tower_commands.add_parser(
        "run", help="run a tower agent: local (--listen ...) or behind NGINX (--config)"
    )
    run.add_argument("--config", type=Path,
                     help="the agent's TOML settings, as provisioning writes them")
    run.add_argument("--name")
    run.add_argument("--listen", help="HOST:PORT of the communication server")
    run.add_argument("--identity", type=Path, help="the tower's key and certificate (PEM)")
    run.add_argument("--ca", type=Path, help="the broker's CA certificate")
    run.add_argument("--capacity", type=int, default=Settings.tower_capacity)
    run.add_argument("--video-weight", type=int, default=Settings.video_weight)
    run.add_argument("--heartbeat-interval", type=float, default=Settings.heartbeat_interval)
    run.add_argument("--heartbeat-timeout", type=float, default=Settings.heartbeat_timeout)
    run.add_argument("--negotiation-deadline", type=float,
                     default=Settings.negotiation_deadline)
    run.add_argument("--load-interval", type=float, default=Settings.tower_load_interval)
    csr = tower_commands.add_parser(
        "csr", help="make the tower's key (kept in DIRECTORY) and print its signing request"
    )
    csr.add_argument("--directory", type=Path, required=True)
    csr.add_argument("--name", required=True)
    csr.add_argument("--key-type", choices=("ec", "rsa"), default="ec")

    load = commands.add_parser(
        "loadtest", help="simulated browsers against a running broker, with a report"
    )
    load.add_argument("url", help="the broker's HTTPS URL, e.g. https://127.0.0.1:8443")
    load.add_argument("--api-key", help="default: the state directory's api-key")
    load.add_argument("--certificate",
                      help="the CA or certificate to trust (default: the state directory's)")
    load.add_argument("--state-dir", type=Path, help="where to find the key and certificate")
    load.add_argument("--sessions", type=int, default=100, help="concurrent sessions to reach")
    load.add_argument("--rate", type=float, default=20.0, help="arrivals per second (ramp)")
    load.add_argument("--duration", type=float, default=30.0,
                      help="seconds with every session up, after the ramp")
    load.add_argument("--message-rate", type=float, default=1.0,
                      help="data channel messages per session per second (a tower "
                           "fails a client's peer past 256, fewer for messages of 16 KiB "
                           "or more: PROTOCOL.md)")
    load.add_argument("--message-size", type=int, default=100, help="bytes per message")
    load.add_argument("--workers", type=int, default=2, help="load generator processes")
    load.add_argument("--media", action="store_true",
                      help="sessions with the tower's video (the demo application)")
    load.add_argument("--kill-tower-at", type=float, metavar="SECONDS",
                      help="chaos: kill a local tower agent this long after the start")
    load.add_argument("--generator-cpus", type=int, nargs="+", default=(), metavar="CPU",
                      help="run the load generator's processes on these CPUs only")
    load.add_argument("--json", action="store_true", help="the report as one JSON document")
    load.add_argument("--plot", metavar="FILE.png", help="draw the time series")

    ca = commands.add_parser("ca", help="the broker's certificate authority")
    ca.add_argument("--state-dir", type=Path, help="the broker's state directory")
    ca.add_argument("--config", type=Path, help="the broker's TOML settings")
    ca_commands = ca.add_subparsers(dest="ca_command", metavar="COMMAND")
    ca_commands.add_parser("status", help="the CA and every tower certificate, with expiries")
    revoke = ca_commands.add_parser(
        "revoke", help="revoke a tower's certificates; a running broker closes its link"
    )
    revoke.add_argument("tower")
    import_ = ca_commands.add_parser(
        "import", help="use an existing CA (certificate and key, PEM) instead of making one"
    )
    import_.add_argument("certificate", type=Path)
    import_.add_argument("key", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``broker`` command line; returns the process exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "serve":
        return _serve(arguments)
    if arguments.command == "shell":
        return _shell(arguments)
    if arguments.command == "tower" and arguments.tower_command == "run":
        return _tower_run(arguments)
    if arguments.command == "tower" and arguments.tower_command == "csr":
        return _tower_csr(arguments)
    if arguments.command == "loadtest":
        return _loadtest(arguments)
    if arguments.command == "ca" and arguments.ca_command:
        from .ca_command import run_ca_command

        return run_ca_command(arguments)
    parser.print_help(sys.stderr)
    return 2


# Each session takes at least one open file: the broker a signaling connection, a tower
# a UDP port, a load generator both. Below this many, a process says how few it has.
FEW_OPEN_FILES = 8192
MOST_OPEN_FILES = 1 << 20


def raise_open_file_limit() -> int:
    """Raises this process's soft limit of open files to its hard limit (at most
    ``MOST_OPEN_FILES``), and returns the soft limit it then has. Children inherit it.

    Many systems start processes at 1,024 open files under a hard limit far above it: a
    broker, tower or load generator left there fails new sessions with "Too many open
    files" at about a thousand. Where the system refuses the hard limit itself (macOS
    caps an unlimited one at ``kern.maxfilesperproc``), the soft limit goes as high as
    it accepts.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    wanted = MOST_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MOST_OPEN_FILES)
    # The highest limit accepted, by halving the range: at most 20 tries.
    accepted = soft
    while accepted < wanted:
        trying = (accepted + wanted + 1) // 2
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (trying, hard))
        except (ValueError, OSError):
            wanted = trying - 1
        else:
            accepted = trying
    return accepted


def _open_files() -> None:
    limit = raise_open_file_limit()
    if limit != resource.RLIM_INFINITY and limit < FEW_OPEN_FILES:
        print(f"broker: this process may open only {limit} files, so it can hold fewer "
              "sessions than that; raise the hard limit (ulimit -Hn; LimitNOFILE= under "
              "systemd) for more", file=sys.stderr)


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    # Every ICE check at INFO would drown what the broker says.
    logging.getLogger("aioice").setLevel(logging.WARNING)
    # Each SSH connection and channel at INFO, from the shell and from provisioning.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


# The settings ``broker serve`` takes as flags, each with its flag.
_SERVE_FLAGS = {
    "state_dir": "--state-dir",
    "host": "--host",
    "https_port": "--https-port",
    "http_port": "--http-port",
    "local_towers": "--towers",
    "shell_port": "--shell-port",
}


def _serve(arguments: argparse.Namespace) -> int:
    from actors import ActorCrashed, bridge

    from .config import ConfigError, load_settings
    from .serve import NotStarted, serve_broker

    given = {setting: getattr(arguments, setting) for setting in _SERVE_FLAGS}
    try:
        settings = load_settings(arguments.config, **given)
    except ConfigError as error:
        message = str(error)
        # A value from the command line is named as it was given there.
        for setting, flag in _SERVE_FLAGS.items():
            if given[setting] is not None and message.startswith(f"{setting} "):
                message = flag + message.removeprefix(setting)
        print(f"broker: {message}", file=sys.stderr)
        return 2
    _logging()
    _open_files()

    def announce(bound, files) -> None:
        origin = bound.https_origin
        if arguments.ready_json:
            print(json.dumps({
                "shell_port": bound.shell_port,
                "url": origin + "/",
                "http_url": f"http://{bound.url_host}:{bound.http_port}/",
                "api_key": files.api_key,
                "state_dir": str(files.directory),
                "certificate": str(files.https_certificate),
            }), flush=True)
            return
        print(
            f"Session broker {__version__} is running.\n"
            f"  open      {origin}/#key={files.api_key}\n"
            f"  API key   {files.api_key}\n"
            f"  state     {files.directory}\n"
            f"  HTTPS certificate (self-signed): {files.https_certificate}\n"
            f"  towers    {bound.local_towers} local agents\n"
            f"  shell     ssh -p {bound.shell_port} operator@{bound.shell_host}"
            "  (or: broker shell)\n"
            "Ctrl-C stops the broker and its towers.",
            flush=True,
        )

    try:
        bridge.run(serve_broker, settings, announce)
    except bridge.Interrupted:
        print("broker: stopped", file=sys.stderr)
    except ActorCrashed as crash:
        print(f"broker: {crash.path.rsplit('/', 1)[-1]} failed to start: {crash.error}",
              file=sys.stderr)
        return 1
    except NotStarted as error:
        print(f"broker: {error}", file=sys.stderr)
        return 2
    return 0


def _shell(arguments: argparse.Namespace) -> int:
    from .config import default_state_dir

    shell = (arguments.state_dir or default_state_dir()) / "shell"
    try:
        port = int((shell / "port").read_text())
        host_key = (shell / "host-key.pub").read_text().split()
        address = shell / "address"  # (a broker that wrote none listens on 127.0.0.1)
        host = arguments.host or (address.read_text().strip() if address.exists()
                                  else "127.0.0.1")
    except (OSError, ValueError, IndexError):
        print(f"broker shell: no running broker found in {shell.parent}", file=sys.stderr)
        return 2
    known_hosts = shell / "known_hosts"
    known_hosts.write_text(f"[{host}]:{port} {host_key[0]} {host_key[1]}\n")
    known_hosts.chmod(0o600)
    command = [
        "ssh", "-q", "-p", str(port), "-i", str(shell / "operator-key"),
        "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=yes",
        # The command as one word: ssh would join several with spaces, and their quoting
        # would be lost. One word is a whole line already (broker shell 'tree --depth 1').
        "--", f"operator@{host}", *_remote_command(arguments.line),
    ]
    try:
        os.execvp("ssh", command)
    except OSError as error:
        print(f"broker shell: cannot run ssh: {error.strerror}", file=sys.stderr)
        return 2
    return 0


def _remote_command(words: list[str]) -> list[str]:
    """What ``broker shell`` gives ssh to run: nothing, a line given whole, or the words
    quoted as the broker's shell splits them."""
    if len(words) <= 1:
        return words
    return [shlex.join(words)]


def _tower_run(arguments: argparse.Namespace) -> int:
    from actors import ActorCrashed, bridge

    from .tower.agent import (
        AgentSettings,
        AlreadyRunning,
        hold_agent_lock,
        load_agent_config,
        run_agent,
    )
    from .tower.peer import PeerSettings

    _logging()
    _open_files()
    if arguments.config is not None:
        try:
            settings = load_agent_config(arguments.config)
            hold_agent_lock(arguments.config.parent)
        except ValueError as error:
            print(f"broker tower run: {error}", file=sys.stderr)
            return 2
        except AlreadyRunning as error:
            print(f"broker tower run: {error}", file=sys.stderr)
            return 0
    else:
        missing = [flag for flag in ("name", "listen", "identity", "ca")
                   if getattr(arguments, flag) is None]
        host, _, port = (arguments.listen or "").rpartition(":")
        if missing or not host or not re.fullmatch(r"[0-9]{1,5}", port):
            print("broker tower run: give --config, or --name, --listen HOST:PORT, "
                  "--identity and --ca", file=sys.stderr)
            return 2
        try:
            peer = PeerSettings(
                arguments.heartbeat_interval, arguments.heartbeat_timeout, tower=arguments.name,
                negotiation_deadline=arguments.negotiation_deadline,
            )
            settings = AgentSettings(
                name=arguments.name,
                identity=arguments.identity,
                host=host,
                port=int(port),
                ca=arguments.ca,
                capacity=arguments.capacity,
                video_weight=arguments.video_weight,
                load_interval=arguments.load_interval,
                peer=peer,
            )
        except ValueError as error:
            print(f"broker tower run: {error}", file=sys.stderr)
            return 2
        for path in (arguments.identity, arguments.ca):
            if not path.is_file():
                print(f"broker tower run: {path}: no such file", file=sys.stderr)
                return 2
    try:
        bridge.run(run_agent, settings)
    except bridge.Interrupted:
        pass
    except (ActorCrashed, OSError) as error:
        reason = error.error if isinstance(error, ActorCrashed) else error
        print(f"broker tower run: cannot start: {reason}", file=sys.stderr)
        return 1
    return 0


def _loadtest(arguments: argparse.Namespace) -> int:
    from .config import default_state_dir
    from .loadtest.run import (
        MAX_MESSAGE_SIZE,
        MAX_WORKERS,
        REPAIR_TIME,
        LoadPlan,
        check_target,
        plot,
        print_report,
        run_load,
    )
    from .tower.application import MESSAGES_PER_SECOND, message_cost

    state = arguments.state_dir or default_state_dir()
    try:
        api_key = arguments.api_key or (state / "api-key").read_text().strip()
    except OSError:
        print(f"broker loadtest: no --api-key, and none in {state}", file=sys.stderr)
        return 2
    certificate = arguments.certificate or str(state / "https" / "certificate.pem")
    # Written so that NaN fails each test, as it fails every comparison.
    problems = [
        f"{name} must be at least 1" for name, value in (
            ("--sessions", arguments.sessions), ("--workers", arguments.workers),
            ("--message-size", arguments.message_size))
        if not value >= 1
    ] + [f"{name} must be above 0" for name, value in (
            ("--rate", arguments.rate), ("--message-rate", arguments.message_rate))
         if not 0 < value < math.inf]
    problems += [f"{name} must be 0 or more" for name, value in (
        ("--duration", arguments.duration), ("--kill-tower-at", arguments.kill_tower_at))
        if value is not None and not 0 <= value < math.inf]
    problems += [f"{name} is at most {most:g}" for name, value, most in (
        ("--message-size", arguments.message_size, MAX_MESSAGE_SIZE),
        ("--workers", arguments.workers, MAX_WORKERS))
        if value > most]
    # What a tower takes from one client (PROTOCOL.md): past it, it fails the peer.
    cost = message_cost(min(arguments.message_size, MAX_MESSAGE_SIZE))
    if arguments.message_rate * cost > MESSAGES_PER_SECOND:
        problems.append(f"--message-rate is at most {MESSAGES_PER_SECOND // cost} for "
                        f"messages of {arguments.message_size} bytes (a tower takes "
                        f"{MESSAGES_PER_SECOND} a second from a client, a message counting "
                        "once and once more per 16 KiB)")
    if not problems:
        end = arguments.sessions / arguments.rate + arguments.duration
        if not end < math.inf:
            problems.append("--rate is too small for --sessions ever to arrive")
        elif arguments.kill_tower_at is not None and (
                arguments.kill_tower_at > end - REPAIR_TIME):
            problems.append(f"--kill-tower-at must leave the sessions {REPAIR_TIME:g} s to "
                            f"be repaired before the run ends ({end:g} s)")
    usable = os.sched_getaffinity(0)
    if not set(arguments.generator_cpus) <= usable:
        problems.append(f"--generator-cpus: this process may use CPUs "
                        f"{', '.join(map(str, sorted(usable)))}")
    if arguments.plot and not os.access(Path(arguments.plot).resolve().parent, os.W_OK):
        problems.append(f"--plot: cannot write in the directory of {arguments.plot}")
    try:
        if not problems:
            check_target(arguments.url, certificate, api_key)
    except ValueError as error:
        problems.append(str(error))
    except KeyboardInterrupt:
        return 130
    if problems:
        print(f"broker loadtest: {'; '.join(problems)}", file=sys.stderr)
        return 2
    _open_files()
    plan = LoadPlan(
        url=arguments.url.rstrip("/"), api_key=api_key, certificate=certificate,
        sessions=arguments.sessions, rate=arguments.rate, duration=arguments.duration,
        message_rate=arguments.message_rate, message_size=arguments.message_size,
        workers=min(arguments.workers, arguments.sessions),
        application="demo" if arguments.media else "echo",
        kill_tower_at=arguments.kill_tower_at,
        generator_cpus=tuple(arguments.generator_cpus),
    )
    try:
        report = run_load(plan, show_progress=not arguments.json)
    except KeyboardInterrupt:  # a second Ctrl-C: the workers are stopped, with no report
        print("broker loadtest: stopped", file=sys.stderr)
        return 130
    if arguments.json:
        print(json.dumps(report))
    else:
        print_report(report)
    if arguments.plot:
        plot(report, arguments.plot)
    if report["interrupted"]:
        return 130
    # Figures that miss a worker's sessions are not a result, nor a run where none
    # connected (the report says why).
    if report["workers"]["failed"] or not report["sessions"]["connected"]:
        return 1
    return 0


def _tower_csr(arguments: argparse.Namespace) -> int:
    """Make a new ``pending-key.pem`` in the directory; print its request.

    A key left pending by an earlier attempt is replaced, never reused: a certificate
    signed for it then may since have been revoked."""
    from .pki import tower_csr_for_key, write_secret, generate_private_key, private_key_pem

    directory: Path = arguments.directory
    key_file = directory / "pending-key.pem"
    try:
        write_secret(key_file, private_key_pem(generate_private_key(arguments.key_type)))
        sys.stdout.write(tower_csr_for_key(key_file.read_bytes(), arguments.name).decode())
    except (OSError, ValueError) as error:
        print(f"broker tower csr: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
