"""Passkey public API: verify an assertion; register credentials and issue challenges.

Each function validates its arguments into the slice's message (raising `InvalidRequest` /
`PayloadTooLarge`) and calls the same instrumented handler the service's endpoint calls
(`endpoints.py`). A refusal is `ok: false` with a reason.
"""

from __future__ import annotations

from typing import Any

from lukhas.identity.passkey import endpoints


async def verify_passkey(assertion: dict[str, Any]) -> dict[str, Any]:
    """Verify a WebAuthn assertion (AuthenticationResponseJSON; in DRY_RUN `{"challenge"}`).

    Raises:
        InvalidRequest: the assertion is not a JSON object.
        PayloadTooLarge: it is over 32 KiB of JSON.
    """
    return await endpoints.VERIFY.handler(assertion)


async def passkey_registration_options(
    user_id: str, user_name: str | None = None
) -> dict[str, Any]:
    """PublicKeyCredentialCreationOptionsJSON for registering a new passkey of `user_id`."""
    return await endpoints.REGISTER_OPTIONS.call(user_id=user_id, user_name=user_name)


async def register_passkey(user_id: str, credential: dict[str, Any]) -> dict[str, Any]:
    """Verify a RegistrationResponseJSON and store the credential for `user_id`."""
    return await endpoints.REGISTER_VERIFY.call(user_id=user_id, credential=credential)


async def passkey_challenge(user_id: str | None = None) -> dict[str, Any]:
    """PublicKeyCredentialRequestOptionsJSON with a fresh single-use challenge."""
    return await endpoints.CHALLENGE.call(user_id=user_id)
