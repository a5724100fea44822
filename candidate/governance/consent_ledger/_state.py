"""The consent state view and how it is checked against the ledger. Pure functions, no I/O.

The KV bucket holds, per (data subject, scope), the state the scope's latest ledger record
set, with that record's stream `seq` and `hash`. It is derived: the stream is the truth. A
value is consistent only if it equals what the scope's latest record says; anything else is
a mismatch (an in-flight or crashed write leaves it `behind`, an insider's edit leaves it
differing), and readers answer from the stream.
"""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Any

import msgspec

from candidate.governance.consent_ledger import _chain


class StateValue(msgspec.Struct, frozen=True, kw_only=True):
    """The KV value of one (subject, scope): the ledger record that last changed it."""

    status: str
    ts: int
    seq: int
    hash: str
    expires_at: int | None = None


#: A KV value that is not a `StateValue` (written by someone bypassing the ledger).
MALFORMED = "malformed"

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StateValue)


def encode(state: StateValue) -> bytes:
    return _encoder.encode(state)


def decode(data: bytes | None) -> StateValue | str:
    """The stored state, or `MALFORMED`."""
    try:
        return _decoder.decode(data or b"")
    except msgspec.DecodeError:
        return MALFORMED


def of_record(seq: int, record: dict[str, Any]) -> StateValue:
    """The state a ledger record sets."""
    return StateValue(
        status="revoked" if record.get("action") in ("revoke", "refuse") else "granted",
        ts=int(record.get("ts", 0)),
        seq=seq,
        hash=str(record.get("hash", "")),
        expires_at=record.get("expires_at"),
    )


@functools.lru_cache(maxsize=4096)
def scope_token(scope: str) -> str:
    """base64url(scope) without padding: scopes may hold `.`, `:` and `/`, which subject
    tokens and KV keys may not. (Cached: a ledger sees few distinct scopes.)"""
    return base64.urlsafe_b64encode(scope.encode("utf-8")).rstrip(b"=").decode("ascii")


def scope_of_token(token: str) -> str | None:
    """The scope a token encodes, or None if it encodes none."""
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def key(pseudonym: str, scope: str) -> str:
    """`<pseudonym>.<scope token>`: the KV key of one (subject, scope)."""
    return f"{pseudonym}.{scope_token(scope)}"


def record_problem(record: dict[str, Any] | None, *, pseudonym: str, scope: str) -> str | None:
    """Why a record read from `pseudonym`'s `scope` subject cannot be answered from."""
    if record is None or not isinstance(record.get("hash"), str):
        return "malformed"
    if record.get("pseudonym") != pseudonym:
        return "wrong_subject"
    if record.get("scope") != scope:
        return "wrong_scope"
    if record.get("action") not in ("grant", "revoke"):
        return "unknown_action"
    try:
        if _chain.digest(record) != record["hash"]:
            return "hash_mismatch"
    except (TypeError, ValueError):
        return "malformed"
    return None


def mismatch(
    state: StateValue | str | None, seq: int | None, record: dict[str, Any] | None
) -> str | None:
    """How a KV state disagrees with the scope's latest ledger record (`seq`, `record`), or
    None when it agrees. Both None means neither exists, which agrees."""
    if state == MALFORMED:
        return "state_malformed"
    if seq is None or record is None:
        return None if state is None else "state_without_record"
    if state is None:
        return "state_missing"
    assert isinstance(state, StateValue)
    if state.seq < seq:
        return "state_behind"
    if state.seq > seq:
        return "state_ahead"
    expected = of_record(seq, record)
    for field in ("hash", "status", "ts", "expires_at"):
        if getattr(state, field) != getattr(expected, field):
            return f"{field}_differs"
    return None
