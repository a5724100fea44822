"""The NATS backend: a thin `Bus` over a nats-py client. The only module that imports `nats`.

Messages are read in the caller's task from each subscription's own bounded pending
queue (never `subscribe(cb=...)`, whose tasks nats-py owns). Overflow is dropped by
nats-py, reported to `error_cb` as `SlowConsumerError`, and counted here per subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import nats.errors
from anyio.lowlevel import checkpoint
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as RawSubscription
from nats.js import JetStreamContext
from nats.js.api import StreamConfig, StreamInfo
from nats.js.errors import APIError, NotFoundError

from bus._subject import normalize_headers, validate_pattern, validate_queue, validate_subject
from bus._subscription import ConsumedSubscription
from bus._throttle import LogThrottle
from bus._types import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_BYTES,
    BusStatistics,
    Envelope,
    Headers,
    SubscriptionStatistics,
)
from bus.errors import (
    BusClosed,
    BusConnectError,
    BusError,
    InvalidHeader,
    InvalidSubject,
    NoResponders,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
    StreamWeakened,
)

__all__ = [
    "NatsBus", "NatsSubscription", "ensure_stream", "open_nats_bus", "stream_weaknesses",
]

logger = logging.getLogger(__name__)

# nats-py retries a server `max_reconnect_attempts + 1` times before giving up. The
# first connect uses this small bound so a missing server fails in well under a
# second; once connected, the caller's (unbounded by default) setting takes over.
_FIRST_CONNECT_RETRIES = 1
_FIRST_CONNECT_RETRY_WAIT = 0.1
#: Subjects remembered as valid by `NatsBus._check_subject` (cleared when full).
_VALID_SUBJECTS_KEPT = 4096
# nats-py can wait forever closing a socket whose TLS handshake failed (it awaits the
# pre-TLS stream's `wait_closed()`), so the first connect, and the close after it fails,
# get deadlines of their own.
_CLOSE_TIMEOUT = 2.0

# JetStream's "stream name already in use" (another creator got there first).
_STREAM_NAME_IN_USE = 10058

_Phase = Literal["active", "draining", "drained", "closed"]

# nats-py hands the server's `-ERR 'Permissions Violation for Publish to "x"'` (or
# `... for Subscription to "x" using queue "q"`) to error_cb, lower-cased.
_VIOLATION = re.compile(
    r'permissions violation for (publish|subscription) to "([^"]*)"(?: using queue "([^"]*)")?'
)


class _PendingRequest:
    """A request in flight: `_on_error` cancels it when the server refuses its publish."""

    __slots__ = ("denied", "scope", "subject")

    def __init__(self, subject: str, scope: anyio.CancelScope) -> None:
        self.subject = subject
        self.scope = scope
        self.denied: PermissionDenied | None = None


@contextmanager
def _translated(subject: str = "", timeout: float = 0.0) -> Iterator[None]:
    """Turn nats-py errors into the bus's own, so callers never import `nats`."""
    try:
        yield
    except nats.errors.NoRespondersError:
        raise NoResponders(subject) from None
    except nats.errors.TimeoutError:  # also FlushTimeoutError
        raise RequestTimeout(subject, timeout) from None
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
        raise BusClosed() from None
    except nats.errors.BadSubjectError:
        raise InvalidSubject(subject, "refused by nats-py") from None
    except nats.errors.BadHeaderError as exc:
        raise InvalidHeader(exc.key) from None
    except nats.errors.OutboundBufferLimitError as exc:
        raise BusError("not connected to NATS and the outbound buffer is full") from exc
    except nats.errors.Error as exc:
        raise BusError(str(exc)) from exc


def _envelope(msg: Msg) -> Envelope:
    return Envelope(
        subject=msg.subject, data=msg.data, headers=msg.headers or {}, reply=msg.reply or None
    )


