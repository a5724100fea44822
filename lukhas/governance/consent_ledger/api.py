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
) -> dict[str, Any]:
    """Record that `user_id` grants `scope`.

    Without `idempotency_key` every call is a new request. With one, a retry of the same
    request (same key, scope and metadata) records once and answers `duplicate: true`.

    Raises:
        IdempotencyConflict: the key was already used for a different request (ledger).
        InvalidRequest: a field has the wrong type or length.
        PayloadTooLarge: the metadata is over 8 KiB of JSON.
    """
    return await endpoints.RECORD.call(
        user_id=user_id, scope=scope, metadata=metadata or {}, idempotency_key=idempotency_key
    )


async def revoke_consent(
    user_id: str, scope: str, *, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Withdraw consent: as easy as giving it, and recorded the same way.

    A scope that was never granted is refused (`ok: false`, reason `not_granted`) by the
    ledger; idempotency keys work as for `record_consent`.
    """
    return await endpoints.REVOKE.call(
        user_id=user_id, scope=scope, idempotency_key=idempotency_key
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
