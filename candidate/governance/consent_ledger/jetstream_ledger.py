"""The consent ledger on JetStream: append-only, hash-chained, idempotent, per data subject.

Layout:

* Stream `CONSENT_LEDGER` on `lukhas.ledger.consent.<pseudonym>.<scope token>`: one subject
  per (data subject, scope), keyed by the keyed pseudonym (never the raw id) and base64url of
  the scope. Deletes, purges, limits and rollups are denied, so the stream is append-only;
  `ensure()` refuses to serve on a stream whose protective config was weakened. Each message
  is one record (canonical JSON, see `_chain`) carrying `prev_hash` (the hash of the data
  subject's previous record, whatever its scope) and its own `hash`.
* KV bucket `consent_state`, key `<pseudonym>.<scope token>`: the state one (subject, scope)
  has, with the seq and hash of the record that set it. It is a derived view, checked on
  every read: `status` answers from the scope's latest record (`get_last_msg` on its
  subject), compares the KV value with it and reports a mismatch; `verify` compares every KV
  value of the data subject.

Records hold the pseudonym, never the raw user id: a consent ledger is append-only and
cannot forget, so it must not hold what it would have to forget. Replies carry the
`user_id` the caller passed in, which is the id the pseudonym was computed from. Writes use
the current pseudonym key; reads look under every configured key (`all_versions`), so a
key rotation keeps every record reachable and the newest record (by stream seq) wins.

Appends cannot fork a chain: each publish carries `Nats-Expected-Last-Subject-Sequence`
with `...-Subject` set to the data subject's wildcard (`<prefix>.<pseudonym>.*`), i.e. the
tail seq the `prev_hash` was read from; if another writer got there first the server
refuses, and the append re-reads the tail and tries again.

Idempotency: only a request with an `idempotency_key` can be a duplicate. The key (scoped to
the data subject) becomes the `Nats-Msg-Id`; a copy within the stream's duplicate window is
dropped by the server, which acknowledges the original's seq. The original is then read and
compared: the same action, scope and metadata is a retry (its record is returned,
`duplicate: true`); anything else is an `IdempotencyConflict`, never a silent dedupe. A
request without a key is always a new request.
"""

from __future__ import annotations

import hashlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import anyio
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
    ensure_kv,
    ensure_stream,
    is_wrong_last_sequence,
    jetstream_of,
    protection_gaps,
)
from candidate.governance.consent_ledger import _chain, _state
from candidate.governance.consent_ledger.errors import (
    LedgerContention,
    LedgerCorrupt,
    LedgerStreamWeakened,
)
from lukhas.config import Settings
from lukhas.errors import Unavailable
from lukhas.governance.consent_ledger import registry
from lukhas.governance.consent_ledger.errors import IdempotencyConflict
from lukhas.governance.consent_ledger.messages import ConsentEntry
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.runtime import Runtime

logger = logging.getLogger(__name__)

STREAM = "CONSENT_LEDGER"
STATE_BUCKET = "consent_state"
SUBJECT_PREFIX = "lukhas.ledger.consent"

#: Records fetched per pull when reading a subject's history.
_READ_BATCH = 256
#: Fetches of a new read consumer that may find it leaderless (503) before the read fails.
_READ_UNAVAILABLE_RETRIES = 50
#: Scopes the expected-last-sequence check to a set of subjects (nats-server 2.11+).
_EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
#: KV operations that mean "no value".
_KV_REMOVED = frozenset({"DEL", "PURGE"})

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LedgerOptions:
    """Where the ledger lives and how it behaves; the defaults are the production names."""

    stream: str = STREAM
    state_bucket: str = STATE_BUCKET
    subject_prefix: str = SUBJECT_PREFIX
    #: Stream and KV replicas: 1 on one server, 3 in a cluster.
    replicas: int = 1
    #: A grant lapses this long after it was recorded (status then says "expired"); None: never.
    consent_ttl_s: float | None = None
    #: How long JetStream remembers message ids: a retry within it records once.
    duplicate_window_s: float = 120.0
    #: Appends to one subject give up (LedgerContention) after losing this many races.
    max_append_attempts: int = 64
    #: Seconds allowed for one JetStream request.
    timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> LedgerOptions:
        return cls(replicas=settings.ledger_replicas, **overrides)


