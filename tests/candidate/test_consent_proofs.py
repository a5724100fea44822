"""The verifiable consent ledger against a real nats-server: proofs a third party checks
offline, insiders who rewrite, truncate or recreate the stream or edit the tree, erasure,
receipts, and the DPV consent model."""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.js.api import StreamConfig

from candidate.governance.consent_ledger import _tiles
from candidate.governance.consent_ledger.errors import LedgerTampered
from candidate.governance.consent_ledger.jetstream_ledger import (
    JetStreamConsentLedger,
    LedgerOptions,
)
from lukhas.governance.consent_ledger import registry as consent_registry
from lukhas.governance.consent_ledger.api import (
    consent_checkpoint,
    consent_erase,
    consent_history,
    consent_proof,
    consent_receipt,
    consent_status,
    record_consent,
    revoke_consent,
    verify_consent_chain,
)
from lukhas.governance.consent_ledger.messages import ConsentEntry
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.transparency.bundle import verify_bundle
from lukhas.transparency.merkle import MemoryNodeStore, inclusion_plan, root_plan
from lukhas.transparency.receipt import open_receipt
from tests.candidate._support import LEDGER_SIGNER, PSEUDONYM_KEY, Names, Stack, nats_bus, user

pytestmark = pytest.mark.nats

VKEY = str(LEDGER_SIGNER.verifier)
KEYS: dict[str, Any] = {"signer": LEDGER_SIGNER, "wrapping_key": b"w" * 32}


def _bundle(reply: dict[str, Any]) -> bytes:
    assert reply["ok"] is True, reply
    return msgspec.json.encode(reply["bundle"])


def _entry(uid: str, i: int, scope: str) -> ConsentEntry:
    return ConsentEntry(trace_id=f"t{i}", ts=time.time_ns() // 1_000_000, user_id=uid,
                        scope=scope, metadata={"i": i})


def test_tiles_give_the_reference_tree_nodes() -> None:
    """Every node a proof or the frontier needs, read from tiles, equals the reference."""
    ref = MemoryNodeStore()
    writer = _tiles.TileWriter()
    stored: dict[tuple[int, int], bytes] = {}
    for i in range(700):
        for node, value in ref.range.append(bytes([i % 251]) * 32):
            ref.nodes[node] = value
            writer.add(node, value)
        if i % 97 == 0 or i == 699:
            stored.update(writer.take())
    size = ref.range.size
    for s in (1, 2, 3, 255, 256, 257, 511, 512, 700):
        for node in root_plan(s).nodes:
            assert _tiles.node_hash(node, stored) == ref.nodes[node]
    for index in (0, 1, 255, 256, 511, 699):
        for node in inclusion_plan(index, size).nodes:
            assert _tiles.node_hash(node, stored) == ref.nodes[node]
    # A writer restored from the partial tiles continues identically.
    partial = {t: stored[t][: n * 32] for t, n in _tiles.partial_tiles(size).items()}
    assert set(partial) == {(0, 2), (1, 0)}


