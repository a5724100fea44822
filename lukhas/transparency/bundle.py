"""Proof bundles for a user's records, and the offline verifier behind `verify-proof`.

A bundle (JSON, `format` = "lukhas/consent-proof-bundle/v1"):

```
{"format": "lukhas/consent-proof-bundle/v1",
 "checkpoint": "<signed checkpoint note>",
 "records": [{"index": 7, "leaf": "<record note>", "inclusion": ["<base64 hash>", ...]}, ...],
 "consistency": {"from_size": 5, "proof": ["<base64 hash>", ...]}}      (optional)
```

`verify_bundle` also takes a single C2SP tlog-proof whose `extra` line carries the record note.
It never raises for bad input: everything wrong is a problem in the `Report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from lukhas.transparency.checkpoint import Checkpoint, open_checkpoint
from lukhas.transparency.errors import MalformedKey, TransparencyError
from lukhas.transparency.merkle import EMPTY_ROOT, leaf_hash, verify_consistency, verify_inclusion
from lukhas.transparency.note import Verifier, b64decode, b64encode
from lukhas.transparency.record import read_leaf
from lukhas.transparency.tlog_proof import HEADER as TLOG_PROOF_HEADER
from lukhas.transparency.tlog_proof import TlogProof, parse_tlog_proof

BUNDLE_FORMAT = "lukhas/consent-proof-bundle/v1"

Index = Annotated[int, msgspec.Meta(ge=0)]


class BundleRecord(msgspec.Struct, frozen=True):
    index: Index
    leaf: str
    inclusion: list[str]


class BundleConsistency(msgspec.Struct, frozen=True):
    from_size: Index
    proof: list[str]


class ProofBundle(msgspec.Struct, frozen=True):
    format: str
    checkpoint: str
    records: list[BundleRecord] = []
    consistency: BundleConsistency | None = None


_decoder = msgspec.json.Decoder(ProofBundle)


def build_bundle(
    checkpoint: bytes,
    records: Sequence[tuple[int, bytes, Sequence[bytes]]],
    consistency: tuple[int, Sequence[bytes]] | None = None,
) -> ProofBundle:
    """A bundle from a signed checkpoint, `(index, leaf, inclusion proof)` per record and an
    optional `(from_size, consistency proof)`; `msgspec.json.encode` it to send or save."""
    return ProofBundle(
        format=BUNDLE_FORMAT,
        checkpoint=checkpoint.decode(),
        records=[
            BundleRecord(index, leaf.decode(), [b64encode(h) for h in proof])
            for index, leaf, proof in records
        ],
        consistency=None if consistency is None else BundleConsistency(
            consistency[0], [b64encode(h) for h in consistency[1]]
        ),
    )


def tlog_proofs(bundle: ProofBundle) -> list[str]:
    """Each record of a bundle as a standalone C2SP tlog-proof (record note in `extra`)."""
    return [
        TlogProof(r.index, tuple(b64decode(h) for h in r.inclusion),
                  bundle.checkpoint.encode(), r.leaf.encode()).text()
        for r in bundle.records
    ]


@dataclass(frozen=True, slots=True)
class RecordCheck:
    """What the verifier found for one record."""

    index: int
    ok: bool
    problem: str | None = None
    body: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """The outcome of `verify_bundle`: `ok` only if every check that ran passed."""

    ok: bool
    checkpoint: Checkpoint | None = None
    records: tuple[RecordCheck, ...] = ()
    #: "ok", "failed", or "not_checked" (no earlier checkpoint given).
    consistency: str = "not_checked"
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        """A human-readable account, one line per fact."""
        out = [f"{'OK' if self.ok else 'FAILED'}: proof bundle"]
        if self.checkpoint is not None:
            cp = self.checkpoint
            out.append(f"checkpoint: {cp.origin} size {cp.size} root {b64encode(cp.root_hash)}"
                       " (signature verified)")
        out.extend(
            f"record {r.index}: " + ("included and authenticated" if r.ok else f"{r.problem}")
            for r in self.records
        )
        out.append(f"consistency with your earlier checkpoint: {self.consistency}")
        out.extend(f"problem: {p}" for p in self.problems)
        out.extend(f"note: {n}" for n in self.notes)
        return out

    def to_dict(self) -> dict[str, Any]:
        cp = self.checkpoint
        return {
            "ok": self.ok,
            "checkpoint": None if cp is None else {
                "origin": cp.origin, "size": cp.size, "root_hash": b64encode(cp.root_hash),
            },
            "records": [
                {"index": r.index, "ok": r.ok, "problem": r.problem, "body": r.body}
                for r in self.records
            ],
            "consistency": self.consistency,
            "problems": list(self.problems),
            "notes": list(self.notes),
        }


def _decode_hashes(values: Sequence[str]) -> list[bytes]:
    return [b64decode(v) for v in values]


def _parse_input(data: bytes) -> ProofBundle:
    """A JSON bundle, or a tlog-proof turned into a one-record bundle."""
    text_start = data.lstrip()[: len(TLOG_PROOF_HEADER)]
    if text_start == TLOG_PROOF_HEADER.encode():
        proof = parse_tlog_proof(data.decode("utf-8"))
        if proof.extra is None:
            raise TransparencyError("the tlog proof has no extra line carrying the record")
        return ProofBundle(
            format=BUNDLE_FORMAT,
            checkpoint=proof.checkpoint.decode(),
            records=[BundleRecord(proof.index, proof.extra.decode("utf-8"),
                                  [b64encode(h) for h in proof.proof])],
        )
    bundle = _decoder.decode(data)
    if bundle.format != BUNDLE_FORMAT:
        raise TransparencyError(f"unknown bundle format {bundle.format[:60]!r}")
    return bundle


def _check_record(record: BundleRecord, cp: Checkpoint) -> RecordCheck:
    try:
        leaf = record.leaf.encode("utf-8")
        proof = _decode_hashes(record.inclusion)
        verify_inclusion(record.index, cp.size, leaf_hash(leaf), proof, cp.root_hash)
    except (TransparencyError, ValueError) as exc:
        return RecordCheck(record.index, False, f"not in the signed tree: {exc}")
    try:
        # Authentic: the signed checkpoint covers it. What is left is what it says.
        opened = read_leaf(leaf, origin=cp.origin, index=record.index)
    except TransparencyError as exc:
        return RecordCheck(record.index, False, f"in the tree but not a record of it: {exc}")
    return RecordCheck(record.index, True, None, opened.body)


def _check_consistency(
    bundle: ProofBundle, cp: Checkpoint, earlier_note: bytes, verifier: Verifier
) -> str | None:
    """None if the earlier checkpoint is a prefix of `cp`, else the problem."""
    try:
        earlier = open_checkpoint(earlier_note, verifier, origin=cp.origin)
    except (TransparencyError, ValueError) as exc:
        return f"your earlier checkpoint does not verify with this key: {exc}"
    if earlier.size > cp.size:
        return (f"the log shrank: your checkpoint has {earlier.size} records, this one "
                f"{cp.size} (truncated or rolled back)")
    if earlier.size == 0:
        return None if earlier.root_hash == EMPTY_ROOT else "your empty checkpoint has a root"
    if earlier.size == cp.size:
        if earlier.root_hash != cp.root_hash:
            return f"two different trees of size {cp.size}: the log was rewritten"
        return None
    c = bundle.consistency
    if c is None or c.from_size != earlier.size:
        have = "none" if c is None else f"one from size {c.from_size}"
        return (f"the bundle has {have}, not a consistency proof from size {earlier.size}; "
                f"ask for one with from_size={earlier.size}")
    try:
        verify_consistency(earlier.size, cp.size, _decode_hashes(c.proof),
                           earlier.root_hash, cp.root_hash)
    except (TransparencyError, ValueError) as exc:
        return f"the log was rewritten since your checkpoint (size {earlier.size}): {exc}"
    return None


def verify_bundle(
    bundle_bytes: bytes, vkey: str | Verifier, from_checkpoint: bytes | None = None
) -> Report:
    """Verify a proof bundle offline: checkpoint signature, each record's inclusion and
    authenticity, and (given an earlier signed checkpoint) that the log only grew since."""
    try:
        verifier = vkey if isinstance(vkey, Verifier) else Verifier.parse(vkey.strip())
    except MalformedKey as exc:
        return Report(False, problems=(f"the verifier key is not usable: {exc}",))
    try:
        bundle = _parse_input(bundle_bytes)
    except (msgspec.DecodeError, TransparencyError, UnicodeDecodeError) as exc:
        return Report(False, problems=(f"not a proof bundle: {exc}",))
    try:
        cp = open_checkpoint(bundle.checkpoint.encode(), verifier)
    except (TransparencyError, ValueError) as exc:
        return Report(False, problems=(f"the checkpoint does not verify: {exc}",))

    problems: list[str] = []
    notes: list[str] = []
    records = tuple(_check_record(r, cp) for r in bundle.records)
    problems.extend(f"record {r.index}: {r.problem}" for r in records if not r.ok)
    indexes = [r.index for r in bundle.records]
    if len(set(indexes)) != len(indexes):
        problems.append("a record index appears twice")

    consistency = "not_checked"
    if from_checkpoint is not None:
        problem = _check_consistency(bundle, cp, from_checkpoint, verifier)
        consistency = "failed" if problem else "ok"
        if problem:
            problems.append(problem)
    elif bundle.consistency is not None:
        notes.append(f"the bundle proves consistency from size {bundle.consistency.from_size}; "
                     "give that earlier checkpoint (--from) to check it")
    return Report(not problems, cp, records, consistency, tuple(problems), tuple(notes))
