"""JetStream pull consumption in bulk: our own pull requests, one inbox, batches read at once.

nats-py's `PullSubscription.fetch` awaits every message of a batch through `next_msg` (a task,
a timer and a uuid per message) and builds JetStream metadata for each. `PullConsumer` speaks
the pull protocol itself instead:

- **Requests.** It publishes `{"batch": N, "expires": ns}` on
  `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` with one long-lived inbox as the reply
  subject, and keeps up to about 1.5 batches requested ahead (a new request goes out when less
  than half a batch is still owed), so the server never waits for a round trip under load.
- **Deliveries.** Everything buffered on the inbox is taken in one synchronous loop
  (the bus's `_compat` internals, as its subscriptions do), and only the stream
  sequence is read from each reply subject, `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.
  <dseq>.<ts>.<pending>` (or the 12-token form with domain and account hash).
- **Status messages** (headers only, `Status`/`Description`): 404 (no messages) and 408
  (request expired) end the oldest request; 409 "Exceeded MaxWaiting"/"Leadership Change"
  and the like forget the requests so they are sent again; 409 "Consumer Deleted" and 503
  (no responders: no such consumer or stream, or no JetStream) raise `ConsumerGone`; a
  request the server refuses for good (400, 409 naming a limit) raises `PullRefused`.
  A request the server forgot (a restart) is dropped locally when its `expires` has passed.
- **Acks** go out after the caller has handled a batch (`ack(batch)`): with ack policy `all`
  one `+ACK` on the batch's highest stream sequence acknowledges everything before it; with
  `explicit` one `+ACK` per message, written together. `none` sends nothing.

Several `PullConsumer`s (in one process or many) may share a durable consumer with ack policy
`explicit`: the server hands each message to one of them. With ack policy `all` an ack covers
messages handed to the others too, so `all` is for a consumer with one reader.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Literal, NamedTuple

import anyio
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as RawSubscription

from bus.errors import BusClosed, BusError
from bus.nats._bus import NatsBus

__all__ = [
    "AckPolicy",
    "ConsumerGone",
    "PullBatch",
    "PullConsumer",
    "PullRefused",
    "PullStatistics",
    "stream_sequence",
]

logger = logging.getLogger(__name__)

AckPolicy = Literal["explicit", "all", "none"]

_ACK = b"+ACK"
_ACK_PREFIX = "$JS.ACK."
_STATUS = "Status"
_DESCRIPTION = "Description"


class ConsumerGone(BusError):
    """The consumer (or its stream, or JetStream itself) is not there any more."""

    def __init__(self, stream: str, consumer: str, why: str) -> None:
        super().__init__(f"JetStream consumer {stream}/{consumer} is gone: {why}")
        self.stream, self.consumer, self.why = stream, consumer, why


class PullRefused(BusError):
    """The server refuses our pull requests for good (e.g. a batch over the consumer's
    `max_batch`); sending them again would not help."""

    def __init__(self, stream: str, consumer: str, status: str, description: str) -> None:
        super().__init__(
            f"JetStream refused a pull request on {stream}/{consumer}: {status} {description}"
        )
        self.status, self.description = status, description


def stream_sequence(reply: str | None) -> int | None:
    """The stream sequence in a JetStream ack subject (9-token v1 or 12-token v2), or None."""
    if not reply or not reply.startswith(_ACK_PREFIX):
        return None
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[5])
        if len(tokens) >= 11:
            return int(tokens[7])
    except ValueError:
        return None
    return None


class PullBatch(NamedTuple):
    """Messages taken together: `(stream sequence, payload)` in delivery order."""

    messages: list[tuple[int, bytes]]
    #: Their ack subjects, same order (what `PullConsumer.ack` answers).
    replies: list[str]
    #: Messages left for the consumer after the last one, as the server said in its ack subject.
    pending: int


class PullStatistics(NamedTuple):
    """A `PullConsumer`'s counters since it opened."""

    delivered: int
    acked: int
    requests: int
    #: Messages still owed by the requests in flight.
    requested_ahead: int
    #: Status messages by code (`404`, `408`, `409`, ...).
    statuses: dict[str, int]
    #: Messages on the inbox that were neither deliveries nor status messages (skipped).
    foreign: int
    #: Messages left for the consumer as of the last delivery (its ack subject's last token).
    pending: int


class _Request:
    __slots__ = ("deadline", "owed")

    def __init__(self, owed: int, deadline: float) -> None:
        self.owed = owed
        self.deadline = deadline