class NatsSubscription(ConsumedSubscription):
    """One subscription on a `NatsBus`; open it with `NatsBus.subscribe`."""

    def __init__(
        self, bus: NatsBus, raw: RawSubscription, subject: str, queue: str | None, max_pending: int
    ) -> None:
        super().__init__()
        self.subject = subject
        self.queue = queue
        self._bus = bus
        self._raw = raw
        self._max_pending = max_pending
        self._phase: _Phase = "active"
        self._delivered = 0
        self._dropped = 0
        # What `drain()` took out of nats-py's queue so the nats-py subscription can be
        # removed at once; iteration hands these out before ending.
        self._moved: deque[Msg] = deque()
        # Cancel scopes of consumers blocked in `next_msg`, so a phase change can wake them.
        self._waiters: set[anyio.CancelScope] = set()
        self._drained = anyio.Event()
        #: Set when the server refused this subscription; iteration raises it.
        self._denied: PermissionDenied | None = None

    def __repr__(self) -> str:
        return f"<NatsSubscription {self.subject!r} queue={self.queue!r} {self._phase}>"

    async def unsubscribe(self) -> None:
        """Stop at once, discarding anything still buffered."""
        await self._close()

    async def drain(self) -> None:
        """Stop new deliveries; iteration yields what is buffered, then ends.

        Returns once the server has stopped sending (a round trip), without waiting
        for the consumer to take the buffered messages.
        """
        if self._phase != "active" or self._bus._client.is_closed:
            await checkpoint()
            return
        self._phase = "draining"
        try:
            with anyio.move_on_after(self._bus._drain_timeout) as deadline:
                await self._stop_interest()
            if deadline.cancelled_caught:
                logger.warning("draining subscription %r timed out", self.subject)
            # Everything the server sent before the UNSUB is in nats-py's queue now;
            # keep it here so the nats-py subscription can go at once. (The timeout only
            # matters if a consumer already waiting took the last message first.)
            with contextlib.suppress(nats.errors.TimeoutError):
                while self._phase == "draining" and self._raw.pending_msgs:
                    self._moved.append(await self._raw.next_msg(timeout=1.0))
            with contextlib.suppress(nats.errors.Error):
                await self._raw.unsubscribe()
        except BusError as exc:
            logger.warning("could not drain subscription %r: %s", self.subject, exc)
        except nats.errors.ConnectionClosedError:
            pass  # the bus closed meanwhile, which discards the buffer anyway
        finally:
            if self._phase == "draining":
                self._phase = "drained"
            self._drained.set()
            self._wake()
            self._check_settled()

    def statistics(self) -> SubscriptionStatistics:
        pending = 0 if self._phase == "closed" else self._raw.pending_msgs + len(self._moved)
        return SubscriptionStatistics(
            subject=self.subject,
            queue=self.queue,
            pending=pending,
            max_pending=self._max_pending,
            delivered=self._delivered,
            dropped=self._dropped,
        )

    # -- internals -----------------------------------------------------------------------

    async def _take(self) -> Envelope:
        msg = await self._receive()
        if msg is None:
            self._settled.set()
            raise StopAsyncIteration
        self._delivered += 1
        return _envelope(msg)

    def _check_settled(self) -> None:
        if self._phase in ("active", "draining") or self._in_hand:
            return
        if self._phase == "closed" or not (self._moved or self._raw.pending_msgs):
            self._settled.set()

    async def _receive(self) -> Msg | None:
        """Take the next message, or None once the subscription has ended."""
        while True:
            if self._denied is not None:
                raise self._denied
            if self._phase == "closed":
                return None
            if self._moved:
                return self._moved.popleft()
            if self._phase == "drained":
                return None
            if self._phase == "draining":
                # Only the drain reads nats-py's queue now, so message order is kept.
                await self._drained.wait()
                continue
            # nats-py's `next_msg()` starts a task, a `wait_for` and a uuid4 per message,
            # which costs more than the rest of a request; reading its bounded queue
            # directly (with the same bookkeeping) is the hot path of every consumer.
            queue = self._raw._pending_queue
            try:
                msg = queue.get_nowait()
            except asyncio.QueueEmpty:
                if self._bus._client.is_closed:
                    self._phase = "closed"
                    return None
                with anyio.CancelScope() as scope:
                    self._waiters.add(scope)
                    try:
                        msg = await queue.get()
                    finally:
                        self._waiters.discard(scope)
                if scope.cancelled_caught:
                    continue  # woken by `_wake()` after a phase change: look again
            self._raw._pending_size -= len(msg.data)
            queue.task_done()
            return msg

    async def _stop_interest(self) -> None:
        """Send UNSUB but keep routing until the server has acted on it.

        nats-py's public `Subscription.drain()` cannot be used: it waits until its queue
        is consumed (a consumer draining its own subscription would hang), and its flush
        PING is written ahead of the queued UNSUB, so messages the server sends in
        between arrive after the subscription is gone and are silently lost. Hence the
        two private calls below, on nats-py internals that have been stable for years.
        """
        with _translated(self.subject):
            await self._bus._client._send_unsubscribe(self._raw._id)
            await self._bus._round_trip()

    def _wake(self) -> None:
        for scope in self._waiters:
            scope.cancel()

    def _count_drop(self) -> None:
        self._dropped += 1

    async def _close(self, *, unsubscribe: bool = True) -> None:
        """Unsubscribe (if still subscribed) and end iteration, discarding the buffer."""
        if self._phase == "closed":
            await checkpoint()
            return
        was_active = self._phase == "active"
        self._phase = "closed"
        self._moved.clear()
        self._drained.set()
        self._settled.set()
        self._wake()
        client = self._bus._client
        if unsubscribe and was_active and not client.is_closed:
            try:
                await self._raw.unsubscribe()
            except nats.errors.Error as exc:  # draining or reconnecting: nothing to undo
                logger.debug("unsubscribe %r: %s", self.subject, exc)
        else:
            await checkpoint()


