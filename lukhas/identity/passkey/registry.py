"""The passkey provider registry: real providers plug in at runtime, never by static import."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from lukhas.config import Settings
from lukhas.identity.passkey.providers.null_webauthn import NullWebAuthnProvider


@runtime_checkable
class PasskeyProvider(Protocol):
    """What a passkey verifier provides. Replies are the wire dicts (`ok`, `provider`, ...)."""

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


_provider: PasskeyProvider | None = None


def register(provider: PasskeyProvider) -> None:
    """Install the real provider; it is used only while the feature flag is on."""
    global _provider
    if not isinstance(provider, PasskeyProvider):
        raise TypeError(f"{provider!r} does not implement PasskeyProvider")
    _provider = provider


def reset() -> None:
    """Forget the registered provider (tests, shutdown)."""
    global _provider
    _provider = None


def get_provider(settings: Settings) -> PasskeyProvider:
    """The registered provider when FEATURE_IDENTITY_PASSKEY is on outside DRY_RUN, else null.

    The null provider accepts only in DRY_RUN, so a misconfigured deployment fails closed.
    """
    if settings.dry_run or not settings.feature_identity_passkey or _provider is None:
        return NullWebAuthnProvider(accept=settings.dry_run)
    return _provider
