"""The browser tests' stack and browser: real chromium, real workers, the deploy config.

One nats-server runs deploy/nats-server.conf (every user with a random password); the slice,
observability and gateway workers run as their own NATS users with the real WebAuthn
provider (FEATURE_IDENTITY_PASSKEY on, DRY_RUN off, a long pseudonym key). A second gateway
on another port stands for a foreign origin: the slices allow only the first one's.

Without Debian's `chromium` these tests skip, except under CI=true, where they fail:
`make tools` installs it there (deploy/install-test-tools.sh).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bus.server import free_port
from tests.browser._cdp import CdpError, Chromium, find_chromium
from tests.integration.processes import REPO, LukhasProcess
from tests.security.test_nats_auth import AuthServer, start_deploy_server

SCREENSHOTS = REPO / "artifacts" / "screenshots"
#: Screenshots committed for the README (refreshed by LUKHAS_UPDATE_SCREENSHOTS=1).
README_SCREENSHOTS = Path(__file__).parent / "screenshots"


@dataclass
class Pages:
    auth: AuthServer
    url: str
    foreign_url: str
    procs: list[LukhasProcess]


def _start(args: tuple[str, ...], env: dict[str, str], procs: list[LukhasProcess]) -> None:
    proc = LukhasProcess(*args, env=env)
    procs.append(proc)
    proc.wait_for_line("ready", 60)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Chromium]:
    binary = find_chromium()
    if binary is None:
        message = "Debian's chromium is not installed (`make tools` installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run the browser tests")
        pytest.skip(message)
    try:
        browser = Chromium(binary)
    except (CdpError, OSError) as exc:
        pytest.fail(f"chromium is installed but does not start: {exc}")
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pages]:
    auth = start_deploy_server(tmp_path_factory.mktemp("browser-nats"))
    port, foreign = free_port(), free_port()
    url, foreign_url = f"http://localhost:{port}", f"http://localhost:{foreign}"
    common = {
        "FEATURE_IDENTITY_PASSKEY": "true",
        "LUKHAS_PSEUDONYM_KEY": secrets.token_hex(32),
        "LUKHAS_WEBAUTHN_ORIGINS": url,
        # Small burn-rate windows, so a burst of errors pages within the test.
        "LUKHAS_SLO_PAGE_LONG_S": "30", "LUKHAS_SLO_PAGE_SHORT_S": "10",
        "LUKHAS_SLO_TICKET_LONG_S": "60", "LUKHAS_SLO_TICKET_SHORT_S": "20",
    }
    procs: list[LukhasProcess] = []
    try:
        _start(("worker", "slices"), auth.env("slices", **common), procs)
        _start(("worker", "observability"), auth.env("observability", **common), procs)
        _start(("worker", "gateway"), auth.env("gateway", LUKHAS_GATEWAY_PORT=str(port)), procs)
        _start(("worker", "gateway"),
               auth.env("gateway", LUKHAS_GATEWAY_PORT=str(foreign)), procs)
        yield Pages(auth, url, foreign_url, procs)
    finally:
        for proc in procs:
            if proc.proc.poll() is None:
                proc.proc.terminate()
            proc.wait(30)
        auth.server.stop()
    for proc in procs:
        # Least privilege, yet nothing the pages needed was refused.
        refused = [line for line in proc.stderr if "permission" in line.lower()]
        assert not refused, (proc.args, refused)
