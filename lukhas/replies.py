"""The reply shapes every endpoint shares: a refusal and an error.

Providers and handlers build replies as plain dicts (the public API returns dicts); these
Structs describe them for the published contract (`lukhas asyncapi`), and the contract tests
check every reply the suite sees against them. A slice declares its own success Structs and,
where its refusals carry more, a `Refusal` subclass, in its `messages.py`.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class ErrorDetail(msgspec.Struct, frozen=True):
    """What went wrong with a request, without a stack trace."""

    #: `invalid_request`, `payload_too_large`, `unavailable`, `internal`, or a slice's own
    #: code (the consent ledger's `idempotency_conflict`, `ledger_corrupt`, ...).
    code: str
    message: str


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True):
    """Bad input or a failure: `{"ok": false, "error": {"code", "message"}}`, sent with the
    nats.micro headers `Nats-Service-Error` (the message) and `Nats-Service-Error-Code`."""

    ok: Literal[False]
    error: ErrorDetail


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """A well-formed request the service declines: `{"ok": false, "reason", ...}`.

    Reasons every endpoint may give: `not_supported` (the serving provider lacks the
    operation) and `overloaded` (waited past its budget; with `retry_after_ms`).
    """

    ok: Literal[False]
    reason: str
    #: The provider that refused, when a provider did.
    provider: str | None = None
    #: A readable explanation.
    message: str | None = None
    #: When a retry may succeed (`rate_limited`, `overloaded`).
    retry_after_ms: int | None = None
