"""What provisioning puts on a tower host: paths, the agent's tower.toml, nginx.conf."""

import grp
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import pytest

from broker.config import Settings
from broker.inventory import parse_host
from broker.pki import BROKER_NAME, CertificateAuthority, generate_key_and_csr
from broker.site import (
    NGINX_WORKER_USER,
    RUN_DIRECTORY,
    Login,
    TowerPaths,
    agent_settings,
    nginx_command,
    nginx_configuration,
    parse_login,
    prepare_directories,
    quote,
    tower_paths,
)
from broker.tower.agent import load_agent_config
from tests.e2e.hosts import listening_port, root_tower_traces_removed

NGINX = "/usr/sbin/nginx"


def host(**overrides):
    values = {"name": "tower-1", "address": "10.0.0.7", "user": "tower",
              "trust_on_first_use": True}
    values.update(overrides)
    return parse_host(values)


# Paths.


def login(home: str, uid: int = 1000) -> Login:
    return Login(home, uid)


def test_the_login_s_answer_gives_its_home_and_user_id():
    assert parse_login("/home/tower\n1000\n") == Login("/home/tower", 1000)
    assert parse_login("/root\n0\n") == Login("/root", 0)


@pytest.mark.parametrize("answer, complaint", [
    ("", "not two lines"),
    ("/home/tower\n", "not two lines"),
    ("welcome!\n/home/tower\n1000\n", "not two lines"),
    ("home/tower\n1000", "not a plain path"),
    ("/home/tower; rm -rf /\n1000", "not a plain path"),
    ("/home/to:wer\n1000", "not a plain path"),  # NGINX would cut its socket path there
    ("/home/tower\n-1", "not a number"),
    ("/home/tower\n0x0", "not a number"),
    ("/home/tower\n\u0660", "not a number"),  # a digit, but not an ASCII one
    ("/home/tower\n" + "9" * 11, "not a number"),
])
def test_a_login_s_answer_that_is_not_a_home_and_a_user_id_is_refused(answer, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_login(answer)


def test_a_relative_root_is_under_the_home_directory():
    paths = tower_paths(host(), login("/home/tower"))
    assert paths.root == "/home/tower/session-tower"
    assert tower_paths(host(), login("/home/tower/")).root == "/home/tower/session-tower"
    assert tower_paths(host(root="towers/eu"), login("/home/tower")).root == "/home/tower/towers/eu"
    assert tower_paths(host(), login("/")).root == "/session-tower"


def test_an_absolute_root_is_kept():
    assert tower_paths(host(root="/srv/tower"), login("/home/tower")).root == "/srv/tower"


def test_the_layout_under_the_root():
    paths = tower_paths(host(), login("/home/tower"))
    root = "/home/tower/session-tower"
    assert paths.settings == f"{root}/tower.toml"
    assert paths.socket == f"{root}/agent.sock"
    assert paths.pid == f"{root}/agent.pid"
    assert paths.log == f"{root}/agent.log"
    assert paths.tls == f"{root}/tls"
    assert paths.identity == f"{root}/tls/tower.pem"
    assert paths.ca == f"{root}/tls/ca.pem"
    assert paths.nginx == f"{root}/nginx"


def test_nginx_runs_with_its_own_prefix_configuration_and_error_log():
    tower = host(nginx="/opt/nginx/sbin/nginx")
    paths = tower_paths(tower, login("/home/tower"))
    nginx = "/home/tower/session-tower/nginx"
    assert nginx_command(tower, paths, "-s", "reload") == [
        "/opt/nginx/sbin/nginx", "-p", f"{nginx}/", "-e", f"{nginx}/error.log",
        "-c", f"{nginx}/nginx.conf", "-s", "reload",
    ]
    assert nginx_command(tower, paths)[-1] == f"{nginx}/nginx.conf"


def test_quote_makes_one_shell_word_of_each_argument():
    assert quote(["nginx", "-c", "/a b/c", "it's"]) == "nginx -c '/a b/c' 'it'\"'\"'s'"


# The agent's settings.


def load(text: str, tmp_path: Path):
    path = tmp_path / "tower.toml"
    path.write_text(text)
    return load_agent_config(path)


def test_the_agent_settings_parse_and_load_as_written(tmp_path):
    tower = host(name="tower-eu-1", nginx="/usr/local/sbin/nginx")
    paths = tower_paths(tower, login("/home/tower"))
    settings = Settings(
        tower_capacity=250, heartbeat_interval=0.5, heartbeat_timeout=2.5,
        tower_load_interval=0.25, tower_silence=1.0, tower_key_type="rsa",
        negotiation_deadline=7.5,
    )
    text = agent_settings(tower, paths, settings)
    values = tomllib.loads(text)
    assert values["name"] == "tower-eu-1"
    assert values["capacity"] == 250
    assert values["key_type"] == "rsa"
    agent = load(text, tmp_path)
    assert agent.name == "tower-eu-1"
    assert agent.identity == Path("/home/tower/session-tower/tls/tower.pem")
    assert agent.socket == Path("/home/tower/session-tower/agent.sock")
    assert agent.reload == tuple(nginx_command(tower, paths, "-s", "reload"))
    assert agent.reload[0] == "/usr/local/sbin/nginx"
    assert agent.reload[-2:] == ("-s", "reload")
    assert agent.key_type == "rsa"
    assert agent.capacity == 250
    assert agent.load_interval == 0.25
    assert agent.peer.heartbeat_interval == 0.5
    assert agent.peer.heartbeat_timeout == 2.5
    assert agent.peer.negotiation_deadline == 7.5
    assert agent.peer.tower == "tower-eu-1"
    # Behind NGINX: no port of its own, no CA of its own.
    assert (agent.host, agent.port, agent.ca) == ("", 0, None)


def test_the_agent_settings_with_the_defaults(tmp_path):
    tower = host()
    paths = tower_paths(tower, login("/root"))
    agent = load(agent_settings(tower, paths, Settings()), tmp_path)
    assert agent.capacity == Settings.tower_capacity
    assert agent.key_type == Settings.tower_key_type
    assert agent.load_interval == Settings.tower_load_interval
    assert agent.peer.heartbeat_interval == Settings.heartbeat_interval
    assert agent.peer.negotiation_deadline == Settings.negotiation_deadline


def test_agent_settings_written_before_the_negotiation_deadline_was_load(tmp_path):
    tower = host()
    text = agent_settings(tower, tower_paths(tower, login("/root")), Settings())
    text = "\n".join(line for line in text.splitlines()
                     if not line.startswith("negotiation_deadline"))
    assert load(text, tmp_path).peer.negotiation_deadline == Settings.negotiation_deadline


def test_paths_with_toml_special_characters_survive(tmp_path):
    # The home directory comes from the host; quotes and backslashes must be escaped.
    tower = host()
    paths = tower_paths(tower, login('/home/o"brien\\x'))
    agent = load(agent_settings(tower, paths, Settings()), tmp_path)
    assert str(agent.socket) == '/home/o"brien\\x/session-tower/agent.sock'
    assert agent.reload[2] == '/home/o"brien\\x/session-tower/nginx/'


# NGINX's configuration.


def test_nginx_requires_a_client_certificate_of_the_broker_s_ca_and_name():
    tower = host(tower_address="192.168.1.9", tower_port=9443)
    paths = tower_paths(tower, login("/home/tower"))
    text = nginx_configuration(tower, paths)
    assert "listen 192.168.1.9:9443 ssl;" in text
    assert "ssl_verify_client on;" in text
    assert f"ssl_client_certificate {paths.ca};" in text
    assert f"ssl_certificate {paths.identity};" in text
    assert f"ssl_certificate_key {paths.identity};" in text
    assert 'if ($ssl_client_s_dn != "CN=broker")' in text
    assert "return 403;" in text
    assert f"proxy_pass http://unix:{paths.socket}:;" in text
    assert "location = /link" in text
    # Everything but /link is refused.
    assert "location / {\n            return 404;" in text
    assert f"pid {paths.nginx}/nginx.pid;" in text


def test_nginx_listens_on_the_ssh_address_without_a_tower_address():
    tower = host(address="10.0.0.7")
    text = nginx_configuration(tower, tower_paths(tower, login("/home/tower")))
    assert "listen 10.0.0.7:8443 ssl;" in text


@pytest.mark.parametrize("user", ["root", "admin"])
def test_nginx_workers_run_as_their_own_user_when_root_provisions(user):
    # Root is user id 0, whatever the login's name.
    tower = host(user=user)
    paths = tower_paths(tower, login("/root", uid=0))
    text = nginx_configuration(tower, paths)
    assert text.startswith(f"user {NGINX_WORKER_USER} {NGINX_WORKER_USER};\n")
    # Root's home is closed to them: the socket is in a directory of their group.
    assert paths.socket == f"{RUN_DIRECTORY}/{tower.name}/agent.sock"
    assert f"proxy_pass http://unix:{paths.socket}:;" in text
    assert paths.root == "/root/session-tower"
    prepared = prepare_directories(paths)
    assert "useradd --system --user-group" in prepared
    assert f"chown root:{NGINX_WORKER_USER} {paths.run} && chmod 2750 {paths.run}" in prepared


def test_nginx_workers_run_as_the_ssh_user_otherwise():
    tower = host(user="root")  # a name only: not user id 0
    paths = tower_paths(tower, login("/home/tower"))
    text = nginx_configuration(tower, paths)
    assert "user " not in text.split("http {")[0]
    assert text.startswith("worker_processes 1;")
    assert paths.run is None and paths.socket == "/home/tower/session-tower/agent.sock"
    assert "useradd" not in prepare_directories(paths)


def test_the_nginx_configuration_braces_balance():
    text = nginx_configuration(host(), tower_paths(host(), login("/home/tower")))
    assert text.count("{") == text.count("}")


def test_an_ipv6_link_address_is_bracketed_in_the_listen_directive():
    tower = host(tower_address="::1")
    text = nginx_configuration(tower, tower_paths(tower, login("/home/tower")))
    assert "listen [::1]:8443 ssl;" in text


# A real NGINX checks the rendered configuration.


@pytest.fixture(scope="module")
def authority():
    return CertificateAuthority.create()


def install(tower, home: Path, authority, uid: int = 1000):
    """Put what provisioning puts on the host: identity, CA, nginx.conf and its tmp dir."""
    paths = tower_paths(tower, login(str(home), uid))
    Path(paths.tls).mkdir(parents=True, mode=0o700)
    Path(paths.nginx, "tmp").mkdir(parents=True)
    key, csr = generate_key_and_csr(tower.name)
    certificate = authority.sign_tower_csr(csr, tower.name, addresses=["127.0.0.1"])
    Path(paths.identity).write_bytes(key + certificate)
    os.chmod(paths.identity, 0o600)
    Path(paths.ca).write_bytes(authority.certificate_pem)
    Path(paths.nginx, "nginx.conf").write_text(nginx_configuration(tower, paths))
    return paths


@pytest.fixture
def home():
    # Short: the agent's socket path must fit in sun_path (108 bytes) for NGINX.
    path = Path(tempfile.mkdtemp(prefix="site-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(not os.path.exists(NGINX), reason=f"no NGINX at {NGINX} to check against")
@pytest.mark.parametrize("uid", [1000, 0])
def test_nginx_accepts_the_rendered_configuration(home, authority, uid):
    tower = host(tower_address="127.0.0.1", tower_port=listening_port(), nginx=NGINX)
    paths = install(tower, home, authority, uid)
    with root_tower_traces_removed():
        if paths.run is not None and os.geteuid() == 0:
            # As provisioning does: NGINX checks that its workers' user exists.
            subprocess.run(["sh", "-c", prepare_directories(paths)], check=True,
                           timeout=30)
            assert os.stat(paths.run).st_mode & 0o7777 == 0o2750
            assert os.stat(paths.run).st_gid == grp.getgrnam(NGINX_WORKER_USER).gr_gid
        result = subprocess.run(
            nginx_command(tower, paths, "-t"), capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_a_tower_directory_of_its_own_is_prepared(home):
    root = home / "session-tower"
    result = subprocess.run(["sh", "-c", prepare_directories(TowerPaths(str(root)))],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert os.stat(root).st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
@pytest.mark.parametrize("theirs", [0, 1, 2])
@pytest.mark.parametrize("slash", ["", "/"])
def test_a_tower_directory_another_user_could_swap_is_refused(home, theirs, slash):
    # Made beforehand by another local user (root's chmod leaves it theirs), or under a
    # directory of theirs (they may rename it and put their own in its place): they could
    # change the settings whose commands the agent runs.
    root = home / "shared" / "theirs" / "session-tower"
    root.mkdir(parents=True)
    os.chown([root, root.parent, root.parent.parent][theirs], 65534, 65534)
    tower = host(root=str(root) + slash)
    paths = tower_paths(tower, login("/home/tower"))  # (no tower-nginx account made)
    assert paths.root == str(root) and paths.run is None
    result = subprocess.run(["sh", "-c", prepare_directories(paths)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "belongs to another user" in result.stderr


@pytest.mark.skipif(not os.path.exists(NGINX), reason=f"no NGINX at {NGINX} to check against")
def test_nginx_refuses_the_configuration_without_the_tower_identity(home, authority):
    # The check is real: without the identity NGINX fails, naming the file.
    tower = host(tower_address="127.0.0.1", tower_port=listening_port(), nginx=NGINX)
    paths = install(tower, home, authority)
    os.unlink(paths.identity)
    result = subprocess.run(
        nginx_command(tower, paths, "-t"), capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "tower.pem" in result.stderr


@pytest.mark.parametrize("line, complaint", [
    ('key_type = "dsa"', "key_type is 'ec' or 'rsa'"),
    ("capacity = [1]", "capacity must be a whole number of at least 1"),
    ('load_interval = "soon"', "load_interval must be a number of seconds"),
    # Of another type, a value was turned into something else: a command of one
    # letter each, a capacity rounded down, true taken as 1.
    ('reload = "systemctl reload nginx"', "reload must be a command as a list of words"),
    ('check = "nginx -t"', "check must be a command as a list of words"),
    ("capacity = 2.9", "capacity must be a whole number of at least 1, not 2.9"),
    ("video_weight = true", "video_weight must be a whole number of at least 1, not True"),
    ('name = ""', "name must be a non-empty string"),
    ("negotiation_deadline = 0.0", "negotiation_deadline must be a number of seconds"),
    ("heartbeat_timeout = nan", "heartbeat_timeout must be a number of seconds"),
])
def test_agent_settings_with_a_bad_value_are_refused_naming_the_file(tmp_path, line, complaint):
    tower = host()
    text = agent_settings(tower, tower_paths(tower, login("/home/tower")), Settings())
    key = line.split(" = ")[0]
    text = "\n".join(
        entry for entry in text.splitlines() if not entry.startswith(f"{key} ")
    ) + f"\n{line}\n"
    path = tmp_path / "tower.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as refused:
        load_agent_config(path)
    assert str(path) in str(refused.value) and complaint in str(refused.value)


def _client_identity(home: Path, name: str, authority: CertificateAuthority) -> Path:
    key, certificate = authority.issue(name, client_only=True)
    path = home / f"client-{name}.pem"
    path.write_bytes(key + certificate)
    return path


class AgentStandIn:
    """Listens on the agent's socket and answers every request 418, with the client
    subject NGINX passed on; it records what it saw."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        os.chmod(path, 0o666)  # NGINX's workers may run as another user here
        self.listener.listen()
        self.listener.settimeout(0.1)
        self.subjects: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(10)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(4096)
                headers = dict(line.split(": ", 1) for line in
                               request.decode().split("\r\n")[1:] if ": " in line)
                subject = headers.get("X-Client-Subject", "")
                self.subjects.append(subject)
                connection.sendall(f"HTTP/1.1 418 I'm a teapot\r\nX-Seen-Subject: {subject}\r\n"
                                   "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(10)
        self.listener.close()


@pytest.mark.skipif(not os.path.exists(NGINX), reason=f"no NGINX at {NGINX} to check against")
@pytest.mark.parametrize("client, expected", [
    ("no certificate", 400),
    ("another CA's broker", 400),
    ("a tower of the broker's CA", 403),
    ("the broker", 418),  # through both checks, to the agent's socket
])
def test_nginx_lets_only_the_broker_through_to_the_agent(home, authority, client, expected):
    home.chmod(0o755)  # for NGINX's workers, whoever they run as here
    tower = host(tower_address="127.0.0.1", tower_port=listening_port(), nginx=NGINX)
    paths = install(tower, home, authority)
    context = ssl.create_default_context(cafile=paths.ca)
    if client == "another CA's broker":
        context.load_cert_chain(_client_identity(home, BROKER_NAME, CertificateAuthority.create()))
    elif client == "a tower of the broker's CA":
        context.load_cert_chain(_client_identity(home, "tower-2", authority))
    elif client == "the broker":
        context.load_cert_chain(_client_identity(home, BROKER_NAME, authority))
    agent = AgentStandIn(paths.socket)
    subprocess.run(nginx_command(tower, paths), check=True, capture_output=True, timeout=30)
    connection = http.client.HTTPSConnection("127.0.0.1", tower.tower_port, context=context,
                                             timeout=30)
    try:
        connection.request("GET", "/link", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        })
        response = connection.getresponse()
        assert response.status == expected
        if expected == 418:
            assert response.getheader("X-Seen-Subject") == f"CN={BROKER_NAME}"
            assert agent.subjects == [f"CN={BROKER_NAME}"]
        else:
            assert agent.subjects == []  # refused before anything reached the agent
    finally:
        connection.close()
        agent.stop()
        subprocess.run(nginx_command(tower, paths, "-s", "stop"), capture_output=True,
                       timeout=30)
        pid = Path(paths.nginx, "nginx.pid")
        deadline = time.monotonic() + 10
        while pid.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
