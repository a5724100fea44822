"""Personal data at rest for crypto-shredding: AES-256-GCM under a per-subject data key.

A record's personal data (metadata, free text) is stored only as `Sealed` ciphertext in the
record body. The data key lives outside the stream, wrapped (RFC 3394 AES key wrap) by a key
from configuration; destroying the wrapped data key makes every sealed value of that subject
unreadable, while the leaves (which commit to the ciphertext) and all proofs stay valid.
"""

from __future__ import annotations

import os

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from lukhas.transparency.errors import TransparencyError
from lukhas.transparency.note import b64decode, b64encode

ALG = "A256GCM"


class SealError(TransparencyError):
    """Sealed data could not be opened: wrong or destroyed key, or altered ciphertext."""


class Sealed(msgspec.Struct, frozen=True):
    """Ciphertext as it appears in a record body: `{"alg","kid","nonce","ct"}` (base64)."""

    alg: str
    kid: str
    nonce: str
    ct: str


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal(data_key: bytes, kid: str, plaintext: bytes, aad: bytes = b"") -> Sealed:
    """Encrypt `plaintext` under the subject's data key `kid`; `aad` is bound but not stored."""
    nonce = os.urandom(12)
    ct = AESGCM(data_key).encrypt(nonce, plaintext, kid.encode() + b"\n" + aad)
    return Sealed(ALG, kid, b64encode(nonce), b64encode(ct))


def unseal(data_key: bytes, sealed: Sealed, aad: bytes = b"") -> bytes:
    """Decrypt sealed data.

    Raises:
        SealError: wrong key, wrong `aad`, altered ciphertext or unknown algorithm.
    """
    if sealed.alg != ALG:
        raise SealError(f"unknown sealing algorithm {sealed.alg!r}")
    try:
        return AESGCM(data_key).decrypt(
            b64decode(sealed.nonce), b64decode(sealed.ct), sealed.kid.encode() + b"\n" + aad
        )
    except (InvalidTag, ValueError):
        raise SealError("the sealed data cannot be opened with this key") from None


def wrap_data_key(wrapping_key: bytes, data_key: bytes) -> bytes:
    """RFC 3394 wrap of a data key under the configured wrapping key (16, 24 or 32 bytes)."""
    return aes_key_wrap(wrapping_key, data_key)


def unwrap_data_key(wrapping_key: bytes, wrapped: bytes) -> bytes:
    """Raises: SealError: the wrapped key was altered or wrapped under another key."""
    try:
        return aes_key_unwrap(wrapping_key, wrapped)
    except (InvalidUnwrap, ValueError):
        raise SealError("the data key cannot be unwrapped with this key") from None
