"""The consent provider registry: real providers plug in at runtime, never by static import."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from lukhas.config import Settings
from lukhas.governance.consent_ledger.messages import ConsentEntry
from lukhas.governance.consent_ledger.providers.null_provider import NullConsentProvider


@runtime_checkable
class ConsentProvider(Protocol):
    """What a consent ledger provides. Replies are the wire dicts (`ok`, `provider`, ...)."""

    name: str

    async def record(self, entry: ConsentEntry, *, idempotency_key: str | None) -> dict[str, Any]:
        ...

    async def revoke(self, entry: ConsentEntry, *, idempotency_key: str | None) -> dict[str, Any]:
        ...

    async def status(self, user_id: str, scope: str) -> dict[str, Any]: ...

    async def history(self, user_id: str) -> dict[str, Any]: ...

    async def verify_chain(self, user_id: str) -> dict[str, Any]: ...


_provider: ConsentProvider | None = None
_null = NullConsentProvider()


def register(provider: ConsentProvider) -> None:
    """Install the real provider; it is used only while the feature flag is on."""
    global _provider
    if not isinstance(provider, ConsentProvider):
        raise TypeError(f"{provider!r} does not implement ConsentProvider")
    _provider = provider


def reset() -> None:
    """Forget the registered provider (tests, shutdown)."""
    global _provider
    _provider = None


def get_provider(settings: Settings) -> ConsentProvider:
    """The registered provider when FEATURE_GOVERNANCE_LEDGER is on outside DRY_RUN, else null."""
    if settings.dry_run or not settings.feature_governance_ledger or _provider is None:
        return _null
    return _provider
