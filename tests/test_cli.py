"""The `lukhas` command as a user meets it: help, errors, and `up` on the in-memory bus."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lukhas.cli import build_parser, main
from tests.integration.processes import REPO, running

COMMANDS = ["up", "worker", "request", "matriz", "health", "demo", "verify", "bench"]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text
    assert "LUKHAS_DRY_RUN_MODE" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "usage: lukhas" in capsys.readouterr().out


def test_request_without_a_server_is_one_clear_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lukhas.cli", "request", "--nats-url", "nats://127.0.0.1:1",
         "lukhas.governance.consent.record", "{}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "cannot connect to NATS" in result.stderr
    assert "Traceback" not in result.stderr


def test_request_with_a_body_that_is_not_json() -> None:
    assert main(["request", "lukhas.governance.consent.record", "{nope"]) == 2


def test_up_offline_runs_everything_in_memory_and_exits_0_on_sigterm() -> None:
    env = {"LUKHAS_OFFLINE": "true", "LUKHAS_DRY_RUN_MODE": "true"}
    with running("up", env=env) as up:
        assert "in-memory bus" in up.stdout[-1]
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0


@pytest.mark.nats
def test_demo_on_an_embedded_stack_exercises_every_slice_and_exits_0() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "lukhas.cli", "demo"], cwd=REPO, capture_output=True, text=True,
        timeout=120, env={**env, "LUKHAS_METRICS_PORT": "0"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rate_limited" in result.stdout
    assert "invalid_request" in result.stdout
    assert "CONTEXT:orchestration:handoff" in result.stdout
    assert "!!" not in result.stdout
