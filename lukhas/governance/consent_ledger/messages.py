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
from lukhas.transparency.bundle import ProofBundle

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
#: The DPV event of a record (`erased` for an erasure record in a history).
DpvEvent = Literal["given", "renewed", "refused", "withdrawn", "revoked"]


class ConsentRecorded(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `record` and `revoke`: the entry written, and where it sits in the ledger."""

    ok: Literal[True]
    provider: str
    entry: ConsentEntry
    #: The record's stream sequence.
    seq: int | UnsetType = UNSET
    #: The record's leaf index in the ledger's Merkle tree (may differ from `seq`: forged
    #: messages in the stream are refused into the tree).
    index: int | UnsetType = UNSET
    #: The DPV event recorded and its term (`dpv:ConsentGiven`, `dpv:ConsentWithdrawn`, ...).
    event: DpvEvent | UnsetType = UNSET
    dpv: str | UnsetType = UNSET
    hash: str | UnsetType = UNSET
    #: The data subject's previous record's hash (64 zeros for the first).
    prev_hash: str | None | UnsetType = UNSET
    #: A retry of an earlier request with the same idempotency key: nothing new recorded.
    duplicate: bool | UnsetType = UNSET
    #: Epoch ms when a grant lapses (the request's `expires_at`, or LUKHAS_CONSENT_TTL_S).
    expires_at: int | UnsetType = UNSET


class ConsentStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `status`, answered from the scope's latest authenticated ledger record."""

    ok: Literal[True]
    provider: str
    user_id: str
    scope: str
    status: ConsentState
    #: The DPV term of the state (`dpv:ConsentUnknown` without a record).
    dpv: str | UnsetType = UNSET
    #: The latest record's DPV event.
    event: DpvEvent | UnsetType = UNSET
    ts: int | UnsetType = UNSET
    seq: int | UnsetType = UNSET
    hash: str | UnsetType = UNSET
    expires_at: int | UnsetType = UNSET
    #: Present (true) when the derived state disagrees with the ledger.
    state_mismatch: bool | UnsetType = UNSET
    #: Why it disagrees: `status_differs`, `state_behind`, `state_missing`, ...
    state_problem: str | UnsetType = UNSET
    #: Stream seqs on this scope after its latest record that the ledger key did not sign
    #: (forged by someone with stream access): skipped, reported here.
    unauthenticated_seqs: list[int] | UnsetType = UNSET


class HistoryRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One record of a `history` reply. A stream message the ledger key did not sign is
    `{seq, unauthenticated: true, problem}`; an erasure record has event `erased`, and a
    record whose data key was erased has `metadata: null, erased: true`."""

    seq: int
    unauthenticated: Literal[True] | UnsetType = UNSET
    problem: str | None | UnsetType = UNSET
    #: The record's leaf index in the Merkle tree.
    index: int | UnsetType = UNSET
    trace_id: str | None | UnsetType = UNSET
    ts: int | UnsetType = UNSET
    user_id: str | UnsetType = UNSET
    scope: str | UnsetType = UNSET
    metadata: dict[str, Any] | None | UnsetType = UNSET
    action: str | UnsetType = UNSET
    event: DpvEvent | Literal["erased"] | UnsetType = UNSET
    expires_at: int | None | UnsetType = UNSET
    prev_hash: str | None | UnsetType = UNSET
    hash: str | None | UnsetType = UNSET
    controller: str | UnsetType = UNSET
    lawful_basis: str | UnsetType = UNSET
    collection_method: str | UnsetType = UNSET
    notice: str | UnsetType = UNSET
    jurisdiction: str | UnsetType = UNSET
    erased: Literal[True] | UnsetType = UNSET


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


class RefusedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A stream message of the user's that the ledger key did not sign: not in the tree."""

    seq: int
    problem: str


class TreeReport(msgspec.Struct, frozen=True, kw_only=True):
    """The whole stream replayed into a Merkle tree and compared with what was signed."""

    #: Records admitted (authenticated), and the tree's base64 root hash.
    size: int
    root: str
    #: The size of the kept signed checkpoint (None: none kept).
    checkpoint_size: int | None
    #: Disagreements with the signed checkpoint or the stored tiles (empty: none).
    problems: list[str]


class ConsentChainReport(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `verify`: the recomputed chain and tree, and the state compared."""

    ok: Literal[True]
    provider: str
    user_id: str
    valid: bool
    length: int
    head: str
    state_mismatches: list[StateMismatch]
    refused: list[RefusedRecord]
    tree: TreeReport
    #: The seq of the first broken (or refused) record.
    broken_at: int | UnsetType = UNSET
    #: `unauthenticated`, a chain problem, `tree_mismatch` or `state_mismatch`.
    problem: str | UnsetType = UNSET


class ConsentCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `checkpoint`: a signed C2SP tlog-checkpoint note and what it says."""

    ok: Literal[True]
    provider: str
    #: The signed note (text); verify it with `vkey`.
    checkpoint: str
    origin: str
    size: int
    #: The tree's root hash, base64.
    root_hash: str
    #: The ledger's signed-note verifier key.
    vkey: str


class ConsentProof(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `proof`: a proof bundle (`lukhas consent verify-proof`) of the user's
    records against a fresh signed checkpoint."""

    ok: Literal[True]
    provider: str
    user_id: str
    bundle: ProofBundle
    #: Records proved, the checkpoint's size, and the tiles read to prove them.
    records: int
    checkpoint_size: int
    reads: int
    #: The user's stream seqs that are not the ledger's records (untagged or forged;
    #: no proof for them).
    refused_seqs: list[int] | UnsetType = UNSET


class ConsentErased(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `erase`: the data keys are destroyed and the erasure recorded."""

    ok: Literal[True]
    provider: str
    user_id: str
    erased: Literal[True]
    seq: int
    index: int
    hash: str
    duplicate: bool


class ConsentReceiptReply(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of `receipt`: a signed consent receipt for the record at `seq`."""

    ok: Literal[True]
    provider: str
    user_id: str
    seq: int
    index: int
    #: The receipt (ISO/IEC TS 27560 shape) as a signed note.
    receipt: str
    #: The record's signed leaf.
    leaf: str


class ConsentRefusal(Refusal, frozen=True, kw_only=True):
    """A consent request declined: `no_ledger` (the null provider keeps none),
    `not_supported`, `overloaded`."""

    reason: Literal["no_ledger", "not_supported", "overloaded"]


class ConsentWriteRefusal(Refusal, frozen=True, kw_only=True):
    """A `record` or `revoke` declined by the consent model, naming user, scope and event:
    `not_granted` (revoking a scope never granted), `not_given` (renewing consent that is
    not given), `already_given` (refusing consent that is given: revoke it instead)."""

    reason: Literal[
        "not_granted", "not_given", "already_given", "no_ledger", "not_supported",
        "overloaded",
    ]
    user_id: str | UnsetType = UNSET
    scope: str | UnsetType = UNSET
    event: DpvEvent | UnsetType = UNSET


class CheckpointRefusal(Refusal, frozen=True, kw_only=True):
    """`no_such_checkpoint`: no checkpoint of that `size` is kept."""

    reason: Literal[
        "no_such_checkpoint", "no_ledger", "not_supported", "overloaded",
    ]
    size: int | UnsetType = UNSET


class ProofRefusal(Refusal, frozen=True, kw_only=True):
    """`from_size_too_large`: the client's checkpoint is larger than the log (`size`)."""

    reason: Literal[
        "from_size_too_large", "no_ledger", "not_supported", "overloaded",
    ]
    size: int | UnsetType = UNSET


class ReceiptRefusal(Refusal, frozen=True, kw_only=True):
    """`no_such_record` (`seq` is not a record of this user), `unauthenticated` (the
    record there is not the ledger's: its tag does not check out)."""

    reason: Literal[
        "no_such_record", "unauthenticated", "no_ledger", "not_supported", "overloaded",
    ]
    user_id: str | UnsetType = UNSET
    seq: int | UnsetType = UNSET


#: What each consent subject may answer, success shapes first (`ErrorReply` is implied).
RECORD_REPLY: tuple[type, ...] = (ConsentRecorded, ConsentWriteRefusal)
STATUS_REPLY: tuple[type, ...] = (ConsentStatus, ConsentRefusal)
HISTORY_REPLY: tuple[type, ...] = (ConsentHistory, ConsentRefusal)
VERIFY_REPLY: tuple[type, ...] = (ConsentChainReport, ConsentRefusal)
CHECKPOINT_REPLY: tuple[type, ...] = (ConsentCheckpoint, CheckpointRefusal)
PROOF_REPLY: tuple[type, ...] = (ConsentProof, ProofRefusal)
ERASE_REPLY: tuple[type, ...] = (ConsentErased, ConsentRefusal)
RECEIPT_REPLY: tuple[type, ...] = (ConsentReceiptReply, ReceiptRefusal)
