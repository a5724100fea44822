"""Passkey public API: verify an assertion; register credentials and issue challenges.

Each function checks input size and shape (raising `InvalidRequest`/`PayloadTooLarge`), emits
one MATRIZ DECISION node, and returns the wire reply. A refusal is `ok: false` with a reason.
"""

from __future__ import annotations

from typing import Any

from lukhas._validation import check_size, convert
from lukhas.errors import InvalidRequest
from lukhas.identity.passkey import registry
from lukhas.identity.passkey.messages import (
    MAX_ASSERTION_BYTES,
    ChallengeRequest,
    RegisterOptionsRequest,
)
from lukhas.observability.matriz_decorators import annotate, instrument
from lukhas.runtime import current_runtime


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
    user_id: str, user_name: str | None = None
) -> dict[str, Any]:
    """PublicKeyCredentialCreationOptionsJSON for registering a new passkey of `user_id`."""
    req = convert(RegisterOptionsRequest, {"user_id": user_id, "user_name": user_name})
    provider = registry.get_provider(current_runtime().settings)
    return _label_refusal(await provider.register_options(req.user_id, req.user_name))


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
async def passkey_challenge(user_id: str | None = None) -> dict[str, Any]:
    """PublicKeyCredentialRequestOptionsJSON with a fresh single-use challenge."""
    req = convert(ChallengeRequest, {"user_id": user_id})
    provider = registry.get_provider(current_runtime().settings)
    return _label_refusal(await provider.challenge(req.user_id))
