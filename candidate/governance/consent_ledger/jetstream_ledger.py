"""The consent ledger on JetStream: authenticated records in one Merkle tree, signed
checkpoints, proofs.

Layout:

* Stream `CONSENT_LEDGER` on `lukhas.ledger.consent.<pseudonym>.<scope token>`: one subject
  per (data subject, scope), named by the keyed pseudonym (never the raw id) and base64url
  of the scope. Deletes, purges, limits and rollups are denied; `ensure()` refuses a stream
  whose protective config was weakened. Each message is one *leaf* made by
  `lukhas.transparency.record.make_leaf(key, index, body)`: the record's text tagged with an
  HMAC under a key derived from `LUKHAS_LEDGER_SIGNING_KEY`, so only a holder of that key can
  make a record the ledger admits. The body is the record
  (pseudonym, scope, DPV event, time, the data subject's `prev_hash` chain link and own
  `hash`; personal data only as `sealed` ciphertext).
* One RFC 6962 tree over every admitted record, in stream order. Leaf index = tree position;
  a message that does not authenticate (forged by someone with stream access but without the
  key) is refused into the tree and reported, so index and stream seq may differ.
* KV bucket `consent_tree`: `lease` (which worker writes), tiles `t.<level>.<n>` (the tree's
  nodes, `_tiles`), `checkpoint` (the latest signed checkpoint with its last stream seq) and
  `cp.<size>` (every checkpoint, kept).
* KV bucket `consent_keys` (history 1): per pseudonym, the data key sealing its personal data,
  wrapped by `LUKHAS_LEDGER_WRAPPING_KEY`. `erase` purges it.
* KV bucket `consent_state`: the derived (subject, scope) state, checked on every read.

One writer at a time: a worker that has records to append takes the KV lease, restores the
tree from the latest signed checkpoint (checking the tiles against its signed root), replays
the stream after it (admitting only authenticated records), then appends in batches: each
batch is tagged, published pipelined with `Nats-Expected-Last-Sequence` (so nothing, not even
a forger, can slip between the writer's view and the stream), and its completed tiles and
state values written once. The lease is released (with a checkpoint) when the worker's queue
drains; other workers wait for it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import logging
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import anyio
import msgspec
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    Header,
    RawStreamMsg,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from candidate._jetstream import (
    allows_atomic,
    atomic_allowed,
    ensure_kv,
    ensure_stream,
    jetstream_of,
    protection_gaps,
)
from candidate.governance.consent_ledger import _chain, _dpv, _state, _tiles
from candidate.governance.consent_ledger._pipeline import (
    AtomicBatch,
    Pipeline,
    StoredMsg,
    TooManyResults,
)
from candidate.governance.consent_ledger.errors import (
    LedgerContention,
    LedgerStreamWeakened,
    LedgerTampered,
)
from lukhas import subjects
from lukhas.config import Settings
from lukhas.errors import Unavailable
from lukhas.governance.consent_ledger import registry
from lukhas.governance.consent_ledger.errors import IdempotencyConflict
from lukhas.governance.consent_ledger.messages import ConsentEntry
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.runtime import Runtime
from lukhas.transparency import keys, sealed
from lukhas.transparency.bundle import build_bundle
from lukhas.transparency.checkpoint import Checkpoint, open_checkpoint
from lukhas.transparency.errors import TransparencyError
from lukhas.transparency.merkle import (
    CompactRange,
    MemoryNodeStore,
    NodeId,
    consistency_plan,
    inclusion_plan,
    leaf_hash,
    root_plan,
)
from lukhas.transparency.note import Signer, b64encode
from lukhas.transparency.receipt import (
    ConsentReceipt,
    ReceiptPurpose,
    receipt_leaf_hash,
    sign_receipt,
)
from lukhas.transparency.record import RecordKey, make_leaf, open_leaf

logger = logging.getLogger(__name__)

STREAM = "CONSENT_LEDGER"
STATE_BUCKET = "consent_state"
TREE_BUCKET = "consent_tree"
KEYS_BUCKET = "consent_keys"
SUBJECT_PREFIX = "lukhas.ledger.consent"
#: Signed checkpoints are announced here as they are made: the note (text/plain), no reply
#: subject, header `Lukhas-Checkpoint: <size>` (the request subject of the same name is
#: read-only, so the slice service does not take an announcement for a request).
CHECKPOINT_FEED = subjects.CONSENT_CHECKPOINT
#: The scope of erasure records (scopes on the wire cannot start with `$`).
ERASURE_SCOPE = "$erasure"
#: Record layout of the leaves' bodies.
RECORD_VERSION = 2

_READ_BATCH = 512
#: Data subjects per multi-last read, and the most last-records one read may answer.
_MULTI_LAST_SUBJECTS = 256
_MULTI_LAST_RESULTS = 100_000
_READ_UNAVAILABLE_RETRIES = 50
#: JetStream's error code for an atomic batch holding an already used `Nats-Msg-Id`.
_ATOMIC_DUPLICATE_MSG_ID = 10201
#: Records of an atomic batch sent as one part while the rest are made.
_PART = 64
_KV_REMOVED = frozenset({"DEL", "PURGE"})
_LEASE_KEY = "lease"
_CHECKPOINT_KEY = "checkpoint"
#: Optional consent-model fields a record may carry (ISO/IEC TS 27560).
DETAIL_FIELDS = ("controller", "lawful_basis", "collection_method", "notice", "jurisdiction")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LedgerOptions:
    """Where the ledger lives and how it behaves; the defaults are the production names."""

    stream: str = STREAM
    state_bucket: str = STATE_BUCKET
    tree_bucket: str = TREE_BUCKET
    keys_bucket: str = KEYS_BUCKET
    subject_prefix: str = SUBJECT_PREFIX
    checkpoint_feed: str = CHECKPOINT_FEED
    replicas: int = 1
    #: A grant lapses this long after it was recorded (status then says "expired"); None: never.
    consent_ttl_s: float | None = None
    duplicate_window_s: float = 120.0
    #: A request gives up (LedgerContention) after its batch was re-run this many times.
    max_append_attempts: int = 64
    timeout_s: float = 5.0
    #: A checkpoint is signed at least this often while records are appended (and whenever
    #: the writer hands the lease back, and on request).
    checkpoint_interval_s: float = 1.0
    #: Records signed and published per round.
    max_batch: int = 256
    #: How long a lease holds without renewal (a crashed writer blocks others this long).
    lease_s: float = 5.0
    #: How long a writer keeps the lease after its queue drains, for the next request.
    linger_s: float = 0.005
    #: How long a worker waits for another's lease before LedgerContention.
    lease_wait_s: float = 30.0
    #: Data subjects whose chain tail, latest records and data key the writer keeps in
    #: memory; beyond that the oldest are forgotten (and read again if they come back), so a
    #: long-running writer's memory does not grow with every data subject it has seen.
    cached_subjects: int = 65_536

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> LedgerOptions:
        return cls(replicas=settings.ledger_replicas, **overrides)


class LedgerStatistics(NamedTuple):
    appended: int
    duplicates: int
    #: Batches re-run because the stream moved under the writer (forged append, rival).
    retries: int
    state_mismatches: int
    #: Stream messages refused into the tree (not authenticated by the ledger key).
    refused: int
    checkpoints: int


class _Msg(NamedTuple):
    seq: int
    subject: str
    data: bytes


class _Opened(NamedTuple):
    """A stream message opened as a record, or why it is refused."""

    seq: int
    subject: str
    data: bytes
    index: int | None
    body: dict[str, Any] | None
    problem: str | None


class _Item:
    """One append waiting in the writer's queue."""

    __slots__ = ("kind", "pseudonym", "versions", "fields", "metadata", "msg_id", "user_id",
                 "attempts", "one_by_one", "done", "result", "error", "_waiter")

    def __init__(
        self, kind: str, pseudonym: str = "", versions: tuple[str, ...] = (),
        fields: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
        msg_id: str | None = None, user_id: str = "",
    ) -> None:
        self.kind = kind  # "write" | "erase" | "checkpoint"
        self.pseudonym = pseudonym
        self.versions = versions
        self.fields = {} if fields is None else fields
        self.metadata = {} if metadata is None else metadata
        self.msg_id = msg_id
        self.user_id = user_id
        self.attempts = 0
        #: Publish on its own, not in an atomic batch (its idempotency key was seen before).
        self.one_by_one = False
        #: Resolved: its outcome is known (whether or not its caller still waits for it).
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        # What the caller awaits: a bare future (an item is made per append).
        self._waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        if not self.done:
            self.result, self.error, self.done = result, error, True
            if not self._waiter.done():  # cancelled when its caller was
                self._waiter.set_result(None)

    async def outcome(self) -> Any:
        """Wait until resolved: the result, or the error raised."""
        await self._waiter
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _Prepared:
    item: _Item
    leaf: bytes
    body: dict[str, Any]
    index: int


