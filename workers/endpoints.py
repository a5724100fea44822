"""The slice service's endpoints: one subject each, decoding JSON and calling a public API."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from lukhas import subjects
from lukhas._validation import decode
from lukhas.config import Settings
from lukhas.governance.consent_ledger import api as consent
from lukhas.governance.consent_ledger.messages import (
    ConsentHistoryQuery,
    ConsentStatusQuery,
    RecordConsent,
    RevokeConsent,
    VerifyConsentChain,
)
from lukhas.identity.passkey import api as passkey
from lukhas.identity.passkey.messages import (
    MAX_ASSERTION_BYTES,
    ChallengeRequest,
    RegisterOptionsRequest,
)
from lukhas.orchestration.context import api as context
from lukhas.orchestration.context.messages import HandoffContext

Reply = dict[str, Any]
Handler = Callable[[bytes, int], Awaitable[Reply]]

#: Bytes a consent request body may take (its metadata is capped at 8 KiB).
CONSENT_MAX_BYTES = 16_384
#: Room for the handoff envelope around a context of LUKHAS_HANDOFF_MAX_BYTES.
HANDOFF_ENVELOPE_BYTES = 1024


class _RegisterVerify(msgspec.Struct, frozen=True):
    user_id: str
    credential: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A request subject served by the slice service."""

    name: str
    subject: str
    handler: Handler
    max_bytes: int


async def _record(data: bytes, limit: int) -> Reply:
    cmd = decode(RecordConsent, data, max_bytes=limit)
    return await consent.record_consent(
        cmd.user_id, cmd.scope, cmd.metadata, idempotency_key=cmd.idempotency_key
    )


async def _revoke(data: bytes, limit: int) -> Reply:
    cmd = decode(RevokeConsent, data, max_bytes=limit)
    return await consent.revoke_consent(cmd.user_id, cmd.scope, idempotency_key=cmd.idempotency_key)


async def _status(data: bytes, limit: int) -> Reply:
    query = decode(ConsentStatusQuery, data, max_bytes=limit)
    return await consent.consent_status(query.user_id, query.scope)


async def _history(data: bytes, limit: int) -> Reply:
    query = decode(ConsentHistoryQuery, data, max_bytes=limit)
    return await consent.consent_history(query.user_id)


async def _verify_chain(data: bytes, limit: int) -> Reply:
    query = decode(VerifyConsentChain, data, max_bytes=limit)
    return await consent.verify_consent_chain(query.user_id)


async def _passkey_verify(data: bytes, limit: int) -> Reply:
    assertion = decode(dict[str, Any], data, max_bytes=limit)
    return await passkey.verify_passkey(assertion)


async def _register_options(data: bytes, limit: int) -> Reply:
    req = decode(RegisterOptionsRequest, data, max_bytes=limit)
    return await passkey.passkey_registration_options(req.user_id, req.user_name)


async def _register_verify(data: bytes, limit: int) -> Reply:
    req = decode(_RegisterVerify, data, max_bytes=limit)
    return await passkey.register_passkey(req.user_id, req.credential)


async def _challenge(data: bytes, limit: int) -> Reply:
    req = decode(ChallengeRequest, data or b"{}", max_bytes=limit)
    return await passkey.passkey_challenge(req.user_id)


async def _handoff(data: bytes, limit: int) -> Reply:
    cmd = decode(HandoffContext, data, max_bytes=limit)
    return await context.handoff_context(cmd.ctx, cmd.target, source=cmd.source)


def build_endpoints(settings: Settings) -> tuple[Endpoint, ...]:
    """Every endpoint, with body limits checked before decoding."""
    cap = settings.request_max_bytes
    consent_max = min(CONSENT_MAX_BYTES, cap)
    passkey_max = min(2 * MAX_ASSERTION_BYTES, cap)
    handoff_max = min(settings.handoff_max_bytes + HANDOFF_ENVELOPE_BYTES, cap)
    return (
        Endpoint("consent_record", subjects.CONSENT_RECORD, _record, consent_max),
        Endpoint("consent_revoke", subjects.CONSENT_REVOKE, _revoke, consent_max),
        Endpoint("consent_status", subjects.CONSENT_STATUS, _status, consent_max),
        Endpoint("consent_history", subjects.CONSENT_HISTORY, _history, consent_max),
        Endpoint("consent_verify", subjects.CONSENT_VERIFY, _verify_chain, consent_max),
        Endpoint("passkey_verify", subjects.PASSKEY_VERIFY, _passkey_verify, passkey_max),
        Endpoint(
            "passkey_register_options", subjects.PASSKEY_REGISTER_OPTIONS,
            _register_options, passkey_max,
        ),
        Endpoint(
            "passkey_register_verify", subjects.PASSKEY_REGISTER_VERIFY,
            _register_verify, passkey_max,
        ),
        Endpoint("passkey_challenge", subjects.PASSKEY_CHALLENGE, _challenge, passkey_max),
        Endpoint("context_handoff", subjects.CONTEXT_HANDOFF, _handoff, handoff_max),
    )

