"""Consent ledger wire messages (JSON). The subject says which one a body is."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from lukhas._validation import check_size

UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Scope = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/\-]*$")
]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]

#: Encoded JSON bytes a consent record's metadata may take.
MAX_METADATA_BYTES = 8192

Short = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
#: W3C DPV consent events a `record` may carry (`revoke` makes withdrawn / revoked).
RecordEvent = Literal["given", "refused", "renewed"]
#: Who ends consent: the data subject (DPV ConsentWithdrawn) or the controller / another
#: party (DPV ConsentRevoked).
RevokedBy = Literal["subject", "controller", "other"]
Millis = Annotated[int, msgspec.Meta(ge=0)]
Index = Annotated[int, msgspec.Meta(ge=0)]


class RecordConsent(msgspec.Struct, frozen=True, tag="consent.record"):
    """A consent event for one purpose (`scope`). Every field after `metadata` is optional,
    so `{"user_id","scope"}` stays a valid request (event `given`)."""

    user_id: UserId
    scope: Scope
    metadata: dict[str, Any] = {}
    idempotency_key: IdempotencyKey | None = None
    event: RecordEvent = "given"
    controller: Short | None = None
    lawful_basis: Short | None = None
    collection_method: Short | None = None
    notice: Short | None = None
    jurisdiction: Short | None = None
    #: Validity: the consent lapses at this time (ms since the epoch); status then "expired".
    expires_at: Millis | None = None

    def __post_init__(self) -> None:
        check_size(self.metadata, MAX_METADATA_BYTES, "metadata")


class RevokeConsent(msgspec.Struct, frozen=True, tag="consent.revoke"):
    user_id: UserId
    scope: Scope
    idempotency_key: IdempotencyKey | None = None
    by: RevokedBy = "subject"


class ConsentStatusQuery(msgspec.Struct, frozen=True, tag="consent.status"):
    user_id: UserId
    scope: Scope


class ConsentHistoryQuery(msgspec.Struct, frozen=True, tag="consent.history"):
    user_id: UserId


class VerifyConsentChain(msgspec.Struct, frozen=True, tag="consent.verify"):
    user_id: UserId


class CheckpointQuery(msgspec.Struct, frozen=True, tag="consent.checkpoint"):
    """The latest signed checkpoint (made now if records were added since), or a kept one."""

    size: Index | None = None


class ProofQuery(msgspec.Struct, frozen=True, tag="consent.proof"):
    user_id: UserId
    scope: Scope | None = None
    seq: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: The size of an earlier checkpoint the client holds: add a consistency proof from it.
    from_size: Annotated[int, msgspec.Meta(ge=1)] | None = None


class EraseQuery(msgspec.Struct, frozen=True, tag="consent.erase"):
    user_id: UserId
    idempotency_key: IdempotencyKey | None = None


class ReceiptQuery(msgspec.Struct, frozen=True, tag="consent.receipt"):
    user_id: UserId
    seq: Annotated[int, msgspec.Meta(ge=1)]


class ConsentEntry(msgspec.Struct, frozen=True):
    """What a record (or revoke) writes; the reply's `entry` has these fields."""

    trace_id: str
    ts: int
    user_id: str
    scope: str
    metadata: dict[str, Any]
    action: str = "grant"
    #: The DPV event (given, refused, renewed, withdrawn, revoked); None: from `action`.
    event: str | None = None
    #: The consent model's optional fields (controller, lawful_basis, collection_method,
    #: notice, jurisdiction, expires_at) that were given.
    details: dict[str, Any] = {}
