"""The offline verifier against the attacks an insider with stream access can make."""

from __future__ import annotations

import random

import msgspec
import pytest

from lukhas.transparency.bundle import build_bundle, tlog_proofs, verify_bundle
from lukhas.transparency.errors import MalformedRecord, UnauthenticatedRecord
from lukhas.transparency.note import Signer, sign_note
from lukhas.transparency.record import RecordKey, leaf_text, make_leaf, open_leaf, read_leaf
from lukhas.transparency.tlog_proof import parse_tlog_proof

from ._log import Log

ORIGIN = "consent.example.com/ledger"


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate(ORIGIN)


def make_log(signer: Signer, n: int, users: int = 5) -> Log:
    log = Log(signer)
    for i in range(n):
        log.append({"event": "given", "subject": f"p{i % users}", "scope": f"s{i % 7}"})
    return log


def test_every_record_of_several_users_verifies(signer: Signer) -> None:
    log = make_log(signer, 3000, users=7)
    early_size = 1234
    early = log.checkpoint(early_size)
    for user in range(7):
        mine = [i for i in range(3000) if i % 7 == user]
        report = verify_bundle(log.bundle(mine, from_size=early_size), str(signer.verifier),
                               early)
        assert report.ok, report.problems
        assert report.consistency == "ok"
        assert [r.index for r in report.records] == mine
        assert all(r.body and r.body["subject"] == f"p{user}" for r in report.records)
    before = log.store.reads
    log.store.inclusion_proof(1733, 3000)
    log.store.consistency_proof(1234, 3000)
    assert log.store.reads - before <= 2 * 2 * (3000).bit_length()  # O(log n) reads per proof


def test_a_forged_record_has_no_place_in_the_signed_tree(signer: Signer) -> None:
    # An insider appends records to the stream; the writer, lacking their tag, never admits
    # them, so a bundle presenting one has no inclusion proof for it in the signed tree.
    log = make_log(signer, 10)
    intruder = RecordKey.of(Signer.generate(ORIGIN))  # same name, different key
    forged = [make_leaf(intruder, 10, {"event": "withdrawn", "subject": "p0"}),
              leaf_text(ORIGIN, 10, {"event": "withdrawn", "subject": "p1"}).encode()]
    good = msgspec.json.decode(log.bundle([0, 9]))
    for leaf in forged:
        with pytest.raises(UnauthenticatedRecord):
            open_leaf(leaf, log.key, index=10)  # what the writer checks
        for claimed in (9, 10):  # posing as the genuine record 9, or as a new one
            record = {"index": claimed, "leaf": leaf.decode(),
                      "inclusion": good["records"][1]["inclusion"]}
            report = verify_bundle(msgspec.json.encode(dict(good, records=[
                good["records"][0], record])), str(signer.verifier))
            assert not report.ok
            ok = {r.index: r.ok for r in report.records}
            assert ok == {0: True, claimed: False}
            assert "not in the signed tree" in (report.records[1].problem or "")


def test_replayed_genuine_record_is_reported(signer: Signer) -> None:
    log = make_log(signer, 6)
    log.append_leaf(log.leaves[2])  # a copy of a genuine signed record, at index 6
    report = verify_bundle(log.bundle([6]), str(signer.verifier))
    assert not report.ok
    assert "made for index 2" in (report.records[0].problem or "")


@pytest.mark.parametrize("attack", ["rewrite", "reorder", "drop", "recreate", "truncate"])
def test_history_attacks_caught_with_an_earlier_checkpoint(signer: Signer, attack: str) -> None:
    honest = make_log(signer, 40)
    held = honest.checkpoint(30)  # what a verifier kept earlier
    bodies = [read_leaf(leaf, origin=ORIGIN).body for leaf in honest.leaves]
    if attack == "rewrite":
        bodies[5] = {**bodies[5], "event": "refused"}
    elif attack == "reorder":
        bodies[3], bodies[4] = bodies[4], bodies[3]
    elif attack == "drop":
        del bodies[7]
    elif attack == "recreate":  # stream deleted and recreated with other records
        bodies = [{"event": "given", "subject": "x", "n": i} for i in range(45)]
    elif attack == "truncate":
        bodies = bodies[:20]
    # The (key-holding) writer rebuilds from the tampered stream and signs what it sees.
    rebuilt = Log(signer)
    for body in bodies:
        rebuilt.append(body)
    from_size = 30 if len(bodies) > 30 else None
    report = verify_bundle(rebuilt.bundle([0], from_size=from_size), str(signer.verifier), held)
    assert not report.ok
    assert report.consistency == "failed"
    # Without the earlier checkpoint the rebuilt log looks fine: this is what --from is for.
    assert verify_bundle(rebuilt.bundle([0]), str(signer.verifier)).ok


