"""How the ledger writer's batches land, against a real nats-server: the state values sent in
order with only the last acknowledged, the tree worked out while the server stores a batch
and kept only for what landed (a batch that lands in part, a batch that does not land)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.js.errors import NoStreamResponseError

from candidate._jetstream import ensure_kv
from candidate.governance.consent_ledger import _state
from candidate.governance.consent_ledger._pipeline import Pipeline
from candidate.governance.consent_ledger.jetstream_ledger import (
    JetStreamConsentLedger,
    LedgerOptions,
)
from lukhas.governance.consent_ledger.messages import ConsentEntry
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.transparency.bundle import verify_bundle
from tests.candidate._support import LEDGER_SIGNER, PSEUDONYM_KEY, Names, nats_bus, user
from tests.candidate.test_consent_ledger import ledger_on_a_stream_before_atomic_batches

pytestmark = pytest.mark.nats

VKEY = str(LEDGER_SIGNER.verifier)
WRAPPING = b"w" * 32


def _entry(uid: str, trace_id: str, scope: str = "gmail.read") -> ConsentEntry:
    return ConsentEntry(trace_id=trace_id, ts=time.time_ns() // 1_000_000, user_id=uid,
                        scope=scope, metadata={})


async def test_values_published_in_order_are_all_stored_and_the_last_answers(
    nats_url: str, internals: str
) -> None:
    bucket = f"order_{uuid.uuid4().hex[:10]}"
    nc = Client()
    await nc.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, bucket, replicas=1, atomic=True)
        values = [(f"$KV.{bucket}.k{i}", f"v{i}".encode()) for i in range(5)]
        ack = await (await Pipeline(nc).publish_in_order(values))
        assert ack.stream == f"KV_{bucket}" and ack.seq == 5
        assert [(await kv.get(f"k{i}")).value for i in range(5)] == [
            f"v{i}".encode() for i in range(5)]
        # Nothing stores them: the last one's answer says so (no silent success).
        with pytest.raises(NoStreamResponseError):
            await (await Pipeline(nc).publish_in_order(
                [(f"nowhere.{uuid.uuid4().hex}.{i}", b"x") for i in range(3)]))
        with pytest.raises(ValueError):
            await Pipeline(nc).publish_in_order([])
        await js.delete_key_value(bucket)
    finally:
        await nc.close()


async def _state_of(ledger: JetStreamConsentLedger, uid: str, scope: str) -> Any:
    pseudonym = Pseudonymizer(PSEUDONYM_KEY)(uid)
    entry = await ledger._state().get(_state.key(pseudonym, scope))
    return _state.decode(entry.value)


async def test_every_append_of_a_batch_leaves_its_state_value(
    nats_url: str, names: Names
) -> None:
    options = LedgerOptions(**names.ledger_options())
    async with nats_bus(nats_url, names) as bus:
        ledger = JetStreamConsentLedger(bus, Pseudonymizer(PSEUDONYM_KEY), options,
                                        signer=LEDGER_SIGNER, wrapping_key=WRAPPING)
        await ledger.ensure()
        # More than one part of an atomic batch (64 records a part).
        uids = [user() for _ in range(150)]
        replies = await asyncio.gather(*(ledger.record(_entry(u, "t"), idempotency_key=None)
                                         for u in uids))
        assert ledger.statistics().appended == 150
        assert ledger.statistics().retries == 0
        for uid, reply in zip(uids, replies, strict=True):
            state = await _state_of(ledger, uid, "gmail.read")
            assert state.seq == reply["seq"] and state.hash == reply["hash"]
            assert state.status == "granted"
            status = await ledger.status(uid, "gmail.read")
            assert status["status"] == "granted" and "state_mismatch" not in status
        await ledger.aclose()


async def test_a_batch_that_lands_in_part_admits_only_what_landed(
    nats_url: str, names: Names
) -> None:
    """A stream made before atomic batches: a batch's records go one by one, each conditional
    on the one before. A retry under a used idempotency key in the middle of a batch is
    answered as the duplicate it is; the records before it land and are admitted, the ones
    after it are sent again; the tree (worked out ahead for the whole batch) holds exactly
    the records of the stream, and every proof verifies."""
    async with nats_bus(nats_url, names) as bus:
        js = bus.jetstream()  # type: ignore[attr-defined]
        ledger = await ledger_on_a_stream_before_atomic_batches(bus, names)
        await ledger.ensure()
        assert not ledger._atomic
        repeat = user()
        first = await ledger.record(_entry(repeat, "first"), idempotency_key="k")
        before, after = user(), user()
        landed, again, resent = await asyncio.gather(
            ledger.record(_entry(before, "a"), idempotency_key=None),
            ledger.record(_entry(repeat, "again"), idempotency_key="k"),
            ledger.record(_entry(after, "c"), idempotency_key=None),
        )
        stats = ledger.statistics()
        assert stats.duplicates == 1 and stats.retries == 1 and stats.appended == 3
        assert again["duplicate"] is True and again["seq"] == first["seq"]
        assert landed["ok"] and resent["ok"] and resent["seq"] == landed["seq"] + 1
        assert [landed["index"], resent["index"]] == [1, 2]

        checkpoint = await ledger.checkpoint()
        info = await js.stream_info(names.stream)
        assert checkpoint["size"] == info.state.messages == 3
        for uid in (repeat, before, after):
            proof = await ledger.proof(uid)
            report = verify_bundle(msgspec.json.encode(proof["bundle"]), VKEY)
            assert report.ok, report.problems
            verdict = await ledger.verify_chain(uid)
            assert verdict["valid"] is True and verdict["tree"]["problems"] == []
        await ledger.aclose()


async def test_a_batch_refused_whole_leaves_no_state_values_and_the_tree_unchanged(
    nats_url: str, names: Names
) -> None:
    """An insider appends between the writer's read and its publish: the atomic batch, whose
    first parts the server had staged already, is refused whole at its commit; the state
    values already sent for it are put back from the stream, the tree worked out ahead is
    dropped, and the retry lands after the forgery."""
    pseudonymize = Pseudonymizer(PSEUDONYM_KEY)
    options = LedgerOptions(**names.ledger_options())
    uids = [user() for _ in range(150)]  # sent in three parts, refused at the commit
    forged: list[int] = []

    class Interrupted(JetStreamConsentLedger):
        async def _load_for(self, batch: list[Any]) -> None:
            await super()._load_for(batch)
            if not forged:
                subject = self._subject(pseudonymize(uids[0]), "gmail.read")
                forged.append((await raw.publish(subject, b'{"action":"grant"}')).seq)

    async with nats_bus(nats_url, names) as bus_a, nats_bus(nats_url, names) as bus_b:
        raw = bus_b.jetstream()  # type: ignore[attr-defined]
        ledger = Interrupted(bus_a, pseudonymize, options, signer=LEDGER_SIGNER,
                             wrapping_key=WRAPPING)
        await ledger.ensure()
        assert ledger._atomic
        replies = await asyncio.gather(*(ledger.record(_entry(u, "t"), idempotency_key=None)
                                         for u in uids))
        stats = ledger.statistics()
        assert stats.retries == 1 and stats.appended == len(uids)
        assert sorted(r["seq"] for r in replies) == list(
            range(forged[0] + 1, forged[0] + 1 + len(uids)))
        assert sorted(r["index"] for r in replies) == list(range(len(uids)))
        for uid, reply in zip(uids, replies, strict=True):
            state = await _state_of(ledger, uid, "gmail.read")
            assert state.seq == reply["seq"]
            status = await ledger.status(uid, "gmail.read")
            assert "state_mismatch" not in status
        checkpoint = await ledger.checkpoint()
        assert checkpoint["size"] == len(uids)
        proof = await ledger.proof(uids[3])
        assert verify_bundle(msgspec.json.encode(proof["bundle"]), VKEY).ok
        await ledger.aclose()
