"""What provisioning puts on a tower host, as text: pure functions, no I/O.

The layout under the tower's root directory (0700, owned by the SSH user):

    <root>/tower.toml         the agent's settings (0600)
    <root>/agent.toml         the settings the running agent was started with
    <root>/agent.sock         the agent's link socket; only NGINX connects to it (for
                              the root user: /run/session-tower/<name>/agent.sock)
    <root>/agent.pid, agent.lock, agent.log
    <root>/tls/pending-key.pem   a new key made on the host by each provisioning, until
                              its certificate is installed
    <root>/tls/tower.pem      the tower's key and certificate (0600; renewals replace it)
    <root>/tls/ca.pem         the broker's CA: NGINX checks client certificates against it
    <root>/nginx/nginx.conf   the tower's own NGINX instance (master runs as the SSH user)

NGINX terminates TLS with the tower's certificate, requires a client certificate issued
by the broker's CA whose subject is exactly the broker's, and proxies the WebSocket
upgrade on ``/link`` to the agent's socket. Everything else is refused.

NGINX's workers, which parse what arrives from the network, never run as root. A master
started by an ordinary SSH user runs its workers as that user. A master started by root
(user id 0, whatever the login's name) runs them as the system user ``tower-nginx``,
which provisioning creates; they reach the agent's socket through a directory of their
group under ``/run``, since root's own directories are closed to them, and nothing else
of the tower's.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass

from .config import Settings
from .inventory import Host, is_plain
from .pki import BROKER_NAME


# The unprivileged user of NGINX's workers on a host provisioned as root.
NGINX_WORKER_USER = "tower-nginx"
# Where, for the root user, each tower's socket directory is: one NGINX's workers enter.
RUN_DIRECTORY = "/run/session-tower"


@dataclass(frozen=True)
class TowerPaths:
    """Absolute paths on the host, once its home directory is known.

    ``run``, for a tower of the root user only, is the directory the agent's socket is
    in instead of ``root``: one that NGINX's workers may enter (mode 2750, their group).
    """

    root: str
    run: str | None = None

    @property
    def settings(self) -> str:
        return f"{self.root}/tower.toml"

    @property
    def running_settings(self) -> str:
        """The settings the running agent was started with."""
        return f"{self.root}/agent.toml"

    @property
    def socket(self) -> str:
        return f"{self.run or self.root}/agent.sock"

    @property
    def pid(self) -> str:
        return f"{self.root}/agent.pid"

    @property
    def log(self) -> str:
        return f"{self.root}/agent.log"

    @property
    def tls(self) -> str:
        return f"{self.root}/tls"

    @property
    def identity(self) -> str:
        return f"{self.root}/tls/tower.pem"

    @property
    def ca(self) -> str:
        return f"{self.root}/tls/ca.pem"

    @property
    def nginx(self) -> str:
        return f"{self.root}/nginx"


# What provisioning asks the SSH login first: its home directory and its user id.
LOGIN_QUERY = "pwd && id -u"


@dataclass(frozen=True)
class Login:
    home: str
    uid: int


def parse_login(answer: str) -> Login:
    """The host's answer to ``LOGIN_QUERY``.

    Raises:
        ValueError: anything but an absolute plain path, then a decimal user id.
    """
    lines = answer.strip().split("\n")
    if len(lines) != 2:
        raise ValueError(f"{LOGIN_QUERY!r} answered {answer[:80]!r}, not two lines")
    home, uid = lines
    if not home.startswith("/") or not is_plain(home) or ":" in home:
        # (NGINX ends a unix: socket's path at the first ':')
        raise ValueError(f"the home directory {home[:80]!r} is not a plain path")
    if not re.fullmatch(r"[0-9]{1,10}", uid):
        raise ValueError(f"the user id {uid[:80]!r} is not a number")
    return Login(home, int(uid))


def tower_paths(host: Host, login: Login) -> TowerPaths:
    home = login.home.rstrip("/")
    root = host.root if host.root.startswith("/") else f"{home}/{host.root}"
    run = f"{RUN_DIRECTORY}/{host.name}" if login.uid == 0 else None
    return TowerPaths(posixpath.normpath(root), run)


def _owned(path: str) -> str:
    """A shell condition: ``path`` is the login's, and every directory above it the
    login's or root's (as OpenSSH's StrictModes asks of a user's files): nobody else
    could replace it, or a directory on its way, with their own."""
    # A subshell of its own, which the loop's exit leaves at the first stranger's.
    return (f'( [ "$(stat -c %u {path})" = "$(id -u)" ] && d={path} && while [ "$d" != / ];'
            f' do d=$(dirname "$d"); o=$(stat -c %u "$d");'
            f' [ "$o" = 0 ] || [ "$o" = "$(id -u)" ] || exit 1; done )')


def prepare_directories(paths: TowerPaths) -> str:
    """A shell command (one ``&&`` chain, failing at the first failure): the tower's
    directories, and for the root user NGINX's worker user and the socket directory of
    its group.

    An existing ``tower-nginx`` must be what provisioning makes (no login, a group of
    its own with no other members): a login account of that name, or others in its
    group, could reach the agent's socket.
    """
    steps = [
        f"mkdir -p {paths.tls} {paths.nginx}/tmp",
        # One made before by another user stays theirs, whatever chmod says, and one in
        # another user's directory may be swapped for theirs: they could change the
        # settings whose commands the agent runs, or NGINX's configuration.
        f"{{ {_owned(paths.root)}"
        f" || {{ echo '{paths.root} or a directory above it belongs to another user' >&2;"
        f" false; }}; }}",
        f"chmod 700 {paths.root}",
    ]
    if paths.run is not None:
        user = NGINX_WORKER_USER
        steps += [
            # Another tower of this host may be making it at the same moment.
            f"{{ id -u {user} >/dev/null 2>&1 || useradd --system --user-group"
            f" --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin {user}"
            f" || id -u {user} >/dev/null; }}",
            f"{{ [ \"$(getent passwd {user} | cut -d: -f7)\" = /usr/sbin/nologin ]"
            f" && [ -z \"$(getent group {user} | cut -d: -f4)\" ]"
            f" || {{ echo 'the account {user} exists but is not one for NGINX workers"
            f" alone (no login, a group of its own)' >&2; false; }}; }}",
            f"mkdir -p {paths.run}",
            f"chmod 755 {RUN_DIRECTORY}",
            # Set-group-ID: the socket made in it belongs to the workers' group too.
            f"chown root:{user} {paths.run}",
            f"chmod 2750 {paths.run}",
        ]
    return " && ".join(steps)


def nginx_command(host: Host, paths: TowerPaths, *arguments: str) -> list[str]:
    """The tower's NGINX, with its own prefix, configuration and error log."""
    return [
        host.nginx, "-p", f"{paths.nginx}/", "-e", f"{paths.nginx}/error.log",
        "-c", f"{paths.nginx}/nginx.conf", *arguments,
    ]  # fmt: skip


