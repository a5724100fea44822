"""Ledger records as leaves: the writer tags each one, so the tree admits only the writer's.

Leaf data (the bytes the tree hashes as SHA-256(0x00 || leaf)) is the record's text followed
by an authentication line, in the shape of a C2SP signed note:

```
lukhas/consent-record/v2
<origin: the log's name, = the signing key's name and the checkpoint origin>
<index: the leaf's position in the tree, decimal>
<body: one compact JSON object, keys sorted>

— <origin> <base64(HMAC-SHA256(record key, text))>
```

The tag is a MAC, not a signature: the record key is derived (HKDF) from the ledger signing key,
which is configuration and never in NATS, so someone with stream access but without the key
cannot make a record the writer admits. A MAC costs the writer 2 µs where an Ed25519 signature
costs 35; third parties need no record key, because the writer vouches for every record it
admitted with its Ed25519-signed checkpoints: a record is the ledger's when an inclusion proof
ties it to a signed checkpoint (`bundle.verify_bundle`). Origin and index bind a record to one
position of one log, so a copy of a genuine record replayed elsewhere is refused, by the
writer (tag and index) and by an offline verifier (index). Personal data sits in the body only
as ciphertext (`lukhas.transparency.sealed`), so the leaf commits to the ciphertext and erasing
the data key leaves every leaf, proof and checkpoint valid.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import msgspec

from lukhas.transparency.errors import MalformedRecord, UnauthenticatedRecord
from lukhas.transparency.note import Signer, b64decode

RECORD_HEADER = "lukhas/consent-record/v2"
_PURPOSE = b"lukhas/consent-record/v2 HMAC-SHA256"
_MARK = "\n\u2014 "

_encoder = msgspec.json.Encoder(order="sorted")


@dataclass(frozen=True, slots=True)
class LeafRecord:
    """A ledger record: where it sits and what it says."""

    origin: str
    index: int
    body: dict[str, Any]


class RecordKey:
    """The writer's record-authentication key, derived from the ledger signing key."""

    __slots__ = ("origin", "_secret", "_mac", "_head", "_mark")

    def __init__(self, origin: str, secret: bytes) -> None:
        if len(secret) != 32:
            raise ValueError("a record key is 32 bytes")
        self.origin = origin
        self._secret = secret
        # Keyed once: each tag copies this state instead of keying HMAC again.
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)
        # What every leaf of this log starts with, and its authentication line up to the tag.
        self._head = f"{RECORD_HEADER}\n{origin}\n".encode()
        self._mark = f"{_MARK}{origin} ".encode()

    @classmethod
    def of(cls, signer: Signer) -> RecordKey:
        """The record key of the ledger whose checkpoints `signer` signs."""
        return cls(signer.name, signer.derive_secret(_PURPOSE))

    def tag(self, text: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(text)
        return mac.digest()

    def __repr__(self) -> str:
        return f"RecordKey({self.origin!r})"


def leaf_text(origin: str, index: int, body: dict[str, Any]) -> str:
    """The text of a record (without its tag)."""
    if index < 0:
        raise ValueError("a leaf index is >= 0")
    encoded = _encoder.encode(body).decode()
    return f"{RECORD_HEADER}\n{origin}\n{index}\n{encoded}\n"


def make_leaf(key: RecordKey, index: int, body: dict[str, Any]) -> bytes:
    """The leaf data of record `body` at `index`, tagged with the record key."""
    if index < 0:
        raise ValueError("a leaf index is >= 0")
    # Byte for byte `leaf_text(...).encode()` and its authentication line, laid out as bytes.
    text = b"%s%d\n%s\n" % (key._head, index, _encoder.encode(body))
    return b"%s%s%s\n" % (text, key._mark, binascii.b2a_base64(key.tag(text), newline=False))


def open_leaf(leaf: bytes, key: RecordKey, *, index: int | None = None) -> LeafRecord:
    """Authenticate a leaf with the record key (the writer's check) and return its record.

    Args:
        index: the position the leaf was found at; a record made for another position is
            refused (replay).

    Raises:
        UnauthenticatedRecord: the tag is missing or wrong (forged or altered record, or a
            record of another log).
        MalformedRecord: not a record of this log at this index.
    """
    text, tag = _split(leaf)
    try:
        valid = tag is not None and hmac.compare_digest(b64decode(tag), key.tag(text))
    except ValueError:
        valid = False
    if not valid:
        raise UnauthenticatedRecord("the record's tag is not the ledger's (forged or altered)")
    return _read(text, origin=key.origin, index=index)


def read_leaf(leaf: bytes, *, origin: str, index: int | None = None) -> LeafRecord:
    """Read a leaf's record without its key (offline verifiers: a record is authenticated
    by its inclusion in a checkpoint signed by the ledger key, not by its tag).

    Raises:
        MalformedRecord: not a record of log `origin` at `index`.
    """
    return _read(_split(leaf)[0], origin=origin, index=index)


def _split(leaf: bytes) -> tuple[bytes, str | None]:
    """(text, the tag's base64) of a leaf; tag None when the authentication line is absent."""
    try:
        decoded = leaf.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRecord("the leaf is not UTF-8 text") from None
    text, mark, line = decoded.rpartition(_MARK)
    if not mark or not line.endswith("\n") or " " not in line:
        return leaf, None
    return text.encode(), line[:-1].rpartition(" ")[2]


def _read(text: bytes, *, origin: str, index: int | None) -> LeafRecord:
    lines = text.decode("utf-8")[:-1].split("\n")
    if len(lines) != 4 or lines[0] != RECORD_HEADER:
        raise MalformedRecord("the leaf is not a lukhas consent record")
    _, found, digits, body = lines
    if found != origin:
        raise MalformedRecord(f"the record is from log {found!r}, not {origin!r}")
    if not digits.isascii() or not digits.isdigit() or (digits != "0" and digits[0] == "0"):
        raise MalformedRecord("the record's index line is not a decimal number")
    if index is not None and int(digits) != index:
        raise MalformedRecord(f"the record was made for index {digits}, found at {index}")
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise MalformedRecord("the record body is not JSON") from None
    if not isinstance(decoded, dict):
        raise MalformedRecord("the record body is not a JSON object")
    return LeafRecord(origin, int(digits), decoded)
