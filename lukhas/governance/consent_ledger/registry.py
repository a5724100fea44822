"""The consent provider registry: real providers plug in at runtime, never by static import."""

from __future__ import annotations

from typing import Any, Protocol

from lukhas.governance.consent_ledger.messages import ConsentEntry
from lukhas.governance.consent_ledger.providers.null_provider import NullConsentProvider
from lukhas.registry import ProviderRegistry


class ConsentProvider(Protocol):
    """What the registry needs of a provider: a name for its replies. Every operation is
    optional (the plan's providers have only `record`): one a provider lacks is answered with
    a `not_supported` refusal. `waits_on_io` (default true) says whether calls may wait on I/O.
    The operations and their signatures are those of `ConsentLedger`."""

    name: str


class ConsentLedger(ConsentProvider, Protocol):
    """Every operation the consent endpoints call; replies are wire dicts (`ok`, `provider`)."""

    async def record(self, entry: ConsentEntry, *, idempotency_key: str | None) -> dict[str, Any]:
        ...

    async def revoke(self, entry: ConsentEntry, *, idempotency_key: str | None) -> dict[str, Any]:
        ...

    async def status(self, user_id: str, scope: str) -> dict[str, Any]: ...

    async def history(self, user_id: str) -> dict[str, Any]: ...

    async def verify_chain(self, user_id: str) -> dict[str, Any]: ...

    async def checkpoint(self, size: int | None = None) -> dict[str, Any]: ...

    async def proof(
        self, user_id: str, *, scope: str | None = None, seq: int | None = None,
        from_size: int | None = None,
    ) -> dict[str, Any]: ...

    async def erase(self, user_id: str, *, idempotency_key: str | None = None
                    ) -> dict[str, Any]: ...

    async def receipt(self, user_id: str, seq: int) -> dict[str, Any]: ...


_null = NullConsentProvider()

#: The slice's registry: the null provider unless FEATURE_GOVERNANCE_LEDGER is on outside
#: DRY_RUN and a real provider is registered. The ledger holds state, so its canary is sticky:
#: one data subject's records all go to one arm.
REGISTRY: ProviderRegistry[ConsentProvider] = ProviderRegistry(
    "feature_governance_ledger", lambda settings: _null, sticky=True
)
register = REGISTRY.register
reset = REGISTRY.reset
get_provider = REGISTRY.get
