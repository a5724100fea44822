"""Overload protection and delivery confirmation for handoffs.

A token bucket answers at once: a token now, or how long until one exists (`retry_after`).
The in-flight gate bounds handoffs published but not yet confirmed by the bus; at the bound
a caller waits a short, bounded time for room (or, deferred, none), then is refused.
Confirmations are grouped: one flush round trip confirms every publish made before it,
for callers awaiting it (`FlushConfirmer`) and for calls parked without a task of their own
(`ParkedConfirmations`).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, NamedTuple, TypeVar

import anyio

from lukhas.ratelimit import Clock, Decision, KeyedLimiter, TokenBucket

__all__ = [
    "Clock", "Decision", "FlushConfirmer", "GateStatistics", "HandoffLimiter", "InflightGate",
    "ParkedConfirmations", "TokenBucket",
]

T = TypeVar("T")

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

    def enter_nowait(self) -> bool:
        """Take a slot if one is free now; False means backpressure."""
        try:
            self._semaphore.acquire_nowait()
        except anyio.WouldBlock:
            self._refused += 1
            return False
        return True

    def leave(self) -> None:
        self._semaphore.release()

    def statistics(self) -> GateStatistics:
        in_flight = self._max - self._semaphore.value
        return GateStatistics(in_flight, self._max, self._refused)


class _Flush:
    """One flush generation: what it covers and how it ended (set once, then read-only)."""

    __slots__ = ("done", "error", "target")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.target = 0
        self.error: BaseException | None = None


class FlushConfirmer:
    """Confirms core publishes by group flush: one bus round trip covers every publish before it.

    Each caller records its publish with `published()` and awaits `confirmed(seq)`. At most
    one flush runs at a time and covers every publish made before it started; a caller whose
    publish it covers parks on that flush's event. Callers published after it started park on
    the *next* flush, whose leader (the first of them) starts it as soon as the running one
    ends, so every caller waits on exactly one event and confirmation never claims more than
    the server has seen. A failed flush fails every caller it covered; a cancelled leader
    leaves its callers to try again.
    """

    __slots__ = ("_confirmed", "_flush", "_inflight", "_next", "_published", "flushes")

    def __init__(self, flush: Callable[[], object]) -> None:
        self._flush = flush
        self._published = 0
        self._confirmed = 0
        self._inflight: _Flush | None = None
        self._next: _Flush | None = None
        #: Flushes made, for tests and benches (calls / flushes = the coalescing factor).
        self.flushes = 0

    def published(self) -> int:
        self._published += 1
        return self._published

    async def confirmed(self, seq: int) -> None:
        """Return once a flush started after publish `seq` has completed.

        Raises:
            BusError: the flush covering `seq` failed (e.g. `RequestTimeout`,
                `PermissionDenied`).
        """
        while self._confirmed < seq:
            inflight = self._inflight
            if inflight is not None and seq <= inflight.target:
                await inflight.done.wait()
                if inflight.error is not None:
                    raise inflight.error
                continue
            upcoming = self._next
            if upcoming is not None:
                await upcoming.done.wait()
                if upcoming.error is not None:
                    raise upcoming.error
                continue
            gen = _Flush()
            if inflight is not None:
                # Lead the next flush once the running one ends.
                self._next = gen
                try:
                    await inflight.done.wait()
                except BaseException:
                    self._next = None
                    gen.done.set()  # its waiters loop and one of them leads instead
                    raise
                self._next = None
            await self._lead(gen)

    async def _lead(self, gen: _Flush) -> None:
        gen.target = self._published
        self._inflight = gen
        self.flushes += 1
        try:
            await self._flush()  # type: ignore[misc]
            if gen.target > self._confirmed:
                self._confirmed = gen.target
        except Exception as exc:
            gen.error = exc
            raise
        finally:
            self._inflight = None
            gen.done.set()


#: Answers parked calls once the flush covering them ended: with None, or the flush's error.
Settle = Callable[[list[T], Exception | None], Awaitable[None]]
#: The same in place (from the bus's reader, no task): answers what it can now and returns
#: the calls it could not, which `Settle` then answers from a confirming task.
SettleNow = Callable[[list[T], Exception | None], list[T]]
#: Starts a flush whose end calls the function given, in place (`NatsBus.flush_calling`);
#: False when it cannot now (then `flush`).
FlushCalling = Callable[[Callable[[Exception | None], None]], bool]


class ParkedConfirmations(Generic[T]):
    """Calls parked until a flush covers their publish, confirmed in groups.

    `park(call)` records a call whose publish is already made. While fewer than
    `max_flushes` flushes are running it starts one for the call at once: a flush that
    sends its PING when called (`NatsBus.flush`) has it on the wire before `park` returns,
    so the call waits one round trip, no task hop and no other call's flush. PINGs are
    answered in order, so the flushes pipeline on the connection. At the bound, calls
    gather and the first flush to end starts one for all of them: under heavy load the
    groups grow instead of the flushes.

    With `flush_calling` and `settle_now` (the NATS bus), a flush's end answers the calls
    it covered in place, as its PONG is read (`settle_now`): no task is woken between the
    PONG and the replies. Otherwise (or for the calls `settle_now` hands back) an idle
    confirming task (`run()` keeps `max_flushes` of them) awaits each flush started and
    then `settle`s the calls it covered, so a parked call costs no task of its own and
    every flush covers every call it confirms. `close()` lets `run()` return once nothing
    is parked or in flight. Bound the number parked upstream (the in-flight gate).
    """

    __slots__ = (
        "_closed", "_flush", "_flush_calling", "_flushing", "_idle", "_max_flushes", "_parked",
        "_settle", "_settle_now", "_started", "flushes",
    )

    def __init__(
        self,
        flush: Callable[[], Awaitable[object]],
        settle: Settle[T],
        *,
        flush_calling: FlushCalling | None = None,
        settle_now: SettleNow[T] | None = None,
        max_flushes: int = 4,
    ) -> None:
        self._flush = flush
        self._settle = settle
        self._flush_calling = flush_calling if settle_now is not None else None
        self._settle_now = settle_now
        self._max_flushes = max_flushes
        #: Flushes started and not yet ended.
        self._flushing = 0
        #: Work for the confirming tasks, oldest first: a flush started, with the calls it
        #: covers (`running` True), or calls whose flush ended with the error given.
        self._started: deque[tuple[list[T], Awaitable[object] | Exception | None, bool]] = (
            deque())
        #: Calls waiting for a flush to start (every flush slot was taken).
        self._parked: list[T] = []
        #: The wake-up events of the confirming tasks waiting for work.
        self._idle: list[anyio.Event] = []
        self._closed = False
        #: Flushes made, for tests and benches (calls / flushes = the grouping factor).
        self.flushes = 0

    @property
    def parked(self) -> int:
        """Calls parked and not yet covered by a flush."""
        return len(self._parked)

    def park(self, call: T) -> None:
        if self._flushing < self._max_flushes:
            self._start([call])
        else:
            self._parked.append(call)

    def _start(self, batch: list[T]) -> None:
        self._flushing += 1
        self.flushes += 1
        flushed: Awaitable[object] | Exception
        try:
            if self._flush_calling is not None and self._flush_calling(
                    functools.partial(self._ended, batch)):
                return
            flushed = self._flush()
        except Exception as exc:  # e.g. the bus is closed: its calls answer with it
            flushed = exc
        self._hand_over(batch, flushed, True)

    def _hand_over(
        self, batch: list[T], flushed: Awaitable[object] | Exception | None, running: bool
    ) -> None:
        self._started.append((batch, flushed, running))
        if self._idle:
            self._idle.pop().set()

    def _ended(self, batch: list[T], error: Exception | None) -> None:
        """A `flush_calling` flush ended (called in place, from the bus's reader)."""
        self._flushing -= 1
        self._start_gathered()
        assert self._settle_now is not None
        try:
            rest = self._settle_now(batch, error)
        except Exception as exc:  # never lose a call: the tasks answer what is left
            rest = batch
            error = error or exc
        if rest:
            self._hand_over(rest, error, False)
        self._close_if_done()

    def _start_gathered(self) -> None:
        if self._parked:  # gathered while every flush slot was taken
            gathered, self._parked = self._parked, []
            self._start(gathered)

    def _close_if_done(self) -> None:
        if self._closed and not self._flushing:
            self.close()  # wake the idle tasks: nothing more will come

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().set()

    async def run(self) -> None:
        """Confirm parked calls until `close()` and none is left parked or in flight."""
        async with anyio.create_task_group() as tg:
            for _ in range(self._max_flushes):
                tg.start_soon(self._confirm)

    async def _confirm(self) -> None:
        while True:
            if not self._started:
                if self._closed and not self._flushing:
                    return
                wake = anyio.Event()
                self._idle.append(wake)
                await wake.wait()
                continue
            batch, flushed, running = self._started.popleft()
            error: Exception | None = None
            if not running:
                error = flushed if isinstance(flushed, Exception) else None
            else:
                try:
                    if isinstance(flushed, Exception):
                        raise flushed
                    await flushed  # type: ignore[misc]
                except Exception as exc:  # each call it covered answers with it
                    error = exc
                finally:
                    self._flushing -= 1
                    self._start_gathered()
                    self._close_if_done()
            await self._settle(batch, error)
