"""Consent ledger wire messages (JSON). The subject says which one a body is.

The requests are decoded from these Structs; the replies are built as dicts by the providers
and described here (the `*Reply`/`Consent*` Structs below), for the published contract and
the contract tests, which check every reply against them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from lukhas._validation import check_size
from lukhas.replies import Refusal

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


# -- replies --------------------------------------------------------------------------------
# Fields typed `X | UnsetType` may be absent (never null); the JetStream ledger adds them.

ConsentState = Literal["granted", "revoked", "expired", "none"]


class ConsentRecorded(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `record` and `revoke`: the entry written, and where it sits in the ledger."""

    ok: Literal[True]
    provider: str
    entry: ConsentEntry
    #: The record's stream sequence.
    seq: int | UnsetType = UNSET
    hash: str | UnsetType = UNSET
    #: The data subject's previous record's hash (64 zeros for the first).
    prev_hash: str | None | UnsetType = UNSET
    #: A retry of an earlier request with the same idempotency key: nothing new recorded.
    duplicate: bool | UnsetType = UNSET
    #: Epoch ms when a grant lapses, under LUKHAS_CONSENT_TTL_S.
    expires_at: int | UnsetType = UNSET


class ConsentStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `status`, answered from the scope's latest ledger record."""

    ok: Literal[True]
    provider: str
    user_id: str
    scope: str
    status: ConsentState
    ts: int | UnsetType = UNSET
    seq: int | UnsetType = UNSET
    hash: str | UnsetType = UNSET
    expires_at: int | UnsetType = UNSET
    #: Present (true) when the derived state disagrees with the ledger.
    state_mismatch: bool | UnsetType = UNSET
    #: Why it disagrees: `status_differs`, `state_behind`, `state_missing`, ...
    state_problem: str | UnsetType = UNSET


class HistoryRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One record of a `history` reply; a record that does not decode is `{seq, malformed}`."""

    seq: int
    malformed: bool | UnsetType = UNSET
    trace_id: str | UnsetType = UNSET
    ts: int | UnsetType = UNSET
    user_id: str | UnsetType = UNSET
    scope: str | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    action: str | UnsetType = UNSET
    expires_at: int | None | UnsetType = UNSET
    prev_hash: str | None | UnsetType = UNSET
    hash: str | None | UnsetType = UNSET


class ConsentHistory(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `history`: the user's records in stream order."""

    ok: Literal[True]
    provider: str
    user_id: str
    records: list[HistoryRecord]


class StateMismatch(msgspec.Struct, frozen=True, kw_only=True):
    """A scope whose derived (KV) state disagrees with its latest ledger record."""

    scope: str
    problem: str
    key_version: int
    state_seq: int | None
    state_status: str | None
    ledger_seq: int | None
    ledger_status: str | None


class ConsentChainReport(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `verify`: the recomputed chain and the state compared with it."""

    ok: Literal[True]
    provider: str
    user_id: str
    valid: bool
    length: int
    head: str
    state_mismatches: list[StateMismatch]
    #: The seq of the first broken record.
    broken_at: int | UnsetType = UNSET
    problem: str | UnsetType = UNSET


class ConsentRefusal(Refusal, frozen=True, kw_only=True):
    """A consent request declined: `not_granted` (revoking a scope never granted, naming the
    user and scope), `no_ledger` (the null provider keeps none), `not_supported`,
    `overloaded`."""

    reason: Literal["not_granted", "no_ledger", "not_supported", "overloaded"]
    user_id: str | UnsetType = UNSET
    scope: str | UnsetType = UNSET


#: What each consent subject may answer, success shapes first (`ErrorReply` is implied).
RECORD_REPLY: tuple[type, ...] = (ConsentRecorded, ConsentRefusal)
STATUS_REPLY: tuple[type, ...] = (ConsentStatus, ConsentRefusal)
HISTORY_REPLY: tuple[type, ...] = (ConsentHistory, ConsentRefusal)
VERIFY_REPLY: tuple[type, ...] = (ConsentChainReport, ConsentRefusal)
