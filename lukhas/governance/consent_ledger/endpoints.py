"""The consent ledger's endpoints: one instrumented handler per subject, and their declaration.

Each handler takes the decoded message, emits one MATRIZ node and asks the registry's
provider; `api.py` is the public Python face over the same handlers.
"""

from __future__ import annotations

import time
from typing import Any

from lukhas import subjects
from lukhas.endpoint import Endpoint, Reply
from lukhas.governance.consent_ledger.messages import (
    CHECKPOINT_REPLY,
    ERASE_REPLY,
    HISTORY_REPLY,
    PROOF_REPLY,
    RECEIPT_REPLY,
    RECORD_REPLY,
    STATUS_REPLY,
    VERIFY_REPLY,
    CheckpointQuery,
    ConsentEntry,
    ConsentHistoryQuery,
    ConsentStatusQuery,
    EraseQuery,
    ProofQuery,
    ReceiptQuery,
    RecordConsent,
    RevokeConsent,
    VerifyConsentChain,
)
from lukhas.governance.consent_ledger.registry import REGISTRY
from lukhas.observability.matriz_decorators import annotate, instrument
from lukhas.observability.tracing import current_trace_id, new_trace_id
from lukhas.runtime import current_runtime

#: Bytes a consent request body may take (its metadata is capped at 8 KiB).
MAX_BODY_BYTES = 16_384


async def _call(operation: str, *args: Any, **options: Any) -> Reply:
    return await REGISTRY.call(current_runtime().settings, operation, *args, **options)


def _entry(
    user_id: str, scope: str, metadata: dict[str, Any], action: str, *,
    event: str | None = None, details: dict[str, Any] | None = None,
) -> ConsentEntry:
    return ConsentEntry(
        trace_id=current_trace_id() or new_trace_id(),
        ts=time.time_ns() // 1_000_000,
        user_id=user_id,
        scope=scope,
        metadata=metadata,
        action=action,
        event=event,
        details=details or {},
    )


_DETAILS = ("controller", "lawful_basis", "collection_method", "notice", "jurisdiction",
            "expires_at")


@instrument(
    "CONSENT", label="governance:record", salience=0.6, urgency=0.2,
    subject_field="user_id", capability="record_consent",
)
async def record(cmd: RecordConsent) -> Reply:
    annotate(consent_scope=cmd.scope)
    details = {k: getattr(cmd, k) for k in _DETAILS if getattr(cmd, k) is not None}
    action = "refuse" if cmd.event == "refused" else "grant"
    event = None if cmd.event == "given" else cmd.event
    entry = _entry(cmd.user_id, cmd.scope, cmd.metadata, action, event=event, details=details)
    return await _call("record", entry, idempotency_key=cmd.idempotency_key)


@instrument(
    "CONSENT", label="governance:revoke", salience=0.7, urgency=0.6,
    subject_field="user_id", capability="revoke_consent",
)
async def revoke(cmd: RevokeConsent) -> Reply:
    annotate(consent_scope=cmd.scope)
    event = None if cmd.by == "subject" else "revoked"
    entry = _entry(cmd.user_id, cmd.scope, {}, "revoke", event=event)
    return await _call("revoke", entry, idempotency_key=cmd.idempotency_key)


@instrument(
    "CONSENT", label="governance:status", salience=0.3, urgency=0.3,
    subject_field="user_id", capability="consent_status",
)
async def status(query: ConsentStatusQuery) -> Reply:
    annotate(consent_scope=query.scope)
    return await _call("status", query.user_id, query.scope)


@instrument(
    "CONSENT", label="governance:history", salience=0.3, urgency=0.2,
    subject_field="user_id", capability="consent_history",
)
async def history(query: ConsentHistoryQuery) -> Reply:
    return await _call("history", query.user_id)


