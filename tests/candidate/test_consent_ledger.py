"""The JetStream consent ledger against a real nats-server, through the public API."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from typing import Any

import anyio
import pytest
from nats.js.errors import APIError

from candidate.governance.consent_ledger import _chain, _state
from candidate.governance.consent_ledger.jetstream_ledger import (
    JetStreamConsentLedger,
    LedgerOptions,
)
from lukhas.governance.consent_ledger import registry as consent_registry
from lukhas.governance.consent_ledger.api import (
    consent_history,
    consent_status,
    record_consent,
    revoke_consent,
    verify_consent_chain,
)
from lukhas.governance.consent_ledger.messages import ConsentEntry
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.transparency.note import Signer
from lukhas.transparency.record import RecordKey, make_leaf, open_leaf, read_leaf
from tests.candidate._support import (
    LEDGER_SIGNER,
    PSEUDONYM_KEY,
    Names,
    Stack,
    nats_bus,
    user,
)

pytestmark = pytest.mark.nats

WRAPPING = b"w" * 32


async def test_record_revoke_status_history_verify_round_trip(wired: Stack) -> None:
    uid = user()
    async with wired(ledger=True) as (runtime, recorder):
        assert (await consent_status(uid, "gmail.read"))["status"] == "none"

        granted = await record_consent(uid, "gmail.read", {"purpose": "inbox", "weight": 0.5})
        assert granted["ok"] is True and granted["provider"] == "jetstream"
        assert granted["entry"]["user_id"] == uid
        assert granted["entry"]["scope"] == "gmail.read"
        assert granted["entry"]["metadata"] == {"purpose": "inbox", "weight": 0.5}
        assert set(granted["entry"]) >= {"trace_id", "ts", "user_id", "scope", "metadata"}
        assert granted["prev_hash"] == _chain.GENESIS and len(granted["hash"]) == 64
        assert granted["duplicate"] is False

        status = await consent_status(uid, "gmail.read")
        assert status["status"] == "granted" and status["seq"] == granted["seq"]

        revoked = await revoke_consent(uid, "gmail.read")
        assert revoked["ok"] is True and revoked["entry"]["action"] == "revoke"
        assert revoked["seq"] > granted["seq"] and revoked["prev_hash"] == granted["hash"]
        assert (await consent_status(uid, "gmail.read"))["status"] == "revoked"

        # Scopes are independent; `:` and `/` are fine in scopes though not in KV keys.
        other = await record_consent(uid, "calendar:read/events")
        assert (await consent_status(uid, "calendar:read/events"))["status"] == "granted"
        assert (await consent_status(uid, "gmail.read"))["status"] == "revoked"

        history = await consent_history(uid)
        assert history["ok"] is True
        records = history["records"]
        assert [r["seq"] for r in records] == [granted["seq"], revoked["seq"], other["seq"]]
        assert [r["action"] for r in records] == ["grant", "revoke", "grant"]
        assert all(r["user_id"] == uid for r in records)
        assert records[0]["prev_hash"] == _chain.GENESIS
        assert [r["prev_hash"] for r in records[1:]] == [r["hash"] for r in records[:-1]]

        verdict = await verify_consent_chain(uid)
        assert verdict["ok"] is True and verdict["valid"] is True
        assert verdict["length"] == 3 and "broken_at" not in verdict
        assert verdict["head"] == other["hash"]

        # Nine calls, nine CONSENT nodes, each naming the subject only by pseudonym.
        nodes = await recorder.take(9)
        pseudonym = runtime.pseudonymize(uid)
        assert {n["type"] for n in nodes} == {"CONSENT"}
        assert {n["provenance"]["subject_pseudonym"] for n in nodes} == {pseudonym}


async def test_the_stream_holds_pseudonyms_never_raw_ids(
    wired: Stack, names: Names
) -> None:
    uid = user()
    async with wired(ledger=True) as (runtime, _):
        await record_consent(uid, "gmail.read", {"note": "kept"})
        js = runtime.bus.jetstream()  # type: ignore[attr-defined]
        info = await js.stream_info(names.stream, subjects_filter=">")
        pseudonym = runtime.pseudonymize(uid)
        subject = f"{names.subject_prefix}.{pseudonym}.{_state.scope_token('gmail.read')}"
        assert info.state.subjects == {subject: 1}
        stored = await js.get_last_msg(names.stream, subject)
        assert uid.encode() not in stored.data
        body = open_leaf(stored.data, RecordKey.of(LEDGER_SIGNER)).body
        assert body["pseudonym"] == pseudonym
        # Personal data (metadata) is stored only as ciphertext.
        assert b"kept" not in stored.data and "metadata" not in body and "sealed" in body
        state = await js.key_value(names.state_bucket)
        assert all(uid not in key for key in await state.keys())


async def test_the_ledger_is_append_only(wired: Stack, names: Names) -> None:
    uid = user()
    async with wired(ledger=True) as (runtime, _):
        first = await record_consent(uid, "gmail.read")
        js = runtime.bus.jetstream()  # type: ignore[attr-defined]
        with pytest.raises(APIError):
            await js.delete_msg(names.stream, first["seq"])
        with pytest.raises(APIError):
            await js.purge_stream(names.stream)
        assert (await verify_consent_chain(uid))["valid"] is True


async def test_status_honours_expiry(wired: Stack) -> None:
    uid = user()
    # A zero TTL makes every grant lapse the moment it is recorded.
    async with wired(ledger=True, ledger_options={"consent_ttl_s": 0}):
        granted = await record_consent(uid, "gmail.read")
        assert granted["expires_at"] == granted["entry"]["ts"]
        status = await consent_status(uid, "gmail.read")
        assert status["status"] == "expired" and status["expires_at"] == granted["expires_at"]
        await revoke_consent(uid, "gmail.read")
        assert (await consent_status(uid, "gmail.read"))["status"] == "revoked"
        history = await consent_history(uid)
        assert [r["expires_at"] for r in history["records"]] == [granted["expires_at"], None]


async def test_expiry_follows_the_clock(wired: Stack, names: Names) -> None:
    uid = user()
    now = [time.time()]
    async with wired(ledger=True) as (runtime, _):
        ledger = JetStreamConsentLedger(
            runtime.bus,
            runtime.pseudonymize,
            LedgerOptions(**names.ledger_options(consent_ttl_s=3600)),
            clock=lambda: now[0],
        )
        await ledger.ensure()
        consent_registry.register(ledger)
        granted = await record_consent(uid, "gmail.read")
        assert granted["expires_at"] == granted["entry"]["ts"] + 3_600_000
        now[0] += 3599
        assert (await consent_status(uid, "gmail.read"))["status"] == "granted"
        now[0] += 2
        assert (await consent_status(uid, "gmail.read"))["status"] == "expired"
        renewed = await record_consent(uid, "gmail.read")  # renewing restarts the clock
        now[0] = renewed["entry"]["ts"] / 1000 + 60
        assert (await consent_status(uid, "gmail.read"))["status"] == "granted"


def _forge(kind: str, genuine_leaf: bytes, other_pseudonym: str) -> bytes:
    """A record published by an insider with stream access but without the ledger key."""
    record = read_leaf(genuine_leaf, origin=LEDGER_SIGNER.name)  # no key needed to read
    body = record.body
    if kind == "edited":  # the genuine tagged record with its scope changed
        return genuine_leaf.replace(b"drive.read", b"every.write")
    if kind == "replayed":  # a genuine tagged record copied verbatim to a new position
        return genuine_leaf
    if kind == "own_key":  # well formed, tagged with a key of the insider's own
        insider = RecordKey.of(Signer.generate(LEDGER_SIGNER.name))
        return make_leaf(insider, record.index + 1, {**body, "event": "withdrawn"})
    if kind == "rechained":  # the old format: a JSON record with a recomputed hash
        return _chain.canonical(_chain.seal({**body, "prev_hash": body["hash"]}))
    if kind == "foreign":  # a self-consistent record naming another data subject
        return _chain.canonical(_chain.seal({**body, "pseudonym": other_pseudonym}))
    return b"not a record"


@pytest.mark.parametrize(
    "kind", ["edited", "replayed", "own_key", "rechained", "foreign", "garbage"])
async def test_a_forged_append_is_refused_and_reported(
    wired: Stack, names: Names, kind: str
) -> None:
    uid = user()
    async with wired(ledger=True) as (runtime, _):
        first = await record_consent(uid, "gmail.read")
        second = await record_consent(uid, "drive.read")
        js = runtime.bus.jetstream()  # type: ignore[attr-defined]
        pseudonym, token = runtime.pseudonymize(uid), _state.scope_token("drive.read")
        subject = f"{names.subject_prefix}.{pseudonym}.{token}"
        genuine = (await js.get_last_msg(names.stream, subject)).data
        # A revoke forged as a grant would be the attack: publish as an insider with nats-py.
        forged = await js.publish(subject, _forge(kind, genuine, runtime.pseudonymize(user())))
        after = await record_consent(uid, "photos.read")
        assert after["seq"] > forged.seq > second["seq"]
        # The forgery was refused into the tree: tree positions skip it.
        assert after["index"] == second["index"] + 1

        verdict = await verify_consent_chain(uid)
        assert verdict["ok"] is True and verdict["valid"] is False
        assert verdict["broken_at"] == forged.seq and verdict["problem"] == "unauthenticated"
        assert [r["seq"] for r in verdict["refused"]] == [forged.seq]
        assert verdict["length"] == 3  # the genuine records, chained without the forgery
        assert verdict["tree"]["problems"] == []  # the tree itself is intact

        history = await consent_history(uid)
        assert [(r["seq"], r.get("unauthenticated", False)) for r in history["records"]] == [
            (first["seq"], False), (second["seq"], False), (forged.seq, True),
            (after["seq"], False),
        ]
        # `status` answers from the latest authenticated record and names the forgery.
        status = await consent_status(uid, "drive.read")
        assert status["status"] == "granted" and status["seq"] == second["seq"]
        assert status["unauthenticated_seqs"] == [forged.seq]


async def test_concurrent_writers_keep_one_chain(nats_url: str, names: Names) -> None:
    uid = user()
    per_writer = 12
    pseudonymize = Pseudonymizer(PSEUDONYM_KEY)
    options = LedgerOptions(**names.ledger_options())
    replies: list[dict[str, Any]] = []

    async def writer(bus: Any, name: str) -> None:
        ledger = JetStreamConsentLedger(bus, pseudonymize, options, signer=LEDGER_SIGNER,
                                        wrapping_key=WRAPPING)
        await ledger.ensure()
        for i in range(per_writer):
            # Each writer grants a scope, then revokes it (a revoke needs a grant first).
            entry = ConsentEntry(
                trace_id=f"{name}-{i}", ts=time.time_ns() // 1_000_000, user_id=uid,
                scope=f"scope.{(i // 2) % 3}", metadata={"writer": name},
                action="grant" if i % 2 == 0 else "revoke",
            )
            write = ledger.record if entry.action == "grant" else ledger.revoke
            replies.append(await write(entry, idempotency_key=None))

    # Two connections, as two workers in one queue group would have.
    async with nats_bus(nats_url, names) as bus_a, nats_bus(nats_url, names) as bus_b:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer, bus_a, "a")
                tg.start_soon(writer, bus_b, "b")
        ledger = JetStreamConsentLedger(bus_a, pseudonymize, options, signer=LEDGER_SIGNER,
                                        wrapping_key=WRAPPING)
        await ledger.ensure()
        verdict = await ledger.verify_chain(uid)
        assert verdict["valid"] is True and verdict["length"] == 2 * per_writer
        records = (await ledger.history(uid))["records"]
        assert len({r["trace_id"] for r in records}) == 2 * per_writer
        assert [r["prev_hash"] for r in records[1:]] == [r["hash"] for r in records[:-1]]
        assert sorted(r["seq"] for r in replies) == [r["seq"] for r in records]
        assert not any(r["duplicate"] for r in replies)
        # Each scope's state is its latest record, whichever writer's KV update landed last.
        for scope in ("scope.0", "scope.1", "scope.2"):
            latest = [r for r in records if r["scope"] == scope][-1]
            status = await ledger.status(uid, scope)
            assert status["seq"] == latest["seq"]
            assert status["status"] == ("granted" if latest["action"] == "grant" else "revoked")


def _entry(uid: str, trace_id: str, scope: str = "gmail.read") -> ConsentEntry:
    return ConsentEntry(
        trace_id=trace_id, ts=time.time_ns() // 1_000_000, user_id=uid, scope=scope, metadata={}
    )


async def test_a_forgery_slipped_in_under_the_lease_is_refused_and_the_batch_retried(
    nats_url: str, names: Names
) -> None:
    """Deterministic race: an insider appends between the writer's catch-up and its publish;
    the publish (conditional on the stream's last seq) is refused, the writer replays the
    stream, refuses the forgery into the tree and appends after it."""
    uid = user()
    pseudonymize = Pseudonymizer(PSEUDONYM_KEY)
    options = LedgerOptions(**names.ledger_options())
    forged: list[int] = []

    class Interrupted(JetStreamConsentLedger):
        async def _run_batch(self, batch: list[Any]) -> None:
            if not forged:
                subject = self._subject(pseudonymize(uid), "gmail.read")
                forged.append((await raw.publish(subject, b'{"action":"grant"}')).seq)
            await super()._run_batch(batch)

    async with nats_bus(nats_url, names) as bus_a, nats_bus(nats_url, names) as bus_b:
        raw = bus_b.jetstream()
        ledger = Interrupted(bus_a, pseudonymize, options, signer=LEDGER_SIGNER,
                             wrapping_key=WRAPPING)
        await ledger.ensure()
        await raw.stream_info(names.stream)
        mine = await ledger.record(_entry(uid, "late"), idempotency_key=None)

        stats = ledger.statistics()
        assert stats.retries == 1 and stats.refused >= 1
        assert mine["seq"] == forged[0] + 1 and mine["index"] == 0
        verdict = await ledger.verify_chain(uid)
        assert verdict["valid"] is False and verdict["refused"][0]["seq"] == forged[0]
        assert verdict["length"] == 1 and verdict["tree"]["size"] == 1


async def ledger_on_a_stream_before_atomic_batches(bus: Any, names: Names
                                                  ) -> JetStreamConsentLedger:
    """A ledger, not yet ensured, whose stream was made as an earlier version made it:
    without `allow_direct` (batched reads) and `allow_atomic` (atomic batches)."""
    ledger = JetStreamConsentLedger(bus, Pseudonymizer(PSEUDONYM_KEY),
                                    LedgerOptions(**names.ledger_options()),
                                    signer=LEDGER_SIGNER, wrapping_key=WRAPPING)
    await bus.jetstream().add_stream(dataclasses.replace(
        ledger.stream_config(), allow_direct=False, allow_atomic=False))
    return ledger


async def test_a_stream_made_before_batched_reads_and_atomic_batches_still_serves(
    nats_url: str, names: Names
) -> None:
    """A ledger stream (and state bucket) created by an earlier version, without
    `allow_direct` / `allow_atomic`: the writer reads one subject at a time and publishes
    record by record, with the same answers."""
    async with nats_bus(nats_url, names) as bus:
        ledger = await ledger_on_a_stream_before_atomic_batches(bus, names)
        await bus.jetstream().create_key_value(  # type: ignore[attr-defined]
            bucket=names.state_bucket)
        await ledger.ensure()
        assert not ledger._direct and not ledger._atomic
        assert not ledger._atomic_kv[names.state_bucket]
        uid = user()
        first = await ledger.record(_entry(uid, "a"), idempotency_key="k")
        again = await ledger.record(_entry(uid, "b"), idempotency_key="k")
        assert again["duplicate"] is True and again["seq"] == first["seq"]
        many = await asyncio.gather(*(ledger.record(_entry(user(), "c"), idempotency_key=None)
                                      for _ in range(20)))
        assert len({r["seq"] for r in many}) == 20
        revoked = await ledger.revoke(
            ConsentEntry(trace_id="d", ts=time.time_ns() // 1_000_000, user_id=uid,
                         scope="gmail.read", metadata={}, action="revoke"),
            idempotency_key=None)
        assert revoked["ok"] and revoked["prev_hash"] == first["hash"]
        status = await ledger.status(uid, "gmail.read")
        assert status["status"] == "revoked" and "state_mismatch" not in status
        assert (await ledger.verify_chain(uid))["valid"] is True
        await ledger.aclose()


async def test_a_writer_keeps_a_bounded_cache_and_reads_back_what_it_forgot(
    nats_url: str, names: Names
) -> None:
    """With room for 2 data subjects, 6 come and go: the cache stays bounded, and a
    subject it forgot is read back from the stream, so its chain and transitions hold."""
    pseudonymize = Pseudonymizer(PSEUDONYM_KEY)
    options = LedgerOptions(**names.ledger_options(cached_subjects=2))
    async with nats_bus(nats_url, names) as bus:
        ledger = JetStreamConsentLedger(bus, pseudonymize, options, signer=LEDGER_SIGNER,
                                        wrapping_key=WRAPPING)
        await ledger.ensure()
        uids = [user() for _ in range(6)]
        first = {uid: await ledger.record(_entry(uid, "a"), idempotency_key=None)
                 for uid in uids}
        # One batch at a time: at most 2 kept from before, plus the batch's own subject.
        assert len(ledger._tails) <= 3 and len(ledger._scopes) <= 3
        again = await ledger.revoke(
            ConsentEntry(trace_id="b", ts=time.time_ns() // 1_000_000, user_id=uids[0],
                         scope="gmail.read", metadata={}, action="revoke"),
            idempotency_key=None)
        assert again["ok"] and again["prev_hash"] == first[uids[0]]["hash"]
        # "renewed" needs an earlier grant the writer no longer holds in memory.
        renewed = await ledger.record(
            ConsentEntry(trace_id="c", ts=time.time_ns() // 1_000_000, user_id=uids[1],
                         scope="gmail.read", metadata={}, event="renewed"),
            idempotency_key=None)
        assert renewed["ok"] and renewed["prev_hash"] == first[uids[1]]["hash"]
        for uid in uids:
            assert (await ledger.verify_chain(uid))["valid"] is True
        assert (await ledger.status(uids[0], "gmail.read"))["status"] == "revoked"
        await ledger.aclose()


async def test_a_retried_request_records_once(wired: Stack) -> None:
    uid = user()
    async with wired(ledger=True):
        first = await record_consent(uid, "gmail.read", {"v": 1}, idempotency_key="req-1")
        again = await record_consent(uid, "gmail.read", {"v": 1}, idempotency_key="req-1")
        assert first["duplicate"] is False and again["duplicate"] is True
        assert again["seq"] == first["seq"] and again["hash"] == first["hash"]
        assert again["entry"] == first["entry"]  # the originally recorded entry, trace id too

        # After the tail moved on, a late retry still finds the original.
        moved = await record_consent(uid, "drive.read", idempotency_key="req-2")
        late = await record_consent(uid, "gmail.read", {"v": 1}, idempotency_key="req-1")
        assert late["duplicate"] is True and late["seq"] == first["seq"]

        # A revoke under its own key records; the grant's retry still finds the grant.
        revoked = await revoke_consent(uid, "gmail.read", idempotency_key="req-3")
        assert revoked["duplicate"] is False and revoked["seq"] > moved["seq"]
        assert (await consent_status(uid, "gmail.read"))["status"] == "revoked"

        history = await consent_history(uid)
        seqs = [r["seq"] for r in history["records"]]
        assert seqs == [first["seq"], moved["seq"], revoked["seq"]]
        assert (await verify_consent_chain(uid))["valid"] is True


async def test_concurrent_duplicates_record_once(wired: Stack) -> None:
    uid = user()
    replies: list[dict[str, Any]] = []

    async def send() -> None:
        replies.append(await record_consent(uid, "gmail.read", idempotency_key="burst"))

    async with wired(ledger=True):
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(send)
        assert len({r["seq"] for r in replies}) == 1
        assert [r["duplicate"] for r in replies].count(False) == 1
        assert len((await consent_history(uid))["records"]) == 1


async def test_users_do_not_share_chains(wired: Stack) -> None:
    alice, bob = user(), user()
    async with wired(ledger=True):
        await record_consent(alice, "gmail.read", idempotency_key="same-key")
        bobs = await record_consent(bob, "gmail.read", idempotency_key="same-key")
        assert bobs["duplicate"] is False and bobs["prev_hash"] == _chain.GENESIS
        assert (await verify_consent_chain(alice))["length"] == 1
        assert (await verify_consent_chain(bob))["length"] == 1
        assert (await consent_history(user()))["records"] == []
        empty = await verify_consent_chain(user())
        assert empty["valid"] is True and empty["length"] == 0


def test_chain_verification_is_pure() -> None:
    pseudonym = "psn_" + "0" * 32
    first = _chain.seal({"pseudonym": pseudonym, "prev_hash": _chain.GENESIS, "n": 1})
    second = _chain.seal({"pseudonym": pseudonym, "prev_hash": first["hash"], "n": 2})
    good = [(1, _chain.canonical(first)), (2, _chain.canonical(second))]
    assert _chain.verify(good, pseudonym=pseudonym).valid
    swapped = [good[1], good[0]]
    report = _chain.verify(swapped, pseudonym=pseudonym)
    assert not report.valid and report.broken_at == 2 and report.problem == "prev_hash_mismatch"
    dropped = [good[1]]
    assert _chain.verify(dropped, pseudonym=pseudonym).broken_at == 2


def test_canonical_bytes_are_those_of_the_standard_library() -> None:
    # Chains written before the hash used msgspec must keep verifying: same bytes, always.
    rng = random.Random(11)
    alphabet = [chr(i) for i in range(0x80)] + ["é", "\u2028", "\u2029", "😀", "中", "\u0085"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))

    for _ in range(5000):
        fields = {text(): rng.choice([None, True, 12, -5, 10**15, text(), {"a": [1, text()]}])
                  for _ in range(rng.randint(1, 6))}
        assert _chain.canonical(fields) == json.dumps(
            fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
