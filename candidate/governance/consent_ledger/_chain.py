"""The consent ledger's hash chain: canonical record bytes, hashing, and chain verification.

Pure functions, no I/O. A record is a JSON object; its `hash` is the SHA-256 of the canonical
JSON (sorted keys, no spaces, UTF-8) of every other field, `prev_hash` included, so changing
any byte of a record or reordering, dropping or splicing records breaks the chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

#: The `prev_hash` of a subject's first record.
GENESIS = "0" * 64
#: Version of the record layout; part of every hashed record.
RECORD_VERSION = 1


_canonical = msgspec.json.Encoder(order="sorted")


def canonical(fields: dict[str, Any]) -> bytes:
    """The canonical JSON bytes of `fields` (what the hash covers): keys sorted, no spaces,
    UTF-8 (byte for byte what `json.dumps(sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)` writes, at a fraction of the cost; tests/candidate checks that)."""
    return _canonical.encode(fields)


def digest(fields: dict[str, Any]) -> str:
    """SHA-256 hex over the canonical JSON of `fields` without their `hash`."""
    unhashed = {k: v for k, v in fields.items() if k != "hash"} if "hash" in fields else fields
    return hashlib.sha256(canonical(unhashed)).hexdigest()


def seal(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with its `hash` set."""
    return {**fields, "hash": digest(fields)}


def request_of(fields: dict[str, Any]) -> bytes:
    """What makes two writes the same request: action, scope and metadata (canonical).

    A retry under an idempotency key must repeat exactly these; the trace id, timestamp and
    chain fields of a retry naturally differ and do not count.
    """
    return canonical(
        {k: fields.get(k) for k in ("action", "scope")} | {"metadata": fields.get("metadata", {})}
    )


def decode(data: bytes | None) -> dict[str, Any] | None:
    """A stored record as a dict, or None if the bytes are not a JSON object."""
    try:
        value = json.loads(data or b"")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def link_of(data: bytes | None) -> str:
    """The hash the next record must chain to: the record's own `hash` field.

    A tail that is not a valid record (tampered) still yields a deterministic link, so
    appends go on and `verify` reports the bad record itself.
    """
    record = decode(data)
    value = record.get("hash") if record else None
    return value if isinstance(value, str) else hashlib.sha256(data or b"").hexdigest()


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of verifying one subject's chain."""

    valid: bool
    length: int
    head: str
    broken_at: int | None = None
    problem: str | None = None


def verify(records: Iterable[tuple[int, bytes | None]], *, pseudonym: str) -> ChainReport:
    """Check `(seq, data)` records, oldest first: each must hash correctly, chain to the
    previous one, and belong to `pseudonym`. Reports the first broken link's stream seq."""
    expected_prev = GENESIS
    length = 0
    for seq, data in records:
        length += 1
        record = decode(data)
        problem = _problem(record, expected_prev, pseudonym)
        if problem is not None:
            return ChainReport(False, length, expected_prev, broken_at=seq, problem=problem)
        assert record is not None
        expected_prev = record["hash"]
    return ChainReport(True, length, expected_prev)


def _problem(record: dict[str, Any] | None, expected_prev: str, pseudonym: str) -> str | None:
    if record is None or not isinstance(record.get("hash"), str):
        return "malformed"
    if record.get("pseudonym") != pseudonym:
        return "wrong_subject"
    if record.get("prev_hash") != expected_prev:
        return "prev_hash_mismatch"
    try:
        recomputed = digest(record)
    except (TypeError, ValueError):
        return "malformed"
    if recomputed != record["hash"]:
        return "hash_mismatch"
    return None
