"""The consent ledger on JetStream: append-only, hash-chained, idempotent, per data subject.

Layout:

* Stream `CONSENT_LEDGER` on `lukhas.ledger.consent.<pseudonym>`: one subject per data
  subject, keyed by the keyed pseudonym (never the raw id). Deletes and purges are denied,
  so the stream is append-only. Each message is one record (canonical JSON, see `_chain`)
  carrying `prev_hash` (the hash of the subject's previous record) and its own `hash`.
* KV bucket `consent_state`, key `<pseudonym>.<base64url(scope)>`: the current state of one
  (subject, scope) — granted or revoked, when, until when, and the ledger seq that set it.
  It is a derived view: the stream is the truth and every KV write is a compare-and-set
  that only moves forward in stream sequence, so concurrent writers cannot leave it behind.

Records hold the pseudonym, never the raw user id: a consent ledger is append-only and
cannot forget, so it must not hold what it would have to forget. Replies carry the
`user_id` the caller passed in, which is the id the pseudonym was computed from.

Appends cannot fork a chain: each publish carries `Nats-Expected-Last-Subject-Sequence`
(the tail seq the `prev_hash` was read from); if another writer got there first the server
refuses, and the append re-reads the tail and tries again. Retried requests record once:
the idempotency key (or, without one, the trace id) becomes the `Nats-Msg-Id`, so the
stream's duplicate window drops the copy and acknowledges the original's seq, whose record
is then returned.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

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

from candidate._jetstream import ensure_kv, ensure_stream, is_wrong_last_sequence, jetstream_of
from candidate.governance.consent_ledger import _chain
from candidate.governance.consent_ledger.errors import LedgerContention
from lukhas.config import Settings
from lukhas.errors import Unavailable
from lukhas.governance.consent_ledger import registry
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


class StateValue(msgspec.Struct, frozen=True, kw_only=True):
    """The KV value of one (subject, scope): the ledger record that last changed it."""

    status: str
    ts: int
    seq: int
    hash: str
    expires_at: int | None = None


_state_encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(StateValue)


class JetStreamConsentLedger:
    """`ConsentProvider` on a JetStream stream (history) and a KV bucket (current state).

    Call `await ensure()` once before use; it creates the stream and bucket if missing.
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
            pseudonymize: the runtime's keyed pseudonymizer (stable across workers).
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
        return LedgerStatistics(self._appended, self._duplicates, self._retries)

    async def ensure(self) -> None:
        """Create the stream and the state bucket unless they exist."""
        opts = self.options
        await ensure_stream(
            self._js,
            StreamConfig(
                name=opts.stream,
                description="LUKHAS consent ledger: hash-chained records per data subject",
                subjects=[f"{opts.subject_prefix}.*"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=opts.replicas,
                duplicate_window=opts.duplicate_window_s,
                discard=DiscardPolicy.NEW,
                deny_delete=True,
                deny_purge=True,
            ),
        )
        self._kv = await ensure_kv(self._js, opts.state_bucket, replicas=opts.replicas)

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

    async def _status(self, user_id: str, scope: str) -> dict[str, Any]:
        pseudonym = self._pseudonymize(user_id)
        reply: dict[str, Any] = {
            "ok": True, "provider": self.name, "user_id": user_id, "scope": scope,
            "status": "none",
        }
        try:
            entry = await self._state().get(_state_key(pseudonym, scope))
        except KeyNotFoundError:
            return reply
        state = _state_decoder.decode(entry.value or b"")
        status = state.status
        if status == "granted" and state.expires_at is not None:
            if self._now_ms() >= state.expires_at:
                status = "expired"
        reply.update(status=status, ts=state.ts, seq=state.seq, hash=state.hash)
        if state.expires_at is not None:
            reply["expires_at"] = state.expires_at
        return reply

    async def _history(self, user_id: str) -> dict[str, Any]:
        pseudonym = self._pseudonymize(user_id)
        records = [
            _history_record(user_id, seq, data) for seq, data in await self._read(pseudonym)
        ]
        return {"ok": True, "provider": self.name, "user_id": user_id, "records": records}

    async def _verify_chain(self, user_id: str) -> dict[str, Any]:
        pseudonym = self._pseudonymize(user_id)
        report = _chain.verify(await self._read(pseudonym), pseudonym=pseudonym)
        reply: dict[str, Any] = {
            "ok": True, "provider": self.name, "user_id": user_id,
            "valid": report.valid, "length": report.length, "head": report.head,
        }
        if not report.valid:
            reply["broken_at"] = report.broken_at
            reply["problem"] = report.problem
            logger.warning(
                "consent chain of %s broken at seq %s (%s)",
                pseudonym, report.broken_at, report.problem,
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
        key = idempotency_key if idempotency_key is not None else f"trace:{entry.trace_id}"
        msg_id = _msg_id(pseudonym, entry.action, entry.scope, key)
        seq, record, duplicate = await self._append(pseudonym, fields, msg_id)
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
        self, pseudonym: str, fields: dict[str, Any], msg_id: str
    ) -> tuple[int, dict[str, Any], bool]:
        """Append one record to the subject's chain; return (seq, record, duplicate)."""
        subject = self._subject(pseudonym)
        attempts = self.options.max_append_attempts
        for attempt in range(attempts):
            tail_seq, prev_hash = await self._tail(subject)
            record = _chain.seal({**fields, "prev_hash": prev_hash})
            headers = {
                Header.MSG_ID.value: msg_id,
                Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(tail_seq),
                Header.EXPECTED_STREAM.value: self.options.stream,
            }
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
                stored = _chain.decode(original.data)
                return ack.seq, stored if stored is not None else record, True
            self._appended += 1
            return ack.seq, record, False
        raise LedgerContention(pseudonym, attempts)

    async def _tail(self, subject: str) -> tuple[int, str]:
        """(seq, hash) of the subject's last record, or (0, GENESIS) when it has none.

        The non-direct get is answered by the stream leader, so it is never stale.
        """
        try:
            msg = await self._js.get_last_msg(self.options.stream, subject)
        except NotFoundError:
            return 0, _chain.GENESIS
        return msg.seq, _chain.link_of(msg.data)

    async def _apply_state(self, pseudonym: str, seq: int, record: dict[str, Any]) -> None:
        """Move the (subject, scope) state to this record unless a later one is already there."""
        kv = self._state()
        key = _state_key(pseudonym, str(record.get("scope", "")))
        value = _state_encoder.encode(
            StateValue(
                status="revoked" if record.get("action") == "revoke" else "granted",
                ts=int(record.get("ts", 0)),
                seq=seq,
                hash=str(record.get("hash", "")),
                expires_at=record.get("expires_at"),
            )
        )
        for _ in range(self.options.max_append_attempts):
            try:
                current = await kv.get(key)
            except KeyNotFoundError:
                current = None
            try:
                if current is None:
                    await kv.create(key, value)
                else:
                    if _state_decoder.decode(current.value or b"").seq >= seq:
                        return  # a later record already set the state
                    await kv.update(key, value, last=current.revision)
                return
            except KeyWrongLastSequenceError:
                continue
        raise LedgerContention(pseudonym, self.options.max_append_attempts)

    # -- reading --------------------------------------------------------------------------

    async def _read(self, pseudonym: str) -> list[tuple[int, bytes | None]]:
        """Every record of the subject, oldest first, as (stream seq, data).

        An ephemeral pull consumer filtered on the subject (memory storage, one replica, no
        acks) is created for the read and deleted after it; its `num_pending` at creation
        is the number of records to fetch, so the read is a snapshot with a known end.
        """
        stream = self.options.stream
        name = f"consent_read_{secrets.token_hex(8)}"
        config = ConsumerConfig(
            name=name,
            filter_subject=self._subject(pseudonym),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=max(self.options.timeout_s * 6, 30.0),
            mem_storage=True,
            num_replicas=1,
        )
        info = await self._js.add_consumer(stream, config, timeout=self.options.timeout_s)
        try:
            remaining = info.num_pending or 0
            records: list[tuple[int, bytes | None]] = []
            if remaining == 0:
                return records
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
                        records.append((msg.metadata.sequence.stream, msg.data))
                    remaining -= len(batch)
            finally:
                await sub.unsubscribe()
            return records
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._js.delete_consumer(stream, name)
                except NatsError as exc:  # its inactive threshold removes it anyway
                    logger.debug("could not delete read consumer %s: %s", name, exc)

    # -- helpers --------------------------------------------------------------------------

    def _subject(self, pseudonym: str) -> str:
        return f"{self.options.subject_prefix}.{pseudonym}"

    def _state(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("JetStreamConsentLedger.ensure() was not awaited before use")
        return self._kv

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


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


def _msg_id(pseudonym: str, action: str, scope: str, key: str) -> str:
    """The JetStream message id of a write: the idempotency key, scoped to its request.

    Scoping by subject, action and scope means two users' keys never collide, and a key
    reused for a different operation records that operation instead of swallowing it.
    Hashing keeps arbitrary client keys out of headers.
    """
    material = "\x00".join((pseudonym, action, scope, key)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(material).hexdigest()


def _state_key(pseudonym: str, scope: str) -> str:
    """`<pseudonym>.<base64url(scope)>`: scopes may hold `:` and `..`, which KV keys may not."""
    token = base64.urlsafe_b64encode(scope.encode("utf-8")).rstrip(b"=").decode("ascii")
    return f"{pseudonym}.{token}"


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
