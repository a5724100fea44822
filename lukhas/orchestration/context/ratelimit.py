"""Overload protection for handoffs: token buckets (rate) and an in-flight gate (backpressure).

A token bucket answers at once: a token now, or how long until one exists (`retry_after`).
The in-flight gate bounds handoffs published but not yet confirmed by the bus; at the bound
a caller waits a short, bounded time for room, then is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import anyio

from lukhas.ratelimit import Clock, Decision, KeyedLimiter, TokenBucket

__all__ = [
    "Clock", "Decision", "FlushConfirmer", "GateStatistics", "HandoffLimiter", "InflightGate",
    "TokenBucket",
]

#: The handoff limiter is the shared keyed limiter (global bucket plus one per source).
HandoffLimiter = KeyedLimiter


class GateStatistics(NamedTuple):
    in_flight: int
    max_in_flight: int
    refused: int


class InflightGate:
    """Bounds in-flight handoffs; `enter()` waits up to `timeout_s` for room, else returns False."""

    def __init__(self, max_in_flight: int, timeout_s: float) -> None:
        self._semaphore = anyio.Semaphore(max_in_flight, max_value=max_in_flight)
        self._max = max_in_flight
        self._timeout_s = timeout_s
        self._refused = 0

    async def enter(self) -> bool:
        """Take a slot, waiting at most the configured timeout; False means backpressure."""
        try:
            self._semaphore.acquire_nowait()
            return True
        except anyio.WouldBlock:
            pass
        with anyio.move_on_after(self._timeout_s):
            await self._semaphore.acquire()
            return True
        self._refused += 1
        return False

    def leave(self) -> None:
        self._semaphore.release()

    def statistics(self) -> GateStatistics:
        in_flight = self._max - self._semaphore.value
        return GateStatistics(in_flight, self._max, self._refused)


class FlushConfirmer:
    """Confirms core publishes by group flush: one bus round trip covers every publish before it.

    Each caller records its publish with `published()` and awaits `confirmed(seq)`. The first
    waiter with no flush in progress leads a flush; publishes made during that flush wait
    for the next one, so confirmation never claims more than the server has seen.
    """

    def __init__(self, flush: Callable[[], object]) -> None:
        self._flush = flush
        self._published = 0
        self._confirmed = 0
        self._flushing: anyio.Event | None = None

    def published(self) -> int:
        self._published += 1
        return self._published

    async def confirmed(self, seq: int) -> None:
        while self._confirmed < seq:
            if self._flushing is not None:
                await self._flushing.wait()
                continue
            done = self._flushing = anyio.Event()
            target = self._published
            try:
                await self._flush()  # type: ignore[misc]
                self._confirmed = max(self._confirmed, target)
            finally:
                self._flushing = None
                done.set()