async def test_every_record_of_thousands_proves_inclusion_and_the_log_only_grows(
    nats_url: str, names: Names
) -> None:
    users = [user() for _ in range(5)]
    per_user = 400
    options = LedgerOptions(**names.ledger_options())
    async with nats_bus(nats_url, names) as bus:
        ledger = JetStreamConsentLedger(bus, Pseudonymizer(PSEUDONYM_KEY), options, **KEYS)
        await ledger.ensure()

        async def write(uid: str, start: int, stop: int) -> None:
            for i in range(start, stop):
                await ledger.record(_entry(uid, i, f"scope.{i % 7}"), idempotency_key=None)

        async def run(start: int, stop: int) -> None:
            async with anyio.create_task_group() as tg:
                for uid in users:
                    for part in range(4):  # 20 concurrent writers: batched appends
                        lo = start + (stop - start) * part // 4
                        hi = start + (stop - start) * (part + 1) // 4
                        tg.start_soon(write, uid, lo, hi)

        with anyio.fail_after(60):
            await run(0, 100)
            earlier = await ledger.checkpoint()
            await run(100, per_user)
        assert earlier["size"] == 5 * 100
        for uid in users:
            reply = await ledger.proof(uid, from_size=earlier["size"])
            report = verify_bundle(_bundle(reply), VKEY, earlier["checkpoint"].encode())
            assert report.ok, report.problems
            assert report.consistency == "ok"
            assert len(report.records) == per_user == reply["records"]
            assert {r.body["pseudonym"] for r in report.records if r.body} == {
                Pseudonymizer(PSEUDONYM_KEY)(uid)}
            assert reply["checkpoint_size"] == 5 * per_user
        # Proofs read O(log n) tiles: one scope of one user, one record.
        one = await ledger.proof(users[0], scope="scope.3")
        assert verify_bundle(_bundle(one), VKEY).ok
        single = await ledger.proof(users[0], seq=one["bundle"]["records"][0]["index"] + 1)
        assert single["reads"] <= 4
        verdict = await ledger.verify_chain(users[1])
        assert verdict["valid"] is True and verdict["length"] == per_user, (
            verdict.get("problem"), verdict["tree"], verdict["state_mismatches"][:2])
        assert verdict["tree"]["size"] == 5 * per_user and verdict["tree"]["problems"] == []
        await ledger.aclose()


async def _hand_back(runtime: Any) -> None:
    """Let the registered ledger finish and hand its lease back (as between requests)."""
    await consent_registry.get_provider(runtime.settings).aclose()


async def _raw_leaves(js: Any, stream: str) -> list[tuple[str, bytes]]:
    info = await js.stream_info(stream)
    return [((m := await js.get_msg(stream, seq=s)).subject, m.data)
            for s in range(1, info.state.last_seq + 1)]


async def _recreate(insider: Any, names: Names, leaves: list[tuple[str, bytes]],
                    *, wipe_tree: bool) -> None:
    """The insider with admin rights: delete the stream, recreate it, republish `leaves`."""
    js = insider.jetstream()
    config = (await js.stream_info(names.stream)).config
    await js.delete_stream(names.stream)
    await js.add_stream(StreamConfig(
        name=names.stream, subjects=config.subjects, retention=config.retention,
        storage=config.storage, discard=config.discard, deny_delete=True, deny_purge=True,
        duplicate_window=config.duplicate_window,
    ))
    for subject, data in leaves:
        await js.publish(subject, data)
    if wipe_tree:  # and forget the tree and its checkpoints
        kv = await js.key_value(names.tree_bucket)
        for key in await kv.keys():
            await kv.purge(key)


@pytest.mark.parametrize("attack", ["truncate", "drop_a_revoke", "reorder"])
@pytest.mark.parametrize("wipe_tree", [False, True])
async def test_rewritten_truncated_or_recreated_streams_are_caught(
    wired: Stack, names: Names, nats_url: str, attack: str, wipe_tree: bool
) -> None:
    uid = user()
    async with wired(ledger=True) as (runtime, _):
        for i in range(6):
            await record_consent(uid, f"scope.{i}")
        revoked = await revoke_consent(uid, "scope.2")
        await record_consent(uid, "scope.9")
        held = await consent_checkpoint()  # the client keeps this
        assert held["size"] == 8
        await _hand_back(runtime)

        insider = await nats.connect(nats_url)
        try:
            leaves = await _raw_leaves(insider.jetstream(), names.stream)
            if attack == "truncate":
                kept = leaves[:5]
            elif attack == "drop_a_revoke":
                kept = [leaf for seq, leaf in enumerate(leaves, 1) if seq != revoked["seq"]]
            else:
                kept = [leaves[1], leaves[0], *leaves[2:]]
            await _recreate(insider, names, kept, wipe_tree=wipe_tree)
        finally:
            await insider.close()

        # The bus verify, replaying the stream against what the key signed:
        verdict = await verify_consent_chain(uid)
        assert verdict["valid"] is False
        if not wipe_tree:
            assert verdict["tree"]["problems"], verdict
            if attack != "reorder":  # the stream ends before the signed checkpoint's seq:
                with pytest.raises(LedgerTampered):  # the writer refuses to append on it
                    await record_consent(uid, "scope.x")
            return
        if attack != "truncate":  # records at the wrong stream position are refused
            assert verdict["refused"], verdict
        # With the tree wiped too, the writer starts over from what authenticates; a client
        # holding the earlier checkpoint catches it offline.
        proof = await consent_proof(uid, from_size=min(held["size"], 5))
        if proof["ok"] is False:  # nothing authenticates at its position any more
            assert proof["reason"] == "from_size_too_large" and proof["size"] < held["size"]
            return
        report = verify_bundle(_bundle(proof), VKEY, held["checkpoint"].encode())
        assert not report.ok
        assert any("shrank" in p or "rewritten" in p or "consistency" in p
                   for p in report.problems), report.problems