class PullConsumer:
    """Reads a durable JetStream pull consumer in batches; see the module docstring.

    Open with `async with PullConsumer(bus, stream, consumer, ...) as pull:`, then loop on
    `batch = await pull.next_batch(timeout)` and `await pull.ack(batch)` once it is handled.

    Args:
        bus: an open `NatsBus`; the inbox is made with its inbox prefix.
        stream, consumer: the stream and the (existing) durable pull consumer.
        ack_policy: the consumer's ack policy (see `ConsumerInfo.config.ack_policy`).
        batch: messages per pull request; at most about 1.5 batches are requested ahead.
        expires_s: how long the server keeps a pull request waiting for messages.
        max_batch: most messages one `next_batch` returns.
        linger_s: when the first message finds fewer than `batch / 8` others buffered, wait
            this long for more before returning (0: never). At low rates this turns one
            wake-up, one ack write and one socket send per message into one per few dozen,
            for a few milliseconds of delay.

    Raises:
        ValueError: a size or duration is out of range.
    """

    def __init__(
        self,
        bus: NatsBus,
        stream: str,
        consumer: str,
        *,
        ack_policy: AckPolicy = "explicit",
        batch: int = 256,
        expires_s: float = 1.0,
        max_batch: int | None = None,
        linger_s: float = 0.0,
    ) -> None:
        if batch < 1 or expires_s <= 0.001 or (max_batch is not None and max_batch < 1):
            raise ValueError("batch and max_batch must be >= 1 and expires_s over 1 ms")
        if not 0 <= linger_s < expires_s:
            raise ValueError("linger_s must be >= 0 and shorter than expires_s")
        self._linger_s = linger_s
        self.stream, self.consumer = stream, consumer
        self.ack_policy: AckPolicy = ack_policy
        self._bus = bus
        # The nats-py access the bus was opened with (`_compat`: checked internals, or public).
        self._internals = bus._internals
        self._batch = batch
        self._expires_s = expires_s
        self._max_batch = max_batch or 4 * batch
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._request_body = json.dumps(
            {"batch": batch, "expires": int(expires_s * 1e9)}
        ).encode()
        self._requests: deque[_Request] = deque()
        self._owed = 0
        self._inbox = ""
        self._raw: RawSubscription | None = None
        self._delivered = 0
        self._acked = 0
        self._sent_requests = 0
        self._statuses: dict[str, int] = {}
        self._foreign = 0
        self._pending = 0
        #: A status message that ends consumption, raised once the messages before it are out.
        self._error: BusError | None = None

    async def __aenter__(self) -> PullConsumer:
        client = self._bus.client
        self._inbox = self._bus.new_inbox()
        try:
            # Requests bound what can be in flight to ~1.5 batches (plus status messages),
            # so this limit is never reached by deliveries we asked for.
            self._raw = await client.subscribe(
                self._inbox,
                pending_msgs_limit=8 * self._batch + 1024,
                pending_bytes_limit=64 * 1024 * 1024,
            )
        except nats.errors.ConnectionClosedError as exc:
            raise BusClosed() from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Unsubscribe the inbox (the server then drops our waiting requests) and flush the
        acks sent so far. What was delivered but not acked is redelivered after `ack_wait`."""
        raw, self._raw = self._raw, None
        self._requests.clear()
        self._owed = 0
        client = self._bus.client
        if raw is None or client.is_closed:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
            try:
                await raw.unsubscribe()
                await client.flush(timeout=5)
            except (nats.errors.Error, ValueError) as exc:
                logger.debug("closing the pull inbox of %s/%s: %s", self.stream, self.consumer,
                             exc)

    def statistics(self) -> PullStatistics:
        return PullStatistics(
            delivered=self._delivered, acked=self._acked, requests=self._sent_requests,
            requested_ahead=self._owed, statuses=dict(self._statuses), foreign=self._foreign,
            pending=self._pending,
        )

    async def drain(self) -> PullBatch:
        """Stop the server sending to this consumer's inbox and return what it sent before;
        handle and `ack` it, then `close()`. Later `next_batch` calls raise `BusClosed`.

        Without this, messages the server sent in the meantime would wait for `ack_wait`.
        """
        raw = self._raw
        client = self._bus.client
        if raw is None or client.is_closed:
            return PullBatch([], [], self._pending)
        self._forget_requests()
        try:
            with anyio.move_on_after(5.0):
                await self._internals.stop_interest(client, raw)
                await client.flush(timeout=5)
        except nats.errors.Error as exc:
            logger.debug("draining the pull inbox of %s/%s: %s", self.stream, self.consumer, exc)
        try:
            batch = self._take_buffered(self._internals.take_nowait(raw), limit=None)
        except BusError:  # only a status message was left (e.g. the consumer was deleted)
            batch = PullBatch([], [], self._pending)
        self._error = BusClosed("pull consumer (drained)")
        return batch

    async def next_batch(self, timeout: float) -> PullBatch:  # noqa: ASYNC109
        """Wait up to `timeout` seconds for messages; return everything buffered by then
        (an empty batch if nothing came).

        Raises:
            ConsumerGone: the consumer, its stream or JetStream is gone (recreate, reopen).
            PullRefused: the server refuses the requests (their size exceeds its limits).
            BusClosed: the connection is closed.
        """
        raw = self._raw
        if raw is None or self._bus.client.is_closed:
            raise BusClosed("pull consumer")
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        await self._request_more()
        msg = self._internals.take_nowait(raw)
        if msg is None:
            with anyio.move_on_after(timeout):
                while msg is None:
                    msg = await self._internals.take(raw)
                    if msg is None:  # the connection closed while waiting
                        raise BusClosed("pull consumer")
            if msg is None:  # the wait timed out
                self._expire_requests()
                return PullBatch([], [], self._pending)
            if self._linger_s and raw.pending_msgs < self._batch // 8:
                # Shielded: `msg` is in hand, so a cancellation now would lose it.
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(self._linger_s)
        return self._take_buffered(msg, limit=self._max_batch)

    def _take_buffered(self, msg: Msg | None, *, limit: int | None) -> PullBatch:
        """`msg` and what is buffered after it (up to `limit` deliveries), without waiting."""
        messages: list[tuple[int, bytes]] = []
        replies: list[str] = []
        raw = self._raw
        if raw is None:
            return PullBatch(messages, replies, self._pending)
        take_nowait, parse = self._internals.take_nowait, stream_sequence
        last_reply = ""
        while msg is not None:
            reply = msg.reply
            seq = parse(reply)
            if seq is not None:
                messages.append((seq, msg.data))
                replies.append(reply)
                last_reply = reply
            else:
                self._on_other(msg)
            if (limit is not None and len(messages) >= limit) or self._error is not None:
                break
            msg = take_nowait(raw)
        self._count_deliveries(len(messages))
        if self._error is not None and not messages:
            error, self._error = self._error, None
            raise error
        if last_reply:
            pending = last_reply.rsplit(".", 1 if last_reply.count(".") == 8 else 2)[1]
            self._pending = int(pending) if pending.isdigit() else self._pending
        return PullBatch(messages, replies, self._pending)

    async def ack(self, batch: PullBatch) -> None:
        """Acknowledge every message of `batch` (after handling it).

        Raises:
            BusClosed: the connection is closed (the batch is redelivered after `ack_wait`).
        """
        if not batch.replies or self.ack_policy == "none":
            return
        publish = self._bus.client.publish
        try:
            if self.ack_policy == "all":
                _, index = max((seq, i) for i, (seq, _) in enumerate(batch.messages))
                await publish(batch.replies[index], _ACK)
            else:
                for reply in batch.replies:
                    await publish(reply, _ACK)
        except nats.errors.ConnectionClosedError as exc:
            raise BusClosed() from exc
        except nats.errors.Error as exc:  # e.g. reconnecting with a full buffer
            raise BusError(f"could not ack {len(batch.replies)} messages: {exc}") from exc
        self._acked += len(batch.replies)

    # -- requests ----------------------------------------------------------------------------

    async def _request_more(self) -> None:
        self._expire_requests()
        if self._owed * 2 > self._batch:
            return
        try:
            await self._bus.client.publish(
                self._next_subject, self._request_body, reply=self._inbox
            )
        except nats.errors.ConnectionClosedError as exc:
            raise BusClosed() from exc
        except nats.errors.Error as exc:
            raise BusError(f"could not send a pull request: {exc}") from exc
        self._sent_requests += 1
        self._requests.append(_Request(self._batch, time.monotonic() + self._expires_s))
        self._owed += self._batch

    def _expire_requests(self) -> None:
        """Forget requests whose `expires` has passed (the server has, or forgot them)."""
        requests, now = self._requests, time.monotonic()
        while requests and requests[0].deadline <= now:
            self._owed -= requests.popleft().owed

    def _count_deliveries(self, n: int) -> None:
        self._delivered += n
        requests = self._requests
        while n and requests:
            head = requests[0]
            used = min(n, head.owed)
            head.owed -= used
            self._owed -= used
            n -= used
            if head.owed == 0:
                requests.popleft()
        if n:  # more than we knew we asked for (a request we had expired still delivered)
            self._owed = max(0, self._owed)

    def _end_oldest_request(self) -> None:
        if self._requests:
            self._owed -= self._requests.popleft().owed

    def _forget_requests(self) -> None:
        self._requests.clear()
        self._owed = 0

    def _on_other(self, msg: Msg) -> None:
        """A message on the inbox that is not a delivery: a status message, or foreign."""
        headers = msg.headers or {}
        status = headers.get(_STATUS)
        if status is None:
            self._foreign += 1
            return
        self._statuses[status] = self._statuses.get(status, 0) + 1
        description = headers.get(_DESCRIPTION, "")
        if status in ("404", "408"):  # no messages / request expired
            self._end_oldest_request()
        elif status == "100":  # an idle heartbeat (we ask for none, but harmless)
            return
        elif status == "503":
            self._forget_requests()
            self._error = ConsumerGone(self.stream, self.consumer, "no responders (503)")
        elif status == "409" and "deleted" in description.lower():
            self._forget_requests()
            self._error = ConsumerGone(self.stream, self.consumer, description or "deleted")
        elif status == "409" and "exceeded maxrequest" in description.lower():
            self._forget_requests()
            self._error = PullRefused(self.stream, self.consumer, status, description)
        elif status == "409":  # leadership change, max waiting, max bytes...: ask again
            logger.info("pull request on %s/%s ended: %s %s", self.stream, self.consumer,
                        status, description)
            self._forget_requests()
        else:
            self._forget_requests()
            self._error = PullRefused(self.stream, self.consumer, status, description)
