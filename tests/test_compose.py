"""compose.yaml and the Dockerfile run real `lukhas` commands with variables the config knows.

No Docker engine runs here, so this checks what can be checked without one.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from lukhas.config import KNOWN_VARIABLES
from workers.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
# Variables the nats service's own config reads (deploy/nats-server.conf), not lukhas.
NATS_CONFIG_VARIABLES = {
    "SLICES_PASSWORD", "OBSERVABILITY_PASSWORD", "CLIENT_PASSWORD", "PLANNER_PASSWORD",
    "GATEWAY_PASSWORD",
}


def _lukhas_services() -> dict[str, dict[str, Any]]:
    """The workers `docker compose up` runs (tool services, such as `client`, have profiles)."""
    return {
        name: svc for name, svc in COMPOSE["services"].items()
        if "build" in svc and "profiles" not in svc
    }


def _parses(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_compose_runs_two_slice_workers_and_the_observability_worker() -> None:
    """Slice workers are one service with replicas (`docker compose up --scale slices=N`)."""
    commands = sorted(
        (tuple(svc["command"]), svc.get("deploy", {}).get("replicas", 1))
        for svc in _lukhas_services().values()
    )
    assert commands == [(("worker", "gateway"), 1), (("worker", "observability"), 1),
                        (("worker", "slices"), 2)]


def test_every_service_command_is_a_real_lukhas_subcommand() -> None:
    for name, svc in _lukhas_services().items():
        args = _parses(svc["command"])
        assert args.func.__name__ == "cmd_worker", name
        health = svc["healthcheck"]["test"]
        if health[1] == "lukhas":
            _parses(health[2:])


def test_every_environment_variable_is_one_the_config_knows() -> None:
    for name, svc in COMPOSE["services"].items():
        env = svc.get("environment", {})
        known = NATS_CONFIG_VARIABLES if "build" not in svc else set(KNOWN_VARIABLES)
        unknown = set(env) - known
        assert not unknown, f"{name}: unknown variables {sorted(unknown)}"


def test_nats_has_jetstream_and_monitoring_and_workers_wait_for_it() -> None:
    conf = (REPO / "deploy" / "nats-server.conf").read_text()
    assert "jetstream" in conf and "http_port: 8222" in conf
    assert "8222:8222" in COMPOSE["services"]["nats"]["ports"]
    for svc in _lukhas_services().values():
        assert svc["depends_on"]["nats"]["condition"] == "service_healthy"
        assert svc["environment"]["NATS_URL"] == "nats://nats:4222"


def test_dockerfile_entrypoint_is_the_lukhas_command() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["lukhas"]' in dockerfile
    _parses(["worker", "slices"])


def test_readme_documents_every_environment_variable() -> None:
    readme = (REPO / "README.md").read_text()
    assert [v for v in KNOWN_VARIABLES if f"`{v}`" not in readme] == []