class NatsBus:
    """A `Bus` over one NATS connection; open it with `open_nats_bus()`."""

    backend = "nats"

    def __init__(
        self,
        url: str,
        *,
        drain_timeout: float = 10.0,
        max_reconnect_attempts: int = -1,
        reconnect_wait: float = 2.0,
    ) -> None:
        self.url = url
        self._client = Client()
        self._drain_timeout = drain_timeout
        self._max_reconnect_attempts = max_reconnect_attempts
        self._reconnect_wait = reconnect_wait
        # Replaced after each reconnect, so `wait_reconnected` waits without polling.
        self._reconnected = anyio.Event()
        self._subs: dict[RawSubscription, NatsSubscription] = {}
        # Requests in flight: `close()` cancels them so they fail with BusClosed at once
        # (as on the memory bus) instead of waiting out their timeout.
        self._requests: dict[anyio.CancelScope, _PendingRequest] = {}
        # Set when the server refused the subscription to this connection's inbox prefix:
        # nats-py subscribes it once, so every request would otherwise wait out its timeout.
        self._inbox_denied: PermissionDenied | None = None
        # Publishes the server refused so far, and the last one (what `flush` reports).
        self._publish_refusals = 0
        self._last_publish_refusal: PermissionDenied | None = None
        self._connected_once = False
        self._closing = False
        self._draining = False
        self._published = 0
        self._dropped = 0
        self._reconnects = 0
        self._connect_errors: list[Exception] = []
        self._slow_log = LogThrottle(1.0)
        self._error_log = LogThrottle(5.0)
        self._valid_subjects: set[str] = set()

    def __repr__(self) -> str:
        return f"<NatsBus {_redact(self.url)} closed={self.is_closed}>"

    @property
    def client(self) -> Client:
        """The underlying nats-py client, for components that need JetStream or KV."""
        return self._client

    def jetstream(self, **options: Any) -> JetStreamContext:
        """Return nats-py's JetStream context for this connection (`options` go to nats-py)."""
        return self._client.jetstream(**options)

    @property
    def is_closed(self) -> bool:
        return self._closing or self._client.is_closed

    def new_inbox(self) -> str:
        """A fresh reply subject under this connection's inbox prefix (NATS_INBOX_PREFIX)."""
        return self._client.new_inbox()

    async def publish(
        self, subject: str, data: bytes, *, headers: Headers | None = None, reply: str | None = None
    ) -> None:
        """Send one message; returns once it is buffered for the server.

        Raises:
            BusClosed: the bus is closed.
            InvalidSubject: `subject` or `reply` is not a literal subject.
            InvalidHeader: a header name is not a valid token.
            PayloadTooLarge: `data` is larger than the server's `max_payload`.
            BusError: disconnected and the reconnect buffer is full.
        """
        self._check_open()
        self._check_subject(subject)
        if reply is not None:
            validate_subject(reply)
        self._check_payload(data)
        wire_headers = normalize_headers(headers) or None if headers else None
        # Hot path: a plain try/except, not the `_translated` generator context manager.
        try:
            await self._client.publish(subject, data, reply=reply or "", headers=wire_headers)
        except nats.errors.Error as exc:
            with _translated(subject):
                raise exc from None
        self._published += 1

    async def publish_batch(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Send several header-less messages in order, handed to nats-py as one write.

        Every subject and size is checked before anything is sent, so a bad message
        sends none of the batch. For a MATRIZ batch this takes about a third of the CPU
        of one `publish()` per message (`lukhas bench`).

        Raises:
            BusClosed: the bus is closed or its connection draining.
            InvalidSubject: a subject is not a literal subject.
            PayloadTooLarge: a message is larger than the server's `max_payload`.
            BusError: disconnected and the reconnect buffer is full.
        """
        self._check_open()
        client = self._client
        frames = []
        size = 0
        for subject, data in messages:
            self._check_subject(subject)
            self._check_payload(data)
            frames.append(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(data), data))
            size += len(data)
        if not frames:
            await checkpoint()
            return
        if client.is_draining_pubs:
            raise BusClosed()
        chunk = b"".join(frames)
        # What nats-py's own publish() checks and counts, once for the whole batch.
        if not client.is_connected and (
            client._max_pending_size <= 0
            or len(chunk) + client._pending_data_size > client._max_pending_size
        ):
            raise BusError("not connected to NATS and the outbound buffer is full")
        client.stats["out_msgs"] += len(frames)
        client.stats["out_bytes"] += size
        with _translated("publish_batch"):
            await client._send_command(chunk)
            if client._flush_queue is not None and client._flush_queue.empty():
                await client._flush_pending()
        self._published += len(frames)

    @asynccontextmanager
    async def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> AsyncIterator[NatsSubscription]:
        """Subscribe to `subject` (`*` and `>` allowed), optionally in a queue group.

        The server has registered the interest when the block is entered.

        Raises:
            BusClosed: the bus is closed or draining.
            InvalidSubject: the subject or queue name is malformed.
            ValueError: `max_pending` is below 1.
        """
        self._check_accepting()
        validate_pattern(subject)
        validate_queue(queue)
        if max_pending < 1:
            # nats-py would read 0 as "no limit": an unbounded queue.
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        with _translated(subject):
            raw = await self._client.subscribe(
                subject,
                queue=queue or "",
                pending_msgs_limit=max_pending,
                pending_bytes_limit=DEFAULT_MAX_PENDING_BYTES,
            )
        sub = NatsSubscription(self, raw, subject, queue, max_pending)
        self._subs[raw] = sub
        try:
            with _translated(subject):
                await self._round_trip()  # the SUB has reached the server
            if sub._denied is not None:  # the server's -ERR arrives before its PONG
                raise sub._denied
            yield sub
        finally:
            with anyio.CancelScope(shield=True):
                await sub._close()
            del self._subs[raw]

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Headers | None = None,
        timeout: float = 2.0,  # noqa: ASYNC109
    ) -> Envelope:
        """Send a request and wait for the first reply.

        A refusal by the server fails the request at once (never a wait for the timeout).

        Raises:
            NoResponders: nobody is subscribed to `subject`.
            RequestTimeout: no reply within `timeout` seconds.
            BusClosed: the bus is closed or draining.
            InvalidSubject: the subject is malformed.
            PermissionDenied: this user may not publish to `subject`, or may not subscribe
                to its own inbox prefix (NATS_INBOX_PREFIX does not match the server's
                permissions).
        """
        self._check_accepting()
        validate_subject(subject)
        self._check_payload(data)
        if self._inbox_denied is not None:
            raise self._inbox_denied
        wire_headers = normalize_headers(headers) or None
        self._published += 1
        scope = anyio.CancelScope()
        pending = _PendingRequest(subject, scope)
        self._requests[scope] = pending
        try:
            with scope, _translated(subject, timeout):
                # nats-py multiplexes replies over one `<inbox prefix>.<id>.*` subscription.
                msg = await self._client.request(
                    subject, data, timeout=timeout, headers=wire_headers
                )
                return _envelope(msg)
        finally:
            del self._requests[scope]
        if pending.denied is not None:
            raise pending.denied
        raise BusClosed()  # only reached when `close()` cancelled the scope

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until everything published so far has reached the server (a PING/PONG).

        Raises:
            BusClosed: the bus is closed.
            RequestTimeout: no PONG within `timeout` seconds.
            PermissionDenied: the server refused a publish made on this connection since
                the previous flush (its -ERR arrives before the PONG).
        """
        self._check_open()
        refusals = self._publish_refusals
        with anyio.move_on_after(timeout) as scope, _translated("flush", timeout):
            await self._round_trip()
        if self._publish_refusals != refusals and self._last_publish_refusal is not None:
            raise self._last_publish_refusal
        if scope.cancelled_caught:
            raise RequestTimeout("flush", timeout)

    async def drain(self) -> None:
        """Stop every subscription, let consumers take what is buffered, then close.

        Each subscription is drained the nats-py way (UNSUB, flush, keep the buffer);
        then this waits up to `drain_timeout` seconds until every consumer has taken
        what was buffered and finished the message in hand (an `async for` loop has
        come back for more), or closed its subscription; then it flushes and closes.
        Publishing still works meanwhile, so handlers can answer the requests they hold.
        """
        if self.is_closed or self._draining:
            await checkpoint()
            return
        self._draining = True
        try:
            subs = list(self._subs.values())
            async with anyio.create_task_group() as tg:
                for sub in subs:
                    tg.start_soon(sub.drain)
            with anyio.move_on_after(self._drain_timeout) as scope:
                for sub in subs:
                    await sub._settled.wait()
            if scope.cancelled_caught:
                logger.warning(
                    "bus drain timed out after %.1fs; discarding what is still buffered",
                    self._drain_timeout,
                )
            if not self._client.is_closed:
                with anyio.move_on_after(self._drain_timeout):
                    try:
                        await self._round_trip()
                    except nats.errors.Error as exc:
                        logger.warning("final flush before close failed: %s", exc)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close at once; buffered messages are discarded and iterations end."""
        self._closing = True
        for scope in list(self._requests):
            scope.cancel()
        with anyio.CancelScope(shield=True):
            for sub in list(self._subs.values()):
                await sub._close(unsubscribe=False)  # the connection goes anyway
            await self._client.close()

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            backend=self.backend,
            published=self._published,
            subscriptions=len(self._subs),
            dropped=self._dropped,
            reconnects=self._reconnects,
        )

    @property
    def is_connected(self) -> bool:
        """Whether the connection is up right now (False while reconnecting)."""
        return self._client.is_connected

    async def wait_reconnected(self, count: int = 1) -> None:
        """Return once the connection has been re-established `count` times in all.

        Subscriptions are live again on the server when this returns.

        Raises:
            BusClosed: the bus closed first.
        """
        while self._reconnects < count:
            if self.is_closed:
                raise BusClosed()
            await self._reconnected.wait()
        await checkpoint()

    # -- connection ----------------------------------------------------------------------

    async def _connect(self, **options: Any) -> None:
        servers = [part.strip() for part in self.url.split(",") if part.strip()]
        attempts = (_FIRST_CONNECT_RETRIES + 1) * len(servers)
        deadline = attempts * (options.get("connect_timeout", 2.0) + _FIRST_CONNECT_RETRY_WAIT)
        try:
            with anyio.fail_after(deadline + _CLOSE_TIMEOUT):
                await self._client.connect(
                    servers,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                    allow_reconnect=True,
                    max_reconnect_attempts=_FIRST_CONNECT_RETRIES,
                    reconnect_time_wait=_FIRST_CONNECT_RETRY_WAIT,
                    **options,
                )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await self._client.close()
            raise BusConnectError(_redact(self.url), _describe(self._first_cause(exc))) from exc
        except BaseException:
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await self._client.close()
            raise
        self._connected_once = True
        # nats-py reads these on every reconnect, so workers now outlive server restarts.
        # (nats-py would read 0 attempts as "forever"; here it means "do not reconnect".)
        options = self._client.options
        options["allow_reconnect"] = self._max_reconnect_attempts != 0
        options["max_reconnect_attempts"] = self._max_reconnect_attempts
        options["reconnect_time_wait"] = self._reconnect_wait

    def _first_cause(self, raised: BaseException) -> BaseException:
        """The most telling reason a first connect failed.

        A refusal the server spelled out (e.g. 'Authorization Violation') beats the
        socket error a retry then met, and either beats nats-py's "no servers".
        """
        told = [e for e in self._connect_errors if isinstance(e, nats.errors.Error)]
        if told:
            return told[0]
        if self._connect_errors and isinstance(raised, nats.errors.NoServersError | TimeoutError):
            return self._connect_errors[-1]
        return raised

    async def _on_error(self, exc: Exception) -> None:
        # nats-py awaits this from its socket reader: keep it cheap and never raise.
        if isinstance(exc, nats.errors.SlowConsumerError):
            self._dropped += 1
            sub = self._subs.get(exc.sub)
            if sub is not None:
                sub._count_drop()
            if self._slow_log.allow(exc.sid):
                logger.warning(
                    "slow consumer on %r: pending buffer full, %d message(s) dropped so far",
                    exc.subject,
                    sub._dropped if sub is not None else 1,
                )
            return
        if self._connected_once and self._note_violation(str(exc)):
            # Raised to the caller that made the refused subscription or request.
            logger.debug("NATS error: %s", _describe(exc))
            return
        if not self._connected_once:
            self._connect_errors.append(exc)
            logger.debug("connect attempt to %s failed: %s", _redact(self.url), _describe(exc))
        elif self._error_log.allow(type(exc)):
            logger.warning("NATS error: %s", _describe(exc))

    def _note_violation(self, text: str) -> bool:
        """Fail whatever the server's permissions violation refused (see PermissionDenied).

        Returns whether a subscription or request in this process was handed the error
        (publishes are reported by the next `flush`, and logged).
        """
        found = _VIOLATION.search(text)
        if found is None:
            return False
        kind, subject, queue = found.group(1), found.group(2), found.group(3) or None
        handed = False
        if kind == "subscription":
            for sub in list(self._subs.values()):
                if sub.subject.lower() == subject and (sub.queue or None) == queue:
                    sub._denied = PermissionDenied("subscribe", sub.subject, queue=sub.queue)
                    sub._wake()
                    handed = True
            if subject.startswith(bytes(self._client._inbox_prefix).decode().lower() + "."):
                # nats-py's request inbox (`<prefix>.<id>.*`): no request can get a reply.
                self._inbox_denied = PermissionDenied("subscribe", subject)
                for pending in self._requests.values():
                    pending.denied = self._inbox_denied
                    pending.scope.cancel()
                    handed = True
            return handed
        self._publish_refusals += 1
        self._last_publish_refusal = PermissionDenied("publish", subject)
        for pending in self._requests.values():
            if pending.subject.lower() == subject:
                pending.denied = PermissionDenied("publish", pending.subject)
                pending.scope.cancel()
                handed = True
        return handed

    async def _on_disconnected(self) -> None:
        if not self._closing and self._connected_once:
            logger.warning("disconnected from NATS at %s; reconnecting", _redact(self.url))

    async def _on_reconnected(self) -> None:
        self._reconnects += 1
        self._reconnected.set()
        self._reconnected = anyio.Event()
        url = self._client.connected_url
        logger.info("reconnected to NATS at %s", url.netloc if url else "?")

    async def _on_closed(self) -> None:
        if not self._closing and self._connected_once:
            logger.error("NATS connection closed for good; the bus is closed")
        self._closing = True
        self._reconnected.set()  # wake `wait_reconnected`, which then raises BusClosed
        for sub in list(self._subs.values()):
            sub._wake()  # consumers waiting on an empty queue see the closed client

    async def _round_trip(self) -> None:
        """PING/PONG after everything written so far, so the server has processed it all."""
        # nats-py writes its PING straight to the socket, ahead of commands still queued
        # for its flusher task, so one `Client.flush()` can return before earlier
        # publishes were even sent. The flusher runs before that first PONG can be
        # read, so the second PING follows everything queued before this call.
        await self._client.flush()
        await self._client.flush()

    # -- checks --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.is_closed:
            raise BusClosed()

    def _check_accepting(self) -> None:
        if self.is_closed or self._draining:
            raise BusClosed()

    def _check_subject(self, subject: str) -> None:
        """`validate_subject`, remembered: hot subjects (MATRIZ, handoffs) repeat."""
        if subject in self._valid_subjects:
            return
        validate_subject(subject)
        if len(self._valid_subjects) >= _VALID_SUBJECTS_KEPT:
            self._valid_subjects.clear()
        self._valid_subjects.add(subject)

    def _check_payload(self, data: bytes) -> None:
        limit = self._client.max_payload
        if limit and len(data) > limit:
            raise PayloadTooLarge(len(data), limit)


def _redact(url: str) -> str:
    """Hide passwords and tokens in a URL (or comma-separated URLs) before logging it."""
    out = []
    for part in url.split(","):
        parts = urlsplit(part.strip())
        if parts.username or parts.password:
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            user = parts.username if parts.password else "***"
            auth = f"{user}:***" if parts.password else user
            parts = parts._replace(netloc=f"{auth}@{host}")
        out.append(urlunsplit(parts))
    return ",".join(out)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not (ca or cert or key):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    elif key:
        raise ValueError("NATS_TLS_KEY is set without NATS_TLS_CERT")
    return context


@asynccontextmanager
async def open_nats_bus(
    url: str,
    *,
    name: str | None = None,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    creds: str | None = None,
    nkey_seed: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    inbox_prefix: str | None = None,
    connect_timeout: float = 2.0,
    max_reconnect_attempts: int = -1,
    reconnect_wait: float = 2.0,
    drain_timeout: float = 10.0,
) -> AsyncIterator[NatsBus]:
    """Connect to NATS at `url` (comma-separate several servers); close on exit.

    The first connect is tried twice, briefly, so a missing server is reported at
    once; after that, reconnects are automatic (unbounded unless
    `max_reconnect_attempts` >= 0) and counted in `statistics().reconnects`.

    Args:
        creds: path to a `.creds` file (JWT + nkey seed).
        nkey_seed: an nkey seed (`SU...`) or the path of a file holding one.
        tls_ca, tls_cert, tls_key: PEM files for server verification and client auth.
        inbox_prefix: where replies to this connection's requests (and its JetStream
            deliveries) go; nats-py's `_INBOX` unless given. With per-user permissions
            each user may read only its own prefix.
        connect_timeout: seconds allowed for each connection attempt.
        max_reconnect_attempts: after a lost connection, tries per server before the
            bus closes for good; -1 retries forever, 0 does not reconnect.
        reconnect_wait: pause between reconnect attempts to the same server.
        drain_timeout: how long `drain()` waits for consumers to empty their buffers.

    Raises:
        BusConnectError: no server answered, authentication failed or the TLS or
            credential files could not be used.
    """
    bus = NatsBus(
        url,
        drain_timeout=drain_timeout,
        max_reconnect_attempts=max_reconnect_attempts,
        reconnect_wait=reconnect_wait,
    )
    try:
        tls = _tls_context(tls_ca, tls_cert, tls_key)
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise BusConnectError(_redact(url), f"bad TLS settings: {_describe(exc)}") from exc
    options: dict[str, Any] = {
        "name": name,
        "user": user,
        "password": password,
        "token": token,
        "connect_timeout": connect_timeout,
        "drain_timeout": drain_timeout,
    }
    if tls is not None:
        options["tls"] = tls
    if inbox_prefix:
        options["inbox_prefix"] = inbox_prefix
    if creds:
        options["user_credentials"] = creds
    if nkey_seed:
        is_seed = nkey_seed.strip().startswith("SU")
        options["nkeys_seed_str" if is_seed else "nkeys_seed"] = nkey_seed.strip()
    try:
        await bus._connect(**options)
    except ModuleNotFoundError as exc:  # nats-py imports `nkeys` only for creds/nkeys
        raise BusConnectError(_redact(url), f"{exc}; install the `nkeys` package") from exc
    try:
        yield bus
    finally:
        await bus.close()


async def ensure_stream(
    js: JetStreamContext, config: StreamConfig, *, protect: bool = False, check_age: bool = True
) -> tuple[StreamInfo, bool]:
    """Create the JetStream stream `config` describes unless it exists.

    Safe when several workers race to create it. An existing stream keeps its
    configuration (limits are an operator's decision once set). Returns the stream's
    info and whether this call created it.

    Args:
        protect: refuse an existing stream that is weaker than `config` (see
            `stream_weaknesses`; `check_age` as there).

    Raises:
        StreamWeakened: `protect` is set and the existing stream is weaker.
    """
    assert config.name is not None, "a stream needs a name"
    try:
        info, created = await js.stream_info(config.name), False
    except NotFoundError:
        try:
            info, created = await js.add_stream(config), True
        except APIError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            info, created = await js.stream_info(config.name), False
    if protect and not created:
        problems = stream_weaknesses(info.config, config, check_age=check_age)
        if problems:
            raise StreamWeakened(config.name, problems)
    return info, created


def _unlimited(value: float | int | None) -> bool:
    return value is None or value <= 0


def stream_weaknesses(
    actual: StreamConfig, wanted: StreamConfig, *, check_age: bool = True
) -> list[str]:
    """What the existing stream `actual` gives up of the protections `wanted` asks for.

    Checked: the retention policy; every wanted subject still captured; not turned into a
    mirror or a stream that sources others; deny_delete and deny_purge kept; discard-new
    kept (discard-old drops accepted messages when full); and with `check_age`, a max age
    no shorter than wanted (none when none is wanted). Larger limits are never a weakness.
    """
    problems = []
    if wanted.retention is not None and actual.retention != wanted.retention:
        problems.append(f"retention is {_name(actual.retention)}, not {_name(wanted.retention)}")
    missing = [s for s in wanted.subjects or [] if s not in (actual.subjects or [])]
    if missing:
        problems.append(f"subjects {actual.subjects} no longer capture {missing}")
    if actual.mirror is not None or actual.sources:
        problems.append("it mirrors or sources other streams")
    for flag in ("deny_delete", "deny_purge"):
        if getattr(wanted, flag) and not getattr(actual, flag):
            problems.append(f"{flag} is off")
    if wanted.discard is not None and _name(wanted.discard) == "new" and (
        _name(actual.discard) != "new"
    ):
        problems.append(f"discard is {_name(actual.discard)}, not new")
    if check_age and not _unlimited(actual.max_age) and (
        _unlimited(wanted.max_age) or actual.max_age < wanted.max_age  # type: ignore[operator]
    ):
        wanted_age = "none" if _unlimited(wanted.max_age) else f"{wanted.max_age:g}s"
        problems.append(f"max_age is {actual.max_age:g}s, wanted {wanted_age}")
    return problems


def _name(value: object) -> str:
    return str(getattr(value, "value", value)).lower()
