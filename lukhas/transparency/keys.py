"""The ledger signing key: read from configuration, never from NATS; its public verifier key.

`LUKHAS_LEDGER_SIGNING_KEY` holds a signed-note signer key,
`PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>` (as golang.org/x/mod/sumdb/note and
`lukhas consent keygen` make). The key name is the log's origin. The verifier key that third
parties need is `lukhas consent vkey`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets

from lukhas.errors import ConfigError
from lukhas.transparency.errors import MalformedKey
from lukhas.transparency.note import Signer

logger = logging.getLogger(__name__)

VARIABLE = "LUKHAS_LEDGER_SIGNING_KEY"
#: The key wrapping the per-subject data keys that erasure destroys.
WRAPPING_VARIABLE = "LUKHAS_LEDGER_WRAPPING_KEY"
#: Key names under this prefix would collide with the record and receipt note headers.
RESERVED_PREFIX = "lukhas/"
#: Private keys published in test vectors (golang.org/x/mod/sumdb/note): never for production.
PUBLISHED_KEY_IDS = frozenset({("PeterNeumann", 0xC74F20A3)})
DRY_RUN_NAME = "dry-run.lukhas.invalid/consent"


def parse_signing_key(raw: str, *, dry_run: bool) -> Signer:
    """The signer from a LUKHAS_LEDGER_SIGNING_KEY value.

    Raises:
        ConfigError: not a signer key, a reserved name, or (outside DRY_RUN) a published key.
            The message never contains the key.
    """
    try:
        signer = Signer.parse(raw.strip())
    except MalformedKey as exc:
        raise ConfigError(VARIABLE, "<hidden>", f"a note signer key ({exc})") from None
    if signer.name.startswith(RESERVED_PREFIX):
        raise ConfigError(VARIABLE, "<hidden>", f"a key name not starting with {RESERVED_PREFIX}")
    if not dry_run and (signer.name, signer.key_id) in PUBLISHED_KEY_IDS:
        raise ConfigError(VARIABLE, "<hidden>", "a key of your own, not a published test key")
    return signer


def ledger_signer(raw: str | None, *, dry_run: bool, ledger_enabled: bool) -> Signer:
    """The key that signs records, checkpoints and receipts.

    Unset: in DRY_RUN or with the ledger off, a random per-process key (proofs then only verify
    for this process's lifetime); with the real ledger on, a ConfigError, since there is no
    default key.

    Raises:
        ConfigError: the key is missing where it is required, or unusable.
    """
    if raw is not None and raw.strip():
        return parse_signing_key(raw, dry_run=dry_run)
    if ledger_enabled and not dry_run:
        raise ConfigError(
            VARIABLE, "",
            "a note signer key (make one with `lukhas consent keygen <origin>`): the consent "
            "ledger signs its checkpoints with it and has no default key",
        )
    logger.warning("%s unset: signing with a random key for this process only", VARIABLE)
    return Signer.generate(DRY_RUN_NAME)


def parse_wrapping_key(raw: str) -> bytes:
    """The wrapping key from a LUKHAS_LEDGER_WRAPPING_KEY value: base64 of 16, 24 or 32 bytes.

    Raises:
        ConfigError: not such a key (the message never contains the value).
    """
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) not in (16, 24, 32):
        raise ConfigError(WRAPPING_VARIABLE, "<hidden>",
                          "base64 of a 16, 24 or 32-byte key (e.g. `openssl rand -base64 32`)")
    return key


def ledger_wrapping_key(raw: str | None, *, dry_run: bool, ledger_enabled: bool) -> bytes:
    """The key wrapping the ledger's per-subject data keys (never stored in NATS).

    Unset: in DRY_RUN or with the ledger off, a random per-process key; with the real ledger
    on, a ConfigError (no default: a default key would make erasure meaningless).
    """
    if raw is not None and raw.strip():
        return parse_wrapping_key(raw)
    if ledger_enabled and not dry_run:
        raise ConfigError(
            WRAPPING_VARIABLE, "",
            "base64 of a 32-byte key (e.g. `openssl rand -base64 32`): it wraps the data keys "
            "erasure destroys, and has no default",
        )
    return secrets.token_bytes(32)
