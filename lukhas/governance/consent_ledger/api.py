"""Consent ledger public API: record, revoke, and read back consent.

Each function validates its arguments into the slice's message (raising `InvalidRequest`)
and calls the same instrumented handler the service's endpoint calls (`endpoints.py`), so
one MATRIZ node is emitted per call and which provider answers is the registry's decision.
"""

from __future__ import annotations

from typing import Any

from lukhas.governance.consent_ledger import endpoints


async def record_consent(
    user_id: str,
    scope: str,
    metadata: dict[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    **consent: Any,
) -> dict[str, Any]:
    """Record that `user_id` grants `scope`.

    Without `idempotency_key` every call is a new request. With one, a retry of the same
    request (same key, scope and metadata) records once and answers `duplicate: true`.

    Raises:
        IdempotencyConflict: the key was already used for a different request (ledger).
        InvalidRequest: a field has the wrong type or length.
        PayloadTooLarge: the metadata is over 8 KiB of JSON.

    `consent` takes the optional consent-model fields: `event` ("given" (default),
    "refused", "renewed"), `controller`, `lawful_basis`, `collection_method`, `notice`,
    `jurisdiction`, `expires_at` (ms since the epoch).
    """
    return await endpoints.RECORD.call(
        user_id=user_id, scope=scope, metadata=metadata or {}, idempotency_key=idempotency_key,
        **consent,
    )


async def revoke_consent(
    user_id: str, scope: str, *, idempotency_key: str | None = None, by: str = "subject"
) -> dict[str, Any]:
    """Withdraw consent: as easy as giving it, and recorded the same way.

    A scope that was never granted is refused (`ok: false`, reason `not_granted`) by the
    ledger; idempotency keys work as for `record_consent`.
    """
    return await endpoints.REVOKE.call(
        user_id=user_id, scope=scope, idempotency_key=idempotency_key, by=by
    )


async def consent_status(user_id: str, scope: str) -> dict[str, Any]:
    """Current state of `scope` for `user_id`: granted, revoked, expired or none.

    The ledger answers from the scope's latest record and reports (`state_mismatch`) a
    derived state that disagrees with it.
    """
    return await endpoints.STATUS.call(user_id=user_id, scope=scope)


async def consent_history(user_id: str) -> dict[str, Any]:
    """Every consent record of `user_id`, oldest first, each with its stream `seq`."""
    return await endpoints.HISTORY.call(user_id=user_id)


async def verify_consent_chain(user_id: str) -> dict[str, Any]:
    """Recompute `user_id`'s hash chain; report its length, the first broken link and any
    derived state that disagrees with the ledger (`state_mismatches`)."""
    return await endpoints.VERIFY.call(user_id=user_id)


async def consent_checkpoint(size: int | None = None) -> dict[str, Any]:
    """The ledger's latest signed C2SP checkpoint (made now if records were added since), or
    the kept checkpoint of `size`: `{"ok", "checkpoint", "origin", "size", "root_hash",
    "vkey"}`."""
    return await endpoints.CHECKPOINT.call(size=size)


async def consent_proof(
    user_id: str, *, scope: str | None = None, seq: int | None = None,
    from_size: int | None = None,
) -> dict[str, Any]:
    """A proof bundle (`lukhas consent verify-proof`) for the user's records (one scope, or
    one seq), with a consistency proof from `from_size` when given."""
    return await endpoints.PROOF.call(user_id=user_id, scope=scope, seq=seq, from_size=from_size)


async def consent_erase(
    user_id: str, *, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Crypto-shred the user's personal data in the ledger and record the erasure."""
    return await endpoints.ERASE.call(user_id=user_id, idempotency_key=idempotency_key)


async def consent_receipt(user_id: str, seq: int) -> dict[str, Any]:
    """A signed consent receipt (ISO/IEC TS 27560 shape) for the user's record at `seq`."""
    return await endpoints.RECEIPT.call(user_id=user_id, seq=seq)
