"""The in-process bus: NATS semantics without a network, for DRY_RUN, OFFLINE and tests.

Delivery copies what a NATS server does: every plain subscriber whose subject pattern
matches gets the message, each queue group gets it once (members take turns), and a
subscriber that does not keep up loses messages rather than slowing the publisher.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Literal

import anyio
from anyio.lowlevel import checkpoint
from anyio.streams.memory import MemoryObjectSendStream

from bus._subject import (
    matches,
    normalize_headers,
    validate_pattern,
    validate_queue,
    validate_subject,
)
from bus._subscription import ConsumedSubscription
from bus._throttle import LogThrottle
from bus._types import (
    DEFAULT_MAX_PENDING,
    BusStatistics,
    Envelope,
    Headers,
    SubscriptionStatistics,
)
from bus.errors import BusClosed, NoResponders, PayloadTooLarge, RequestTimeout

__all__ = ["MemoryBus", "MemorySubscription", "open_memory_bus"]

logger = logging.getLogger(__name__)

#: The default `max_payload` of nats-server, so oversized bodies fail here as they would there.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
#: Prefix of private reply subjects, the one nats-py uses.
INBOX_PREFIX = "_INBOX."

_State = Literal["active", "draining", "closed"]


class MemorySubscription(ConsumedSubscription):
    """One subscription on a `MemoryBus`; open it with `MemoryBus.subscribe`."""

    def __init__(self, bus: MemoryBus, subject: str, queue: str | None, max_pending: int) -> None:
        super().__init__()
        self.subject = subject
        self.queue = queue
        self._bus = bus
        self._pattern = validate_pattern(subject)
        self._max_pending = max_pending
        send, receive = anyio.create_memory_object_stream[Envelope](max_pending)
        self._send = send
        self._receive = receive
        self._state: _State = "active"
        self._delivered = 0
        self._dropped = 0

    def __repr__(self) -> str:
        return f"<MemorySubscription {self.subject!r} queue={self.queue!r} {self._state}>"

    async def unsubscribe(self) -> None:
        """Stop at once, discarding anything still buffered."""
        self._close()
        await checkpoint()

    async def drain(self) -> None:
        """Stop new deliveries; iteration yields what is buffered, then ends."""
        self._stop_delivery()
        await checkpoint()

    def statistics(self) -> SubscriptionStatistics:
        pending = 0 if self._state == "closed" else self._receive.statistics().current_buffer_used
        return SubscriptionStatistics(
            subject=self.subject,
            queue=self.queue,
            pending=pending,
            max_pending=self._max_pending,
            delivered=self._delivered,
            dropped=self._dropped,
        )

    # -- used by MemoryBus -------------------------------------------------------------

    async def _take(self) -> Envelope:
        if self._state == "closed":
            raise StopAsyncIteration
        try:
            envelope = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._settled.set()
            raise StopAsyncIteration from None
        if self._closed():  # unsubscribed while we were waiting: discard
            raise StopAsyncIteration
        self._delivered += 1
        return envelope

    def _take_ready(self, limit: int) -> list[Envelope]:
        envelopes: list[Envelope] = []
        if self._state == "closed":
            return envelopes
        receive = self._receive
        try:
            while len(envelopes) < limit:
                envelopes.append(receive.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            pass
        self._delivered += len(envelopes)
        return envelopes

    def _closed(self) -> bool:
        # A method, so a type checker does not carry the narrowing above across the await.
        return self._state == "closed"

    def _check_settled(self) -> None:
        if self._state == "active" or self._in_hand:
            return
        if self._state == "closed" or self._receive.statistics().current_buffer_used == 0:
            self._settled.set()

    def _wants(self, tokens: tuple[str, ...]) -> bool:
        return self._state == "active" and matches(self._pattern, tokens)

    def _offer(self, envelope: Envelope) -> None:
        """Hand over one message without waiting; a full buffer drops it, as NATS does."""
        try:
            self._send.send_nowait(envelope)
        except anyio.WouldBlock:
            self._dropped += 1
            self._bus._count_drop(self)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # closed between matching and sending: nobody left to deliver to

    def _stop_delivery(self) -> None:
        if self._state == "active":
            self._state = "draining"
            # Closing the only send end lets iteration drain the buffer, then end.
            self._send.close()
            self._check_settled()

    def _close(self) -> None:
        if self._state != "closed":
            self._state = "closed"
            self._bus._forget(self)
            self._send.close()
            self._receive.close()
        self._settled.set()


class MemoryBus:
    """A `Bus` inside one process; open it with `open_memory_bus()`."""

    backend = "memory"

    def __init__(
        self, *, drain_timeout: float = 10.0, max_payload: int = DEFAULT_MAX_PAYLOAD
    ) -> None:
        self._drain_timeout = drain_timeout
        self._max_payload = max_payload
        # Every subscription not yet closed; only the active ones are routed to.
        self._subs: list[MemorySubscription] = []
        self._inboxes: dict[str, MemoryObjectSendStream[Envelope]] = {}
        self._turns: dict[str, itertools.count[int]] = {}
        self._draining = False
        self._closed = False
        self._published = 0
        self._dropped = 0
        self._slow_log = LogThrottle(1.0)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "draining" if self._draining else "open"
        return f"<MemoryBus {state} subscriptions={len(self._subs)}>"

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def publish(
        self, subject: str, data: bytes, *, headers: Headers | None = None, reply: str | None = None
    ) -> None:
        """Deliver one message to every matching subscription; never waits for them.

        Raises:
            BusClosed: the bus is closed.
            InvalidSubject: `subject` or `reply` is not a literal subject.
            InvalidHeader: a header name is not a valid token.
            PayloadTooLarge: `data` is larger than `max_payload`.
        """
        self._check_open()
        validate_subject(subject)
        if reply is not None:
            validate_subject(reply)
        if len(data) > self._max_payload:
            raise PayloadTooLarge(len(data), self._max_payload)
        envelope = Envelope(
            subject=subject,
            data=bytes(data),
            # One read-only mapping shared by every receiver, so none can change another's.
            headers=MappingProxyType(normalize_headers(headers)),
            reply=reply,
        )
        self._published += 1
        self._route(envelope)
        # A publish never blocks, but it must still let other tasks run and see cancellation.
        await checkpoint()

    async def publish_batch(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Deliver several header-less messages in order, as `publish()` each would.

        Every subject and size is checked before anything is delivered.

        Raises:
            BusClosed: the bus is closed.
            InvalidSubject: a subject is not a literal subject.
            PayloadTooLarge: a message is larger than `max_payload`.
        """
        self._check_open()
        batch = list(messages)
        for subject, data in batch:
            validate_subject(subject)
            if len(data) > self._max_payload:
                raise PayloadTooLarge(len(data), self._max_payload)
        for subject, data in batch:
            self._published += 1
            self._route(
                Envelope(subject=subject, data=bytes(data), headers=MappingProxyType({}))
            )
        await checkpoint()

    @asynccontextmanager
    async def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> AsyncIterator[MemorySubscription]:
        """Subscribe to `subject` (`*` and `>` allowed), optionally in a queue group.

        Raises:
            BusClosed: the bus is closed or draining.
            InvalidSubject: the subject or queue name is malformed.
            ValueError: `max_pending` is below 1.
        """
        self._check_accepting()
        validate_queue(queue)
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        sub = MemorySubscription(self, subject, queue, max_pending)
        self._subs.append(sub)
        try:
            await checkpoint()
            yield sub
        finally:
            sub._close()

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Headers | None = None,
        timeout: float = 2.0,  # noqa: ASYNC109
    ) -> Envelope:
        """Send a request on a private `_INBOX.` reply subject and wait for the first reply.

        Raises:
            NoResponders: nobody is subscribed to `subject`.
            RequestTimeout: no reply within `timeout` seconds.
            BusClosed: the bus is closed or draining.
            InvalidSubject: the subject is malformed.
        """
        self._check_accepting()
        validate_subject(subject)
        tokens = tuple(subject.split("."))
        if not any(sub._wants(tokens) for sub in self._subs):
            # What nats-server answers at once (a 503 status) when interest is missing.
            await checkpoint()
            raise NoResponders(subject)
        inbox = self.new_inbox()
        send, receive = anyio.create_memory_object_stream[Envelope](1)
        self._inboxes[inbox] = send
        try:
            with send, receive:
                await self.publish(subject, data, headers=headers, reply=inbox)
                with anyio.move_on_after(timeout):
                    try:
                        return await receive.receive()
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        raise BusClosed() from None
                raise RequestTimeout(subject, timeout)
        finally:
            self._inboxes.pop(inbox, None)

    def new_inbox(self) -> str:
        """A fresh `_INBOX.` reply subject (the memory bus has no users or permissions)."""
        return INBOX_PREFIX + secrets.token_hex(11)

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Return once everything published so far is delivered (always true here).

        Raises:
            BusClosed: the bus is closed.
        """
        self._check_open()
        await checkpoint()

    async def drain(self) -> None:
        """Stop every subscription, let consumers take what is buffered, then close.

        Waits up to `drain_timeout` seconds until every consumer has taken what was
        buffered and finished the message in hand (an `async for` loop has come back
        for more), or closed its subscription. Publishing still works meanwhile, so
        handlers can answer the requests they were given.
        """
        if self._closed or self._draining:
            await checkpoint()
            return
        self._draining = True
        try:
            subs = list(self._subs)
            for sub in subs:
                sub._stop_delivery()
            with anyio.move_on_after(self._drain_timeout) as scope:
                for sub in subs:
                    await sub._settled.wait()
            if scope.cancelled_caught:
                logger.warning(
                    "bus drain timed out after %.1fs; discarding what is still buffered",
                    self._drain_timeout,
                )
        finally:
            await self.close()

    async def close(self) -> None:
        """Close at once; buffered messages are discarded and iterations end."""
        if not self._closed:
            self._closed = True
            for sub in list(self._subs):
                sub._close()
            for send in list(self._inboxes.values()):
                send.close()
            self._inboxes.clear()
        await checkpoint()

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            backend=self.backend,
            published=self._published,
            subscriptions=len(self._subs),
            dropped=self._dropped,
            reconnects=0,
        )

    # -- internals -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed()

    def _check_accepting(self) -> None:
        if self._closed or self._draining:
            raise BusClosed()

    def _route(self, envelope: Envelope) -> None:
        tokens = tuple(envelope.subject.split("."))
        groups: dict[str, list[MemorySubscription]] = {}
        for sub in self._subs:
            if not sub._wants(tokens):
                continue
            if sub.queue is None:
                sub._offer(envelope)
            else:
                groups.setdefault(sub.queue, []).append(sub)
        for name, members in groups.items():
            turn = next(self._turns.setdefault(name, itertools.count()))
            members[turn % len(members)]._offer(envelope)
        inbox = self._inboxes.get(envelope.subject)
        if inbox is not None:
            try:
                inbox.send_nowait(envelope)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # a request takes only the first reply, as with NATS

    def _forget(self, sub: MemorySubscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def _count_drop(self, sub: MemorySubscription) -> None:
        self._dropped += 1
        if self._slow_log.allow(id(sub)):
            logger.warning(
                "slow consumer on %r: buffer of %d full, %d message(s) dropped so far",
                sub.subject,
                sub._max_pending,
                sub._dropped,
            )


@asynccontextmanager
async def open_memory_bus(
    *, drain_timeout: float = 10.0, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> AsyncIterator[MemoryBus]:
    """Open an in-process bus; it is closed (buffers discarded) when the block exits.

    Args:
        drain_timeout: how long `drain()` waits for consumers to empty their buffers.
        max_payload: the largest body accepted, like nats-server's `max_payload`.
    """
    bus = MemoryBus(drain_timeout=drain_timeout, max_payload=max_payload)
    try:
        yield bus
    finally:
        await bus.close()
