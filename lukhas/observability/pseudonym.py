"""Keyed pseudonyms: the only form a data subject may take in logs, subjects or MATRIZ."""

from __future__ import annotations

import hmac
import logging
import secrets

logger = logging.getLogger(__name__)

PREFIX = "psn_"


class Pseudonymizer:
    """Maps a raw user id to `psn_<32 hex>` with HMAC-SHA256 under a secret key.

    The same key gives the same pseudonym in every worker and across restarts, which the
    real ledger needs (its subjects are keyed by pseudonym). Without a key a random one is
    drawn per process: fine for DRY_RUN, useless for anything durable.
    """

    __slots__ = ("_key", "ephemeral")

    def __init__(self, key: str | bytes | None, *, warn: bool = True) -> None:
        self.ephemeral = key is None
        if key is None:
            if warn:
                logger.warning(
                    "LUKHAS_PSEUDONYM_KEY is not set: using a random per-process key, so "
                    "pseudonyms will differ between workers and restarts"
                )
            key = secrets.token_bytes(32)
        self._key = key.encode() if isinstance(key, str) else key

    def __call__(self, user_id: str) -> str:
        digest = hmac.digest(self._key, user_id.encode("utf-8", "surrogatepass"), "sha256")
        return PREFIX + digest[:16].hex()

    def __repr__(self) -> str:  # never print the key
        return f"Pseudonymizer(ephemeral={self.ephemeral})"
