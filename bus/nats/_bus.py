"""`NatsBus`: a `Bus` over one nats-py connection (publish path, requests, lifecycle)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import nats.errors
from anyio.lowlevel import checkpoint
from nats.aio.client import Client
from nats.aio.subscription import Subscription as RawSubscription
from nats.js import JetStreamContext

from bus._subject import (
    EncodedHeaders,
    normalize_headers,
    validate_pattern,
    validate_queue,
    validate_subject,
)
from bus._throttle import LogThrottle
from bus._types import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_BYTES,
    BusStatistics,
    Envelope,
    Headers,
)
from bus.errors import (
    BusClosed,
    BusConnectError,
    BusError,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
)
from bus.nats import _compat
from bus.nats._errors import describe, raise_translated, translated
from bus.nats._options import DEFAULT_INBOX_PREFIX, redact
from bus.nats._refusals import PendingRequest, Refusals
from bus.nats._subscription import NatsSubscription, envelope

__all__ = ["NatsBus"]


def _expire(pong: asyncio.Future[bool], timeout: float) -> None:
    if not pong.done():
        pong.set_exception(RequestTimeout("flush", timeout))


class _Flight:
    """A flush begun: the PONG it waits for (None: nats-py's own flush) and what it failed."""

    __slots__ = ("deadline", "pong", "refused", "timeout")

    def __init__(self, pong: asyncio.Future[bool] | None, refused: PermissionDenied | None
                 ) -> None:
        self.pong = pong
        self.refused = refused
        #: When (loop time) a `flush_calling` flight's PONG wait fails, and its timeout.
        self.deadline: float | None = None
        self.timeout = 0.0

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


def _first_connect_policy() -> dict[str, Any]:
    # A dict, because nats-py annotates `reconnect_time_wait` as int though it takes seconds.
    return {
        "allow_reconnect": True,
        "max_reconnect_attempts": _FIRST_CONNECT_RETRIES,
        "reconnect_time_wait": _FIRST_CONNECT_RETRY_WAIT,
    }


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
        inbox_prefix: str = DEFAULT_INBOX_PREFIX,
    ) -> None:
        self.url = url
        self.drain_timeout = drain_timeout
        self._client = Client()
        self._internals = _compat.INTERNALS
        self._max_reconnect_attempts = max_reconnect_attempts
        self._reconnect_wait = reconnect_wait
        # Replaced after each reconnect, so `wait_reconnected` waits without polling.
        self._reconnected = anyio.Event()
        self._subs: dict[RawSubscription, NatsSubscription] = {}
        # Requests in flight (`close()` cancels them so they fail with BusClosed at once,
        # as on the memory bus) and what the server refused.
        self._refusals = Refusals(inbox_prefix)
        self._connected_once = False
        self._closing = False
        self._draining = False
        self._published = 0
        #: Flushes begun and not yet ended, oldest first, and the refused publish no flush
        #: has claimed yet (its -ERR came in while none was in flight): see `_refused`.
        self._flights: deque[_Flight] = deque()
        self._unclaimed: PermissionDenied | None = None
        #: The timer failing `flush_calling` flights at their deadlines (see there).
        self._expiry: asyncio.TimerHandle | None = None
        self._dropped = 0
        self._reconnects = 0
        self._connect_errors: list[Exception] = []
        self._slow_log = LogThrottle(1.0)
        self._error_log = LogThrottle(5.0)
        self._valid_subjects: set[str] = set()

    def __repr__(self) -> str:
        return f"<NatsBus {redact(self.url)} closed={self.is_closed}>"

    @property
    def client(self) -> Client:
        """The underlying nats-py client, for components that need JetStream or KV."""
        return self._client

    def jetstream(self, **options: Any) -> JetStreamContext:
        """Return nats-py's JetStream context for this connection (`options` go to nats-py)."""
        return self._client.jetstream(**options)

    @property
    def internals(self) -> str:
        """Which nats-py path this bus reads and drains with: "private" or "public"."""
        return self._internals.name

    @property
    def is_closed(self) -> bool:
        return self._closing or self._client.is_closed

    @property
    def is_connected(self) -> bool:
        """Whether the connection is up right now (False while reconnecting)."""
        return self._client.is_connected

    def new_inbox(self) -> str:
        """A fresh reply subject under this connection's inbox prefix (NATS_INBOX_PREFIX)."""
        return self._client.new_inbox()

    # -- the publish path ------------------------------------------------------------------

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
        # Hot path: a plain try/except, not the `translated` generator context manager.
        try:
            await self._client.publish(subject, data, reply=reply or "", headers=wire_headers)
        except nats.errors.Error as exc:
            raise_translated(exc, subject)
        self._published += 1

    def publish_nowait(
        self, subject: str, data: bytes, *, headers: EncodedHeaders | None = None,
        wake: bool = True,
    ) -> bool:
        """Queue one message (headers, if any, already encoded) for nats-py's flusher
        without waiting.

        Returns False, having sent nothing, when it cannot be done at once (disconnected,
        the outgoing buffer at its bound, or nats-py without the internals: see `_compat`);
        then use `publish`. What is queued goes out in order with every other publish.
        `wake=False` leaves nats-py's flusher asleep, for a caller that starts a flush
        (`flush_calling`, `flush`) right after: its PING is written with the queue.

        Raises:
            BusClosed: the bus is closed.
            InvalidSubject: `subject` is not a literal subject.
            PayloadTooLarge: `data` is larger than the server's `max_payload`.
        """
        self._check_open()
        self._check_subject(subject)
        self._check_payload(data)
        block = None if headers is None or not headers.mapping else headers.block
        queue = self._internals.queue_publish if wake else self._internals.append_publish
        if not queue(self._client, subject, data, block):
            return False
        self._published += 1
        return True

    async def publish_batch(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Send several header-less messages in order.

        Every subject and size is checked before anything is sent, so a bad message
        sends none of the batch. nats-py's flusher task writes them out together.

        Raises:
            BusClosed: the bus is closed or its connection draining.
            InvalidSubject: a subject is not a literal subject.
            PayloadTooLarge: a message is larger than the server's `max_payload`.
            BusError: disconnected and the reconnect buffer is full.
        """
        self._check_open()
        batch = list(messages)
        for subject, data in batch:
            self._check_subject(subject)
            self._check_payload(data)
        if not batch:
            await checkpoint()
            return
        publish = self._client.publish
        try:
            for subject, data in batch:
                await publish(subject, data)
                self._published += 1
        except nats.errors.Error as exc:
            raise_translated(exc, "publish_batch")

    # -- subscriptions and requests --------------------------------------------------------

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
            PermissionDenied: the server refused the subscription.
            ValueError: `max_pending` is below 1.
        """
        self._check_accepting()
        validate_pattern(subject)
        validate_queue(queue)
        if max_pending < 1:
            # nats-py would read 0 as "no limit": an unbounded queue.
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        with translated(subject):
            raw = await self._client.subscribe(
                subject,
                queue=queue or "",
                pending_msgs_limit=max_pending,
                pending_bytes_limit=DEFAULT_MAX_PENDING_BYTES,
            )
        sub = NatsSubscription(self, raw, subject, queue, max_pending, self._internals)
        self._subs[raw] = sub
        try:
            with translated(subject):
                await self.round_trip()  # the SUB has reached the server
            if sub.denied is not None:  # the server's -ERR arrives before its PONG
                raise sub.denied
            yield sub
        finally:
            with anyio.CancelScope(shield=True):
                await sub.close()
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
        refusals = self._refusals
        if refusals.inbox_denied is not None:
            raise refusals.inbox_denied
        wire_headers = normalize_headers(headers) or None
        self._published += 1
        scope = anyio.CancelScope()
        pending = PendingRequest(subject, scope)
        refusals.requests[scope] = pending
        try:
            with scope, translated(subject, timeout):
                # nats-py multiplexes replies over one `<inbox prefix>.<id>.*` subscription.
                msg = await self._client.request(
                    subject, data, timeout=timeout, headers=wire_headers
                )
                return envelope(msg)
        finally:
            del refusals.requests[scope]
        if pending.denied is not None:
            raise pending.denied
        raise BusClosed()  # only reached when `close()` cancelled the scope

    def flush(self, timeout: float = 5.0) -> Coroutine[Any, Any, None]:
        """Wait until everything published so far has reached the server (a PING/PONG).

        The round trip starts at the call: its PING is sent then, behind everything
        published so far, and awaiting the result waits for its PONG. So a caller can
        start a flush at once and leave the wait to another task.

        Raises:
            BusClosed: the bus is closed.
            RequestTimeout: no PONG within `timeout` seconds.
            PermissionDenied: the server refused a publish this flush covers and no earlier
                flush reported (its -ERR arrives before the PONG; see `_refused`).
        """
        self._check_open()
        flight = _Flight(self._internals.ping(self._client), self._unclaimed)
        self._unclaimed = None
        self._flights.append(flight)
        return self._flushed(flight, timeout)

    def flush_calling(
        self, ended: Callable[[BusError | None], None], timeout: float = 5.0
    ) -> bool:
        """`flush()` without a waiter: its end calls `ended` once, in place.

        The PING is sent at the call, as by `flush()`. `ended(None)` is called from
        nats-py's reader as it reads the PONG (no task is woken; anything `ended` publishes
        with `publish_nowait` and writes with `write_queued` leaves in that same loop pass),
        `ended(error)` with what `flush()` would raise: the `PermissionDenied` of a publish
        it covers, a `RequestTimeout` after `timeout` seconds, a lost connection. `ended`
        runs inside nats-py's reader: it must be quick and must not raise (it is logged).

        Returns False, having started nothing, when this cannot be done now (nats-py
        without the internals, or disconnected): then use `flush()`.

        Raises:
            BusClosed: the bus is closed.
        """
        self._check_open()
        flight = _Flight(None, self._unclaimed)
        pong = self._internals.ping_calling(
            self._client, functools.partial(self._landed, flight, ended)
        )
        if pong is None:
            return False
        self._unclaimed = None
        flight.pong = pong
        loop = pong.get_loop()
        flight.deadline = deadline = loop.time() + timeout
        flight.timeout = timeout
        self._flights.append(flight)
        # One timer for every such flight, not one each: a timer cancelled at each PONG
        # stays in the loop's heap until its time, and at thousands of handoffs a second
        # those made most of the garbage collections on the handoff path.
        expiry = self._expiry
        if expiry is None or deadline < expiry.when():
            if expiry is not None:
                expiry.cancel()
            self._expiry = loop.call_at(deadline, self._expire_calling)
        return True

    def _expire_calling(self) -> None:
        """Fail the `flush_calling` flights past their deadline; wake again for the next."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        soonest: float | None = None
        for flight in list(self._flights):
            deadline = flight.deadline
            if deadline is None or flight.pong is None:
                continue
            if deadline <= now:
                _expire(flight.pong, flight.timeout)  # its PONG calls `_landed`
            elif soonest is None or deadline < soonest:
                soonest = deadline
        if soonest is not None:
            self._expiry = loop.call_at(soonest, self._expire_calling)

    def _landed(
        self, flight: _Flight, ended: Callable[[BusError | None], None],
        error: BaseException | None,
    ) -> None:
        """A `flush_calling` flight's PONG is in (or its wait failed): tell its caller."""
        try:
            self._flights.remove(flight)
        except ValueError:
            pass  # `_refused` already dropped it once its PONG was in
        if flight.refused is not None:  # a refusal beats a timeout, and fails a PONG
            ended(flight.refused)
        elif error is None or isinstance(error, BusError):
            ended(error)
        else:
            ended(BusError(f"flush failed: {error}"))

    def write_queued(self) -> bool:
        """Write everything queued for nats-py's flusher task (`publish_nowait`) to the
        socket now rather than at the flusher's next wake-up; False: the flusher will."""
        if self._client.is_closed:
            return False
        return self._internals.write_queued(self._client)

    async def _flushed(self, flight: _Flight, timeout: float) -> None:  # noqa: ASYNC109
        pong = flight.pong
        try:
            if pong is None:
                with anyio.move_on_after(timeout) as scope, translated("flush", timeout):
                    await self.round_trip()
                if scope.cancelled_caught:
                    raise RequestTimeout("flush", timeout)
            else:
                # The PONG future directly, its timeout a timer: an anyio cancel scope costs
                # more than the rest of the wait, and every handoff waits here.
                expiry = pong.get_loop().call_later(timeout, _expire, pong, timeout)
                try:
                    await pong
                finally:
                    expiry.cancel()
        except RequestTimeout:
            if flight.refused is not None:  # the refusal is what to report
                raise flight.refused from None
            raise
        finally:
            try:
                self._flights.remove(flight)
            except ValueError:
                pass  # `_refused` already dropped it once its PONG was in
        if flight.refused is not None:
            raise flight.refused

    async def round_trip(self) -> None:
        """PING/PONG after everything written so far, so the server has processed it all
        (nats-py's own `flush()` may PING ahead of queued publishes: see `_compat`)."""
        await self._internals.round_trip(self._client)

    # -- lifecycle -------------------------------------------------------------------------

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
            with anyio.move_on_after(self.drain_timeout) as scope:
                for sub in subs:
                    await sub.wait_settled()
            if scope.cancelled_caught:
                logger.warning(
                    "bus drain timed out after %.1fs; discarding what is still buffered",
                    self.drain_timeout,
                )
            if not self._client.is_closed:
                with anyio.move_on_after(self.drain_timeout):
                    try:
                        await self.round_trip()
                    except nats.errors.Error as exc:
                        logger.warning("final flush before close failed: %s", exc)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close at once; buffered messages are discarded and iterations end."""
        self._closing = True
        for scope in list(self._refusals.requests):
            scope.cancel()
        with anyio.CancelScope(shield=True):
            for sub in list(self._subs.values()):
                await sub.close(unsubscribe=False)  # the connection goes anyway
            await self._client.close()

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            backend=self.backend,
            published=self._published,
            subscriptions=len(self._subs),
            dropped=self._dropped,
            reconnects=self._reconnects,
        )

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

    # -- connection ------------------------------------------------------------------------

    async def connect(self, **options: Any) -> None:
        """Connect with nats-py `options` (see `open_nats_bus`), failing fast the first time.

        Raises:
            BusConnectError: no server answered, or it refused us.
        """
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
                    **_first_connect_policy(),
                    **options,
                )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await self._client.close()
            raise BusConnectError(redact(self.url), describe(self._first_cause(exc))) from exc
        except BaseException:
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await self._client.close()
            raise
        self._connected_once = True
        # nats-py reads these (its public `options`) on every reconnect, so workers now
        # outlive server restarts. (nats-py reads 0 attempts as "forever"; here it means
        # "do not reconnect".)
        client_options = self._client.options
        client_options["allow_reconnect"] = self._max_reconnect_attempts != 0
        client_options["max_reconnect_attempts"] = self._max_reconnect_attempts
        client_options["reconnect_time_wait"] = self._reconnect_wait

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
                sub.count_drop()
            if self._slow_log.allow(exc.sid):
                logger.warning(
                    "slow consumer on %r: pending buffer full, %d message(s) dropped so far",
                    exc.subject,
                    sub.dropped if sub is not None else 1,
                )
            return
        refused = self._refusals.publishes
        handed = self._connected_once and self._refusals.note(
            str(exc), list(self._subs.values())
        )
        if self._refusals.publishes != refused and self._refusals.last_publish is not None:
            self._refused(self._refusals.last_publish)
        if handed:
            # Raised to the caller that made the refused subscription or request.
            logger.debug("NATS error: %s", describe(exc))
            return
        if not self._connected_once:
            self._connect_errors.append(exc)
            logger.debug("connect attempt to %s failed: %s", redact(self.url), describe(exc))
        elif self._error_log.allow(type(exc).__name__):
            logger.warning("NATS error: %s", describe(exc))

    def _refused(self, denied: PermissionDenied) -> None:
        """Hand a refused publish to the flush that covers it.

        The server answers a connection's commands in order: an -ERR that comes in while
        the oldest flush in flight has no PONG yet is for a publish made before that
        flush's PING and after the previous one's, so it is that flush's; with no flush in
        flight it is the next one's. A flush whose PONG cannot be watched (nats-py's own
        flush, when the PING could not be sent at once) fails for any refusal that comes
        in while it runs, as every flush did before PONGs were watched.
        """
        flights = self._flights
        while flights and flights[0].pong is not None and flights[0].pong.done():
            flights.popleft()
        if not flights:
            self._unclaimed = denied
        elif flights[0].pong is not None:
            flights[0].refused = denied
        else:
            for flight in flights:
                flight.refused = denied

    async def _on_disconnected(self) -> None:
        # The PONGs these flushes wait for will not come (nats-py forgets the PINGs it sent
        # on a lost connection): fail them now, not at their timeout, and so that no
        # refusal on the next connection is handed to them.
        for flight in list(self._flights):
            pong = flight.pong
            if pong is not None and not pong.done():
                self._flights.remove(flight)
                pong.set_exception(BusError("the connection to NATS dropped before the PONG"))
        if not self._closing and self._connected_once:
            logger.warning("disconnected from NATS at %s; reconnecting", redact(self.url))

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
            sub.wake()  # consumers waiting on an empty queue see the closed client

    # -- checks ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.is_closed:
            raise BusClosed()

    def _check_accepting(self) -> None:
        if self.is_closed or self._draining:
            raise BusClosed()

    def _check_subject(self, subject: str) -> None:
        """`validate_subject`, remembered: hot subjects (MATRIZ, handoffs) repeat. A reply
        inbox (`_INBOX...`) is used once: remembering it would only push the hot ones out."""
        if subject in self._valid_subjects:
            return
        validate_subject(subject)
        if subject.startswith("_INBOX"):
            return
        if len(self._valid_subjects) >= _VALID_SUBJECTS_KEPT:
            self._valid_subjects.clear()
        self._valid_subjects.add(subject)

    def _check_payload(self, data: bytes) -> None:
        limit = self._client.max_payload
        if limit and len(data) > limit:
            raise PayloadTooLarge(len(data), limit)
