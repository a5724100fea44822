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

    def take_ready(self, limit: int) -> list[Envelope]:
        """Up to `limit` envelopes already buffered, oldest first, without waiting.

        For a reader that looks at everything waiting in one pass: one call instead of an
        `async for` step per message. Empty when nothing is buffered; never ends iteration
        or raises a refusal (the next `async for` step does). What it returns counts as
        delivered and in hand, as the last message of an `async for` step does.
        """
        envelopes = self._take_ready(limit) if limit > 0 else []
        if envelopes:
            self._in_hand = True
        return envelopes

    async def _take(self) -> Envelope:
        raise NotImplementedError

    def _take_ready(self, limit: int) -> list[Envelope]:
        raise NotImplementedError

    def _check_settled(self) -> None:
        raise NotImplementedError
