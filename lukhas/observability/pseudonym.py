"""Keyed pseudonyms: the only form a data subject may take in logs, subjects or MATRIZ.

Keys are versioned so they can be rotated without orphaning data. The current key (the first
of `LUKHAS_PSEUDONYM_KEYS`) makes every new pseudonym; earlier keys stay listed so readers can
still find what was written under them (`all_versions`). See the README's rotation procedure.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Sequence

logger = logging.getLogger(__name__)

PREFIX = "psn_"

#: Fewer characters than this is not a secret key (128 bits as hex).
MIN_KEY_LENGTH = 32
#: Keys that were ever published (examples, old compose defaults): never accepted for real data.
KNOWN_PUBLIC_KEYS = frozenset({
    "change-me-in-production",
    "changeme",
    "secret",
    "test-pseudonym-key",
})


def key_problem(key: str) -> str | None:
    """Why `key` cannot protect real data, or None when it can."""
    if key in KNOWN_PUBLIC_KEYS:
        return "a secret key, not a published example"
    if len(key) < MIN_KEY_LENGTH:
        return f"a secret key of at least {MIN_KEY_LENGTH} characters (e.g. `openssl rand -hex 32`)"
    return None


class Pseudonymizer:
    """Maps a raw user id to `psn_<32 hex>` with HMAC-SHA256 under a secret key.

    The same key gives the same pseudonym in every worker and across restarts, which the
    real providers need (durable state is keyed by pseudonym). Without a key a random one is
    drawn per process: fine for DRY_RUN, useless for anything durable.

    `previous` holds earlier keys, newest first: `__call__` always uses the current key,
    `all_versions` lists the pseudonym under every key so data written before a rotation
    stays reachable.
    """

    __slots__ = ("_keys", "_macs", "ephemeral")

    def __init__(
        self,
        key: str | bytes | None,
        *,
        previous: Sequence[str | bytes] = (),
        warn: bool = True,
    ) -> None:
        self.ephemeral = key is None
        if key is None:
            if warn:
                logger.warning(
                    "LUKHAS_PSEUDONYM_KEYS is not set: using a random per-process key, so "
                    "pseudonyms will differ between workers and restarts"
                )
            key = secrets.token_bytes(32)
        self._keys = tuple(k.encode() if isinstance(k, str) else k for k in (key, *previous))
        # Keyed once: each pseudonym copies a key's HMAC state instead of keying it again.
        self._macs = tuple(hmac.new(k, digestmod=hashlib.sha256) for k in self._keys)

    def __call__(self, user_id: str) -> str:
        """The pseudonym under the current key."""
        return _pseudonym(self._macs[0], user_id)

    def all_versions(self, user_id: str) -> tuple[str, ...]:
        """The pseudonym under every key, current first, then earlier keys newest first."""
        return tuple([_pseudonym(mac, user_id) for mac in self._macs])

    @property
    def versions(self) -> int:
        """How many keys are configured (1 without rotation)."""
        return len(self._keys)

    def __repr__(self) -> str:  # never print a key
        return f"Pseudonymizer(ephemeral={self.ephemeral}, versions={self.versions})"


def _pseudonym(keyed: hmac.HMAC, user_id: str) -> str:
    mac = keyed.copy()
    mac.update(user_id.encode("utf-8", "surrogatepass"))
    return PREFIX + mac.digest()[:16].hex()