async def test_an_edited_tree_tile_is_caught(
    wired: Stack, names: Names, nats_url: str
) -> None:
    uid = user()
    async with wired(ledger=True) as (runtime, _):
        for i in range(5):
            await record_consent(uid, f"scope.{i}")
        held = await consent_checkpoint()
        await _hand_back(runtime)  # the tile is edited while no worker holds the lease
        insider = await nats.connect(nats_url)
        try:
            kv = await insider.jetstream().key_value(names.tree_bucket)
            tile = (await kv.get("t.0.0")).value
            await kv.put("t.0.0", b"\x00" * 32 + tile[32:])
        finally:
            await insider.close()
        verdict = await verify_consent_chain(uid)
        assert verdict["valid"] is False and verdict["problem"] == "tree_mismatch"
        assert any("t.0.0" in p for p in verdict["tree"]["problems"])
        with pytest.raises(LedgerTampered):
            await record_consent(uid, "scope.x")
        assert held["size"] == 5


async def test_erasure_keeps_every_proof_valid_and_the_data_unreadable(
    wired: Stack, names: Names, nats_url: str
) -> None:
    uid, other = user(), user()
    async with wired(ledger=True) as (runtime, _):
        first = await record_consent(uid, "gmail.read", {"email": "alice@example.com"})
        await record_consent(other, "gmail.read", {"email": "bob@example.com"})
        await revoke_consent(uid, "gmail.read")
        held = await consent_checkpoint()
        before = (await consent_history(uid))["records"]
        assert before[0]["metadata"] == {"email": "alice@example.com"}

        erased = await consent_erase(uid)
        assert erased["ok"] is True and erased["erased"] is True

        history = (await consent_history(uid))["records"]
        assert [r["event"] for r in history] == ["given", "withdrawn", "erased"]
        assert history[0]["erased"] is True and history[0]["metadata"] is None
        assert history[0]["scope"] == "gmail.read" and history[0]["ts"] == first["entry"]["ts"]
        # Other data subjects keep theirs.
        assert (await consent_history(other))["records"][0]["metadata"] == {
            "email": "bob@example.com"}
        # Nothing readable is left in NATS: the stream holds ciphertext, the key is purged.
        insider = await nats.connect(nats_url)
        try:
            js = insider.jetstream()
            for seq in range(1, erased["seq"] + 1):
                assert b"alice@example.com" not in (await js.get_msg(names.stream, seq=seq)).data
            keys = await js.key_value(names.keys_bucket)
            assert runtime.pseudonymize(uid) not in await keys.keys()
        finally:
            await insider.close()
        # Every proof still verifies, including the erasure record's, against the old
        # checkpoint too.
        proof = await consent_proof(uid, from_size=held["size"])
        report = verify_bundle(_bundle(proof), VKEY, held["checkpoint"].encode())
        assert report.ok and len(report.records) == 3, report.problems
        assert report.records[-1].body and report.records[-1].body["event"] == "erased"
        receipt = await consent_receipt(uid, first["seq"])
        assert open_receipt(receipt["receipt"].encode(), LEDGER_SIGNER.verifier,
                            leaf=receipt["leaf"].encode()).purposes[0].purpose == "gmail.read"
        assert (await verify_consent_chain(uid))["valid"] is True


