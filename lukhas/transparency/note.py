"""C2SP signed notes (https://c2sp.org/signed-note) with Ed25519, as golang.org/x/mod/sumdb/note.

A note is UTF-8 text ending in a newline, a blank line, then signature lines
`— <key name> base64(key id || signature)`. Key id = SHA-256(name || 0x0A || 0x01 || pubkey)[:4].
Keys are text: verifier key `<name>+<hex key id>+base64(0x01 || pubkey)`, signer key
`PRIVATE+KEY+<name>+<hex key id>+base64(0x01 || seed)`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from lukhas.transparency.errors import (
    InvalidSignature,
    MalformedKey,
    MalformedNote,
    UnverifiedNote,
)

ALG_ED25519 = 0x01
SIG_PREFIX = "— "
#: Signatures read from one note at most (the spec asks verifiers to accept at least 16).
MAX_SIGNATURES = 100


def b64decode(text: str) -> bytes:
    """Strict standard base64 (RFC 4648 §4): padding required, no other characters."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError("not standard base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("not canonical base64")
    return raw


def b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def valid_key_name(name: str) -> bool:
    """Non-empty, with no Unicode space and no '+' (as the spec and the Go package require)."""
    return bool(name) and "+" not in name and not any(ch.isspace() for ch in name)


def key_id(name: str, public_key: bytes) -> int:
    """SHA-256(name || 0x0A || 0x01 || public_key)[:4] as a big-endian uint32."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True, slots=True)
class Verifier:
    """An Ed25519 note verifier key."""

    name: str
    key_id: int
    public_key: bytes

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """Read a verifier key string `<name>+<hex id>+<base64(0x01 || pubkey)>`.

        Raises:
            MalformedKey: the string is not a valid Ed25519 verifier key.
        """
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise MalformedKey("a verifier key has three '+'-separated parts: name+id+key")
        name, hex_id, b64 = parts
        if not valid_key_name(name):
            raise MalformedKey(f"invalid key name {name!r}")
        kid = _parse_key_id(hex_id)
        try:
            raw = b64decode(b64)
        except ValueError:
            raise MalformedKey("the key part is not base64") from None
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise MalformedKey("the key part is not 0x01 followed by a 32-byte Ed25519 key")
        if key_id(name, raw[1:]) != kid:
            raise MalformedKey(f"key id {hex_id} does not match the name and key")
        return cls(name, kid, raw[1:])

    def __str__(self) -> str:
        return f"{self.name}+{self.key_id:08x}+{b64encode(bytes([ALG_ED25519]) + self.public_key)}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except _CryptoInvalidSignature:
            return False
        return True


class Signer:
    """An Ed25519 note signer; `str()` never shows the seed."""

    __slots__ = ("name", "key_id", "_key", "verifier")

    def __init__(self, name: str, seed: bytes) -> None:
        if not valid_key_name(name):
            raise MalformedKey(f"invalid key name {name!r}")
        if len(seed) != 32:
            raise MalformedKey("an Ed25519 seed is 32 bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.name = name
        self.key_id = key_id(name, public)
        self.verifier = Verifier(name, self.key_id, public)

    @classmethod
    def parse(cls, skey: str) -> Signer:
        """Read a signer key `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>`.

        Raises:
            MalformedKey: the string is not a valid Ed25519 signer key (the message never
                contains the key material).
        """
        parts = skey.split("+", 4)
        if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
            raise MalformedKey("a signer key reads PRIVATE+KEY+name+id+key")
        _, _, name, hex_id, b64 = parts
        kid = _parse_key_id(hex_id)
        try:
            raw = b64decode(b64)
        except ValueError:
            raise MalformedKey("the key part is not base64") from None
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise MalformedKey("the key part is not 0x01 followed by a 32-byte Ed25519 seed")
        signer = cls(name, raw[1:])
        if signer.key_id != kid:
            raise MalformedKey(f"key id {hex_id} does not match the name and key")
        return signer

    @classmethod
    def generate(cls, name: str) -> Signer:
        """A new random key named `name`."""
        seed = Ed25519PrivateKey.generate().private_bytes_raw()
        return cls(name, seed)

    def private_key_string(self) -> str:
        """The signer key string (secret: for configuration only)."""
        seed = bytes([ALG_ED25519]) + self._key.private_bytes_raw()
        return f"PRIVATE+KEY+{self.name}+{self.key_id:08x}+{b64encode(seed)}"

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def derive_secret(self, purpose: bytes) -> bytes:
        """A 32-byte secret for `purpose`, derived from the seed (HKDF-SHA256, RFC 5869):
        other keys of the same holder without more configuration; the seed stays here."""
        return HKDF(algorithm=SHA256(), length=32, salt=None, info=purpose).derive(
            self._key.private_bytes_raw())

    def __repr__(self) -> str:
        return f"Signer({self.verifier})"


def _parse_key_id(hex_id: str) -> int:
    if len(hex_id) != 8 or any(c not in "0123456789abcdefABCDEF" for c in hex_id):
        raise MalformedKey("the key id is not 8 hex digits")
    return int(hex_id, 16)


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature line: key name, key id and the base64 text as written."""

    name: str
    key_id: int
    base64: str


