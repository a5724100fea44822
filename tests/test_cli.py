"""The `lukhas` command as a user meets it: help, errors, and `up` on the in-memory bus."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import nats
import pytest

from bus.server import free_port
from tests.integration.processes import REPO, running
from workers.cli.main import EXIT_BROKEN_PIPE, build_parser, main

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


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NATS_URL", "LUKHAS_OFFLINE", "LUKHAS_DRY_RUN_MODE")}
    return {**env, **extra}


def _cli(*args: str, env: dict[str, str] | None = None, input: str | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, env=env or _env(), input=input,
    )


async def _acli(*args: str, input: bytes | None = None,
                env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI as a child process while this event loop keeps serving (a responder)."""
    result = await anyio.run_process(
        [sys.executable, "-m", "workers.cli.main", *args], cwd=REPO, input=input, check=False,
        env=env or _env(),
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@asynccontextmanager
async def _echo(url: str, subject: str) -> AsyncIterator[list[bytes]]:
    """A plain nats-py responder that answers `{"ok": true, "echo": <body>}`."""
    nc = await nats.connect(url)
    seen: list[bytes] = []

    async def answer(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.data)
        await msg.respond(json.dumps({"ok": True, "echo": json.loads(msg.data)}).encode())

    await nc.subscribe(subject, cb=answer)
    await nc.flush()
    try:
        yield seen
    finally:
        await nc.close()


def test_request_without_a_server_is_one_clear_line_on_stderr() -> None:
    result = _cli("request", "--nats-url", "nats://127.0.0.1:1",
                  "lukhas.governance.consent.record", "{}")
    assert result.returncode == 2
    assert result.stderr.startswith("lukhas: ") and "cannot connect to NATS" in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_request_with_a_body_that_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["request", "lukhas.governance.consent.record", "{nope"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("lukhas: the request body is not JSON")


def test_request_body_from_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = _cli("request", "lukhas.governance.consent.record", f"@{tmp_path}/nope.json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"lukhas: cannot read the request body from {tmp_path}")


@pytest.mark.nats
async def test_request_reads_the_body_from_stdin_and_from_a_file(
    nats_url: str, tmp_path: Path
) -> None:
    body = {"ctx": {"task": "plan", "n": 3}, "target": "planner"}
    path = tmp_path / "body.json"
    path.write_text(json.dumps(body))
    async with _echo(nats_url, "cli.echo.body") as seen:
        code_stdin, out_stdin, _ = await _acli(
            "request", "--nats-url", nats_url, "cli.echo.body", "-",
            input=json.dumps(body).encode(),
        )
        code_file, out_file, _ = await _acli(
            "request", "--nats-url", nats_url, "cli.echo.body", f"@{path}"
        )
    assert code_stdin == code_file == 0
    assert json.loads(out_stdin)["echo"] == json.loads(out_file)["echo"] == body
    assert [json.loads(d) for d in seen] == [body, body]


@pytest.mark.nats
async def test_bus_errors_are_one_stderr_line_and_exit_2_never_a_hang(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.subscribe("cli.silent")  # takes requests, never answers
        await nc.flush()
        with anyio.fail_after(30):
            nobody = await _acli("request", "--nats-url", nats_url, "cli.nobody.home", "{}")
            silent = await _acli("request", "--nats-url", nats_url, "--timeout", "0.5",
                                 "cli.silent", "{}")
    finally:
        await nc.close()
    for code, out, err in (nobody, silent):
        assert code == 2 and out == ""
        assert err.startswith("lukhas: ") and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    assert "cli.nobody.home" in nobody[2]
    assert "cli.silent" in silent[2]


@pytest.mark.nats
async def test_output_into_a_closed_pipe_exits_quietly(nats_url: str) -> None:
    """`lukhas ... | head` after head has gone: no Broken pipe noise, the SIGPIPE status."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before we write
    try:
        async with _echo(nats_url, "cli.echo.pipe"):
            result = await anyio.run_process(
                [sys.executable, "-m", "workers.cli.main", "request", "--nats-url", nats_url,
                 "cli.echo.pipe", '{"x": 1}'],
                cwd=REPO, stdout=write_end, check=False, env=_env(),
            )
    finally:
        os.close(write_end)
    assert result.returncode == EXIT_BROKEN_PIPE
    assert result.stderr.decode() == ""


@pytest.mark.parametrize("args", [
    ["request", "lukhas.governance.consent.record", "{}"],
    ["health"],
    ["matriz", "stats"],
    ["matriz", "tail", "--count", "1"],
])
def test_client_commands_refuse_under_offline(args: list[str]) -> None:
    result = _cli(*args, env=_env(LUKHAS_OFFLINE="true"), timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("lukhas: LUKHAS_OFFLINE=true forbids network connections")


def test_demo_under_offline_runs_in_memory_and_prints_no_false_oks() -> None:
    result = _cli("demo", env=_env(LUKHAS_OFFLINE="true"), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "in-memory bus" in lines[0]
    assert "ok=False" not in result.stdout and "!!" not in result.stdout
    assert any("invalid_request" in line and "(as expected)" in line for line in lines)
    assert "rate_limited" in result.stdout and "CONTEXT:orchestration:handoff" in result.stdout


def _tcp_socket_inodes() -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path("/proc/net") / table
        if path.exists():
            inodes |= {line.split()[9] for line in path.read_text().splitlines()[1:]}
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:["):-1])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_up_offline_opens_no_network_socket() -> None:
    env = {"LUKHAS_OFFLINE": "true", "LUKHAS_METRICS_PORT": "9464"}
    with running("up", env=env) as up:
        assert "no /metrics" in up.stdout[-1]
        network = _socket_inodes(up.proc.pid) & _tcp_socket_inodes()
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0
    assert network == set()


def test_up_refuses_a_taken_metrics_port_naming_it() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _cli("up", "--metrics-port", str(port),
                      env=_env(LUKHAS_DRY_RUN_MODE="true"), timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"lukhas: port {port} (Prometheus /metrics")
    assert "--metrics-port" in result.stderr and "Traceback" not in result.stderr


def test_up_refuses_a_nats_port_another_program_holds() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _cli("up", "--port", str(port), "--metrics-port", "0", timeout=60)
    assert result.returncode == 2
    assert f"port {port} is in use: another program listens on it" in result.stderr
    assert f"--port {port + 1}" in result.stderr and "Traceback" not in result.stderr


def _make_n(*args: str) -> subprocess.CompletedProcess[str]:
    # Not as a sub-make of `make test`: no inherited flags, no "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-n", "-o", "install", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=30, env=env)


def test_make_run_passes_port_and_args() -> None:
    dry = _make_n("run", "PORT=4223", "ARGS=--join")
    assert dry.returncode == 0, dry.stderr
    assert ".venv/bin/lukhas up --port 4223 --join" in dry.stdout
    plain = _make_n("run")
    assert plain.stdout.split() == [".venv/bin/lukhas", "up"]


def test_up_offline_runs_everything_in_memory_and_exits_0_on_sigterm() -> None:
    env = {"LUKHAS_OFFLINE": "true", "LUKHAS_DRY_RUN_MODE": "true"}
    with running("up", env=env) as up:
        assert "in-memory bus" in up.stdout[-1]
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0


@pytest.mark.nats
async def test_demo_without_a_running_stack_starts_an_embedded_one_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lukhas.config import Settings
    from workers.cli.demo import run_demo

    dead = f"nats://127.0.0.1:{free_port()}"  # where `lukhas up` would be: nobody answers
    lines: list[str] = []
    ok = await run_demo(Settings(pseudonym_key="demo-test"), nats_url=None, default_url=dead,
                        out=lines.append)
    table = capsys.readouterr().out
    assert ok, lines
    assert lines[0].startswith(f"no stack answers at {dead}")
    assert lines[1].startswith("demo against an embedded stack at nats://")
    assert "ok=False" not in "\n".join(lines) and not any(li.startswith("!!") for li in lines)
    assert any("rate_limited" in line for line in lines)
    assert "CONTEXT:orchestration:handoff" in table


def test_demo_with_an_explicit_url_that_does_not_answer_fails_clearly() -> None:
    result = _cli("demo", "--nats-url", "nats://127.0.0.1:1", timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("lukhas: ") and "nats://127.0.0.1:1" in result.stderr
