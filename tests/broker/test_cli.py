"""The installed ``broker`` command."""

import resource
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import broker
from broker import cli

BROKER = Path(sys.executable).with_name("broker")


def test_the_console_command_is_installed_and_reports_its_version():
    result = subprocess.run([BROKER, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"broker {broker.__version__}"


def test_without_a_command_it_prints_usage_and_fails():
    result = subprocess.run([BROKER], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: broker" in result.stderr


def test_an_unknown_command_is_refused_clearly():
    result = subprocess.run([BROKER, "fly"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice: 'fly'" in result.stderr


def run_with_open_file_limit(soft: int, hard: int, code: str) -> subprocess.CompletedProcess:
    """``code`` run in a Python whose open-file limit starts at ``soft``, ``hard``."""
    prelude = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        "from broker import cli\n"
    )
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, check=True, timeout=60)


def hard_open_file_limit() -> int:
    """This machine's hard limit (which an unprivileged process cannot raise)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return cli.MOST_OPEN_FILES if hard == resource.RLIM_INFINITY else hard


def test_the_open_file_limit_is_raised_to_the_hard_one():
    hard = hard_open_file_limit()
    result = run_with_open_file_limit(256, hard, (
        "print(cli.raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"))
    raised = min(hard, cli.MOST_OPEN_FILES)
    assert result.stdout.split() == [str(raised), str(raised)]


def test_a_system_that_refuses_the_hard_limit_gets_the_highest_it_accepts():
    hard = hard_open_file_limit()
    if hard < 10_240:
        pytest.skip(f"this machine's hard limit ({hard}) is below the cap tried here")
    result = run_with_open_file_limit(256, hard, (
        "set_limit = resource.setrlimit\n"
        "def capped(kind, limits):\n"
        "    if limits[0] > 10_240:\n"
        "        raise ValueError('not allowed to raise maximum limit')\n"
        "    set_limit(kind, limits)\n"
        "resource.setrlimit = capped\n"
        "print(cli.raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "cli._open_files()\n"))
    assert result.stdout.split() == ["10240", "10240"]
    assert result.stderr == ""


def test_a_low_hard_limit_is_said_at_start():
    result = run_with_open_file_limit(256, 512, "cli._open_files()")
    assert "may open only 512 files" in result.stderr
    if hard_open_file_limit() >= cli.FEW_OPEN_FILES:
        quiet = run_with_open_file_limit(256, hard_open_file_limit(), "cli._open_files()")
        assert quiet.stderr == ""


def test_a_broker_that_cannot_start_says_why_without_a_traceback(tmp_path):
    state = tmp_path / "a-file"
    state.write_text("")
    result = subprocess.run([BROKER, "serve", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, f"broker: cannot use {state}: File exists\n")


@pytest.mark.parametrize("options, refused", [
    (["--towers", "-1"], "--towers cannot be negative"),
    (["--https-port", "70000"], "--https-port must be a port number (0-65535), not 70000"),
])
def test_a_broker_names_a_bad_flag_as_it_was_given(tmp_path, options, refused):
    result = subprocess.run([BROKER, "serve", "--state-dir", str(tmp_path), *options],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, f"broker: {refused}\n")


def test_a_bad_setting_from_the_file_keeps_its_name(tmp_path):
    (tmp_path / "broker.toml").write_text("local_towers = -1\n")
    result = subprocess.run([BROKER, "serve", "--config", str(tmp_path / "broker.toml")],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, "broker: local_towers cannot be negative\n")


@pytest.mark.parametrize("options, refused", [
    (["--capacity", "0"], "capacity must be at least 1, not 0"),
    (["--load-interval", "inf"], "load_interval must be a number of seconds"),
    (["--heartbeat-interval", "10", "--heartbeat-timeout", "1"],
     "heartbeat_timeout must be longer than heartbeat_interval"),
    (["--listen", "127.0.0.1:99999"], "the port must be a port number (0-65535), not 99999"),
    (["--listen", "127.0.0.1:\u00b2"], "give --config, or --name, --listen HOST:PORT"),
    (["--identity", "/nonexistent/identity.pem"], "/nonexistent/identity.pem: no such file"),
])
def test_a_tower_agent_refuses_settings_that_make_no_sense(tmp_path, options, refused):
    files = []
    for name in ("identity.pem", "ca.pem"):
        (tmp_path / name).write_text("")
        files.append(str(tmp_path / name))
    command = [BROKER, "tower", "run", "--name", "tower-1", "--listen", "127.0.0.1:0",
               "--identity", files[0], "--ca", files[1], *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.startswith(f"broker tower run: {refused}")


@pytest.mark.parametrize("options, refused", [
    (["--rate", "nan"], "--rate must be above 0"),
    (["--kill-tower-at", "-5"], "--kill-tower-at must be 0 or more"),
    (["--generator-cpus", "9999"], "--generator-cpus: this process may use CPUs"),
    (["--message-size", "262145"], "--message-size is at most 262144"),
    (["--workers", "65"], "--workers is at most 64"),
    (["--kill-tower-at", "26"],
     "--kill-tower-at must leave the sessions 10 s to be repaired before the run ends (35 s)"),
])
def test_a_load_test_refuses_figures_that_make_no_sense(options, refused):
    result = subprocess.run([BROKER, "loadtest", "https://127.0.0.1:9", "--api-key", "k",
                             *options], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"broker loadtest: {refused}")


def test_each_signing_request_comes_with_a_new_key(tmp_path):
    # A key left pending by an earlier provisioning attempt may have had its certificate
    # revoked since: the next attempt never asks for that key to be signed again.
    command = [BROKER, "tower", "csr", "--directory", str(tmp_path), "--name", "tower-1"]
    requests, keys = [], []
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
        requests.append(x509.load_pem_x509_csr(result.stdout.encode()))
        keys.append((tmp_path / "pending-key.pem").read_bytes())
    assert keys[0] != keys[1]
    public_keys = [request.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for request in requests]
    assert public_keys[0] != public_keys[1]
    assert public_keys[1] == serialization.load_pem_private_key(keys[1], None).public_key(
    ).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert (tmp_path / "pending-key.pem").stat().st_mode & 0o777 == 0o600
