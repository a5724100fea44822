"""Passkey public API: verify an assertion; register, list and delete credentials; issue
challenges.

Each function checks input size and shape (raising `InvalidRequest`/`PayloadTooLarge`), emits
one MATRIZ DECISION node, and returns the wire reply. A refusal is `ok: false` with a reason.
Usernameless challenges are rate limited here, per source and globally, whatever the provider.
"""

from __future__ import annotations

import math
from typing import Any

from lukhas._validation import check_size, convert
from lukhas.errors import InvalidRequest
from lukhas.identity.passkey import registry
from lukhas.identity.passkey.messages import (
    MAX_ASSERTION_BYTES,
    ChallengeRequest,
    DeletePasskey,
    ListPasskeys,
    RegisterOptionsRequest,
)
from lukhas.observability.matriz_decorators import annotate, instrument
from lukhas.ratelimit import KeyedLimiter
from lukhas.runtime import Runtime, current_runtime

_STATE_KEY = "identity.passkey.challenge_limiter"
#: The rate-limit key of a usernameless challenge that names no source.
ANONYMOUS_SOURCE = "anonymous"


def challenge_limiter(runtime: Runtime) -> KeyedLimiter:
    """The runtime's limiter of usernameless challenges, built from its settings on first use."""
    limiter = runtime.slice_state.get(_STATE_KEY)
    if limiter is None:
        s = runtime.settings
        limiter = runtime.slice_state[_STATE_KEY] = KeyedLimiter(
            rate=s.passkey_challenge_global_rate, burst=s.passkey_challenge_global_burst,
            key_rate=s.passkey_challenge_rate, key_burst=s.passkey_challenge_burst,
        )
    return limiter


def _label_refusal(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok") is not True and "reason" in reply:
        annotate(label=f"reason:{reply['reason']}")
    return reply


@instrument("DECISION", label="identity:passkey.verify", salience=0.5, urgency=0.8)
async def verify_passkey(assertion: dict[str, Any]) -> dict[str, Any]:
    """Verify a WebAuthn assertion (AuthenticationResponseJSON; in DRY_RUN `{"challenge"}`).

    Raises:
        InvalidRequest: the assertion is not a JSON object.
        PayloadTooLarge: it is over 32 KiB of JSON.
    """
    if not isinstance(assertion, dict):
        raise InvalidRequest("assertion must be a JSON object")
    check_size(assertion, MAX_ASSERTION_BYTES, "assertion")
    provider = registry.get_provider(current_runtime().settings)
    return _label_refusal(await provider.verify(assertion))


@instrument(
    "DECISION", label="identity:passkey.register.options", salience=0.4, urgency=0.5,
    subject_arg="user_id",
)
async def passkey_registration_options(
    user_id: str, user_name: str | None = None, *, enrolment_grant: str | None = None
) -> dict[str, Any]:
    """PublicKeyCredentialCreationOptionsJSON for registering a new passkey of `user_id`.

    An account's first passkey needs nothing more; a further one needs `enrolment_grant`,
    from a successful verify of that same account (single use, short-lived). Refusals:
    `enrolment_grant_required`, `invalid_enrolment_grant`.
    """
    req = convert(
        RegisterOptionsRequest,
        {"user_id": user_id, "user_name": user_name, "enrolment_grant": enrolment_grant},
    )
    provider = registry.get_provider(current_runtime().settings)
    return _label_refusal(
        await provider.register_options(req.user_id, req.user_name, req.enrolment_grant)
    )


@instrument(
    "DECISION", label="identity:passkey.register.verify", salience=0.6, urgency=0.6,
    subject_arg="user_id",
)
async def register_passkey(user_id: str, credential: dict[str, Any]) -> dict[str, Any]:
    """Verify a RegistrationResponseJSON and store the credential for `user_id`."""
    convert(RegisterOptionsRequest, {"user_id": user_id})
    if not isinstance(credential, dict):
        raise InvalidRequest("credential must be a JSON object")
    check_size(credential, MAX_ASSERTION_BYTES, "credential")
    provider = registry.get_provider(current_runtime().settings)
    return _label_refusal(await provider.register_verify(user_id, credential))


@instrument(
    "DECISION", label="identity:passkey.challenge", salience=0.3, urgency=0.6,
    subject_arg="user_id",
)
async def passkey_challenge(
    user_id: str | None = None, *, source: str | None = None
) -> dict[str, Any]:
    """PublicKeyCredentialRequestOptionsJSON with a fresh single-use challenge.

    Without `user_id` (a usernameless login) the request is rate limited per `source`
    (default "anonymous") and globally: `{"ok": false, "reason": "rate_limited",
    "retry_after_ms": N}`.
    """
    req = convert(ChallengeRequest, {"user_id": user_id, "source": source})
    runtime = current_runtime()
    provider = registry.get_provider(runtime.settings)
    if req.user_id is None and provider.name != "null":
        decision = challenge_limiter(runtime).decide(req.source or ANONYMOUS_SOURCE)
        if not decision.allowed:
            return _label_refusal({
                "ok": False,
                "provider": provider.name,
                "reason": "rate_limited",
                "retry_after_ms": max(1, math.ceil(decision.retry_after_s * 1000)),
            })
    return _label_refusal(await provider.challenge(req.user_id))


@instrument(
    "DECISION", label="identity:passkey.list", salience=0.3, urgency=0.3,
    subject_arg="user_id",
)
async def list_passkeys(user_id: str) -> dict[str, Any]:
    """The passkeys of `user_id`: `{"ok": true, "credentials": [{"credential_id", "created",
    "last_used", "transports", "backup_eligible", "backup_state", "sign_count"}]}`."""
    req = convert(ListPasskeys, {"user_id": user_id})
    provider = registry.get_provider(current_runtime().settings)
    return _label_refusal(await provider.list_credentials(req.user_id))


@instrument(
    "DECISION", label="identity:passkey.delete", salience=0.6, urgency=0.5,
    subject_arg="user_id",
)
async def delete_passkey(user_id: str, credential_id: str) -> dict[str, Any]:
    """Delete one passkey of `user_id`: `{"ok": true, "deleted": true}`, or `not_found` when
    `user_id` has no passkey with that id (another user's included). A deleted passkey is
    never offered again and never verifies again."""
    req = convert(DeletePasskey, {"user_id": user_id, "credential_id": credential_id})
    provider = registry.get_provider(current_runtime().settings)
    return _label_refusal(await provider.delete_credential(req.user_id, req.credential_id))
