"""Fixtures for the candidate providers: unique JetStream names, a wired runtime on NATS.

Every test gets its own stream, buckets and ledger subject prefix (deleted when it ends),
so tests sharing the session's nats-server never see each other's state. The registries
are reset around every test.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from lukhas.runtime import Runtime
from lukhas.testing import MatrizRecorder, open_test_runtime
from tests.candidate._support import Names, Stack, nats_bus, nats_settings
from workers.service.bootstrap import unwire_providers, wire_providers


@pytest.fixture
def names() -> Names:
    return Names(uuid.uuid4().hex[:10])


@pytest.fixture(autouse=True)
def _reset_registries() -> Iterator[None]:
    unwire_providers()
    yield
    unwire_providers()


@pytest.fixture
def wired(nats_url: str, names: Names) -> Stack:
    """`async with wired(ledger=True, passkey=True, **settings) as (runtime, recorder):`

    Opens a bus and a runtime outside DRY_RUN and calls `wire_providers` with this test's
    names, so the public APIs answer with the real providers.
    """

    @asynccontextmanager
    async def open_stack(
        *,
        ledger: bool = False,
        passkey: bool = False,
        passkey_provider: str = "webauthn",
        ledger_options: dict[str, Any] | None = None,
        passkey_options: dict[str, Any] | None = None,
        **settings_overrides: Any,
    ) -> AsyncIterator[tuple[Runtime, MatrizRecorder]]:
        settings = nats_settings(
            nats_url,
            feature_governance_ledger=ledger,
            feature_identity_passkey=passkey,
            **settings_overrides,
        )
        async with nats_bus(nats_url, names) as bus:
            async with open_test_runtime(settings, bus=bus) as (runtime, recorder):
                await wire_providers(
                    runtime,
                    passkey_provider=passkey_provider,  # type: ignore[arg-type]
                    ledger_options=names.ledger_options(**(ledger_options or {})),
                    passkey_options=(
                        names.passkey_options(**(passkey_options or {}))
                        if passkey_provider == "webauthn"
                        else passkey_options
                    ),
                )
                yield runtime, recorder

    return open_stack