@instrument(
    "CONSENT", label="governance:verify", salience=0.5, urgency=0.4,
    subject_field="user_id", capability="verify_consent_chain",
)
async def verify(query: VerifyConsentChain) -> Reply:
    return await _call("verify_chain", query.user_id)


@instrument(
    "CONSENT", label="governance:checkpoint", salience=0.3, urgency=0.2,
    capability="consent_checkpoint",
)
async def checkpoint(query: CheckpointQuery) -> Reply:
    return await _call("checkpoint", query.size)


@instrument(
    "CONSENT", label="governance:proof", salience=0.4, urgency=0.3,
    subject_field="user_id", capability="consent_proof",
)
async def proof(query: ProofQuery) -> Reply:
    return await _call("proof", query.user_id, scope=query.scope, seq=query.seq,
                       from_size=query.from_size)


@instrument(
    "CONSENT", label="governance:erase", salience=0.8, urgency=0.6,
    subject_field="user_id", capability="consent_erase",
)
async def erase(query: EraseQuery) -> Reply:
    return await _call("erase", query.user_id, idempotency_key=query.idempotency_key)


@instrument(
    "CONSENT", label="governance:receipt", salience=0.3, urgency=0.2,
    subject_field="user_id", capability="consent_receipt",
)
async def receipt(query: ReceiptQuery) -> Reply:
    return await _call("receipt", query.user_id, query.seq)


RECORD = Endpoint("consent_record", subjects.CONSENT_RECORD, RecordConsent, record,
                  "record_consent", MAX_BODY_BYTES, REGISTRY.waits_on_io,
                  reply=RECORD_REPLY)
REVOKE = Endpoint("consent_revoke", subjects.CONSENT_REVOKE, RevokeConsent, revoke,
                  "revoke_consent", MAX_BODY_BYTES, REGISTRY.waits_on_io,
                  reply=RECORD_REPLY)
STATUS = Endpoint("consent_status", subjects.CONSENT_STATUS, ConsentStatusQuery, status,
                  "consent_status", MAX_BODY_BYTES, REGISTRY.waits_on_io,
                  reply=STATUS_REPLY, read_only=True)
HISTORY = Endpoint("consent_history", subjects.CONSENT_HISTORY, ConsentHistoryQuery, history,
                   "consent_history", MAX_BODY_BYTES, REGISTRY.waits_on_io,
                   reply=HISTORY_REPLY, read_only=True)
VERIFY = Endpoint("consent_verify", subjects.CONSENT_VERIFY, VerifyConsentChain, verify,
                  "verify_consent_chain", MAX_BODY_BYTES, REGISTRY.waits_on_io,
                  reply=VERIFY_REPLY, read_only=True)

CHECKPOINT = Endpoint("consent_checkpoint", subjects.CONSENT_CHECKPOINT, CheckpointQuery,
                      checkpoint, "consent_checkpoint", MAX_BODY_BYTES, REGISTRY.waits_on_io,
                      reply=CHECKPOINT_REPLY, read_only=True)
PROOF = Endpoint("consent_proof", subjects.CONSENT_PROOF, ProofQuery, proof,
                 "consent_proof", MAX_BODY_BYTES, REGISTRY.waits_on_io, reply=PROOF_REPLY,
                 read_only=True)
ERASE = Endpoint("consent_erase", subjects.CONSENT_ERASE, EraseQuery, erase,
                 "consent_erase", MAX_BODY_BYTES, REGISTRY.waits_on_io, reply=ERASE_REPLY)
RECEIPT = Endpoint("consent_receipt", subjects.CONSENT_RECEIPT, ReceiptQuery, receipt,
                   "consent_receipt", MAX_BODY_BYTES, REGISTRY.waits_on_io,
                   reply=RECEIPT_REPLY, read_only=True)

ENDPOINTS: tuple[Endpoint[Any], ...] = (
    RECORD, REVOKE, STATUS, HISTORY, VERIFY, CHECKPOINT, PROOF, ERASE, RECEIPT,
)
