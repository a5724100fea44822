"""compose.yaml's services and examples against the users of deploy/nats-server.conf.

No Docker engine runs here, so two kinds of check: statically, every service connects as a
user the config has, with that user's password variable and an inbox prefix the user may
read; and for real, the compose header's example commands and the healthchecks run with
the very environment compose gives their service (only the server's host name differs)
against a nats-server running the deploy config, with the workers running as compose runs
them. An example that a user's permissions refuse fails here, as it would for a user.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

import tests.integration.processes as processes
from bus import connect
from bus.connect import inbox_prefix
from lukhas import subjects
from lukhas.config import Settings
from tests.candidate._support import LEDGER_SIGNING_KEY, LEDGER_WRAPPING_KEY
from tests.integration.processes import REPO, LukhasProcess
from tests.security.test_nats_auth import (
    DEPLOY_CONF,
    PASSWORD_VARIABLES,
    AuthServer,
    _clean_env,
    start_deploy_server,
)

COMPOSE_TEXT = (REPO / "compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
CONF = DEPLOY_CONF.read_text()


@dataclass(frozen=True)
class Example:
    line: str
    service: str
    argv: list[str]
    how: str  # "run" or "exec"


def header_examples() -> list[Example]:
    """The `docker compose run|exec ...` commands in compose.yaml's header comment."""
    examples = []
    for raw in COMPOSE_TEXT.splitlines():
        if not raw.startswith("#"):
            break
        line = raw.lstrip("#").strip()
        if not line.startswith("docker compose "):
            continue
        words = shlex.split(line)[2:]
        how = words.pop(0)
        words = [w for w in words if w != "--rm"]
        service, argv = words[0], words[1:]
        if how == "exec":
            assert argv[0] == "lukhas", line
            argv = argv[1:]
        examples.append(Example(line, service, argv, how))
    return examples


def permission_block(user: str) -> str:
    """The text of the permissions block the config gives `user`."""
    found = re.search(rf"\{{user:\s*{user},[^}}]*permissions:\s*\$(\w+)\}}", CONF)
    assert found is not None, f"no user {user} in {DEPLOY_CONF}"
    start = CONF.index(f"{found.group(1)} = {{")
    depth = 0
    for i in range(start, len(CONF)):
        depth += {"{": 1, "}": -1}.get(CONF[i], 0)
        if CONF[i] == "}" and depth == 0:
            return CONF[start:i + 1]
    raise AssertionError(f"unbalanced block for {user}")