def test_consistency_needs_a_proof_from_the_held_size(signer: Signer) -> None:
    log = make_log(signer, 20)
    held = log.checkpoint(8)
    report = verify_bundle(log.bundle([1], from_size=9), str(signer.verifier), held)
    assert not report.ok and "from_size=8" in report.problems[0]
    assert verify_bundle(log.bundle([1], from_size=8), str(signer.verifier), held).ok
    same = verify_bundle(log.bundle([1]), str(signer.verifier), log.checkpoint())
    assert same.ok and same.consistency == "ok"
    note_only = verify_bundle(log.bundle([1], from_size=8), str(signer.verifier))
    assert note_only.ok and note_only.consistency == "not_checked" and note_only.notes


def test_tampered_bundles_fail(signer: Signer) -> None:
    log = make_log(signer, 12)
    good = msgspec.json.decode(log.bundle([3, 4]))
    vkey = str(signer.verifier)
    assert verify_bundle(msgspec.json.encode(good), vkey).ok

    leaf = dict(good)
    leaf["records"] = [dict(good["records"][0], leaf=good["records"][0]["leaf"].replace(
        "given", "GIVEN")), good["records"][1]]
    assert not verify_bundle(msgspec.json.encode(leaf), vkey).ok

    moved = dict(good)
    moved["records"] = [dict(good["records"][0], index=4)]
    assert not verify_bundle(msgspec.json.encode(moved), vkey).ok

    cp = dict(good, checkpoint=good["checkpoint"].replace("\n12\n", "\n13\n"))
    report = verify_bundle(msgspec.json.encode(cp), vkey)
    assert not report.ok and "checkpoint" in report.problems[0]

    other_key = Signer.generate(ORIGIN).verifier
    assert not verify_bundle(msgspec.json.encode(good), str(other_key)).ok

    dup = dict(good, records=[good["records"][0], good["records"][0]])
    assert not verify_bundle(msgspec.json.encode(dup), vkey).ok


@pytest.mark.parametrize("data", [
    b"", b"{", b"[]", b'{"format": "x", "checkpoint": ""}', b"\xff\xfe",
    b'{"format": "lukhas/consent-proof-bundle/v1", "checkpoint": 5}',
    b'{"format": "lukhas/consent-proof-bundle/v1", "checkpoint": "x", "records": '
    b'[{"index": -1, "leaf": "", "inclusion": []}]}',
    b"c2sp.org/tlog-proof@v1\nindex 0\n\nx\n",
])
def test_garbage_is_a_report_not_a_crash(signer: Signer, data: bytes) -> None:
    report = verify_bundle(data, str(signer.verifier))
    assert not report.ok and report.problems


def test_garbage_fuzz_never_raises(signer: Signer) -> None:
    rng = random.Random(7)
    good = make_log(signer, 5).bundle([1, 2], from_size=3)
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        verify_bundle(bytes(data), str(signer.verifier))


def test_bad_vkey_is_a_report(signer: Signer) -> None:
    log = make_log(signer, 2)
    report = verify_bundle(log.bundle([0]), "not a key")
    assert not report.ok and "verifier key" in report.problems[0]


def test_tlog_proof_files(signer: Signer) -> None:
    log = make_log(signer, 9)
    bundle = msgspec.json.decode(log.bundle([2, 8]), type=type(build_bundle(b"", [])))
    texts = tlog_proofs(bundle)
    assert texts[0].startswith("c2sp.org/tlog-proof@v1\nextra ")
    for index, text in zip((2, 8), texts, strict=True):
        parsed = parse_tlog_proof(text)
        assert parsed.index == index and parsed.extra == log.leaves[index]
        report = verify_bundle(text.encode(), str(signer.verifier))
        assert report.ok and report.records[0].index == index
    assert not verify_bundle(texts[0].replace("index 2", "index 3").encode(),
                             str(signer.verifier)).ok


def test_record_leaves(signer: Signer) -> None:
    key = RecordKey.of(signer)
    leaf = make_leaf(key, 3, {"b": 1, "a": "é"})
    head = b"lukhas/consent-record/v2\n" + ORIGIN.encode() + b'\n3\n{"a":"\xc3\xa9","b":1}\n'
    assert leaf.startswith(head + "\n\u2014 ".encode() + ORIGIN.encode() + b" ")
    assert open_leaf(leaf, key, index=3).body == {"a": "é", "b": 1}
    assert read_leaf(leaf, origin=ORIGIN, index=3).body == {"a": "é", "b": 1}
    assert RecordKey.of(signer).tag(b"x") == key.tag(b"x")  # derived, so every worker agrees
    with pytest.raises(MalformedRecord):
        open_leaf(leaf, key, index=4)
    with pytest.raises(MalformedRecord):
        read_leaf(leaf, origin="other.example.com/ledger")
    with pytest.raises(UnauthenticatedRecord):
        open_leaf(leaf.replace(b'"b":1', b'"b":2'), key)
    with pytest.raises(UnauthenticatedRecord):
        open_leaf(leaf, RecordKey.of(Signer.generate(ORIGIN)))
    with pytest.raises(UnauthenticatedRecord):
        open_leaf(head, key)  # no tag at all
    not_a_record = sign_note("hello\n", signer)
    with pytest.raises(MalformedRecord):
        read_leaf(not_a_record, origin=ORIGIN)
    with pytest.raises(MalformedRecord):
        read_leaf(b"\xff\xfe", origin=ORIGIN)
