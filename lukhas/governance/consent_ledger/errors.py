"""Errors of the consent slice; each `code` is the wire error code of its reply."""

from __future__ import annotations

from lukhas.errors import LukhasError


class ConsentError(LukhasError):
    """A consent request the ledger cannot carry out as asked."""

    code = "consent_error"


class IdempotencyConflict(ConsentError):
    """An idempotency key was reused for a different request (action, scope or metadata).

    A duplicate is only ever a retry of the same request; anything else under a used key
    would be silently dropped, so it is refused instead.
    """

    code = "idempotency_conflict"

    def __init__(self, *, action: str, scope: str, seq: int) -> None:
        super().__init__(
            f"this idempotency_key was already used for a different request (the {action} of "
            f"scope {scope!r} recorded at seq {seq}); a retry must repeat the same action, "
            "scope and metadata, and a new request needs a new key"
        )
        self.action = action
        self.scope = scope
        self.seq = seq
