"""The passkey slice's endpoints: one instrumented handler per subject, and their declaration.

Each handler checks what the message type cannot (sizes of open objects), emits one MATRIZ
DECISION node, and asks the registry's provider. A refusal is `ok: false` with a reason,
which the node carries as a `reason:<reason>` label. Usernameless challenges are rate
limited here, per source and globally, whatever the provider.
"""

from __future__ import annotations

import math
from typing import Any

from lukhas import subjects
from lukhas._validation import check_size
from lukhas.endpoint import Endpoint, Reply
from lukhas.errors import InvalidRequest
from lukhas.identity.passkey.messages import (
    DELETE_REPLY,
    LIST_REPLY,
    MAX_ASSERTION_BYTES,
    OPTIONS_REPLY,
    REGISTER_REPLY,
    VERIFY_REPLY,
    ChallengeRequest,
    DeletePasskey,
    ListPasskeys,
    RegisterCredential,
    RegisterOptionsRequest,
)
from lukhas.identity.passkey.registry import REGISTRY
from lukhas.observability.matriz_decorators import annotate, instrument
from lukhas.ratelimit import SharedLimiter, lease_store
from lukhas.runtime import Runtime, current_runtime

#: Bytes a passkey request body may take: an assertion or credential plus its envelope.
MAX_BODY_BYTES = 2 * MAX_ASSERTION_BYTES
#: The rate-limit key of a usernameless challenge that names no source.
ANONYMOUS_SOURCE = "anonymous"
_LIMITER_KEY = "identity.passkey.challenge_limiter"


def challenge_limiter(runtime: Runtime) -> SharedLimiter:
    """The limiter of usernameless challenges (buckets shared by the queue group), built
    from the runtime's settings on first use."""
    limiter = runtime.slice_state.get(_LIMITER_KEY)
    if limiter is None:
        s = runtime.settings
        limiter = runtime.slice_state[_LIMITER_KEY] = SharedLimiter(
            lease_store(runtime), name="passkey_challenge", scope=s.tenant,
            rate=s.passkey_challenge_global_rate, burst=s.passkey_challenge_global_burst,
            key_rate=s.passkey_challenge_rate, key_burst=s.passkey_challenge_burst,
        )
    return limiter


def _labelled(reply: Reply) -> Reply:
    if reply.get("ok") is not True and "reason" in reply:
        annotate(label=f"reason:{reply['reason']}")
    return reply


async def _call(operation: str, *args: Any) -> Reply:
    return _labelled(await REGISTRY.call(current_runtime().settings, operation, *args))


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
    return await _call("register_options", req.user_id, req.user_name, req.enrolment_grant)


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
    runtime = current_runtime()
    provider = REGISTRY.get(runtime.settings)
    if req.user_id is None and provider.name != "null":
        decision = await challenge_limiter(runtime).decide(req.source or ANONYMOUS_SOURCE)
        if not decision.allowed:
            return _labelled({
                "ok": False,
                "provider": provider.name,
                "reason": "rate_limited",
                "retry_after_ms": max(1, math.ceil(decision.retry_after_s * 1000)),
            })
    return await _call("challenge", req.user_id)


@instrument(
    "DECISION", label="identity:passkey.list", salience=0.3, urgency=0.3,
    subject_field="user_id", capability="list_passkeys",
)
async def list_credentials(req: ListPasskeys) -> Reply:
    return await _call("list_credentials", req.user_id)


@instrument(
    "DECISION", label="identity:passkey.delete", salience=0.6, urgency=0.5,
    subject_field="user_id", capability="delete_passkey",
)
async def delete_credential(req: DeletePasskey) -> Reply:
    return await _call("delete_credential", req.user_id, req.credential_id)


def _endpoint(
    name: str, subject: str, message: Any, handler: Any, capability: str,
    reply: tuple[type, ...] = (),
) -> Endpoint[Any]:
    return Endpoint(
        name, subject, message, handler, capability, MAX_BODY_BYTES, REGISTRY.waits_on_io,
        reply=reply,
    )


VERIFY = _endpoint("passkey_verify", subjects.PASSKEY_VERIFY, dict[str, Any], verify,
                   "verify_passkey", reply=VERIFY_REPLY)
REGISTER_OPTIONS = _endpoint("passkey_register_options", subjects.PASSKEY_REGISTER_OPTIONS,
                             RegisterOptionsRequest, register_options,
                             "passkey_registration_options", reply=OPTIONS_REPLY)
REGISTER_VERIFY = _endpoint("passkey_register_verify", subjects.PASSKEY_REGISTER_VERIFY,
                            RegisterCredential, register_verify, "register_passkey",
                            reply=REGISTER_REPLY)
CHALLENGE = _endpoint("passkey_challenge", subjects.PASSKEY_CHALLENGE, ChallengeRequest,
                      challenge, "passkey_challenge", reply=OPTIONS_REPLY)
LIST = _endpoint("passkey_list", subjects.PASSKEY_LIST, ListPasskeys, list_credentials,
                 "list_passkeys", reply=LIST_REPLY)
DELETE = _endpoint("passkey_delete", subjects.PASSKEY_DELETE, DeletePasskey, delete_credential,
                   "delete_passkey", reply=DELETE_REPLY)

ENDPOINTS: tuple[Endpoint[Any], ...] = (
    VERIFY, REGISTER_OPTIONS, REGISTER_VERIFY, CHALLENGE, LIST, DELETE,
)
