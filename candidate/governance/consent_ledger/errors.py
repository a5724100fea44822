"""Errors of the JetStream consent ledger."""

from __future__ import annotations

from lukhas.errors import LukhasError


class LedgerError(LukhasError):
    """The ledger could not do what was asked."""

    code = "ledger_error"


class LedgerContention(LedgerError):
    """Appends to one subject kept losing the race for its tail; the caller may retry."""

    code = "ledger_contention"

    def __init__(self, pseudonym: str, attempts: int) -> None:
        super().__init__(
            f"consent ledger subject {pseudonym} changed under {attempts} append attempts; "
            "retry the request (with the same idempotency key)"
        )
        self.pseudonym = pseudonym
        self.attempts = attempts
