"""Errors raised by every bus backend alike."""

from __future__ import annotations


class BusError(Exception):
    """Base class of every bus error."""


class BusClosed(BusError):
    """The bus (or subscription) is closed or draining, so it cannot do this."""

    def __init__(self, what: str = "bus") -> None:
        super().__init__(f"{what} is closed")
        self.what = what


class InvalidSubject(BusError, ValueError):
    """A subject that NATS would refuse (empty tokens, spaces, misplaced wildcards)."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"invalid subject {subject!r}: {reason}")
        self.subject = subject
        self.reason = reason


class InvalidHeader(BusError, ValueError):
    """A header name that cannot go on the wire (not an RFC 7230 token)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"invalid header name {key!r}")
        self.key = key


class PayloadTooLarge(BusError, ValueError):
    """A message body larger than the server accepts (NATS `max_payload`, 1 MiB by default)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


class NoResponders(BusError):
    """A request found nobody subscribed to its subject."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"no responders on {subject!r}")
        self.subject = subject


class RequestTimeout(BusError, TimeoutError):
    """No reply (or message) arrived within the deadline."""

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(f"no reply on {subject!r} within {timeout:g}s")
        self.subject = subject
        self.timeout = timeout


class SlowConsumer(BusError):
    """A subscription's pending buffer was full, so a message was dropped."""

    def __init__(self, subject: str, dropped: int) -> None:
        super().__init__(f"slow consumer on {subject!r}: {dropped} message(s) dropped")
        self.subject = subject
        self.dropped = dropped


class BusConnectError(BusError):
    """The bus could not be reached (e.g. no NATS server at the configured URL)."""

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"cannot connect to NATS at {url}: {cause}")
        self.url = url
        self.cause = cause


class PermissionDenied(BusError):
    """The NATS server refused this user an operation on a subject (a permissions violation).

    Raised by `subscribe` (the server refused the subscription), `request` (it refused the
    publish, or the subscription to this connection's inbox prefix) and `flush` (it refused
    a publish made on this connection before the flush). The in-memory bus has no users
    and never raises it.
    """

    def __init__(self, operation: str, subject: str, *, queue: str | None = None) -> None:
        target = f"{subject!r} (queue {queue!r})" if queue else repr(subject)
        hint = ""
        if operation == "subscribe" and subject.lower().startswith("_inbox"):
            hint = "; set NATS_INBOX_PREFIX to the inbox prefix this NATS user may read"
        super().__init__(
            f"permission denied: this NATS user may not {operation} "
            f"{'to ' if operation == 'publish' else ''}{target}{hint}"
        )
        self.operation = operation
        self.subject = subject
        self.queue = queue


class JetStreamUnavailable(BusError):
    """JetStream was asked of a bus that has none (the in-memory bus)."""

    def __init__(self, backend: str) -> None:
        super().__init__(
            f"JetStream needs a NATS bus, and this bus is {backend!r} "
            "(unset LUKHAS_OFFLINE and give NATS_URL, or let `lukhas up` start a server)"
        )
        self.backend = backend