@dataclass(frozen=True, slots=True)
class Note:
    """An opened note: its text and which signatures verified."""

    text: str
    signatures: tuple[Signature, ...]
    unverified: tuple[Signature, ...]


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise MalformedNote("the note text must end with a newline")
    for ch in text:
        if ch < " " and ch != "\n":
            raise MalformedNote(f"the note text holds the control character {ord(ch):#04x}")


def sign_note(text: str, *signers: Signer) -> bytes:
    """Sign `text` with each signer and return the note bytes.

    Raises:
        MalformedNote: the text does not end in a newline or holds a control character.
    """
    _check_text(text)
    if not signers:
        raise ValueError("at least one signer is needed")
    body = text.encode()
    lines = []
    for s in signers:
        sig = s.key_id.to_bytes(4, "big") + s.sign(body)
        lines.append(f"{SIG_PREFIX}{s.name} {b64encode(sig)}\n")
    return body + b"\n" + "".join(lines).encode()


def split_note(msg: bytes) -> tuple[str, list[tuple[Signature, bytes]]]:
    """The text and the parsed signature lines (with raw signature bytes), unverified.

    Raises:
        MalformedNote: the bytes are not a signed note.
    """
    try:
        whole = msg.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedNote("a note must be UTF-8") from None
    for ch in whole:
        if ch < " " and ch != "\n":
            raise MalformedNote(f"the note holds the control character {ord(ch):#04x}")
    split = whole.rfind("\n\n")
    if split < 0:
        raise MalformedNote("no blank line separates the text from the signatures")
    text, sig_block = whole[: split + 1], whole[split + 2 :]
    if not sig_block or not sig_block.endswith("\n"):
        raise MalformedNote("the signature lines must end with a newline")
    lines = sig_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNote(f"more than {MAX_SIGNATURES} signatures")
    sigs: list[tuple[Signature, bytes]] = []
    for line in lines:
        if not line.startswith(SIG_PREFIX):
            raise MalformedNote(f"not a signature line: {line[:60]!r}")
        name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
        if not valid_key_name(name) or not b64:
            raise MalformedNote(f"malformed signature line: {line[:60]!r}")
        try:
            raw = b64decode(b64)
        except ValueError:
            raise MalformedNote(f"signature of {name} is not base64") from None
        if len(raw) < 5:
            raise MalformedNote(f"signature of {name} is too short")
        sigs.append((Signature(name, int.from_bytes(raw[:4], "big"), b64), raw[4:]))
    return text, sigs


def open_note(msg: bytes, verifiers: Iterable[Verifier]) -> Note:
    """Verify a signed note against the known keys and return it.

    Signatures from unknown keys (name and id not both matching) are ignored, as the spec asks;
    a signature from a known key that fails is fatal; at least one known key must have signed.

    Raises:
        MalformedNote: the bytes are not a signed note.
        InvalidSignature: a known key's signature does not verify (text or signature altered).
        UnverifiedNote: no known key signed it.
    """
    known: dict[tuple[str, int], Verifier] = {}
    for v in verifiers:
        if (v.name, v.key_id) in known and known[(v.name, v.key_id)] != v:
            raise MalformedKey(f"ambiguous key {v.name}+{v.key_id:08x}")
        known[(v.name, v.key_id)] = v
    text, sigs = split_note(msg)
    body = text.encode()
    good: list[Signature] = []
    other: list[Signature] = []
    for sig, raw in sigs:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            if sig not in other:
                other.append(sig)
            continue
        if not v.verify(body, raw):
            raise InvalidSignature(f"invalid signature for key {sig.name}+{sig.key_id:08x}")
        if sig not in good:
            good.append(sig)
    if not good:
        names = tuple(f"{s.name}+{s.key_id:08x}" for s in other)
        raise UnverifiedNote(
            "the note is not signed by a known key"
            + (f" (signed by {', '.join(names)})" if names else ""),
            names,
        )
    return Note(text, tuple(good), tuple(other))
