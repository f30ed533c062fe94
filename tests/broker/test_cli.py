"""The installed ``broker`` command."""

import subprocess
import sys
from pathlib import Path

import broker

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