class JetStreamConsentLedger:
    """`ConsentProvider` on JetStream: tagged leaves in a stream, the tree and keys in KV.

    Call `await ensure()` once before use, and `await aclose()` to hand the lease back.
    """

    name = "jetstream"
    waits_on_io = True

    def __init__(
        self,
        js: JetStreamContext | Any,
        pseudonymize: Pseudonymizer | Callable[[str], str],
        options: LedgerOptions | None = None,
        *,
        signer: Signer | None = None,
        wrapping_key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._js: JetStreamContext = js.jetstream() if hasattr(js, "jetstream") else js
        self._pseudonymize = pseudonymize
        self.options = options or LedgerOptions()
        self._signer = signer or Signer.generate(keys.DRY_RUN_NAME)
        self._verifier = self._signer.verifier
        self._record_key = RecordKey.of(self._signer)
        self._wrapping_key = wrapping_key or secrets.token_bytes(32)
        self._clock = clock
        self._kv: KeyValue | None = None
        self._tree_kv: KeyValue | None = None
        self._keys_kv: KeyValue | None = None
        self._owner = uuid.uuid4().hex
        # writer state (valid while the lease is held)
        self._queue: list[_Item] = []
        self._wake = anyio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._pipeline: Pipeline | None = None
        # The stream answers multi-last direct gets (allow_direct; older streams may not).
        self._direct = False
        # ... and atomic batch publishes (allow_atomic, nats-server 2.12+).
        self._atomic = False
        self._atomic_kv: dict[str, bool] = {}
        self._tree_ok = False
        self._lease_rev: int | None = None
        self._lease_until = 0.0
        self._range = CompactRange()
        self._tiles = _tiles.TileWriter()
        self._last_seq = 0
        self._checkpoint: tuple[int, bytes] | None = None  # (size, note)
        self._checkpoint_at = 0.0
        self._tails: dict[str, str] = {}
        # (data subject, scope) -> its latest record as `_scope_entry` makes it, or None.
        self._scopes: dict[tuple[str, str], tuple[int, str, Any] | None] = {}
        self._data_keys: dict[str, tuple[str, bytes] | None] = {}
        self._appended = self._duplicates = self._retries = 0
        self._state_mismatches = self._refused = self._checkpoints = 0

    @classmethod
    def from_settings(
        cls,
        js: JetStreamContext | Any,
        pseudonymize: Pseudonymizer | Callable[[str], str],
        settings: Settings,
        **overrides: Any,
    ) -> JetStreamConsentLedger:
        signer = keys.ledger_signer(settings.ledger_signing_key, dry_run=settings.dry_run,
                                    ledger_enabled=True)
        wrapping = keys.ledger_wrapping_key(settings.ledger_wrapping_key,
                                            dry_run=settings.dry_run, ledger_enabled=True)
        return cls(js, pseudonymize, LedgerOptions.from_settings(settings, **overrides),
                   signer=signer, wrapping_key=wrapping)

    def __repr__(self) -> str:
        return f"<JetStreamConsentLedger stream={self.options.stream}>"

    @property
    def verifier_key(self) -> str:
        return str(self._verifier)

    def statistics(self) -> LedgerStatistics:
        return LedgerStatistics(self._appended, self._duplicates, self._retries,
                                self._state_mismatches, self._refused, self._checkpoints)

    def stream_config(self) -> StreamConfig:
        opts = self.options
        return StreamConfig(
            name=opts.stream,
            description="LUKHAS consent ledger: authenticated records, one Merkle tree",
            subjects=[f"{opts.subject_prefix}.*.*"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=opts.replicas,
            duplicate_window=opts.duplicate_window_s,
            discard=DiscardPolicy.NEW,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
            allow_atomic=True,
        )

    async def ensure(self) -> None:
        """Create the stream and buckets unless they exist; refuse a weakened stream."""
        required = self.stream_config()
        info = await ensure_stream(self._js, required)
        gaps = protection_gaps(info.config, required)
        if gaps:
            logger.error("consent ledger stream %s is weakened: %s", required.name, gaps)
            raise LedgerStreamWeakened(self.options.stream, gaps)
        self._direct = bool(info.config.allow_direct)
        self._atomic = atomic_allowed(info.config)
        replicas = self.options.replicas
        self._kv = await ensure_kv(self._js, self.options.state_bucket, replicas=replicas,
                                   atomic=True)
        self._tree_kv = await ensure_kv(self._js, self.options.tree_bucket, replicas=replicas,
                                        atomic=True)
        self._atomic_kv = {
            bucket: await allows_atomic(self._js, f"KV_{bucket}")
            for bucket in (self.options.state_bucket, self.options.tree_bucket)
        }
        self._keys_kv = await ensure_kv(self._js, self.options.keys_bucket, replicas=replicas)

    async def aclose(self) -> None:
        """Finish queued appends and hand the lease back (with a checkpoint)."""
        if self._writer is not None:
            self._wake.set()
            await asyncio.gather(self._writer, return_exceptions=True)

    # -- ConsentProvider ------------------------------------------------------------------

    async def record(self, entry: ConsentEntry, *, idempotency_key: str | None) -> dict[str, Any]:
        with _unavailable_when_jetstream_is("record"):
            return await self._write(entry, idempotency_key)

    async def revoke(self, entry: ConsentEntry, *, idempotency_key: str | None) -> dict[str, Any]:
        with _unavailable_when_jetstream_is("revoke"):
            return await self._write(entry, idempotency_key)

    async def status(self, user_id: str, scope: str) -> dict[str, Any]:
        with _unavailable_when_jetstream_is("status"):
            return await self._status(user_id, scope)

    async def history(self, user_id: str) -> dict[str, Any]:
        with _unavailable_when_jetstream_is("history"):
            return await self._history(user_id)

    async def verify_chain(self, user_id: str) -> dict[str, Any]:
        with _unavailable_when_jetstream_is("verify"):
            return await self._verify(user_id)

    async def checkpoint(self, size: int | None = None) -> dict[str, Any]:
        with _unavailable_when_jetstream_is("checkpoint"):
            return await self._checkpoint_reply(size)

    async def proof(
        self, user_id: str, *, scope: str | None = None, seq: int | None = None,
        from_size: int | None = None,
    ) -> dict[str, Any]:
        with _unavailable_when_jetstream_is("proof"):
            return await self._proof(user_id, scope, seq, from_size)

    async def erase(self, user_id: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        with _unavailable_when_jetstream_is("erase"):
            return await self._erase(user_id, idempotency_key)

    async def receipt(self, user_id: str, seq: int) -> dict[str, Any]:
        with _unavailable_when_jetstream_is("receipt"):
            return await self._receipt(user_id, seq)

    # -- opening records ------------------------------------------------------------------

    def _open(self, seq: int, subject: str, data: bytes | None,
              index: int | None = None) -> _Opened:
        data = data or b""
        try:
            leaf = open_leaf(data, self._record_key, index=index)
        except TransparencyError as exc:
            return _Opened(seq, subject, data, None, None, f"unauthenticated: {exc}")
        body = leaf.body
        if body.get("seq") != seq:
            return _Opened(seq, subject, data, None, None,
                           f"unauthenticated: a replayed record (signed for stream seq "
                           f"{body.get('seq')}, found at {seq})")
        pseudonym, _, token = subject[len(self.options.subject_prefix) + 1:].partition(".")
        if body.get("pseudonym") != pseudonym:
            return _Opened(seq, subject, data, leaf.index, body, "wrong_subject")
        if _state.scope_token(str(body.get("scope"))) != token:
            return _Opened(seq, subject, data, leaf.index, body, "wrong_scope")
        return _Opened(seq, subject, data, leaf.index, body, None)

    # -- status ---------------------------------------------------------------------------

    async def _status(self, user_id: str, scope: str) -> dict[str, Any]:
        versions = self._versions(user_id)
        kv = self._state()
        found = await _gather(
            *(lambda p=p: self._kv_get(kv, _state.key(p, scope)) for p in versions),
            *(lambda p=p: self._scope_latest(p, scope) for p in versions),
        )
        states, lasts = found[: len(versions)], found[len(versions):]
        reply: dict[str, Any] = {
            "ok": True, "provider": self.name, "user_id": user_id, "scope": scope,
            "status": "none", "dpv": _dpv.UNKNOWN,
        }
        problems: list[str] = []
        refused: list[int] = []
        latest: tuple[int, dict[str, Any]] | None = None
        for pseudonym, state, (last, forged) in zip(versions, states, lasts, strict=True):
            refused.extend(forged)
            if last is not None and (latest is None or last[0] > latest[0]):
                latest = last
            seq, record = last if last is not None else (None, None)
            mismatch = _state.mismatch(state, seq, record)
            if mismatch is not None:
                problems.append(mismatch)
                logger.warning("consent state of %s scope=%s disagrees with the ledger (%s)",
                               pseudonym, scope, mismatch)
        if problems:
            self._state_mismatches += 1
            reply.update(state_mismatch=True, state_problem=problems[0])
        if refused:
            reply["unauthenticated_seqs"] = sorted(refused)
        if latest is None:
            return reply
        seq, record = latest
        truth = _state.of_record(seq, record)
        expires_at = record.get("expires_at")
        expired = expires_at is not None and self._now_ms() >= expires_at
        event = _dpv.event_of(record)
        status, term = _dpv.status_of(event, expired=expired)
        reply.update(status=status, dpv=term, event=event, ts=truth.ts, seq=seq,
                     hash=truth.hash)
        if expires_at is not None:
            reply["expires_at"] = expires_at
        return reply

    async def _scope_latest(
        self, pseudonym: str, scope: str
    ) -> tuple[tuple[int, dict[str, Any]] | None, list[int]]:
        """The scope's latest authenticated record, and the seqs of forged ones after it."""
        subject = self._subject(pseudonym, scope)
        last = await self._last(subject)
        if last is None:
            return None, []
        opened = self._open(last.seq, subject, last.data)
        if opened.problem is None:
            assert opened.body is not None
            return (last.seq, opened.body), []
        # The newest message is not the writer's: read the subject and skip what is forged.
        self._refused += 1
        logger.warning("consent record seq %s of %s is refused (%s)", last.seq, pseudonym,
                       opened.problem)
        good, forged = None, []
        for msg in await self._messages([subject]):
            o = self._open(msg.seq, msg.subject, msg.data)
            if o.problem is None:
                assert o.body is not None
                good = (o.seq, o.body)
            else:
                forged.append(o.seq)
        return good, [s for s in forged if good is None or s > good[0]]

    # -- history --------------------------------------------------------------------------

    async def _history(self, user_id: str) -> dict[str, Any]:
        versions = self._versions(user_id)
        messages, data_keys = await _gather(
            lambda: self._messages([self._chain_subjects(p) for p in versions]),
            lambda: self._read_data_keys(versions),
        )
        records = []
        for msg in messages:
            opened = self._open(msg.seq, msg.subject, msg.data)
            if opened.problem is not None or opened.body is None:
                records.append({"seq": msg.seq, "unauthenticated": True,
                                "problem": opened.problem})
                continue
            records.append(self._history_record(user_id, opened, data_keys))
        return {"ok": True, "provider": self.name, "user_id": user_id, "records": records}

    def _history_record(
        self, user_id: str, opened: _Opened, data_keys: dict[str, tuple[str, bytes] | None]
    ) -> dict[str, Any]:
        body = opened.body or {}
        metadata, erased = self._unseal(body, data_keys)
        out = {
            "seq": opened.seq,
            "index": opened.index,
            **_entry(user_id, body, metadata),
            "event": _dpv.event_of(body) if body.get("action") != "erase" else "erased",
            "expires_at": body.get("expires_at"),
            "prev_hash": body.get("prev_hash"),
            "hash": body.get("hash"),
        }
        for name in DETAIL_FIELDS:
            if name in body:
                out[name] = body[name]
        if erased:
            out["erased"] = True
        return out

    def _unseal(
        self, body: dict[str, Any], data_keys: dict[str, tuple[str, bytes] | None]
    ) -> tuple[dict[str, Any] | None, bool]:
        """(metadata, erased): the record's personal data, or None if its key is gone."""
        box = body.get("sealed")
        if box is None:
            return body.get("metadata", {}), False
        pseudonym = str(body.get("pseudonym"))
        key = data_keys.get(pseudonym)
        try:
            box_ = msgspec.convert(box, sealed.Sealed)
        except msgspec.ValidationError:
            return None, True
        if key is None or key[0] != box_.kid:
            return None, True
        try:
            plain = sealed.unseal(key[1], box_, _aad(pseudonym, str(body.get("scope"))))
        except TransparencyError:
            return None, True
        return msgspec.json.decode(plain), False

    # -- verify ---------------------------------------------------------------------------

    async def _verify(self, user_id: str) -> dict[str, Any]:
        """Replay the whole stream into a tree (admitting only authenticated records at their
        signed index), check it against the signed checkpoint and the stored tiles, and check
        the user's chain and state values."""
        versions = self._versions(user_id)
        writer_problem = None
        try:  # checkpoint what was appended so far (the writer checks its own view first)
            await self._fresh_checkpoint()
        except LedgerTampered as exc:
            writer_problem = exc.problem
        kv_stream = f"KV_{self.options.state_bucket}"
        kv_prefix = f"$KV.{self.options.state_bucket}."
        everything, kv_entries, cp_entry, tiles = await _gather(
            lambda: self._messages([f"{self.options.subject_prefix}.*.*"]),
            lambda: self._read(kv_stream, [f"{kv_prefix}{p}.*" for p in versions],
                               DeliverPolicy.LAST_PER_SUBJECT),
            lambda: self._kv_raw(self._tree(), _CHECKPOINT_KEY),
            self._read_all_tiles,
        )
        store = MemoryNodeStore()
        leaves: dict[int, bytes] = {}
        mine = {f"{self.options.subject_prefix}.{p}." for p in versions}
        user_records: list[_Opened] = []
        refused: list[dict[str, Any]] = []
        for msg in everything:
            opened = self._open(msg.seq, msg.subject, msg.data, index=store.range.size)
            is_mine = any(msg.subject.startswith(m) for m in mine)
            if opened.problem is not None and opened.problem.startswith("unauthenticated"):
                if is_mine:
                    refused.append({"seq": msg.seq, "problem": opened.problem})
                continue
            leaves[store.append(msg.data)] = msg.data
            if is_mine:
                user_records.append(opened)
        tree_problems = self._tree_problems(store, cp_entry, tiles)
        if writer_problem is not None:
            tree_problems.insert(0, f"the writer refuses to write: {writer_problem}")
        reports: list[_chain.ChainReport] = []
        mismatches: list[dict[str, Any]] = []
        for version, pseudonym in enumerate(versions):
            prefix = f"{self.options.subject_prefix}.{pseudonym}."
            own = [o for o in user_records if o.subject.startswith(prefix)]
            reports.append(_verify_one(own, pseudonym))
            states = {
                subject[len(kv_prefix) + len(pseudonym) + 1:]: _state.decode(data)
                for _, subject, data, removed in kv_entries
                if subject.startswith(f"{kv_prefix}{pseudonym}.") and not removed
            }
            mismatches.extend(_state_mismatches(version, own, states))
        broken = [r for r in reports if not r.valid]
        first = min(broken, key=lambda r: r.broken_at or 0) if broken else None
        heads = [(r.length, r.head) for r in reports if r.length]
        valid = first is None and not mismatches and not refused and not tree_problems
        reply: dict[str, Any] = {
            "ok": True, "provider": self.name, "user_id": user_id,
            "valid": valid,
            "length": sum(r.length for r in reports),
            "head": heads[0][1] if heads else _chain.GENESIS,
            "state_mismatches": mismatches,
            "refused": refused,
            "tree": {
                "size": store.range.size,
                "root": b64encode(store.root()),
                "checkpoint_size": cp_entry[0] if cp_entry else None,
                "problems": tree_problems,
            },
        }
        candidates = []
        if refused:
            candidates.append((refused[0]["seq"], "unauthenticated"))
        if first is not None:
            candidates.append((first.broken_at or 0, first.problem or "broken"))
        if candidates:
            reply["broken_at"], reply["problem"] = min(candidates)
        elif tree_problems:
            reply["problem"] = "tree_mismatch"
        elif mismatches:
            reply["problem"] = "state_mismatch"
        if not valid:
            logger.warning("consent verify of %s: %s", versions[0], reply.get("problem"))
        if mismatches:
            self._state_mismatches += 1
        return reply

    def _tree_problems(
        self, store: MemoryNodeStore, cp_entry: tuple[int, bytes, int] | None,
        tiles: dict[tuple[int, int], bytes],
    ) -> list[str]:
        problems: list[str] = []
        size = store.range.size
        if cp_entry is not None:
            _, note, _ = cp_entry
            try:
                cp = open_checkpoint(note, self._verifier)
            except TransparencyError as exc:
                problems.append(f"the kept checkpoint does not verify: {exc}")
            else:
                if cp.size > size:
                    problems.append(
                        f"the signed checkpoint has {cp.size} records, the stream only "
                        f"{size}: records were dropped (truncated or recreated stream)")
                elif store.root(cp.size) != cp.root_hash:
                    problems.append(
                        f"the stream's first {cp.size} records do not hash to the signed "
                        "checkpoint: records were rewritten, reordered or replaced")
        elif size:
            problems.append("records exist but no signed checkpoint is kept")
        for (tile_level, n), data in sorted(tiles.items()):
            level = tile_level * _tiles.TILE_HEIGHT
            for i in range(len(data) // 32):
                index = n * _tiles.TILE_WIDTH + i
                node = NodeId(level, index)
                if node.end > size or store.nodes.get(node) != data[i * 32:(i + 1) * 32]:
                    problems.append(f"stored tree tile t.{tile_level}.{n} differs from the "
                                    f"stream at node {level}/{index}")
                    break
        return problems

    async def _read_all_tiles(self) -> dict[tuple[int, int], bytes]:
        """Every stored tile (the bucket's stream, last value per key)."""
        bucket = self.options.tree_bucket
        prefix = f"$KV.{bucket}."
        entries = await self._read(f"KV_{bucket}", [f"{prefix}t.>"],
                                   DeliverPolicy.LAST_PER_SUBJECT)
        out = {}
        for _, subject, data, removed in entries:
            parts = subject[len(prefix):].split(".")
            if not removed and len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                out[(int(parts[1]), int(parts[2]))] = data
        return out

    # -- writing --------------------------------------------------------------------------

    def _write(self, entry: ConsentEntry, idempotency_key: str | None) -> Awaitable[Any]:
        """Queue the record; what to await for its reply. (A plain function handing back
        `_submit`'s awaitable: one coroutine fewer alive per pending append.)"""
        versions = self._versions(entry.user_id)
        pseudonym = versions[0]  # the current key's
        details = entry.details
        expires_at = details.get("expires_at")
        event = entry.event or ("withdrawn" if entry.action == "revoke" else "given")
        action = _dpv.EVENTS[event][0]
        ttl = self.options.consent_ttl_s
        if expires_at is None and ttl is not None and action == "grant":
            expires_at = entry.ts + int(ttl * 1000)
        fields: dict[str, Any] = {
            "v": RECORD_VERSION,
            "pseudonym": pseudonym,
            "action": action,
            "event": event,
            "scope": entry.scope,
            "ts": entry.ts,
            "trace_id": entry.trace_id,
            "expires_at": expires_at,
        }
        if details:
            fields.update({k: v for k, v in details.items()
                           if k in DETAIL_FIELDS and v is not None})
        msg_id = None if idempotency_key is None else _msg_id(pseudonym, idempotency_key)
        item = _Item("write", pseudonym, versions, fields,
                     dict(entry.metadata), msg_id, entry.user_id)
        return self._submit(item)

    async def _erase(self, user_id: str, idempotency_key: str | None) -> dict[str, Any]:
        versions = self._versions(user_id)
        pseudonym = versions[0]  # the current key's
        fields = {
            "v": RECORD_VERSION, "pseudonym": pseudonym, "action": "erase", "event": "erased",
            "scope": ERASURE_SCOPE, "ts": self._now_ms(), "trace_id": None,
        }
        msg_id = None if idempotency_key is None else _msg_id(pseudonym, idempotency_key)
        item = _Item("erase", pseudonym, versions, fields, {}, msg_id, user_id)
        return await self._submit(item)

    async def _submit(self, item: _Item) -> Any:
        """Queue an append for the writer (started on demand) and wait for its outcome."""
        self._queue.append(item)
        self._wake.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drive())
        return await item.outcome()

    async def _drive(self) -> None:
        """The writer: drain the queue under the lease, hand the lease back after
        `linger_s` of quiet; run again if something was queued meanwhile."""
        try:
            while self._queue:
                await self._run_writer()
        except BaseException as exc:
            for item in self._queue:
                item.resolve(error=Unavailable(f"consent ledger writer stopped: {exc}"))
            self._queue.clear()
            raise

    async def _run_writer(self) -> None:
        try:
            while True:
                if not self._queue:
                    with anyio.move_on_after(self.options.linger_s):
                        self._wake = anyio.Event()
                        await self._wake.wait()
                    if not self._queue:
                        break
                # Let the callers the last batch answered queue their next appends first:
                # one batch of many costs the round trips of one batch of few.
                await anyio.lowlevel.checkpoint()
                batch = self._queue[: self.options.max_batch]
                del self._queue[: len(batch)]
                try:
                    await self._hold_lease()
                    await self._run_batch(batch)
                except Exception as exc:
                    for item in batch:
                        item.resolve(error=exc)
                    # The writer's view may be off: never checkpoint it; restore next time.
                    self._tree_ok = False
                    if not isinstance(exc, LedgerTampered):
                        logger.warning("consent ledger batch failed: %r", exc)
        finally:
            with anyio.CancelScope(shield=True):
                await self._release_lease()

    # -- the lease ------------------------------------------------------------------------

    async def _hold_lease(self) -> None:
        now = self._clock()
        if (self._lease_rev is not None and self._tree_ok
                and now < self._lease_until - self.options.lease_s / 2):
            return
        if self._lease_rev is not None and not self._tree_ok:
            await self._restore()
            self._tree_ok = True
        kv = self._tree()
        deadline = now + self.options.lease_wait_s
        delay = 0.001
        while True:
            value = msgspec.json.encode({"owner": self._owner,
                                         "until": self._clock() + self.options.lease_s})
            try:
                if self._lease_rev is not None:
                    self._lease_rev = await kv.update(_LEASE_KEY, value, last=self._lease_rev)
                    self._lease_until = self._clock() + self.options.lease_s
                    return
                try:
                    current = await kv.get(_LEASE_KEY)
                except KeyNotFoundError:
                    current = None
                if current is None or current.value is None or current.operation in _KV_REMOVED:
                    rev = (await kv.create(_LEASE_KEY, value) if current is None
                           else await kv.update(_LEASE_KEY, value, last=current.revision))
                else:
                    held = _lease_of(current.value)
                    if held is not None and held[0] != self._owner and held[1] > self._clock():
                        raise _LeaseBusy
                    rev = await kv.update(_LEASE_KEY, value, last=current.revision)
                self._lease_rev = rev
                self._lease_until = self._clock() + self.options.lease_s
                self._tree_ok = False
                await self._restore()
                self._tree_ok = True
                return
            except (KeyWrongLastSequenceError, _LeaseBusy):
                self._lease_rev = None
                if self._clock() > deadline:
                    raise LedgerContention("the ledger lease", 0) from None
                await anyio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 0.05)

    async def _release_lease(self) -> None:
        if self._lease_rev is None:
            return
        try:
            if self._tree_ok:
                await self._make_checkpoint(force=True)
            await self._tree().update(
                _LEASE_KEY, msgspec.json.encode({"owner": "", "until": 0}), last=self._lease_rev
            )
        except Exception as exc:  # the lease then lapses by itself
            logger.warning("could not hand the consent ledger lease back: %s", exc)
        await self._drop_lease_state()

    async def _drop_lease_state(self) -> None:
        self._lease_rev = None
        self._tree_ok = False
        self._tails.clear()
        self._scopes.clear()
        self._data_keys.clear()

    # -- restoring the tree ---------------------------------------------------------------

    async def _restore(self) -> None:
        """Rebuild the writer's tree at the latest signed checkpoint, checking the stored
        tiles against its root, then replay the stream after it."""
        self._tails.clear()
        self._scopes.clear()
        self._data_keys.clear()
        entry = await self._kv_raw(self._tree(), _CHECKPOINT_KEY)
        if entry is None:
            size, last_seq, root, note = 0, 0, None, None
        else:
            size, note, last_seq = entry
            cp = open_checkpoint(note, self._verifier)
            if cp.size != size:
                raise LedgerTampered("the kept checkpoint entry does not match its signed size")
            root = cp.root_hash
        partial = _tiles.partial_tiles(size)
        frontier = root_plan(size).nodes
        wanted = sorted(set(_tiles.tiles_for(frontier)) | set(partial))
        values = await _gather(*(lambda t=t: self._kv_raw_value(self._tree(), _tiles.key(t))
                                 for t in wanted))
        tiles = {t: v for t, v in zip(wanted, values, strict=True) if v is not None}
        try:
            cr = CompactRange.from_hashes(size, [_tiles.node_hash(n, tiles) for n in frontier])
        except KeyError as exc:
            raise LedgerTampered(f"a stored tree tile is missing ({exc})") from None
        if root is not None and cr.root() != root:
            raise LedgerTampered("the stored tree tiles do not match the signed checkpoint")
        info = await self._js.stream_info(self.options.stream)
        if info.state.last_seq < last_seq:
            raise LedgerTampered(
                f"the stream ends at seq {info.state.last_seq}, before the signed checkpoint's "
                f"seq {last_seq}: records were dropped (stream truncated or recreated)")
        self._range = cr
        self._tiles = _tiles.TileWriter({
            t: tiles.get(t, b"")[: count * 32] for t, count in partial.items()
        })
        self._last_seq = last_seq
        self._checkpoint = None if note is None else (size, note)
        self._checkpoint_at = self._clock()
        await self._catch_up()

    async def _catch_up(self) -> None:
        """Admit the stream's records after `_last_seq` (authenticated ones only)."""
        msgs = await self._messages([f"{self.options.subject_prefix}.*.*"],
                                    start_seq=self._last_seq + 1)
        admitted: list[dict[str, Any]] = []
        for msg in msgs:
            opened = self._open(msg.seq, msg.subject, msg.data, index=self._range.size)
            self._last_seq = msg.seq
            if opened.problem is not None and opened.problem.startswith("unauthenticated"):
                self._refused += 1
                logger.warning("consent ledger: stream seq %s refused into the tree (%s)",
                               msg.seq, opened.problem)
                continue
            self._admit(msg.data)
            if opened.problem is None and opened.body is not None:
                admitted.append({**opened.body, "_seq": msg.seq})
            self._tails.clear()
            self._scopes.clear()
        if admitted:
            # A writer that stopped between its records and their state values left them
            # unwritten: the state of what was caught up, from the records themselves.
            await self._put_all(self.options.state_bucket, self._state_values(admitted))
            await self._store_tiles()

    def _admit(self, leaf: bytes) -> None:
        for node, value in self._range.append(leaf_hash(leaf)):
            self._tiles.add(node, value)

    async def _store_tiles(self) -> None:
        """Write the tiles the tree changed since the last write (before every checkpoint:
        a restore needs the tiles of the checkpoint it starts from, nothing after it)."""
        tiles = {_tiles.key(t): v for t, v in self._tiles.take().items()}
        await self._put_all(self.options.tree_bucket, tiles)

    # -- checkpoints ----------------------------------------------------------------------

    async def _make_checkpoint(self, *, force: bool) -> None:
        size = self._range.size
        if self._checkpoint is not None and self._checkpoint[0] == size:
            return
        if not force and self._clock() - self._checkpoint_at < self.options.checkpoint_interval_s:
            return
        await self._store_tiles()
        note = Checkpoint(self._signer.name, size, self._range.root()).sign(self._signer)
        value = msgspec.json.encode({"size": size, "last_seq": self._last_seq,
                                     "note": note.decode()})
        kv = self._tree()
        await _gather(lambda: kv.put(_CHECKPOINT_KEY, value),
                      lambda: kv.put(f"cp.{size}", value))
        self._checkpoint = (size, note)
        self._checkpoint_at = self._clock()
        self._checkpoints += 1
        try:
            await self._js._nc.publish(self.options.checkpoint_feed, note,
                                       headers={subjects.CHECKPOINT_HEADER: str(size)})
        except NatsError as exc:
            logger.debug("checkpoint announcement not sent: %s", exc)

    async def _checkpoint_reply(self, size: int | None) -> dict[str, Any]:
        if size is not None:
            entry = await self._kv_raw(self._tree(), f"cp.{size}")
            if entry is None:
                return {"ok": False, "provider": self.name, "reason": "no_such_checkpoint",
                        "size": size, "message": f"no checkpoint of size {size} is kept"}
            note = entry[1]
        else:
            note = await self._fresh_checkpoint()
        cp = open_checkpoint(note, self._verifier)
        return {"ok": True, "provider": self.name, "checkpoint": note.decode(),
                "origin": cp.origin, "size": cp.size, "root_hash": b64encode(cp.root_hash),
                "vkey": self.verifier_key}

    async def _fresh_checkpoint(self) -> bytes:
        """A signed checkpoint covering every record appended so far."""
        item = _Item("checkpoint")
        await self._submit(item)
        assert isinstance(item.result, bytes)
        return item.result

    # -- one batch ------------------------------------------------------------------------

    async def _run_batch(self, batch: list[_Item]) -> None:
        # Trimmed before the batch loads what it needs, never between its load and use.
        keep = self.options.cached_subjects
        for cache in (self._tails, self._scopes, self._data_keys):
            _forget_oldest(cache, keep)
        await self._load_for(batch)
        prepared: list[_Prepared] = []
        index = self._range.size
        # An atomic batch goes out in parts as its records are made, so the server stages
        # them meanwhile; the last part commits it (`_append`).
        parts = (self._publisher().atomic_batch()
                 if self._atomic and not any(i.one_by_one for i in batch) else None)
        for item in batch:
            if item.kind == "checkpoint":
                continue
            if item.kind == "erase":
                await self._destroy_keys(item.versions)
            made = self._prepare(item, index, self._last_seq + 1 + len(prepared))
            if made is not None:
                prepared.append(made)
                index += 1
                if parts is not None and len(prepared) - parts.sent > _PART:
                    await parts.send(*self._records(prepared, parts.sent, len(prepared) - 1))
        admitted: list[_Prepared] = []
        failed_at: int | None = None  # where the rerun starts
        failure: BaseException | None = None
        if prepared:
            results, ahead = await self._append(prepared, parts)
            for i, (p, result) in enumerate(zip(prepared, results, strict=True)):
                if isinstance(result, BaseException):
                    failed_at, failure = i, result
                    break
                if result.duplicate:  # answered with the original; not stored again
                    self._duplicates += 1
                    await self._resolve_duplicate(p, result.seq)
                    failed_at = i + 1
                    break
                self._last_seq = result.seq
                self._appended += 1
                admitted.append(p)
            self._admit_ahead(ahead, len(admitted))
            for p, reply in zip(admitted, ahead.replies, strict=False):
                p.item.resolve(reply)
        if failed_at is not None:
            self._retries += 1
            self._tails.clear()
            self._scopes.clear()
            rerun = [p.item for p in prepared[failed_at:] if not p.item.done]
            if _is_duplicate_in_batch(failure):
                # An idempotency key already used: retried one by one, where the stream's
                # deduplication names the duplicate.
                for item in rerun:
                    item.one_by_one = True
            elif failure is not None and not _is_wrong_last_sequence(failure):
                # Unknown outcome (timeout...): the failed item errs; the stream decides the
                # tree on catch-up, and a retry with the same idempotency key is deduplicated.
                prepared[failed_at].item.resolve(error=failure)
                rerun = [i for i in rerun if not i.done]
            await self._catch_up()
            # Their state values went out with the records: put back what the stream says.
            await self._repair_state([p.body for p in prepared[len(admitted):]])
            for item in rerun:
                item.attempts += 1
                if item.attempts >= self.options.max_append_attempts:
                    item.resolve(error=LedgerContention(item.pseudonym, item.attempts))
            self._queue[:0] = [i for i in rerun if not i.done]
        wanted = [item for item in batch if item.kind == "checkpoint"]
        await self._make_checkpoint(force=bool(wanted))
        for item in wanted:
            assert self._checkpoint is not None
            item.resolve(self._checkpoint[1])

    async def _append(
        self, prepared: list[_Prepared], parts: AtomicBatch | None
    ) -> tuple[list[Any], _Ahead]:
        """Publish the batch's records and, in the same round trip, the state values they
        make: one `PubAck`-like result or JetStream error per record, in order, and the work
        done while the server stored them (`_Ahead`).

        Records go as one JetStream atomic batch (nats-server 2.12+, stream `allow_atomic`;
        `parts`, of which `_run_batch` sent the first records already): stored together right
        after the writer's last seq, or not at all, with one acknowledgement; else (`parts`
        None) pipelined, each conditional on the one before it. They are on
        the socket before the state values are made; the state values are sent without
        waiting for the records' acks (when records fail, `_run_batch` puts back the state
        the stream holds). While the server stores both, the writer works ahead: the tree
        nodes and the replies the batch makes if it lands.

        Raises:
            TimeoutError: no answer within `timeout_s` (outcome unknown).
            Exception: a state value was refused.
        """
        pipeline = self._publisher()
        atomic = parts is not None
        if parts is not None:
            records = [await parts.commit(*self._records(prepared, parts.sent, len(prepared)))]
        else:
            records = [await pipeline.publish(self._subject(p.body["pseudonym"], p.body["scope"]),
                                              p.leaf, self._headers(p, self._last_seq + i))
                       for i, p in enumerate(prepared)]
        # The state values are an index of the records (`status` answers from the stream
        # and reports a state value that disagrees): in order, the last one acknowledged.
        values = self._state_values([p.body for p in prepared])
        states = [await pipeline.publish_in_order(
            [(f"$KV.{self.options.state_bucket}.{k}", v) for k, v in values.items()])
        ] if values else []
        ahead = self._work_ahead(prepared)
        results = await pipeline.settle(records + states, self.options.timeout_s)
        for result in results[len(records):]:
            if isinstance(result, BaseException):
                raise result
        if not atomic:
            return results[: len(records)], ahead
        (ack,) = results[: len(records)]
        if isinstance(ack, BaseException):
            return [ack] * len(prepared), ahead
        first = ack.seq - len(prepared) + 1
        return [_Stored(first + i) for i in range(len(prepared))], ahead

    def _work_ahead(self, prepared: list[_Prepared]) -> _Ahead:
        """The tree after the batch's records (on a copy) and their replies, made while the
        server stores them; `_admit_ahead` keeps what landed."""
        tree = self._range.copy()
        hashes = [leaf_hash(p.leaf) for p in prepared]
        push = tree.push
        # Level 0 of the tiles is `hashes`; a record completes a node of level 8 (the next
        # tile level) once in 256: only those records' nodes are kept.
        high = [(i, done) for i, h in enumerate(hashes)
                if len(done := push(h)) > _tiles.TILE_HEIGHT]
        reply = self._reply
        replies = [reply(p, p.body["_seq"]) for p in prepared]
        return _Ahead(tree, hashes, high, replies)

    def _admit_ahead(self, ahead: _Ahead, landed: int) -> None:
        """Admit the batch's first `landed` records into the tree (all of them, usually:
        then the tree made ahead is the tree)."""
        first = self._range.size
        self._tiles.add_leaves(first, ahead.hashes[:landed])
        for i, done in ahead.high:
            if i < landed:
                index = first + i
                for level in range(_tiles.TILE_HEIGHT, len(done), _tiles.TILE_HEIGHT):
                    self._tiles.add(NodeId(level, index >> level), done[level])
        if landed == len(ahead.hashes):
            self._range = ahead.tree
            return
        for h in ahead.hashes[:landed]:
            self._range.push(h)

    def _records(
        self, prepared: list[_Prepared], start: int, stop: int
    ) -> tuple[list[tuple[str, bytes]], list[dict[str, str]] | None]:
        """The messages and headers of an atomic batch's records `start:stop` (None: none
        has any): the first record's conditions cover the batch."""
        chosen = prepared[start:stop]
        prefix = f"{self.options.subject_prefix}."
        token = _state.scope_token
        messages = [(f"{prefix}{p.body['pseudonym']}.{token(p.body['scope'])}", p.leaf)
                    for p in chosen]  # `_subject`, inlined
        if start > 0 and all(p.item.msg_id is None for p in chosen):
            return messages, None  # no record of these has headers of its own
        headers = [self._headers(p, self._last_seq) if start + i == 0 else self._batch_headers(p)
                   for i, p in enumerate(chosen)]
        return messages, headers

    def _headers(self, p: _Prepared, expected_last_seq: int) -> dict[str, str]:
        headers = {Header.EXPECTED_STREAM.value: self.options.stream,
                   Header.EXPECTED_LAST_SEQUENCE.value: str(expected_last_seq)}
        if p.item.msg_id is not None:
            headers[Header.MSG_ID.value] = p.item.msg_id
        return headers

    @staticmethod
    def _batch_headers(p: _Prepared) -> dict[str, str]:
        """A later record of an atomic batch: the first one's conditions cover the batch."""
        return {} if p.item.msg_id is None else {Header.MSG_ID.value: p.item.msg_id}

    async def _send(self, bucket: str, values: dict[str, bytes]) -> list[asyncio.Future[Any]]:
        """Put KV values (one atomic batch where the bucket allows it); their futures."""
        pipeline = self._publisher()
        messages = [(f"$KV.{bucket}.{k}", v) for k, v in values.items()]
        if self._atomic_kv.get(bucket) and len(messages) > 1:
            return [await pipeline.publish_atomic(messages)]
        return [await pipeline.publish(subject, value, {}) for subject, value in messages]

    async def _put_all(self, bucket: str, values: dict[str, bytes]) -> None:
        futures = await self._send(bucket, values)
        for result in await self._publisher().settle(futures, self.options.timeout_s):
            if isinstance(result, BaseException):
                raise result

    @staticmethod
    def _state_values(bodies: Sequence[dict[str, Any]]) -> dict[str, bytes]:
        """The state value each record makes for its (data subject, scope), latest last."""
        latest: dict[str, bytes] = {}
        for body in bodies:
            if body.get("action") == "erase":
                continue
            # `of_record` reads the record's own fields, never the writer's `_seq` mark.
            latest[_state.key(body["pseudonym"], body["scope"])] = _state.encode(
                _state.of_record(body["_seq"], body))
        return latest

    async def _repair_state(self, bodies: Sequence[dict[str, Any]]) -> None:
        """Put back the state of these records' scopes as the stream has it (their values
        were sent with records that did not all land)."""
        keys = sorted({(b["pseudonym"], b["scope"]) for b in bodies
                       if b.get("action") != "erase"})
        latest = await _gather(*(lambda p=p, s=s: self._scope_latest(p, s) for p, s in keys))
        found = [{**body, "_seq": seq} for (last, _) in latest if last is not None
                 for seq, body in (last,)]
        await self._put_all(self.options.state_bucket, self._state_values(found))
        missing = [_state.key(p, s) for (p, s), (last, _) in zip(keys, latest, strict=True)
                   if last is None]
        state = self._state()
        for key in missing:
            await state.delete(key)

    def _last_seq_of(self, p: _Prepared) -> int:
        return p.body["_seq"]

    def _remember(self, seq: int, body: dict[str, Any]) -> None:
        body["_seq"] = seq
        pseudonym = body["pseudonym"]
        self._tails[pseudonym] = body["hash"]
        if body["action"] != "erase":
            self._scopes[(pseudonym, body["scope"])] = _scope_entry(seq, body)

    def _prepare(self, item: _Item, index: int, seq: int) -> _Prepared | None:
        fields = dict(item.fields)
        pseudonym = item.pseudonym
        if item.kind == "write":
            scope = fields["scope"]
            current = None
            for p in item.versions:
                known = self._scopes.get((p, scope))
                if known is not None and (current is None or known[0] > current[0]):
                    current = known
            event = fields["event"]
            _, current_event, expires_at = current if current else (None, None, None)
            expired = expires_at is not None and self._now_ms() >= expires_at
            refusal = _dpv.refusal(event, current_event, expired=expired)
            if refusal is not None:
                reason, message = refusal
                logger.info("consent %s %s scope=%s refused: %s", event, pseudonym, scope,
                            reason)
                item.resolve({"ok": False, "provider": self.name, "reason": reason,
                              "user_id": item.user_id, "scope": scope, "event": event,
                              "message": message})
                return None
            if item.metadata:
                data_key = self._data_keys.get(pseudonym)
                assert data_key is not None
                box = sealed.seal(data_key[1], data_key[0],
                                  msgspec.json.encode(item.metadata), _aad(pseudonym, scope))
                fields["sealed"] = msgspec.to_builtins(box)
        fields["prev_hash"] = self._tails.get(pseudonym, _chain.GENESIS)
        # The stream seq it must land at (publishes are conditional on the last seq), signed:
        # a genuine record copied elsewhere in the stream is refused as a replay.
        fields["seq"] = seq
        fields["hash"] = _chain.digest(fields)  # `_chain.seal`, on the item's own copy
        body = fields
        leaf = make_leaf(self._record_key, index, body)
        # Later items of the batch see this one (undone if the batch fails: caches cleared).
        self._remember(seq, body)
        return _Prepared(item, leaf, body, index)

    async def _load_for(self, batch: list[_Item]) -> None:
        """Read, for the batch, what the writer does not know yet: chain tails, the scopes'
        latest records (every key version), data keys."""
        tails = sorted({i.pseudonym for i in batch
                        if i.kind != "checkpoint" and i.pseudonym not in self._tails})
        scopes = sorted({(p, i.fields["scope"]) for i in batch if i.kind == "write"
                         for p in i.versions if (p, i.fields["scope"]) not in self._scopes})
        wanted_keys = sorted({i.pseudonym for i in batch if i.kind == "write" and i.metadata
                              and self._data_keys.get(i.pseudonym) is None})
        readers = sorted(set(tails) | {p for p, _ in scopes})
        if wanted_keys:
            lasts, found = await _gather(
                lambda: self._last_records(readers),
                lambda: _gather(*(lambda p=p: self._data_key(p, create=True)
                                  for p in wanted_keys)),
            )
            for p, data_key in zip(wanted_keys, found, strict=True):
                self._data_keys[p] = data_key
        else:
            lasts = await self._last_records(readers)
        scopes_of: dict[str, list[str]] = {}
        for p, scope in scopes:
            scopes_of.setdefault(p, []).append(scope)
        wanted_tails = set(tails)
        slow: set[str] = set()
        for p in readers:
            msgs = lasts.get(p)
            if not msgs:
                if msgs is None:  # no batched read: read one by one
                    slow.add(p)
                    continue
                # A data subject with no record yet (the common case).
                if p in wanted_tails:
                    self._tails[p] = _chain.GENESIS
                for scope in scopes_of.get(p, ()):
                    self._scopes[(p, scope)] = None
                continue
            opened = [self._open(m.seq, m.subject, m.data) for m in msgs]
            if any(o.problem is not None for o in opened):
                slow.add(p)  # a forged last record: read one by one
                continue
            last = max(opened, key=lambda o: o.seq)
            if p in wanted_tails:
                self._tails[p] = str(last.body["hash"])
            on = {str(o.body["scope"]): _scope_entry(o.seq, o.body)
                  for o in opened if o.body is not None}
            for scope in scopes_of.get(p, ()):
                self._scopes[(p, scope)] = on.get(scope)
        if slow:
            await self._load_one_by_one([p for p in tails if p in slow],
                                        [key for key in scopes if key[0] in slow])

    async def _last_records(self, pseudonyms: Sequence[str]) -> dict[str, list[StoredMsg]]:
        """Every scope's last stream message of each data subject, read in batched
        multi-last direct gets; {} (read one by one instead) where the stream or server
        cannot answer them."""
        if not self._direct or not pseudonyms:
            return {}
        out: dict[str, list[StoredMsg]] = {p: [] for p in pseudonyms}
        chunks = [pseudonyms[i:i + _MULTI_LAST_SUBJECTS]
                  for i in range(0, len(pseudonyms), _MULTI_LAST_SUBJECTS)]
        pipeline = self._publisher()
        futures = [await pipeline.last_per_subject(
            self.options.stream, [self._chain_subjects(p) for p in chunk],
            batch=_MULTI_LAST_RESULTS) for chunk in chunks]
        results = await pipeline.settle(futures, self.options.timeout_s)
        start = len(self.options.subject_prefix) + 1
        for chunk, result in zip(chunks, results, strict=True):
            if isinstance(result, TooManyResults | NoStreamResponseError):
                logger.info("consent ledger: batched read refused (%s), reading one by one",
                            result)
                for p in chunk:
                    out.pop(p, None)
                continue
            if isinstance(result, BaseException):
                raise result
            for msg in result:
                pseudonym = msg.subject[start:].partition(".")[0]
                if pseudonym in out:
                    out[pseudonym].append(msg)
        return out

    async def _load_one_by_one(self, tails: list[str], scopes: list[tuple[str, str]]) -> None:
        """The slow path of `_load_for`: a data subject's last record through its chain
        (skipping forged records), then each scope's own latest where that was not it."""
        found = await _gather(*(lambda p=p: self._chain_tail(p) for p in tails))
        for p, (tail, last) in zip(tails, found, strict=True):
            self._tails[p] = tail
            if last is None:
                for key in scopes:
                    if key[0] == p:
                        self._scopes[key] = None
            elif (p, last[1]["scope"]) in scopes:
                self._scopes[(p, last[1]["scope"])] = _scope_entry(*last)
        rest = [key for key in scopes if key not in self._scopes]
        latest = await _gather(*(lambda p=p, s=s: self._scope_latest(p, s) for p, s in rest))
        for key, (last, _) in zip(rest, latest, strict=True):
            self._scopes[key] = None if last is None else _scope_entry(*last)

    async def _chain_tail(
        self, pseudonym: str
    ) -> tuple[str, tuple[int, dict[str, Any]] | None]:
        """The hash the data subject's next record links to, and its last authenticated
        record (seq, body), or None if it has none."""
        subject = self._chain_subjects(pseudonym)
        last = await self._last(subject)
        if last is None:
            return _chain.GENESIS, None
        opened = self._open(last.seq, last.subject or "", last.data)
        if opened.problem is None and opened.body is not None:
            return str(opened.body["hash"]), (last.seq, opened.body)
        found: tuple[str, tuple[int, dict[str, Any]] | None] = (_chain.GENESIS, None)
        for msg in await self._messages([subject]):
            o = self._open(msg.seq, msg.subject, msg.data)
            if o.problem is None and o.body is not None:
                found = (str(o.body["hash"]), (o.seq, o.body))
        # The latest authenticated record is not necessarily the scope's: read scopes apart.
        return found[0], None if found[1] is None else (-1, {"scope": None})

    async def _resolve_duplicate(self, p: _Prepared, seq: int) -> None:
        """A retry under a used idempotency key: the same request, or a conflict."""
        original = await self._js.get_msg(self.options.stream, seq=seq)
        opened = self._open(seq, original.subject or "", original.data)
        body = opened.body if opened.problem is None else None
        mine = p.body
        same = body is not None and body.get("action") == mine.get("action") and (
            body.get("scope") == mine.get("scope"))
        if same and body is not None:
            data_keys = {p.item.pseudonym: self._data_keys.get(p.item.pseudonym)}
            metadata, _ = self._unseal(body, data_keys)
            same = (metadata or {}) == p.item.metadata
        if not same:
            p.item.resolve(error=IdempotencyConflict(
                action=str((body or {}).get("action")), scope=str((body or {}).get("scope")),
                seq=seq))
            return
        assert body is not None
        body = {**body, "_seq": seq}
        # Re-applied: a retry repairs state a crashed first attempt missed.
        if body.get("action") != "erase":
            await self._state().put(
                _state.key(body["pseudonym"], body["scope"]),
                _state.encode(_state.of_record(seq, {k: v for k, v in body.items()
                                                     if k != "_seq"})))
        p.item.resolve(self._reply(_Prepared(p.item, original.data or b"", body,
                                             opened.index or 0), seq, duplicate=True))

    def _reply(self, p: _Prepared, seq: int, *, duplicate: bool = False) -> dict[str, Any]:
        body = p.body
        if p.item.kind == "erase":
            return {"ok": True, "provider": self.name, "user_id": p.item.user_id,
                    "erased": True, "seq": seq, "index": p.index, "hash": body.get("hash"),
                    "duplicate": duplicate}
        event = _dpv.event_of(body)
        reply: dict[str, Any] = {
            "ok": True,
            "provider": self.name,
            "entry": _entry(p.item.user_id, body, p.item.metadata),
            "seq": seq,
            "index": p.index,
            "event": event,
            "dpv": _dpv.EVENTS[event][1],
            "hash": body.get("hash"),
            "prev_hash": body.get("prev_hash"),
            "duplicate": duplicate,
        }
        if body.get("expires_at") is not None:
            reply["expires_at"] = body["expires_at"]
        return reply

    # -- data keys ------------------------------------------------------------------------

    async def _data_key(self, pseudonym: str, *, create: bool) -> tuple[str, bytes] | None:
        kv = self._keys()
        for _ in range(8):
            try:
                entry = await kv.get(pseudonym)
            except KeyNotFoundError:
                entry = None
            if entry is not None and entry.value and entry.operation not in _KV_REMOVED:
                return self._unwrap(entry.value)
            if not create:
                return None
            kid = secrets.token_hex(8)
            key = sealed.new_data_key()
            value = msgspec.json.encode({
                "kid": kid, "wrapped": b64encode(sealed.wrap_data_key(self._wrapping_key, key)),
            })
            try:
                if entry is None:
                    await kv.create(pseudonym, value)
                else:
                    await kv.update(pseudonym, value, last=entry.revision)
                return kid, key
            except (KeyWrongLastSequenceError, APIError):
                continue
        raise LedgerContention(pseudonym, 8)

    def _unwrap(self, value: bytes) -> tuple[str, bytes] | None:
        try:
            stored = msgspec.json.decode(value)
            return str(stored["kid"]), sealed.unwrap_data_key(
                self._wrapping_key, base64.b64decode(stored["wrapped"]))
        except (ValueError, KeyError, TypeError, TransparencyError, msgspec.DecodeError):
            logger.warning("a consent data key cannot be unwrapped")
            return None

    async def _read_data_keys(self, versions: Sequence[str]) -> dict[str, tuple[str, bytes] | None]:
        found = await _gather(*(lambda p=p: self._data_key(p, create=False) for p in versions))
        return dict(zip(versions, found, strict=True))

    async def _destroy_keys(self, versions: Sequence[str]) -> None:
        kv = self._keys()
        await _gather(*(lambda p=p: kv.purge(p) for p in versions))
        for p in versions:
            self._data_keys[p] = None

    # -- proofs and receipts --------------------------------------------------------------

    async def _proof(
        self, user_id: str, scope: str | None, seq: int | None, from_size: int | None
    ) -> dict[str, Any]:
        note = await self._fresh_checkpoint()
        cp = open_checkpoint(note, self._verifier)
        if from_size is not None and from_size > cp.size:
            return {"ok": False, "provider": self.name, "reason": "from_size_too_large",
                    "size": cp.size, "message": f"the log has {cp.size} records, not "
                    f"{from_size}: your checkpoint is not from this log (or it was truncated)"}
        versions = self._versions(user_id)
        subjects = ([self._subject(p, scope) for p in versions] if scope is not None
                    else [self._chain_subjects(p) for p in versions])
        refused: list[int] = []
        records: list[_Opened] = []
        for msg in await self._messages(subjects):
            if seq is not None and msg.seq != seq:
                continue
            opened = self._open(msg.seq, msg.subject, msg.data)
            if opened.problem is not None or opened.index is None:
                refused.append(msg.seq)
                continue
            if opened.index < cp.size:
                records.append(opened)
        plans = [inclusion_plan(o.index or 0, cp.size) for o in records]
        cons = (consistency_plan(from_size, cp.size)
                if from_size is not None and from_size < cp.size else None)
        nodes = [n for plan in plans for n in plan.nodes] + list(cons.nodes if cons else ())
        wanted = _tiles.tiles_for(nodes)
        values = await _gather(*(lambda t=t: self._kv_raw_value(self._tree(), _tiles.key(t))
                                 for t in wanted))
        tiles = {t: v for t, v in zip(wanted, values, strict=True) if v is not None}
        try:
            proved = [(o.index or 0, o.data, plan.assemble([_tiles.node_hash(n, tiles)
                                                            for n in plan.nodes]))
                      for o, plan in zip(records, plans, strict=True)]
            consistency = None if cons is None else (
                from_size or 0, cons.assemble([_tiles.node_hash(n, tiles) for n in cons.nodes]))
        except KeyError as exc:
            raise LedgerTampered(f"a stored tree node is missing ({exc})") from None
        bundle = build_bundle(note, proved, consistency)
        reply: dict[str, Any] = {
            "ok": True, "provider": self.name, "user_id": user_id,
            "bundle": msgspec.to_builtins(bundle), "records": len(proved),
            "checkpoint_size": cp.size, "reads": len(wanted),
        }
        if refused:
            reply["refused_seqs"] = refused
        return reply

    async def _receipt(self, user_id: str, seq: int) -> dict[str, Any]:
        versions = self._versions(user_id)
        try:
            msg = await self._js.get_msg(self.options.stream, seq=seq)
        except NotFoundError:
            msg = None
        prefixes = tuple(f"{self.options.subject_prefix}.{p}." for p in versions)
        if msg is None or not (msg.subject or "").startswith(prefixes):
            return {"ok": False, "provider": self.name, "reason": "no_such_record",
                    "user_id": user_id, "seq": seq,
                    "message": f"seq {seq} is not a consent record of this user"}
        opened = self._open(seq, msg.subject or "", msg.data)
        if opened.problem is not None or opened.body is None or opened.index is None:
            return {"ok": False, "provider": self.name, "reason": "unauthenticated",
                    "user_id": user_id, "seq": seq,
                    "message": "that record is not authenticated by the ledger key"}
        body = opened.body
        event = "erased" if body.get("action") == "erase" else _dpv.event_of(body)
        expires_at = body.get("expires_at")
        receipt = ConsentReceipt(
            receipt_id=str(uuid.uuid4()),
            issued_at=_rfc3339(self._now_ms()),
            pii_principal=str(body.get("pseudonym")),
            controller=str(body.get("controller") or self._signer.name),
            purposes=(ReceiptPurpose(
                purpose=str(body.get("scope")),
                lawful_basis=str(body.get("lawful_basis") or "dpv:Consent"),
            ),),
            status=_dpv.EVENTS[event][1] if event in _dpv.EVENTS else "dpv:ConsentErased",
            event_time=_rfc3339(int(body.get("ts") or 0)),
            log_origin=self._signer.name,
            leaf_index=opened.index,
            leaf_hash=receipt_leaf_hash(opened.data),
            collection_method=body.get("collection_method"),
            notice=body.get("notice"),
            jurisdiction=body.get("jurisdiction"),
            expires_at=None if expires_at is None else _rfc3339(int(expires_at)),
        )
        return {"ok": True, "provider": self.name, "user_id": user_id, "seq": seq,
                "index": opened.index, "receipt": sign_receipt(self._signer, receipt).decode(),
                "leaf": opened.data.decode()}

    # -- reading --------------------------------------------------------------------------

    async def _kv_get(self, kv: KeyValue, key: str) -> _state.StateValue | str | None:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        return _state.decode(entry.value)

    async def _kv_raw_value(self, kv: KeyValue, key: str) -> bytes | None:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        return entry.value

    async def _kv_raw(self, kv: KeyValue, key: str) -> tuple[int, bytes, int] | None:
        """A kept checkpoint entry: (size, note, last stream seq)."""
        value = await self._kv_raw_value(kv, key)
        if not value:
            return None
        try:
            stored = msgspec.json.decode(value)
            return int(stored["size"]), str(stored["note"]).encode(), int(stored["last_seq"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            raise LedgerTampered(f"the kept {key} entry is malformed") from None

    async def _last(self, subject: str) -> RawStreamMsg | None:
        try:
            return await self._js.get_last_msg(self.options.stream, subject)
        except NotFoundError:
            return None

    async def _messages(self, filters: list[str], *, start_seq: int | None = None) -> list[_Msg]:
        entries = await self._read(self.options.stream, filters, DeliverPolicy.ALL,
                                   start_seq=start_seq)
        return [_Msg(seq, subject, data) for seq, subject, data, _ in entries]

    async def _read(
        self, stream: str, filters: list[str], deliver: DeliverPolicy, *,
        start_seq: int | None = None,
    ) -> list[tuple[int, str, bytes, bool]]:
        """The messages of `stream` on `filters`, oldest first, as (seq, subject, data,
        removed); an ephemeral pull consumer whose `num_pending` bounds the read."""
        name = f"consent_read_{secrets.token_hex(8)}"
        config = ConsumerConfig(
            name=name,
            filter_subjects=filters,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start_seq else deliver,
            opt_start_seq=start_seq,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=max(self.options.timeout_s * 6, 30.0),
            mem_storage=True,
            num_replicas=1,
        )
        info = await self._js.add_consumer(stream, config, timeout=self.options.timeout_s)
        try:
            remaining = info.num_pending or 0
            out: list[tuple[int, str, bytes, bool]] = []
            if remaining == 0:
                return out
            sub = await self._js.pull_subscribe_bind(consumer=name, stream=stream)
            try:
                unavailable = 0
                while remaining > 0:
                    try:
                        batch = await sub.fetch(
                            batch=min(remaining, _READ_BATCH), timeout=self.options.timeout_s
                        )
                    except ServiceUnavailableError:
                        unavailable += 1
                        if unavailable > _READ_UNAVAILABLE_RETRIES:
                            raise
                        await anyio.sleep(0.01 * unavailable)
                        continue
                    for msg in batch:
                        removed = (msg.headers or {}).get("KV-Operation") in _KV_REMOVED
                        out.append((msg.metadata.sequence.stream, msg.subject, msg.data,
                                    removed))
                    remaining -= len(batch)
            finally:
                await sub.unsubscribe()
            return out
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._js.delete_consumer(stream, name)
                except NatsError as exc:
                    logger.debug("could not delete read consumer %s: %s", name, exc)

    # -- helpers --------------------------------------------------------------------------

    def _versions(self, user_id: str) -> tuple[str, ...]:
        all_versions = getattr(self._pseudonymize, "all_versions", None)
        if all_versions is None:
            return (self._pseudonymize(user_id),)
        return tuple(all_versions(user_id))

    def _subject(self, pseudonym: str, scope: str) -> str:
        return f"{self.options.subject_prefix}.{pseudonym}.{_state.scope_token(scope)}"

    def _chain_subjects(self, pseudonym: str) -> str:
        return f"{self.options.subject_prefix}.{pseudonym}.*"

    def _state(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("JetStreamConsentLedger.ensure() was not awaited before use")
        return self._kv

    def _publisher(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = Pipeline(self._js._nc)
        return self._pipeline

    def _tree(self) -> KeyValue:
        if self._tree_kv is None:
            raise RuntimeError("JetStreamConsentLedger.ensure() was not awaited before use")
        return self._tree_kv

    def _keys(self) -> KeyValue:
        if self._keys_kv is None:
            raise RuntimeError("JetStreamConsentLedger.ensure() was not awaited before use")
        return self._keys_kv

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


class _LeaseBusy(Exception):
    """Another worker holds the ledger lease."""


def _scope_entry(seq: int, body: dict[str, Any]) -> tuple[int, str, Any]:
    """What the writer keeps of a scope's latest record: (seq, DPV event, expires_at), the
    fields the next record's transition check reads. A tuple of atomic values, which the
    garbage collector stops tracking: a cache of 65,536 records' bodies would make every
    full collection walk them."""
    return seq, _dpv.event_of(body), body.get("expires_at")


def _forget_oldest(cache: dict[Any, Any], keep: int) -> None:
    """Drop the oldest entries (insertion order) of `cache` beyond `keep`."""
    excess = len(cache) - keep
    if excess > 0:
        for key in list(itertools.islice(cache, excess)):
            del cache[key]


def _lease_of(value: bytes) -> tuple[str, float] | None:
    try:
        stored = msgspec.json.decode(value)
        return str(stored["owner"]), float(stored["until"])
    except (msgspec.DecodeError, KeyError, TypeError, ValueError):
        return None


def _is_wrong_last_sequence(exc: BaseException) -> bool:
    return isinstance(exc, APIError) and exc.err_code in (10071, 10164)


def _is_duplicate_in_batch(exc: BaseException | None) -> bool:
    """An atomic batch refused because one of its message ids was seen before."""
    return isinstance(exc, APIError) and exc.err_code == _ATOMIC_DUPLICATE_MSG_ID


class _Ahead(NamedTuple):
    """What a batch makes if it lands, worked out while the server stores it."""

    tree: CompactRange
    #: The records' leaf hashes, in order (the nodes of level 0).
    hashes: list[bytes]
    #: (position in the batch, `CompactRange.push`'s hashes) of the records that complete
    #: nodes above level 0 that the tiles store (levels 8, 16...).
    high: list[tuple[int, list[bytes]]]
    replies: list[dict[str, Any]]


class _Stored(NamedTuple):
    """Where one record of an atomic batch was stored (the batch's ack covers them all)."""

    seq: int
    duplicate: bool = False


async def _gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run JetStream calls concurrently; results in order; the first failure is raised."""
    results: list[Any] = [None] * len(calls)

    async def run(index: int, call: Callable[[], Awaitable[Any]]) -> None:
        results[index] = await call()

    try:
        async with anyio.create_task_group() as tg:
            for index, call in enumerate(calls):
                tg.start_soon(run, index, call)
    except ExceptionGroup as group:
        raise group.exceptions[0] from None
    return results


def _verify_one(records: list[_Opened], pseudonym: str) -> _chain.ChainReport:
    """One key version's chain over its authenticated records."""
    items = [(o.seq, _chain.canonical(o.body) if o.body is not None else None)
             for o in records]
    report = _chain.verify(items, pseudonym=pseudonym)
    for count, o in enumerate(records, start=1):
        if report.broken_at is not None and o.seq >= report.broken_at:
            break
        if o.problem is not None:
            return _chain.ChainReport(False, count, report.head, broken_at=o.seq,
                                      problem=o.problem)
    return report


def _state_mismatches(
    version: int, records: list[_Opened], states: dict[str, _state.StateValue | str],
) -> list[dict[str, Any]]:
    latest: dict[str, tuple[int, dict[str, Any] | None]] = {}
    for o in records:
        if o.body is not None and o.body.get("action") == "erase":
            continue
        latest[o.subject.rsplit(".", 1)[-1]] = (o.seq, o.body)
    found = []
    for token in sorted(set(latest) | set(states)):
        seq, record = latest.get(token, (None, None))
        state = states.get(token)
        problem = _state.mismatch(state, seq, record)
        if problem is None:
            continue
        found.append({
            "scope": _state.scope_of_token(token),
            "problem": problem,
            "key_version": version,
            "state_seq": state.seq if isinstance(state, _state.StateValue) else None,
            "state_status": state.status if isinstance(state, _state.StateValue) else None,
            "ledger_seq": seq,
            "ledger_status": _state.of_record(seq, record).status
            if seq is not None and record is not None else None,
        })
    return found


class _Unanswered:
    """Turns JetStream not answering into `Unavailable` (a class, not `@contextmanager`:
    it guards every append, and has no state to make per use)."""

    __slots__ = ("operation",)

    def __init__(self, operation: str) -> None:
        self.operation = operation

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if isinstance(exc, _NOT_ANSWERED):
            raise Unavailable(
                f"consent ledger {self.operation}: JetStream did not answer "
                f"({type(exc).__name__}); retry with the same idempotency key"
            ) from None


_NOT_ANSWERED = (NatsTimeoutError, NoRespondersError, NoStreamResponseError,
                 ServiceUnavailableError, TimeoutError)
_GUARDS = {operation: _Unanswered(operation) for operation in (
    "record", "revoke", "status", "history", "verify", "checkpoint", "proof", "erase",
    "receipt")}


def _unavailable_when_jetstream_is(operation: str) -> _Unanswered:
    return _GUARDS[operation]


def _msg_id(pseudonym: str, key: str) -> str:
    material = "\x00".join(("consent", pseudonym, key)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(material).hexdigest()


def _aad(pseudonym: str, scope: str) -> bytes:
    return f"{pseudonym}\n{scope}".encode()


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _entry(user_id: str, record: dict[str, Any], metadata: dict[str, Any] | None
           ) -> dict[str, Any]:
    return {
        "trace_id": record.get("trace_id"),
        "ts": record.get("ts"),
        "user_id": user_id,
        "scope": record.get("scope"),
        "metadata": metadata,
        "action": record.get("action"),
    }


async def _wire(runtime: Runtime, **overrides: Any) -> None:
    """Build the ledger, ensure it, and register it (under FEATURE_GOVERNANCE_LEDGER outside
    DRY_RUN). Without LUKHAS_LEDGER_SIGNING_KEY or LUKHAS_LEDGER_WRAPPING_KEY: ConfigError."""
    js = jetstream_of(runtime, "FEATURE_GOVERNANCE_LEDGER", "the JetStream consent ledger")
    ledger = JetStreamConsentLedger.from_settings(
        js, runtime.pseudonymize, runtime.settings, **overrides
    )
    await ledger.ensure()
    registry.register(ledger)
    logger.info("FEATURE_GOVERNANCE_LEDGER: consent ledger provider %r registered (vkey %s)",
                ledger.name, ledger.verifier_key)
