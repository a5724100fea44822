"""Errors of the JetStream consent ledger."""

from __future__ import annotations

from collections.abc import Sequence

from lukhas.errors import LukhasError
from lukhas.governance.consent_ledger.errors import ConsentError


class LedgerError(ConsentError):
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


class LedgerCorrupt(LedgerError):
    """The record the answer depends on is not a valid ledger record (see `verify`)."""

    code = "ledger_corrupt"

    def __init__(self, pseudonym: str, seq: int, problem: str) -> None:
        super().__init__(
            f"consent record seq {seq} of {pseudonym} is not a valid ledger record "
            f"({problem}); the ledger cannot answer from it: run verify"
        )
        self.pseudonym = pseudonym
        self.seq = seq
        self.problem = problem


class LedgerTampered(LedgerError):
    """The stream, tree tiles or kept checkpoint disagree with what the ledger key signed:
    the writer refuses to append or sign on top of it (run verify)."""

    code = "ledger_tampered"

    def __init__(self, problem: str) -> None:
        super().__init__(f"consent ledger refuses to write: {problem}; run verify")
        self.problem = problem


class LedgerStreamWeakened(LukhasError):
    """At startup the ledger's stream lacks a protection records depend on; not served."""

    code = "ledger_stream_weakened"

    def __init__(self, stream: str, gaps: Sequence[str]) -> None:
        super().__init__(
            f"consent ledger stream {stream} has a weakened config: {'; '.join(gaps)}. "
            "Refusing to serve the ledger on it: restore the protective config (an operator "
            "decision; records may already be lost) and restart"
        )
        self.stream = stream
        self.gaps = tuple(gaps)