class LedgerStatistics(NamedTuple):
    """Counters since the provider was built."""

    appended: int
    duplicates: int
    #: Appends that lost the race for a subject's tail and re-read it.
    retries: int
    #: Reads whose KV state disagreed with the ledger (answered from the ledger).
    state_mismatches: int


class _Appended(NamedTuple):
    seq: int
    #: The stored record (the original's on a duplicate; None if that is not a record).
    record: dict[str, Any] | None
    duplicate: bool


class JetStreamConsentLedger:
    """`ConsentProvider` on a JetStream stream (history) and a KV bucket (current state).

    Call `await ensure()` once before use; it creates the stream and bucket if missing and
    refuses (`LedgerStreamWeakened`) an existing stream whose protective config was weakened.
    """

    name = "jetstream"
    waits_on_io = True

    def __init__(
        self,
        js: JetStreamContext | Any,
        pseudonymize: Pseudonymizer | Callable[[str], str],
        options: LedgerOptions | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """
        Args:
            js: nats-py's JetStream context, or a bus (or client) with a `jetstream()` method.
            pseudonymize: the runtime's keyed pseudonymizer (stable across workers); with
                earlier keys configured, reads look under all of them.
            clock: seconds since the epoch; injectable so tests can move past an expiry.
        """
        self._js: JetStreamContext = js.jetstream() if hasattr(js, "jetstream") else js
        self._pseudonymize = pseudonymize
        self.options = options or LedgerOptions()
        self._clock = clock
        self._kv: KeyValue | None = None
        self._appended = 0
        self._duplicates = 0
        self._retries = 0
        self._state_mismatches = 0

    @classmethod
    def from_settings(
        cls,
        js: JetStreamContext | Any,
        pseudonymize: Pseudonymizer | Callable[[str], str],
        settings: Settings,
        **overrides: Any,
    ) -> JetStreamConsentLedger:
        return cls(js, pseudonymize, LedgerOptions.from_settings(settings, **overrides))

    def __repr__(self) -> str:
        return f"<JetStreamConsentLedger stream={self.options.stream}>"

    def statistics(self) -> LedgerStatistics:
        return LedgerStatistics(
            self._appended, self._duplicates, self._retries, self._state_mismatches
        )

    def stream_config(self) -> StreamConfig:
        """The stream this ledger needs; an existing stream must be at least as protective."""
        opts = self.options
        return StreamConfig(
            name=opts.stream,
            description="LUKHAS consent ledger: hash-chained records per data subject",
            subjects=[f"{opts.subject_prefix}.*.*"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=opts.replicas,
            duplicate_window=opts.duplicate_window_s,
            discard=DiscardPolicy.NEW,
            deny_delete=True,
            deny_purge=True,
        )

    async def ensure(self) -> None:
        """Create the stream and the state bucket unless they exist; check the stream.

        Raises:
            LedgerStreamWeakened: the existing stream lost a protection (a limit that drops
                records, deletes or purges allowed, other subjects...); nothing is served.
        """
        required = self.stream_config()
        info = await ensure_stream(self._js, required)
        gaps = protection_gaps(info.config, required)
        if gaps:
            logger.error("consent ledger stream %s is weakened: %s", required.name, gaps)
            raise LedgerStreamWeakened(self.options.stream, gaps)
        self._kv = await ensure_kv(self._js, self.options.state_bucket,
                                   replicas=self.options.replicas)

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
            return await self._verify_chain(user_id)

    # -- status ---------------------------------------------------------------------------

    async def _status(self, user_id: str, scope: str) -> dict[str, Any]:
        """Answer from the scope's latest record under any key version; check the KV."""
        versions = self._versions(user_id)
        kv = self._state()
        found = await _gather(
            *(lambda p=p: self._kv_get(kv, _state.key(p, scope)) for p in versions),
            *(lambda p=p: self._last(self._subject(p, scope)) for p in versions),
        )
        states, lasts = found[: len(versions)], found[len(versions):]
        reply: dict[str, Any] = {
            "ok": True, "provider": self.name, "user_id": user_id, "scope": scope,
            "status": "none",
        }
        problems: list[str] = []
        latest: tuple[int, dict[str, Any]] | None = None
        for pseudonym, state, last in zip(versions, states, lasts, strict=True):
            record = None
            if last is not None:
                record = _chain.decode(last.data)
                problem = _state.record_problem(record, pseudonym=pseudonym, scope=scope)
                if problem is not None:
                    raise LedgerCorrupt(pseudonym, last.seq, problem)
                assert record is not None
                if latest is None or last.seq > latest[0]:
                    latest = (last.seq, record)
            mismatch = _state.mismatch(state, last.seq if last else None, record)
            if mismatch is not None:
                problems.append(mismatch)
                logger.warning(
                    "consent state of %s scope=%s disagrees with the ledger (%s); "
                    "answering from the ledger", pseudonym, scope, mismatch,
                )
        if problems:
            self._state_mismatches += 1
            reply.update(state_mismatch=True, state_problem=problems[0])
        if latest is None:
            return reply
        seq, record = latest
        truth = _state.of_record(seq, record)
        status = truth.status
        if status == "granted" and truth.expires_at is not None:
            if self._now_ms() >= truth.expires_at:
                status = "expired"
        reply.update(status=status, ts=truth.ts, seq=truth.seq, hash=truth.hash)
        if truth.expires_at is not None:
            reply["expires_at"] = truth.expires_at
        return reply

    # -- history and verify ---------------------------------------------------------------

    async def _history(self, user_id: str) -> dict[str, Any]:
        records = [
            _history_record(user_id, seq, data)
            for seq, _, data in await self._read_records(self._versions(user_id))
        ]
        return {"ok": True, "provider": self.name, "user_id": user_id, "records": records}

    async def _verify_chain(self, user_id: str) -> dict[str, Any]:
        versions = self._versions(user_id)
        kv_stream = f"KV_{self.options.state_bucket}"
        kv_prefix = f"$KV.{self.options.state_bucket}."
        records, kv_entries = await _gather(
            lambda: self._read_records(versions),
            lambda: self._read(
                kv_stream, [f"{kv_prefix}{p}.*" for p in versions],
                DeliverPolicy.LAST_PER_SUBJECT,
            ),
        )
        reports: list[_chain.ChainReport] = []
        mismatches: list[dict[str, Any]] = []
        for version, pseudonym in enumerate(versions):
            mine = [(seq, subject, data) for seq, subject, data in records
                    if subject.startswith(f"{self.options.subject_prefix}.{pseudonym}.")]
            reports.append(_verify_one(mine, pseudonym))
            states = {
                subject[len(kv_prefix) + len(pseudonym) + 1:]: _state.decode(data)
                for _, subject, data, removed in kv_entries
                if subject.startswith(f"{kv_prefix}{pseudonym}.") and not removed
            }
            mismatches.extend(_state_mismatches(version, pseudonym, mine, states))
        broken = [r for r in reports if not r.valid]
        first = min(broken, key=lambda r: r.broken_at or 0) if broken else None
        heads = [(r.length, r.head) for r in reports if r.length]
        reply: dict[str, Any] = {
            "ok": True, "provider": self.name, "user_id": user_id,
            "valid": first is None and not mismatches,
            "length": sum(r.length for r in reports),
            "head": heads[0][1] if heads else _chain.GENESIS,
            "state_mismatches": mismatches,
        }
        pseudonym = versions[0]
        if first is not None:
            reply["broken_at"] = first.broken_at
            reply["problem"] = first.problem
            logger.warning(
                "consent chain of %s broken at seq %s (%s)",
                pseudonym, first.broken_at, first.problem,
            )
        elif mismatches:
            reply["problem"] = "state_mismatch"
        if mismatches:
            self._state_mismatches += 1
            logger.warning(
                "consent state of %s disagrees with the ledger for %d scope(s)",
                pseudonym, len(mismatches),
            )
        return reply

    # -- writing --------------------------------------------------------------------------

    async def _write(self, entry: ConsentEntry, idempotency_key: str | None) -> dict[str, Any]:
        pseudonym = self._pseudonymize(entry.user_id)
        ttl = self.options.consent_ttl_s
        expires_at = None
        if ttl is not None and entry.action == "grant":
            expires_at = entry.ts + int(ttl * 1000)
        fields = {
            "v": _chain.RECORD_VERSION,
            "pseudonym": pseudonym,
            "action": entry.action,
            "scope": entry.scope,
            "ts": entry.ts,
            "trace_id": entry.trace_id,
            "metadata": entry.metadata,
            "expires_at": expires_at,
        }
        msg_id = None if idempotency_key is None else _msg_id(pseudonym, idempotency_key)
        # A withdrawal needs something to withdraw: the scope must have a record (under any
        # key version). Checked against the tail the publish is conditional on, so a grant
        # racing this revoke is either seen here or makes the publish retry.
        must_exist = self._versions(entry.user_id) if entry.action == "revoke" else None
        appended = await self._append(pseudonym, fields, msg_id, must_exist=must_exist)
        if appended is None:
            logger.info("consent revoke %s scope=%s refused: not_granted", pseudonym, entry.scope)
            return {
                "ok": False, "provider": self.name, "reason": "not_granted",
                "user_id": entry.user_id, "scope": entry.scope,
                "message": "there is no consent for this scope to revoke: it was never granted",
            }
        seq, record, duplicate = appended
        if duplicate and (record is None or _chain.request_of(record) != _chain.request_of(fields)):
            logger.info("consent %s %s idempotency conflict with seq %s",
                        entry.action, pseudonym, seq)
            raise IdempotencyConflict(
                action=str((record or {}).get("action")), scope=str((record or {}).get("scope")),
                seq=seq,
            )
        assert record is not None
        # Re-applied on duplicates too: a retry repairs state a crashed first attempt missed.
        await self._apply_state(pseudonym, seq, record)
        logger.info(
            "consent %s %s scope=%s seq=%s duplicate=%s",
            record.get("action"), pseudonym, record.get("scope"), seq, duplicate,
        )
        reply: dict[str, Any] = {
            "ok": True,
            "provider": self.name,
            "entry": _entry(entry.user_id, record),
            "seq": seq,
            "hash": record.get("hash"),
            "prev_hash": record.get("prev_hash"),
            "duplicate": duplicate,
        }
        if record.get("expires_at") is not None:
            reply["expires_at"] = record["expires_at"]
        return reply

    async def _append(
        self,
        pseudonym: str,
        fields: dict[str, Any],
        msg_id: str | None,
        *,
        must_exist: Sequence[str] | None = None,
    ) -> _Appended | None:
        """Append one record to the data subject's chain; None if `must_exist` (pseudonyms
        to look under) is given and the scope has no record under any of them."""
        scope = str(fields["scope"])
        subject = self._subject(pseudonym, scope)
        chain = self._chain_subjects(pseudonym)
        attempts = self.options.max_append_attempts
        for attempt in range(attempts):
            if must_exist is None:
                tail_seq, prev_hash = await self._tail(chain)
            else:
                (tail_seq, prev_hash), *lasts = await _gather(
                    lambda: self._tail(chain),
                    *(lambda p=p: self._last(self._subject(p, scope)) for p in must_exist),
                )
                if all(last is None for last in lasts):
                    return None
            record = _chain.seal({**fields, "prev_hash": prev_hash})
            headers = {
                Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(tail_seq),
                _EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: chain,
                Header.EXPECTED_STREAM.value: self.options.stream,
            }
            if msg_id is not None:
                headers[Header.MSG_ID.value] = msg_id
            try:
                ack = await self._js.publish(
                    subject, _chain.canonical(record), headers=headers,
                    timeout=self.options.timeout_s,
                )
            except APIError as exc:
                if not is_wrong_last_sequence(exc):
                    raise
                self._retries += 1
                # Another writer moved the tail: back off a little, jittered, and re-read.
                await anyio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))
                continue
            if ack.duplicate:
                self._duplicates += 1
                original = await self._js.get_msg(self.options.stream, seq=ack.seq)
                return _Appended(ack.seq, _chain.decode(original.data), True)
            self._appended += 1
            return _Appended(ack.seq, record, False)
        raise LedgerContention(pseudonym, attempts)

    async def _tail(self, subject: str) -> tuple[int, str]:
        """(seq, hash) of the last record on `subject` (the data subject's wildcard), or
        (0, GENESIS) when it has none.

        The non-direct get is answered by the stream leader, so it is never stale.
        """
        msg = await self._last(subject)
        if msg is None:
            return 0, _chain.GENESIS
        return msg.seq, _chain.link_of(msg.data)

    async def _last(self, subject: str) -> RawStreamMsg | None:
        """The stream's last message on `subject` (may be a wildcard), or None."""
        try:
            return await self._js.get_last_msg(self.options.stream, subject)
        except NotFoundError:
            return None

    async def _apply_state(self, pseudonym: str, seq: int, record: dict[str, Any]) -> None:
        """Move the (subject, scope) state to this record unless a later one is already there."""
        kv = self._state()
        key = _state.key(pseudonym, str(record.get("scope", "")))
        value = _state.encode(_state.of_record(seq, record))
        for _ in range(self.options.max_append_attempts):
            try:
                current = await kv.get(key)
            except KeyNotFoundError:
                current = None
            try:
                if current is None:
                    await kv.create(key, value)
                else:
                    stored = _state.decode(current.value)
                    if isinstance(stored, _state.StateValue) and stored.seq >= seq:
                        return  # a later record already set the state
                    await kv.update(key, value, last=current.revision)
                return
            except KeyWrongLastSequenceError:
                continue
        raise LedgerContention(pseudonym, self.options.max_append_attempts)

    # -- reading --------------------------------------------------------------------------

    async def _kv_get(self, kv: KeyValue, key: str) -> _state.StateValue | str | None:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        return _state.decode(entry.value)

    async def _read_records(self, versions: Sequence[str]) -> list[tuple[int, str, bytes]]:
        """Every record of the data subject under every key version, in stream order."""
        entries = await self._read(
            self.options.stream, list(self._chain_subjects(p) for p in versions),
            DeliverPolicy.ALL,
        )
        return [(seq, subject, data) for seq, subject, data, _ in entries]

    async def _read(
        self, stream: str, filters: list[str], deliver: DeliverPolicy
    ) -> list[tuple[int, str, bytes, bool]]:
        """The messages of `stream` on `filters`, oldest first, as (seq, subject, data,
        removed) where `removed` marks a KV delete or purge.

        An ephemeral pull consumer (memory storage, one replica, no acks) is created for
        the read and deleted after it; its `num_pending` at creation is the number of
        messages to fetch, so the read is a snapshot with a known end.
        """
        name = f"consent_read_{secrets.token_hex(8)}"
        config = ConsumerConfig(
            name=name,
            filter_subjects=filters,
            deliver_policy=deliver,
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
                        # In a cluster a new consumer answers 503 until it has a leader.
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
                except NatsError as exc:  # its inactive threshold removes it anyway
                    logger.debug("could not delete read consumer %s: %s", name, exc)

    # -- helpers --------------------------------------------------------------------------

    def _versions(self, user_id: str) -> tuple[str, ...]:
        """The data subject's pseudonym under every key, current first."""
        all_versions = getattr(self._pseudonymize, "all_versions", None)
        if all_versions is None:
            return (self._pseudonymize(user_id),)
        return tuple(all_versions(user_id))

    def _subject(self, pseudonym: str, scope: str) -> str:
        return f"{self.options.subject_prefix}.{pseudonym}.{_state.scope_token(scope)}"

    def _chain_subjects(self, pseudonym: str) -> str:
        """Every subject of one data subject's chain."""
        return f"{self.options.subject_prefix}.{pseudonym}.*"

    def _state(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("JetStreamConsentLedger.ensure() was not awaited before use")
        return self._kv

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


async def _gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run JetStream reads concurrently (one round trip of latency); results in order.

    If any fails the rest are cancelled and the first failure is raised as itself, so
    callers handle it as they would from a single call.
    """
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


def _verify_one(records: list[tuple[int, str, bytes]], pseudonym: str) -> _chain.ChainReport:
    """One key version's chain, plus: every record sits on its own scope's subject."""
    report = _chain.verify([(seq, data) for seq, _, data in records], pseudonym=pseudonym)
    for count, (seq, subject, data) in enumerate(records, start=1):
        if report.broken_at is not None and seq >= report.broken_at:
            break
        record = _chain.decode(data)
        scope = str((record or {}).get("scope"))
        if not subject.endswith(f".{pseudonym}.{_state.scope_token(scope)}"):
            return _chain.ChainReport(False, count, report.head, broken_at=seq,
                                      problem="wrong_scope")
    return report


def _state_mismatches(
    version: int,
    pseudonym: str,
    records: list[tuple[int, str, bytes]],
    states: dict[str, _state.StateValue | str],
) -> list[dict[str, Any]]:
    """Each scope whose KV state disagrees with its latest record under one key version."""
    latest: dict[str, tuple[int, dict[str, Any] | None]] = {}
    for seq, subject, data in records:
        latest[subject.rsplit(".", 1)[-1]] = (seq, _chain.decode(data))
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


@contextmanager
def _unavailable_when_jetstream_is(operation: str) -> Iterator[None]:
    """JetStream did not answer (a leader election, a lost server, a timeout): that is a
    clear, retryable `unavailable` for the caller, not an internal error."""
    try:
        yield
    except (
        NatsTimeoutError, NoRespondersError, NoStreamResponseError, ServiceUnavailableError
    ) as exc:
        raise Unavailable(
            f"consent ledger {operation}: JetStream did not answer ({type(exc).__name__}); "
            "retry with the same idempotency key"
        ) from None


def _msg_id(pseudonym: str, key: str) -> str:
    """The JetStream message id of a keyed write: the key, scoped to its data subject.

    The key alone (not the action or scope) decides, so reusing a key for a different
    request is caught as a conflict instead of recording beside the original. Scoping by
    pseudonym means two users' keys never collide; hashing keeps client keys out of headers.
    """
    material = "\x00".join(("consent", pseudonym, key)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(material).hexdigest()


def _entry(user_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """The reply `entry` (the null provider's fields) of a stored record."""
    return {
        "trace_id": record.get("trace_id"),
        "ts": record.get("ts"),
        "user_id": user_id,
        "scope": record.get("scope"),
        "metadata": record.get("metadata", {}),
        "action": record.get("action"),
    }


def _history_record(user_id: str, seq: int, data: bytes | None) -> dict[str, Any]:
    record = _chain.decode(data)
    if record is None:
        return {"seq": seq, "malformed": True}
    return {
        "seq": seq,
        **_entry(user_id, record),
        "expires_at": record.get("expires_at"),
        "prev_hash": record.get("prev_hash"),
        "hash": record.get("hash"),
    }


async def _wire(runtime: Runtime, **overrides: Any) -> None:
    """Build the ledger on the runtime's JetStream, ensure it, and register it (the bootstrap
    calls this only under FEATURE_GOVERNANCE_LEDGER outside DRY_RUN)."""
    js = jetstream_of(runtime, "FEATURE_GOVERNANCE_LEDGER", "the JetStream consent ledger")
    ledger = JetStreamConsentLedger.from_settings(
        js, runtime.pseudonymize, runtime.settings, **overrides
    )
    await ledger.ensure()
    registry.register(ledger)
    logger.info("FEATURE_GOVERNANCE_LEDGER: consent ledger provider %r registered", ledger.name)
