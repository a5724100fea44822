"""Seal a raw user id into a challenge record so the verify reply can name the account.

The id is encrypted with AES-256-GCM under a key derived from the pseudonym key (the
pseudonymizer's HMAC of a reserved, domain-separating input), bound to the challenge as
associated data. An insider who reads the challenge bucket sees only ciphertext, and the
record expires with its challenge; nothing raw is stored. Sealing uses the current key,
opening tries every key version, so a challenge issued just before a rotation still opens.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from candidate.identity.passkey._ceremony import b64url, from_b64url

#: Never a user id: the pseudonymizer's output for it is key material, not a pseudonym.
_DERIVATION_INPUT = "\x00lukhas.passkey.seal.v1\x00"
_NONCE_BYTES = 12


class UserSealer:
    """Encrypt/decrypt user ids under keys derived from every pseudonym key version."""

    def __init__(self, pseudonymize: Callable[[str], str] | Any) -> None:
        versions = getattr(pseudonymize, "all_versions", None)
        outputs = versions(_DERIVATION_INPUT) if versions else (pseudonymize(_DERIVATION_INPUT),)
        self._keys = tuple(
            AESGCM(hashlib.sha256(b"lukhas.passkey.seal\x00" + out.encode()).digest())
            for out in outputs
        )

    def seal(self, user_id: str, challenge: bytes) -> str:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return b64url(nonce + self._keys[0].encrypt(nonce, user_id.encode(), challenge))

    def open(self, sealed: str | None, challenge: bytes) -> str | None:
        """The user id, or None when there is none or no key version opens it."""
        if not sealed:
            return None
        raw = from_b64url(sealed, "sealed user")
        nonce, body = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        for key in self._keys:
            try:
                return key.decrypt(nonce, body, challenge).decode()
            except (InvalidTag, ValueError, UnicodeDecodeError):
                continue
        return None
