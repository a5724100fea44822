"""The shared vocabulary of the bus: envelopes, statistics and the `Bus` protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

Headers = Mapping[str, str]

#: Default bound on messages buffered for one subscription before overflow drops.
DEFAULT_MAX_PENDING = 65_536
#: Default bound on bytes buffered for one subscription before overflow drops.
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Envelope:
    """One delivered message: what arrived on which subject, and where to answer."""

    subject: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    reply: str | None = None


class SubscriptionStatistics(NamedTuple):
    """A snapshot of one subscription's buffer."""

    subject: str
    queue: str | None
    pending: int
    max_pending: int
    delivered: int
    dropped: int


class BusStatistics(NamedTuple):
    """A snapshot of a whole bus connection."""

    backend: str
    published: int
    subscriptions: int
    dropped: int
    reconnects: int


# The `timeout` parameters below (ruff ASYNC109) are deliberate: a deadline that ends in
# `RequestTimeout` is part of the bus semantics NATS defines, not a caller's cancel scope.


@runtime_checkable
class Subscription(Protocol):
    """A live interest in a subject; iterate it to receive envelopes.

    Iteration ends once the subscription is drained or unsubscribed, or the bus closes.
    """

    subject: str
    queue: str | None

    def __aiter__(self) -> AsyncIterator[Envelope]: ...

    async def next(self, timeout: float | None = None) -> Envelope:  # noqa: ASYNC109
        """Wait for the next envelope.

        Raises:
            RequestTimeout: nothing arrived within `timeout` seconds.
            BusClosed: the subscription ended.
        """
        ...

    def take_ready(self, limit: int) -> list[Envelope]:
        """Up to `limit` envelopes already buffered, oldest first, without waiting (empty
        when none); iteration's end and refusals show at the next `async for` step."""
        ...

    async def unsubscribe(self) -> None:
        """Stop at once, discarding anything still buffered."""
        ...

    async def drain(self) -> None:
        """Stop new deliveries; iteration yields what is buffered, then ends."""
        ...

    def statistics(self) -> SubscriptionStatistics: ...


@runtime_checkable
class Bus(Protocol):
    """Publish/subscribe/request over subjects, with the same semantics on every backend."""

    backend: str

    @property
    def is_closed(self) -> bool: ...

    async def publish(
        self, subject: str, data: bytes, *, headers: Headers | None = None, reply: str | None = None
    ) -> None:
        """Send one message; never waits for subscribers.

        Publishing still works while `drain()` empties the subscriptions, so handlers can
        answer the requests that were buffered; it fails once the bus has closed.

        Raises:
            BusClosed: the bus is closed.
            InvalidSubject: the subject is empty or holds wildcards or spaces.
            InvalidHeader: a header name is not a valid token.
        """
        ...

    async def publish_batch(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Send several header-less `(subject, data)` messages in order, cheaper than one
        `publish()` each; all are checked before any is sent.

        Raises:
            BusClosed: the bus is closed.
            InvalidSubject: a subject holds wildcards, spaces or empty tokens.
            PayloadTooLarge: a message is larger than the server allows.
        """
        ...

    def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe to `subject` (`*` and `>` wildcards allowed), optionally in a queue group.

        The subscription is live on the server when the context manager has entered.

        Raises:
            PermissionDenied: (NATS) the server refused the subscription.
        """
        ...

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Headers | None = None,
        timeout: float = 2.0,  # noqa: ASYNC109
    ) -> Envelope:
        """Send a request and wait for the first reply.

        Raises:
            NoResponders: nobody is subscribed to `subject`.
            RequestTimeout: no reply within `timeout` seconds.
            BusClosed: the bus is closed.
            PermissionDenied: (NATS) the server refused the request or its inbox.
        """
        ...

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until everything published so far has reached the server.

        Raises:
            PermissionDenied: (NATS) the server refused a publish made before the flush.
        """
        ...

    def new_inbox(self) -> str:
        """A fresh reply subject under this connection's inbox prefix (for hand-made
        request patterns such as discovery pings, which gather several replies)."""
        ...

    async def drain(self) -> None:
        """Stop subscriptions, deliver what they buffered, flush, then close."""
        ...

    async def close(self) -> None:
        """Close at once; buffered messages are discarded."""
        ...

    def statistics(self) -> BusStatistics: ...