async def test_receipts_verify_offline_and_bind_to_their_leaf(wired: Stack) -> None:
    uid = user()
    async with wired(ledger=True) as (runtime, _):
        given = await record_consent(
            uid, "newsletter", controller="Example Ltd", lawful_basis="dpv:Consent",
            collection_method="web-form", notice="privacy-v3", jurisdiction="EU",
        )
        reply = await consent_receipt(uid, given["seq"])
        receipt = open_receipt(reply["receipt"].encode(), LEDGER_SIGNER.verifier,
                               leaf=reply["leaf"].encode())
        assert receipt.status == "dpv:ConsentGiven" and receipt.controller == "Example Ltd"
        assert receipt.notice == "privacy-v3" and receipt.jurisdiction == "EU"
        assert receipt.pii_principal == runtime.pseudonymize(uid)
        assert uid not in reply["receipt"]
        assert receipt.leaf_index == given["index"]
        # The receipt is for that leaf only, and only this user's records have receipts.
        other = await record_consent(uid, "other.scope")
        other_leaf = (await consent_receipt(uid, other["seq"]))["leaf"].encode()
        with pytest.raises(Exception, match="not for this record"):
            open_receipt(reply["receipt"].encode(), LEDGER_SIGNER.verifier, leaf=other_leaf)
        refused = await consent_receipt(user(), given["seq"])
        assert refused["ok"] is False and refused["reason"] == "no_such_record"
        tampered = reply["receipt"].replace("Example Ltd", "Evil Ltd").encode()
        with pytest.raises(Exception, match="signature|verify"):
            open_receipt(tampered, LEDGER_SIGNER.verifier)


async def test_dpv_events_and_checked_transitions(wired: Stack) -> None:
    uid = user()
    async with wired(ledger=True) as (runtime, _):
        never = await record_consent(uid, "ads", event="renewed")
        assert never["ok"] is False and never["reason"] == "not_given"
        assert (await consent_status(uid, "ads"))["dpv"] == "dpv:ConsentUnknown"

        refused = await record_consent(uid, "ads", event="refused")
        assert refused["ok"] is True and refused["dpv"] == "dpv:ConsentRefused"
        status = await consent_status(uid, "ads")
        assert (status["status"], status["dpv"]) == ("revoked", "dpv:ConsentRefused")
        assert (await record_consent(uid, "ads", event="renewed"))["reason"] == "not_given"

        await record_consent(uid, "ads")
        assert (await record_consent(uid, "ads", event="refused"))["reason"] == "already_given"
        renewed = await record_consent(uid, "ads", event="renewed")
        assert renewed["dpv"] == "dpv:RenewedConsentGiven"
        assert (await consent_status(uid, "ads"))["status"] == "granted"

        by_controller = await revoke_consent(uid, "ads", by="controller")
        assert by_controller["event"] == "revoked" and by_controller["dpv"] == "dpv:ConsentRevoked"
        await record_consent(uid, "ads")
        withdrawn = await revoke_consent(uid, "ads")
        assert withdrawn["dpv"] == "dpv:ConsentWithdrawn"

        past = time.time_ns() // 1_000_000 - 1000
        await record_consent(uid, "mail", expires_at=past)
        status = await consent_status(uid, "mail")
        assert (status["status"], status["dpv"]) == ("expired", "dpv:ConsentExpired")
        # Today's requests stay valid and mean "given".
        plain = await record_consent(uid, "plain")
        assert plain["event"] == "given" and plain["entry"]["action"] == "grant"