def agent_settings(host: Host, paths: TowerPaths, settings: Settings) -> str:
    """The agent's ``tower.toml``."""
    def words(*arguments: str) -> str:
        return ", ".join(_toml_string(word) for word in nginx_command(host, paths, *arguments))

    return "\n".join([
        f"name = {_toml_string(host.name)}",
        f"identity = {_toml_string(paths.identity)}",
        f"socket = {_toml_string(paths.socket)}",
        f"check = [{words('-t')}]",
        f"reload = [{words('-s', 'reload')}]",
        f"key_type = {_toml_string(settings.tower_key_type)}",
        f"capacity = {settings.tower_capacity}",
        f"video_weight = {settings.video_weight}",
        f"heartbeat_interval = {settings.heartbeat_interval!r}",
        f"heartbeat_timeout = {settings.heartbeat_timeout!r}",
        f"negotiation_deadline = {settings.negotiation_deadline!r}",
        f"load_interval = {settings.tower_load_interval!r}",
        "",
    ])  # fmt: skip


def nginx_configuration(host: Host, paths: TowerPaths) -> str:
    """A complete ``nginx.conf`` for the tower's own NGINX instance."""
    nginx = paths.nginx
    user = f"user {NGINX_WORKER_USER} {NGINX_WORKER_USER};\n" if paths.run is not None else ""
    return f"""\
{user}worker_processes 1;
pid {nginx}/nginx.pid;
error_log {nginx}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {nginx}/tmp/body;
    proxy_temp_path {nginx}/tmp/proxy;
    fastcgi_temp_path {nginx}/tmp/fastcgi;
    uwsgi_temp_path {nginx}/tmp/uwsgi;
    scgi_temp_path {nginx}/tmp/scgi;
    server {{
        listen {_listen_address(host.link_address)}:{host.tower_port} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {paths.identity};
        ssl_certificate_key {paths.identity};
        ssl_client_certificate {paths.ca};
        ssl_verify_client on;
        ssl_verify_depth 1;
        location = /link {{
            if ($ssl_client_s_dn != "CN={BROKER_NAME}") {{
                return 403;
            }}
            proxy_pass http://unix:{paths.socket}:;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header X-Client-Subject $ssl_client_s_dn;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            # Nothing through a temporary file: the workers may not reach NGINX's.
            proxy_buffering off;
            proxy_request_buffering off;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


def _listen_address(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def quote(words: list[str]) -> str:
    return " ".join(shlex.quote(word) for word in words)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
