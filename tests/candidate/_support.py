"""Helpers for the candidate provider tests: unique JetStream names, settings, a NATS bus."""

from __future__ import annotations

import base64
import dataclasses
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
from nats.js.errors import NotFoundError

from bus import open_nats_bus
from bus.nats import NatsBus
from lukhas.config import Settings
from lukhas.runtime import Runtime
from lukhas.testing import TEST_QUEUE_BUDGET_MS, MatrizRecorder
from lukhas.transparency.note import Signer

PSEUDONYM_KEY = "test-candidate-pseudonym-key-0123456789"
#: The consent ledger's keys in tests (made once per session; never a published key).
LEDGER_SIGNER = Signer.generate("test.lukhas.example/consent")
LEDGER_SIGNING_KEY = LEDGER_SIGNER.private_key_string()
LEDGER_WRAPPING_KEY = base64.b64encode(b"w" * 32).decode()


def user() -> str:
    """A fresh raw user id (raw ids in tests start with `usr_`, see the root conftest)."""
    return f"usr_{uuid.uuid4().hex[:12]}"


@dataclasses.dataclass(frozen=True)
class Names:
    """JetStream names no other test uses."""

    tag: str

    @property
    def stream(self) -> str:
        return f"CONSENT_LEDGER_{self.tag}"

    @property
    def state_bucket(self) -> str:
        return f"consent_state_{self.tag}"

    @property
    def subject_prefix(self) -> str:
        return f"test.{self.tag}.ledger.consent"

    @property
    def tree_bucket(self) -> str:
        return f"consent_tree_{self.tag}"

    @property
    def keys_bucket(self) -> str:
        return f"consent_keys_{self.tag}"

    @property
    def credentials_bucket(self) -> str:
        return f"passkey_credentials_{self.tag}"

    @property
    def challenges_bucket(self) -> str:
        return f"passkey_challenges_{self.tag}"

    @property
    def grants_bucket(self) -> str:
        return f"passkey_grants_{self.tag}"

    def ledger_options(self, **overrides: Any) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "state_bucket": self.state_bucket,
            "tree_bucket": self.tree_bucket,
            "keys_bucket": self.keys_bucket,
            "subject_prefix": self.subject_prefix,
            **overrides,
        }

    def passkey_options(self, **overrides: Any) -> dict[str, Any]:
        return {
            "credentials_bucket": self.credentials_bucket,
            "challenges_bucket": self.challenges_bucket,
            "grants_bucket": self.grants_bucket,
            **overrides,
        }

    async def drop(self, bus: NatsBus) -> None:
        js = bus.jetstream()
        streams = [self.stream] + [
            f"KV_{b}"
            for b in (
                self.state_bucket, self.tree_bucket, self.keys_bucket,
                self.credentials_bucket, self.challenges_bucket,
                self.grants_bucket,
            )
        ]
        for name in streams:
            try:
                await js.delete_stream(name)
            except NotFoundError:
                pass


def nats_settings(nats_url: str, **overrides: Any) -> Settings:
    """Outside DRY_RUN, on NATS, with a stable pseudonym key; flags via `overrides`.

    Each call is its own tenant, so the rate limits the workers share through the session's
    server (scoped by tenant) are this test's own, as separate deployments' are.
    """
    return dataclasses.replace(
        Settings(nats_url=nats_url, pseudonym_key=PSEUDONYM_KEY,
                 ledger_signing_key=LEDGER_SIGNING_KEY, ledger_wrapping_key=LEDGER_WRAPPING_KEY,
                 tenant=f"test-{secrets.token_hex(4)}",
                 worker_queue_budget_ms=TEST_QUEUE_BUDGET_MS),
        **overrides
    )


@asynccontextmanager
async def nats_bus(url: str, names: Names) -> AsyncIterator[NatsBus]:
    """A NATS bus; the test's streams and buckets are deleted when it closes."""
    async with open_nats_bus(url) as bus:
        try:
            yield bus
        finally:
            with anyio.CancelScope(shield=True):
                await names.drop(bus)


Stack = Callable[..., AbstractAsyncContextManager[tuple[Runtime, MatrizRecorder]]]


