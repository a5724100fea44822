"""The passkey provider registry: real providers plug in at runtime, never by static import."""

from __future__ import annotations

from typing import Any, Protocol

from lukhas.config import Settings
from lukhas.identity.passkey.providers.null_webauthn import NullWebAuthnProvider
from lukhas.registry import ProviderRegistry


class PasskeyProvider(Protocol):
    """What a full passkey verifier provides; replies are the wire dicts (`ok`, `provider`...).

    Only `name` and `verify` are required: an operation a provider lacks is answered with a
    `not_supported` refusal. `waits_on_io` (default true) says whether calls may wait on I/O.
    """

    name: str

    async def verify(self, assertion: dict[str, Any]) -> dict[str, Any]: ...

    async def register_options(
        self, user_id: str, user_name: str | None, enrolment_grant: str | None = None
    ) -> dict[str, Any]: ...

    async def register_verify(self, user_id: str, credential: dict[str, Any]) -> dict[str, Any]:
        ...

    async def challenge(self, user_id: str | None) -> dict[str, Any]: ...

    async def list_credentials(self, user_id: str) -> dict[str, Any]: ...

    async def delete_credential(self, user_id: str, credential_id: str) -> dict[str, Any]: ...


_accepting = NullWebAuthnProvider(accept=True)
_refusing = NullWebAuthnProvider(accept=False)


def _builtin(settings: Settings) -> PasskeyProvider:
    """The null provider accepts only in DRY_RUN, so a misconfigured deployment fails closed."""
    return _accepting if settings.dry_run else _refusing


#: The slice's registry: the null provider unless FEATURE_IDENTITY_PASSKEY is on outside
#: DRY_RUN and a real provider is registered. Credentials and challenges are state, so its
#: canary is sticky: one user's ceremonies all go to one arm.
REGISTRY: ProviderRegistry[PasskeyProvider] = ProviderRegistry(
    "feature_identity_passkey", _builtin, sticky=True
)
register = REGISTRY.register
reset = REGISTRY.reset
get_provider = REGISTRY.get
