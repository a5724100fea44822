"""Backend selection from settings, and connect failures that are loud, fast and never memory."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pytest

from bus import BusConnectError, connect, open_nats_bus
from bus.connect import choose_backend
from bus.server import free_port


@dataclass(frozen=True)
class FakeSettings:
    offline: bool = False
    dry_run: bool = False
    nats_url: str | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_creds: str | None = None
    nats_nkey_seed: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    nats_inbox_prefix: str | None = None


def _dead_url() -> str:
    """A loopback port nothing listens on."""
    return f"nats://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("settings", "backend"),
    [
        (FakeSettings(offline=True), "memory"),
        (FakeSettings(offline=True, nats_url="nats://127.0.0.1:1"), "memory"),
        (FakeSettings(dry_run=True), "memory"),
        (FakeSettings(dry_run=True, nats_url="nats://127.0.0.1:1"), "nats"),
        (FakeSettings(nats_url="nats://127.0.0.1:1"), "nats"),
        (FakeSettings(), "nats"),
    ],
)
def test_choose_backend(settings: FakeSettings, backend: str) -> None:
    assert choose_backend(settings) == backend


async def test_offline_uses_memory_even_with_a_url() -> None:
    async with connect(FakeSettings(offline=True, nats_url=_dead_url())) as bus:
        assert bus.backend == "memory"
    assert bus.is_closed


async def test_dry_run_without_url_uses_memory() -> None:
    async with connect(FakeSettings(dry_run=True)) as bus:
        assert bus.backend == "memory"


@pytest.mark.nats
async def test_dry_run_with_url_uses_nats(nats_url: str) -> None:
    async with connect(FakeSettings(dry_run=True, nats_url=nats_url), name="test") as bus:
        assert bus.backend == "nats"
        await bus.flush()
    assert bus.is_closed


async def test_missing_url_outside_dry_run_is_a_clear_error() -> None:
    with pytest.raises(BusConnectError, match="NATS_URL is not set"):
        async with connect(FakeSettings()):
            pass


async def test_dead_server_fails_fast_and_never_falls_back_to_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = _dead_url()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(BusConnectError) as caught:
        async with connect(FakeSettings(nats_url=url)):
            pytest.fail("a bus was opened although nothing listens")
    assert time.monotonic() - started < 2
    assert url in str(caught.value)
    assert "refused" in str(caught.value).lower()
    assert not caplog.records  # failed attempts are not logged as warnings one by one


async def test_open_nats_bus_hides_the_password_in_errors() -> None:
    port = free_port()
    with pytest.raises(BusConnectError) as caught:
        async with open_nats_bus(f"nats://alice:s3cret@127.0.0.1:{port}"):
            pass
    assert "s3cret" not in str(caught.value)
    assert f"alice:***@127.0.0.1:{port}" in str(caught.value)


async def test_bad_tls_files_are_a_connect_error() -> None:
    with pytest.raises(BusConnectError, match="TLS"):
        async with open_nats_bus(_dead_url(), tls_ca="/nonexistent/ca.pem"):
            pass


async def test_lukhas_settings_fit_the_protocol() -> None:
    config = pytest.importorskip("lukhas.config")
    settings = config.Settings.from_env({"LUKHAS_OFFLINE": "true"})
    assert choose_backend(settings) == "memory"
    async with connect(settings) as bus:
        assert bus.backend == "memory"
