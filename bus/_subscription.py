"""What both backends' subscriptions share: iteration, `next()`, and drain settling."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import anyio

from bus._types import Envelope
from bus.errors import BusClosed, RequestTimeout


class ConsumedSubscription:
    """Base of `MemorySubscription` and `NatsSubscription`.

    A backend provides `_take()` (the next envelope, or `StopAsyncIteration` once the
    subscription has ended) and `_check_settled()`. `_in_hand` is true while the consumer
    holds a message from `async for`; the bus's `drain()` waits on `_settled`, which is set
    once delivery has stopped, the buffer is empty and no message is in hand.
    """

    subject: str

    def __init__(self) -> None:
        self._in_hand = False
        self._settled = anyio.Event()

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self

    async def __anext__(self) -> Envelope:
        self._in_hand = False  # the consumer is back, so the previous message is handled
        self._check_settled()
        envelope = await self._take()
        self._in_hand = True
        return envelope

    async def next(self, timeout: float | None = None) -> Envelope:  # noqa: ASYNC109
        """Wait for the next envelope.

        Raises:
            RequestTimeout: nothing arrived within `timeout` seconds.
            BusClosed: the subscription ended.
        """
        self._in_hand = False
        deadline = math.inf if timeout is None else timeout
        with anyio.move_on_after(deadline):
            try:
                envelope = await self._take()
            except StopAsyncIteration:
                raise BusClosed("subscription") from None
            self._check_settled()
            return envelope
        raise RequestTimeout(self.subject, deadline)

    async def _take(self) -> Envelope:
        raise NotImplementedError

    def _check_settled(self) -> None:
        raise NotImplementedError
