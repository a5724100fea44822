"""Ledger records as leaves: a record is a signed note, so the tree admits only the writer's.

Leaf data (the bytes the tree hashes as SHA-256(0x00 || leaf)) is a C2SP signed note signed by
the ledger key, whose text is four lines:

```
lukhas/consent-record/v1
<origin: the log's name, = the key name and the checkpoint origin>
<index: the leaf's position in the tree, decimal>
<body: one compact JSON object, keys sorted>
```

The signature authenticates the record (a record appended by someone without the key fails
`open_leaf`); origin and index bind it to one position of one log, so a copy of a genuine record
replayed elsewhere is refused too. Personal data sits in the body only as ciphertext
(`lukhas.transparency.sealed`), so the leaf commits to the ciphertext and erasing the data key
leaves every leaf, proof and checkpoint valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from lukhas.transparency.errors import MalformedRecord
from lukhas.transparency.note import Signer, Verifier, open_note, sign_note

RECORD_HEADER = "lukhas/consent-record/v1"

_encoder = msgspec.json.Encoder(order="sorted")


@dataclass(frozen=True, slots=True)
class LeafRecord:
    """An authenticated ledger record: where it sits and what it says."""

    origin: str
    index: int
    body: dict[str, Any]


def leaf_text(origin: str, index: int, body: dict[str, Any]) -> str:
    """The note text of a record (unsigned)."""
    if index < 0:
        raise ValueError("a leaf index is >= 0")
    encoded = _encoder.encode(body).decode()
    return f"{RECORD_HEADER}\n{origin}\n{index}\n{encoded}\n"


def make_leaf(signer: Signer, index: int, body: dict[str, Any]) -> bytes:
    """The leaf data of record `body` at `index`, signed by the ledger key (origin = key name)."""
    return sign_note(leaf_text(signer.name, index, body), signer)


def open_leaf(leaf: bytes, verifier: Verifier, *, index: int | None = None) -> LeafRecord:
    """Authenticate a leaf and return its record.

    Args:
        index: the position the leaf was found at; a record signed for another position is
            refused (replay).

    Raises:
        MalformedNote, InvalidSignature, UnverifiedNote: not signed by the ledger key (forged,
            altered, or from another log).
        MalformedRecord: signed, but not a record of this log at this index.
    """
    text = open_note(leaf, [verifier]).text
    lines = text[:-1].split("\n")
    if len(lines) != 4 or lines[0] != RECORD_HEADER:
        raise MalformedRecord("the leaf is not a lukhas consent record")
    _, origin, digits, body = lines
    if origin != verifier.name:
        raise MalformedRecord(f"the record is from log {origin!r}, not {verifier.name!r}")
    if not digits.isascii() or not digits.isdigit() or (digits != "0" and digits[0] == "0"):
        raise MalformedRecord("the record's index line is not a decimal number")
    if index is not None and int(digits) != index:
        raise MalformedRecord(f"the record was signed for index {digits}, found at {index}")
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise MalformedRecord("the record body is not JSON") from None
    if not isinstance(decoded, dict):
        raise MalformedRecord("the record body is not a JSON object")
    return LeafRecord(origin, int(digits), decoded)