def resolve(value: str, variables: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?message}` interpolation."""

    def one(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if variables.get(name):
            return variables[name]
        if op == ":-":
            return rest
        raise AssertionError(f"compose would refuse to start: {name} is unset ({rest})")

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, str(value))


def lukhas_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in SERVICES.items() if "build" in svc}


# -- static ---------------------------------------------------------------------------------


def test_header_examples_name_real_services_and_commands() -> None:
    examples = header_examples()
    assert any(e.argv[:1] == ["request"] for e in examples), examples
    for example in examples:
        svc = SERVICES.get(example.service)
        assert svc is not None and "build" in svc, example.line
        # `exec` needs a service `up` runs; `run` a tool service `up` leaves alone.
        assert ("profiles" in svc) == (example.how == "run"), example.line


def test_every_service_connects_as_a_config_user_with_its_own_inbox() -> None:
    nats_env = SERVICES["nats"]["environment"]
    assert set(PASSWORD_VARIABLES.values()) <= set(nats_env), "nats-server would not start"
    for name, svc in lukhas_services().items():
        env = svc["environment"]
        user = env["NATS_USER"]
        assert user in PASSWORD_VARIABLES, f"{name}: {user} is not a user of the config"
        variable = PASSWORD_VARIABLES[user]
        assert re.fullmatch(rf"\$\{{{variable}(:[-?][^}}]*)?\}}", env["NATS_PASSWORD"]), name
        prefix = inbox_prefix(Settings(nats_user=user))
        block = permission_block(user)
        subscribe = block[block.index("subscribe"):]
        assert f'"{prefix}.>"' in subscribe, f"{name}: {user} may not read {prefix}.>"
        assert '"_INBOX.>"' not in block, f"{user} may read every inbox"


def test_no_password_has_a_public_default() -> None:
    for name, svc in SERVICES.items():
        for key, value in svc.get("environment", {}).items():
            if "PASSWORD" in key:
                assert ":?" in str(value), f"{name}: {key} has a default: {value}"


# -- for real -------------------------------------------------------------------------------


def service_env(name: str, auth: AuthServer, variables: dict[str, str]) -> dict[str, str]:
    env = {k: resolve(v, variables) for k, v in SERVICES[name]["environment"].items()}
    env["NATS_URL"] = env["NATS_URL"].replace("nats://nats:4222", auth.url)
    return env


@pytest.fixture(scope="module")
def compose_like(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AuthServer, dict]]:
    auth = start_deploy_server(tmp_path_factory.mktemp("compose-nats"))
    variables = {PASSWORD_VARIABLES[u]: p for u, p in auth.passwords.items()}
    variables["LUKHAS_PSEUDONYM_KEYS"] = secrets.token_hex(32)
    variables.update({  # the features on, as a deployment that uses them runs
        "FEATURE_GOVERNANCE_LEDGER": "true", "FEATURE_ORCHESTRATION_HANDOFF": "true",
        "LUKHAS_LEDGER_SIGNING_KEY": LEDGER_SIGNING_KEY,
        "LUKHAS_LEDGER_WRAPPING_KEY": LEDGER_WRAPPING_KEY,
    })
    procs: list[LukhasProcess] = []
    # Only compose's environment: no test defaults (e.g. a second pseudonym key variable).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(processes, "BASE_ENV", {})
        for key in [k for k in os.environ if k.startswith(("NATS_", "LUKHAS_", "FEATURE_"))]:
            mp.delenv(key)
        try:
            for name, svc in lukhas_services().items():
                if "profiles" in svc:
                    continue
                # Port 0: other tests on this machine may hold compose's metrics port.
                env = {**service_env(name, auth, variables), "LUKHAS_METRICS_PORT": "0",
                       "LUKHAS_GATEWAY_PORT": "0"}
                proc = LukhasProcess(*svc["command"], env=env)
                procs.append(proc)
                proc.wait_for_line("ready", 60)
            yield auth, variables
        finally:
            for proc in procs:
                if proc.proc.poll() is None:
                    proc.proc.terminate()
                proc.wait(30)
            auth.server.stop()


def run_lukhas(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *argv], cwd=REPO, capture_output=True,
        text=True, timeout=60, env={**_clean_env(), **env},
    )


@pytest.mark.nats
def test_header_examples_work_as_the_user_they_run_as(
    compose_like: tuple[AuthServer, dict[str, str]],
) -> None:
    auth, variables = compose_like
    for example in header_examples():
        env = service_env(example.service, auth, variables)
        if example.argv[:2] == ["matriz", "tail"]:
            result = _tail_one_node(example.argv, env, auth)
        else:
            result = run_lukhas(example.argv, env)
        assert result.returncode == 0, (example.line, result.stdout, result.stderr)
        assert "permission" not in result.stderr.lower(), (example.line, result.stderr)


@pytest.mark.nats
def test_a_worker_user_calling_a_slice_is_a_clear_refusal(
    compose_like: tuple[AuthServer, dict[str, str]],
) -> None:
    """The old header example (`exec slices lukhas request ...`): refused, said so, non-zero."""
    auth, variables = compose_like
    result = run_lukhas(
        ["request", subjects.CONSENT_RECORD, '{"user_id":"u1","scope":"gmail.read"}'],
        service_env("slices", auth, variables),
    )
    assert result.returncode != 0, result  # the CLI's error status
    assert result.stderr.startswith("lukhas: permission denied"), result.stderr
    assert subjects.CONSENT_RECORD in result.stderr, result.stderr


@pytest.mark.nats
def test_healthchecks_pass_as_their_services_user(
    compose_like: tuple[AuthServer, dict[str, str]],
) -> None:
    auth, variables = compose_like
    checks = {
        name: svc["healthcheck"]["test"][2:] for name, svc in lukhas_services().items()
        if svc.get("healthcheck", {}).get("test", [])[1:2] == ["lukhas"]
    }
    assert checks, "no lukhas healthcheck found"
    with ThreadPoolExecutor(len(checks)) as pool:  # `lukhas health` listens for its timeout
        results = dict(zip(checks, pool.map(
            lambda name: run_lukhas(checks[name], service_env(name, auth, variables)), checks
        ), strict=True))
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stdout, result.stderr)


def _tail_one_node(
    argv: list[str], env: dict[str, str], auth: AuthServer
) -> subprocess.CompletedProcess[str]:
    """Run the tail example until it has printed one node, making calls until it does."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli.main", *argv, "--count", "1"], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**_clean_env(), **env},
    )

    async def call_until_done() -> None:
        async with connect(auth.settings("client")) as client:
            with anyio.fail_after(30):
                while proc.poll() is None:
                    await client.request(subjects.CONSENT_STATUS,
                                         b'{"user_id":"usr_tail","scope":"gmail.read"}')
                    # Pace on the condition itself: the tail exiting, or a short deadline.
                    await anyio.to_thread.run_sync(_wait_quietly, proc, 0.2)

    try:
        anyio.run(call_until_done, backend="asyncio")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _wait_quietly(proc: subprocess.Popen[str], timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def test_compose_file_lists_the_deploy_config_it_mounts() -> None:
    mounts = SERVICES["nats"]["volumes"]
    assert any(Path(m.split(":")[0]).name == DEPLOY_CONF.name for m in mounts), mounts
