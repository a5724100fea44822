"""Consent ledger public API: record, revoke, and read back consent.

Each function validates its input (raising `InvalidRequest`), emits one MATRIZ node, and
returns the wire reply as a dict. Which provider answers is the registry's decision.
"""

from __future__ import annotations

import time
from typing import Any

from lukhas._validation import convert
from lukhas.governance.consent_ledger import registry
from lukhas.governance.consent_ledger.messages import (
    ConsentEntry,
    ConsentHistoryQuery,
    ConsentStatusQuery,
    RecordConsent,
    RevokeConsent,
    VerifyConsentChain,
)
from lukhas.observability.matriz_decorators import annotate, instrument
from lukhas.observability.tracing import current_trace_id, new_trace_id
from lukhas.runtime import current_runtime


def _entry(user_id: str, scope: str, metadata: dict[str, Any], action: str) -> ConsentEntry:
    return ConsentEntry(
        trace_id=current_trace_id() or new_trace_id(),
        ts=time.time_ns() // 1_000_000,
        user_id=user_id,
        scope=scope,
        metadata=metadata,
        action=action,
    )


@instrument(
    "CONSENT", label="governance:record", salience=0.6, urgency=0.2, subject_arg="user_id"
)
async def record_consent(
    user_id: str,
    scope: str,
    metadata: dict[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Record that `user_id` grants `scope`.

    Without `idempotency_key` every call is a new request. With one, a retry of the same
    request (same key, scope and metadata) records once and answers `duplicate: true`.

    Raises:
        IdempotencyConflict: the key was already used for a different request (ledger).
        InvalidRequest: a field has the wrong type or length.
        PayloadTooLarge: the metadata is over 8 KiB of JSON.
    """
    cmd = convert(
        RecordConsent,
        {"user_id": user_id, "scope": scope, "metadata": metadata or {},
         "idempotency_key": idempotency_key},
    )
    annotate(consent_scope=cmd.scope)
    provider = registry.get_provider(current_runtime().settings)
    entry = _entry(cmd.user_id, cmd.scope, cmd.metadata, "grant")
    return await provider.record(entry, idempotency_key=cmd.idempotency_key)


@instrument(
    "CONSENT", label="governance:revoke", salience=0.7, urgency=0.6, subject_arg="user_id"
)
async def revoke_consent(
    user_id: str, scope: str, *, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Withdraw consent: as easy as giving it, and recorded the same way.

    A scope that was never granted is refused (`ok: false`, reason `not_granted`) by the
    ledger; idempotency keys work as for `record_consent`.
    """
    cmd = convert(
        RevokeConsent, {"user_id": user_id, "scope": scope, "idempotency_key": idempotency_key}
    )
    annotate(consent_scope=cmd.scope)
    provider = registry.get_provider(current_runtime().settings)
    entry = _entry(cmd.user_id, cmd.scope, {}, "revoke")
    return await provider.revoke(entry, idempotency_key=cmd.idempotency_key)


@instrument(
    "CONSENT", label="governance:status", salience=0.3, urgency=0.3, subject_arg="user_id"
)
async def consent_status(user_id: str, scope: str) -> dict[str, Any]:
    """Current state of `scope` for `user_id`: granted, revoked, expired or none.

    The ledger answers from the scope's latest record and reports (`state_mismatch`) a
    derived state that disagrees with it.
    """
    query = convert(ConsentStatusQuery, {"user_id": user_id, "scope": scope})
    annotate(consent_scope=query.scope)
    provider = registry.get_provider(current_runtime().settings)
    return await provider.status(query.user_id, query.scope)


@instrument(
    "CONSENT", label="governance:history", salience=0.3, urgency=0.2, subject_arg="user_id"
)
async def consent_history(user_id: str) -> dict[str, Any]:
    """Every consent record of `user_id`, oldest first, each with its stream `seq`."""
    query = convert(ConsentHistoryQuery, {"user_id": user_id})
    provider = registry.get_provider(current_runtime().settings)
    return await provider.history(query.user_id)


@instrument(
    "CONSENT", label="governance:verify", salience=0.5, urgency=0.4, subject_arg="user_id"
)
async def verify_consent_chain(user_id: str) -> dict[str, Any]:
    """Recompute `user_id`'s hash chain; report its length, the first broken link and any
    derived state that disagrees with the ledger (`state_mismatches`)."""
    query = convert(VerifyConsentChain, {"user_id": user_id})
    provider = registry.get_provider(current_runtime().settings)
    return await provider.verify_chain(query.user_id)
