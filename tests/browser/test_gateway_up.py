"""`lukhas up` serves the pages and prints where; a taken gateway port is refused by name."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx

from bus.server import free_port
from tests.integration.processes import REPO, running


def test_up_serves_the_pages_and_prints_their_url() -> None:
    port = free_port()
    env = {"LUKHAS_DRY_RUN_MODE": "true", "LUKHAS_GATEWAY_PORT": str(port)}
    with running("up", env=env) as up:
        line = up.stdout[-1]
        assert f"open http://localhost:{port}/ (passkeys)" in line, line
        assert f"http://localhost:{port}/dashboard" in line, line
        with httpx.Client(base_url=f"http://localhost:{port}", timeout=10) as client:
            page = client.get("/")
            assert page.status_code == 200 and "Register a passkey" in page.text
            assert "default-src 'self'" in page.headers["content-security-policy"]
            assert client.get("/static/passkeys.js").status_code == 200
            with client.stream("GET", "/api/events") as events:
                assert events.headers["content-type"].startswith("text/event-stream")
                first = next(events.iter_lines())
            # The first frame is the current state (the snapshot, or the node history).
            assert first in ("event: snapshot", "event: nodes"), first
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0


def test_up_refuses_a_taken_gateway_port_naming_it() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "workers.cli.main", "up", "--gateway-port", str(port),
             "--metrics-port", "0"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "LUKHAS_DRY_RUN_MODE": "true"},
        )
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"lukhas: port {port} (the gateway"), result.stderr
    assert "--gateway-port" in result.stderr and "Traceback" not in result.stderr
