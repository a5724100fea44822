"""Passkey public API: verify an assertion; register, list and delete credentials; issue
challenges.

Each function validates its arguments into the slice's message (raising `InvalidRequest` /
`PayloadTooLarge`) and calls the same instrumented handler the service's endpoint calls
(`endpoints.py`). A refusal is `ok: false` with a reason.
"""

from __future__ import annotations

from typing import Any

from lukhas.identity.passkey import endpoints


async def verify_passkey(assertion: dict[str, Any]) -> dict[str, Any]:
    """Verify a WebAuthn assertion (AuthenticationResponseJSON; in DRY_RUN `{"challenge"}`).

    A success names the account: `user_handle`, and `user_id` when the challenge was issued
    for one; it also carries a single-use `enrolment_grant` for adding another passkey.

    Raises:
        InvalidRequest: the assertion is not a JSON object.
        PayloadTooLarge: it is over 32 KiB of JSON.
    """
    return await endpoints.verify(assertion)


async def passkey_registration_options(
    user_id: str, user_name: str | None = None, *, enrolment_grant: str | None = None
) -> dict[str, Any]:
    """PublicKeyCredentialCreationOptionsJSON for registering a new passkey of `user_id`.

    An account's first passkey needs nothing more; a further one needs `enrolment_grant`,
    from a successful verify of that same account (single use, short-lived). Refusals:
    `enrolment_grant_required`, `invalid_enrolment_grant`.
    """
    return await endpoints.REGISTER_OPTIONS.call(
        user_id=user_id, user_name=user_name, enrolment_grant=enrolment_grant
    )


async def register_passkey(user_id: str, credential: dict[str, Any]) -> dict[str, Any]:
    """Verify a RegistrationResponseJSON and store the credential for `user_id`."""
    return await endpoints.REGISTER_VERIFY.call(user_id=user_id, credential=credential)


async def passkey_challenge(
    user_id: str | None = None, *, source: str | None = None
) -> dict[str, Any]:
    """PublicKeyCredentialRequestOptionsJSON with a fresh single-use challenge.

    Without `user_id` (a usernameless login) the request is rate limited per `source`
    (default "anonymous") and globally: `{"ok": false, "reason": "rate_limited",
    "retry_after_ms": N}`.
    """
    return await endpoints.CHALLENGE.call(user_id=user_id, source=source)


async def list_passkeys(user_id: str) -> dict[str, Any]:
    """The passkeys of `user_id`: `{"ok": true, "credentials": [{"credential_id", "created",
    "last_used", "transports", "backup_eligible", "backup_state", "sign_count"}]}`."""
    return await endpoints.LIST.call(user_id=user_id)


async def delete_passkey(user_id: str, credential_id: str) -> dict[str, Any]:
    """Delete one passkey of `user_id`: `{"ok": true, "deleted": true}`, or `not_found` when
    `user_id` has no passkey with that id (another user's included). A deleted passkey is
    never offered again and never verifies again."""
    return await endpoints.DELETE.call(user_id=user_id, credential_id=credential_id)
