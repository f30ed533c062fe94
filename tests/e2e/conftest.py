"""The embedded broker as a real process, with real tower agent processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from broker.client import BrokerClient, trusting

# Short deadlines keep the repair tests quick; the protocol is the same at any value.
FAST_REPAIR = {
    "negotiation_deadline": 3.0,
    "heartbeat_interval": 0.5,
    "heartbeat_timeout": 2.0,
    "negotiation_restarts": 1,
}


@dataclass
class RunningBroker:
    process: subprocess.Popen
    url: str
    http_url: str
    api_key: str
    state_dir: Path
    certificate: str

    def client(self, api_key: str | None = None) -> BrokerClient:
        return BrokerClient(self.url, self.api_key if api_key is None else api_key,
                            trusting(self.certificate))

    def tower_pids(self) -> dict[str, int]:
        """Each local tower agent's pid, by tower name."""
        pids = {}
        for child in psutil.Process(self.process.pid).children(recursive=True):
            command = child.cmdline()
            if "tower" in command and "--name" in command:
                pids[command[command.index("--name") + 1]] = child.pid
        return pids


def start_broker(
    tmp_path: Path, towers: int = 2, https_port: int = 0, **settings: object
) -> RunningBroker:
    config = tmp_path / "broker.toml"
    settings.setdefault("shell_port", 0)
    config.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in settings.items()))
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", str(config),
         "--state-dir", str(tmp_path / "state"), "--https-port", str(https_port),
         "--http-port", "0",
         "--towers", str(towers), "--ready-json"],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "broker.log", "wb"),
    )
    line = process.stdout.readline()
    if not line:
        process.wait(10)
        raise RuntimeError((tmp_path / "broker.log").read_text()[-3000:])
    ready = json.loads(line)
    return RunningBroker(process, ready["url"].rstrip("/"), ready["http_url"].rstrip("/"),
                         ready["api_key"], Path(ready["state_dir"]), ready["certificate"])


@dataclass
class SteadyClient:
    """A session held by ``tests.e2e.steady_client`` in a process of its own."""

    process: subprocess.Popen
    id: str

    def finish(self) -> dict:
        """Stop it; returns its summary (echoes, failed echoes, negotiation, states)."""
        self.process.stdin.close()
        summary = json.loads(self.process.stdout.readline())
        self.process.wait(10)
        return summary

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


def start_steady_client(broker: RunningBroker) -> SteadyClient:
    """A session that keeps echoing, connected once this returns."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.steady_client", broker.url, broker.api_key,
         broker.certificate],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline().split()
    assert line[:1] == ["connected"], line
    return SteadyClient(process, line[1])


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(value)


def stop_broker(broker: RunningBroker) -> list[psutil.Process]:
    """SIGINT, as Ctrl-C; returns whatever of its process tree is still alive after."""
    tree = [psutil.Process(broker.process.pid)]
    tree += tree[0].children(recursive=True)
    broker.process.send_signal(signal.SIGINT)
    try:
        broker.process.wait(15)
    except subprocess.TimeoutExpired:
        pass
    _gone, alive = psutil.wait_procs(tree, timeout=5)
    for process in alive:
        process.kill()
    return alive


@pytest.fixture
def broker(tmp_path):
    running = start_broker(tmp_path, **FAST_REPAIR)
    yield running
    stop_broker(running)


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; TimeoutError past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"not within {timeout} s: {what}")


def wait_for_towers(broker: RunningBroker, count: int, timeout: float = 20.0) -> None:
    import time
    import urllib.request
    import ssl

    context = ssl.create_default_context(cafile=broker.certificate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker.process.poll() is not None:
            raise RuntimeError(f"the broker exited with {broker.process.returncode}")
        try:
            with urllib.request.urlopen(broker.url + "/healthz", context=context) as response:
                if json.load(response)["towers_ready"] >= count:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {count} towers ready after {timeout} s")





def run_shell(broker: RunningBroker, *commands: str, key: Path | None = None) -> list:
    """Each command over one SSH connection to the broker's shell, as ``ssh broker-host
    COMMAND`` would run it; returns asyncssh's completed processes."""
    import asyncio

    import asyncssh

    shell = broker.state_dir / "shell"
    port = int((shell / "port").read_text())
    host_key = asyncssh.read_public_key(str(shell / "host-key.pub"))

    async def main():
        known = asyncssh.import_known_hosts(
            f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
        async with asyncssh.connect(
            "127.0.0.1", port, username="operator", known_hosts=known,
            client_keys=[str(key or shell / "operator-key")],
        ) as connection:
            return [await connection.run(command) for command in commands]

    return asyncio.run(main())
