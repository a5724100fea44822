"""`NatsSubscription`: the read path of every consumer, and its drain.

Messages are read in the caller's task from the subscription's own bounded pending queue
(never `subscribe(cb=...)`, whose tasks nats-py owns), through `_compat.INTERNALS`. Overflow
is dropped by nats-py, reported to `error_cb` as `SlowConsumerError` and counted here.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Literal

import anyio
import nats.errors
from anyio.lowlevel import checkpoint
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as RawSubscription

from bus._subscription import ConsumedSubscription
from bus._types import Envelope, SubscriptionStatistics
from bus.errors import BusError, PermissionDenied
from bus.nats._compat import NatsPyInternals
from bus.nats._errors import translated

if TYPE_CHECKING:
    from bus.nats._bus import NatsBus

__all__ = ["NatsSubscription", "envelope"]

logger = logging.getLogger(__name__)

_Phase = Literal["active", "draining", "drained", "closed"]


def envelope(msg: Msg) -> Envelope:
    """The bus's view of a nats-py message."""
    return Envelope(
        subject=msg.subject, data=msg.data, headers=msg.headers or {}, reply=msg.reply or None
    )


class NatsSubscription(ConsumedSubscription):
    """One subscription on a `NatsBus`; open it with `NatsBus.subscribe`."""

    def __init__(
        self,
        bus: NatsBus,
        raw: RawSubscription,
        subject: str,
        queue: str | None,
        max_pending: int,
        internals: NatsPyInternals,
    ) -> None:
        super().__init__()
        self.subject = subject
        self.queue = queue
        self._bus = bus
        self._raw = raw
        self._internals = internals
        self._max_pending = max_pending
        self._phase: _Phase = "active"
        self._delivered = 0
        self._dropped = 0
        # What `drain()` took out of nats-py's queue so the nats-py subscription can be
        # removed at once; iteration hands these out before ending.
        self._moved: deque[Msg] = deque()
        # Cancel scopes of consumers waiting for a message, so a phase change can wake them.
        self._waiters: set[anyio.CancelScope] = set()
        self._drained = anyio.Event()
        #: Set when the server refused this subscription; iteration raises it.
        self._denied: PermissionDenied | None = None

    def __repr__(self) -> str:
        return f"<NatsSubscription {self.subject!r} queue={self.queue!r} {self._phase}>"

    async def unsubscribe(self) -> None:
        """Stop at once, discarding anything still buffered."""
        await self.close()

    async def drain(self) -> None:
        """Stop new deliveries; iteration yields what is buffered, then ends.

        Returns once the server has stopped sending (a round trip), without waiting
        for the consumer to take the buffered messages.
        """
        if self._phase != "active" or self._bus.client.is_closed:
            await checkpoint()
            return
        self._phase = "draining"
        try:
            with anyio.move_on_after(self._bus.drain_timeout) as deadline:
                with translated(self.subject):
                    await self._internals.stop_interest(self._bus.client, self._raw)
                    await self._bus.round_trip()
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

    # -- what the bus calls ----------------------------------------------------------------

    def deny(self, refusal: PermissionDenied) -> None:
        """The server refused this subscription: iteration raises `refusal`."""
        self._denied = refusal
        self._wake()

    def count_drop(self) -> None:
        self._dropped += 1

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def denied(self) -> PermissionDenied | None:
        return self._denied

    async def wait_settled(self) -> None:
        """Wait until delivery has stopped, the buffer is empty and no message is in hand."""
        await self._settled.wait()

    def wake(self) -> None:
        """Wake consumers waiting for a message, so they look at the bus's state again."""
        self._wake()

    async def close(self, *, unsubscribe: bool = True) -> None:
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
        if unsubscribe and was_active and not self._bus.client.is_closed:
            try:
                await self._raw.unsubscribe()
            except nats.errors.Error as exc:  # draining or reconnecting: nothing to undo
                logger.debug("unsubscribe %r: %s", self.subject, exc)
        else:
            await checkpoint()

    # -- the read path ---------------------------------------------------------------------

    async def _take(self) -> Envelope:
        msg = await self._receive()
        if msg is None:
            self._settled.set()
            raise StopAsyncIteration
        self._delivered += 1
        return envelope(msg)

    def _take_ready(self, limit: int) -> list[Envelope]:
        if self._denied is not None or self._phase == "closed":
            return []
        msgs: list[Msg] = []
        moved = self._moved
        while moved and len(msgs) < limit:
            msgs.append(moved.popleft())
        if self._phase == "active" and len(msgs) < limit:
            # Only while active: once draining, the drain alone reads nats-py's queue.
            msgs += self._internals.take_ready(self._raw, limit - len(msgs))
        self._delivered += len(msgs)
        # `envelope()` inlined: a call less per message on the hot path.
        return [
            Envelope(msg.subject, msg.data, msg.headers or {}, msg.reply or None) for msg in msgs
        ]

    def _check_settled(self) -> None:
        if self._phase in ("active", "draining") or self._in_hand:
            return
        if self._phase == "closed" or not (self._moved or self._raw.pending_msgs):
            self._settled.set()

    async def _receive(self) -> Msg | None:
        """Take the next message, or None once the subscription has ended."""
        internals = self._internals
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
            msg = internals.take_nowait(self._raw)
            if msg is not None:
                return msg
            if self._bus.client.is_closed:
                self._phase = "closed"
                return None
            with anyio.CancelScope() as scope:
                self._waiters.add(scope)
                try:
                    msg = await internals.take(self._raw)
                finally:
                    self._waiters.discard(scope)
            if scope.cancelled_caught or msg is None:
                continue  # woken by `_wake()` after a phase change: look again
            return msg

    def _wake(self) -> None:
        for scope in self._waiters:
            scope.cancel()
