"""The passkey slice's endpoints: one instrumented handler per subject, and their declaration.

Each handler checks what the message type cannot (sizes of open objects), emits one MATRIZ
DECISION node, and asks the registry's provider. A refusal is `ok: false` with a reason,
which the node carries as a `reason:<reason>` label.
"""

from __future__ import annotations

from typing import Any

from lukhas import subjects
from lukhas._validation import check_size
from lukhas.endpoint import Endpoint, Reply
from lukhas.errors import InvalidRequest
from lukhas.identity.passkey.messages import (
    MAX_ASSERTION_BYTES,
    ChallengeRequest,
    RegisterCredential,
    RegisterOptionsRequest,
)
from lukhas.identity.passkey.registry import REGISTRY
from lukhas.observability.matriz_decorators import annotate, instrument
from lukhas.runtime import current_runtime

#: Bytes a passkey request body may take: an assertion or credential plus its envelope.
MAX_BODY_BYTES = 2 * MAX_ASSERTION_BYTES


async def _call(operation: str, *args: Any) -> Reply:
    reply = await REGISTRY.call(current_runtime().settings, operation, *args)
    if reply.get("ok") is not True and "reason" in reply:
        annotate(label=f"reason:{reply['reason']}")
    return reply


@instrument(
    "DECISION", label="identity:passkey.verify", salience=0.5, urgency=0.8,
    capability="verify_passkey",
)
async def verify(assertion: dict[str, Any]) -> Reply:
    if not isinstance(assertion, dict):
        raise InvalidRequest("assertion must be a JSON object")
    check_size(assertion, MAX_ASSERTION_BYTES, "assertion")
    return await _call("verify", assertion)


@instrument(
    "DECISION", label="identity:passkey.register.options", salience=0.4, urgency=0.5,
    subject_field="user_id", capability="passkey_registration_options",
)
async def register_options(req: RegisterOptionsRequest) -> Reply:
    return await _call("register_options", req.user_id, req.user_name)


@instrument(
    "DECISION", label="identity:passkey.register.verify", salience=0.6, urgency=0.6,
    subject_field="user_id", capability="register_passkey",
)
async def register_verify(req: RegisterCredential) -> Reply:
    check_size(req.credential, MAX_ASSERTION_BYTES, "credential")
    return await _call("register_verify", req.user_id, req.credential)


@instrument(
    "DECISION", label="identity:passkey.challenge", salience=0.3, urgency=0.6,
    subject_field="user_id", capability="passkey_challenge",
)
async def challenge(req: ChallengeRequest) -> Reply:
    return await _call("challenge", req.user_id)


VERIFY = Endpoint("passkey_verify", subjects.PASSKEY_VERIFY, dict[str, Any], verify,
                  "verify_passkey", MAX_BODY_BYTES, REGISTRY.waits_on_io)
REGISTER_OPTIONS = Endpoint(
    "passkey_register_options", subjects.PASSKEY_REGISTER_OPTIONS, RegisterOptionsRequest,
    register_options, "passkey_registration_options", MAX_BODY_BYTES, REGISTRY.waits_on_io,
)
REGISTER_VERIFY = Endpoint(
    "passkey_register_verify", subjects.PASSKEY_REGISTER_VERIFY, RegisterCredential,
    register_verify, "register_passkey", MAX_BODY_BYTES, REGISTRY.waits_on_io,
)
CHALLENGE = Endpoint("passkey_challenge", subjects.PASSKEY_CHALLENGE, ChallengeRequest,
                     challenge, "passkey_challenge", MAX_BODY_BYTES, REGISTRY.waits_on_io)

ENDPOINTS: tuple[Endpoint[Any], ...] = (VERIFY, REGISTER_OPTIONS, REGISTER_VERIFY, CHALLENGE)
