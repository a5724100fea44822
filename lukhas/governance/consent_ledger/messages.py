"""Consent ledger wire messages (JSON). The subject says which one a body is."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from lukhas._validation import check_size

UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Scope = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/\-]*$")
]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]

#: Encoded JSON bytes a consent record's metadata may take.
MAX_METADATA_BYTES = 8192


class RecordConsent(msgspec.Struct, frozen=True, tag="consent.record"):
    user_id: UserId
    scope: Scope
    metadata: dict[str, Any] = {}
    idempotency_key: IdempotencyKey | None = None

    def __post_init__(self) -> None:
        check_size(self.metadata, MAX_METADATA_BYTES, "metadata")


class RevokeConsent(msgspec.Struct, frozen=True, tag="consent.revoke"):
    user_id: UserId
    scope: Scope
    idempotency_key: IdempotencyKey | None = None


class ConsentStatusQuery(msgspec.Struct, frozen=True, tag="consent.status"):
    user_id: UserId
    scope: Scope


class ConsentHistoryQuery(msgspec.Struct, frozen=True, tag="consent.history"):
    user_id: UserId


class VerifyConsentChain(msgspec.Struct, frozen=True, tag="consent.verify"):
    user_id: UserId


class ConsentEntry(msgspec.Struct, frozen=True):
    """What a record (or revoke) writes; the reply's `entry` has these fields."""

    trace_id: str
    ts: int
    user_id: str
    scope: str
    metadata: dict[str, Any]
    action: str = "grant"
