from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import pytest

from bus import BusClosed
from lukhas.orchestration.context.ratelimit import (
    FlushConfirmer,
    HandoffLimiter,
    InflightGate,
    ParkedConfirmations,
    TokenBucket,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_bucket_allows_the_burst_then_refuses() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    for _ in range(5):
        assert bucket.wait_time() == 0
        bucket.take()
    assert bucket.wait_time() == pytest.approx(0.1)


def test_retry_after_is_exactly_the_time_until_a_token() -> None:
    clock = FakeClock()
    limiter = HandoffLimiter(rate=4, burst=1, clock=clock)
    assert limiter.decide("a").allowed
    refused = limiter.decide("a")
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(0.25)
    clock.advance(0.1)
    assert limiter.decide("a").retry_after_s == pytest.approx(0.15)
    clock.advance(0.15 - 1e-9)
    assert not limiter.decide("a").allowed
    clock.advance(2e-9)
    assert limiter.decide("a").allowed


def test_refill_never_exceeds_the_burst() -> None:
    clock = FakeClock()
    limiter = HandoffLimiter(rate=100, burst=3, clock=clock)
    clock.advance(3600)
    allowed = sum(limiter.decide("a").allowed for _ in range(10))
    assert allowed == 3


def test_accepted_over_time_is_rate_times_t_plus_burst() -> None:
    clock = FakeClock()
    limiter = HandoffLimiter(rate=100, burst=20, clock=clock)
    accepted = 0
    for _ in range(5000):  # 10x the rate for 5 s, in 1 ms steps of 1 offer each
        accepted += limiter.decide("a").allowed
        clock.advance(0.001)
    assert accepted == pytest.approx(100 * 5 + 20, abs=1)


def test_keys_are_isolated_but_share_the_global_bucket() -> None:
    clock = FakeClock()
    limiter = HandoffLimiter(rate=1000, burst=10, key_rate=1, key_burst=2, clock=clock)
    assert [limiter.decide("a").allowed for _ in range(3)] == [True, True, False]
    assert [limiter.decide("b").allowed for _ in range(3)] == [True, True, False]
    tight = HandoffLimiter(rate=1, burst=3, key_rate=10, key_burst=10, clock=clock)
    assert [tight.decide(k).allowed for k in "abcd"] == [True, True, True, False]


def test_a_refusal_by_one_bucket_spends_nothing_from_the_other() -> None:
    clock = FakeClock()
    limiter = HandoffLimiter(rate=1, burst=2, key_rate=1, key_burst=1, clock=clock)
    assert limiter.decide("a").allowed
    assert not limiter.decide("a").allowed  # key bucket empty: global keeps its token
    assert limiter.decide("b").allowed


def test_idle_full_keys_are_forgotten_to_bound_memory() -> None:
    clock = FakeClock()
    limiter = HandoffLimiter(rate=1000, burst=1000, key_rate=10, key_burst=1, max_keys=3,
                             clock=clock)
    for key in "abc":
        limiter.decide(key)
    limiter.decide("d")  # a, b, c all owe a token: none may be forgotten yet
    assert limiter.tracked_keys == 4
    clock.advance(1)
    for key in "efgh":
        limiter.decide(key)
    assert limiter.tracked_keys <= 4


async def test_concurrent_callers_never_exceed_the_burst() -> None:
    clock = FakeClock()
    limiter = HandoffLimiter(rate=1, burst=50, clock=clock)
    results: list[bool] = []

    async def caller() -> None:
        await anyio.lowlevel.checkpoint()
        results.append(limiter.decide("k").allowed)

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(caller)
    assert results.count(True) == 50


async def test_gate_refuses_after_the_timeout_at_the_bound() -> None:
    gate = InflightGate(max_in_flight=2, timeout_s=0.01)
    assert await gate.enter() and await gate.enter()
    assert not await gate.enter()
    assert gate.statistics() == (2, 2, 1)
    gate.leave()
    assert await gate.enter()


async def test_gate_admits_a_waiter_when_a_slot_frees() -> None:
    gate = InflightGate(max_in_flight=1, timeout_s=5)
    assert await gate.enter()
    admitted = anyio.Event()

    async def waiter() -> None:
        if await gate.enter():
            admitted.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert not admitted.is_set()
        gate.leave()
    assert admitted.is_set()


async def test_flush_confirmer_group_commits() -> None:
    flushes = 0
    release = anyio.Event()

    async def flush() -> None:
        nonlocal flushes
        flushes += 1
        await release.wait()

    confirmer = FlushConfirmer(flush)
    done: list[int] = []

    async def confirm(seq: int) -> None:
        await confirmer.confirmed(seq)
        done.append(seq)

    seqs = [confirmer.published() for _ in range(10)]
    async with anyio.create_task_group() as tg:
        for seq in seqs:
            tg.start_soon(confirm, seq)
        await anyio.wait_all_tasks_blocked()
        assert flushes == 1 and done == []
        release.set()
    assert sorted(done) == seqs
    assert flushes == 1


async def test_a_publish_during_a_flush_waits_for_the_next_flush() -> None:
    gates = [anyio.Event(), anyio.Event()]
    flushes = 0

    async def flush() -> None:
        nonlocal flushes
        flushes += 1
        await gates[flushes - 1].wait()

    confirmer = FlushConfirmer(flush)
    done: list[int] = []

    async def confirm(seq: int) -> None:
        await confirmer.confirmed(seq)
        done.append(seq)

    async with anyio.create_task_group() as tg:
        tg.start_soon(confirm, confirmer.published())
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(confirm, confirmer.published())  # published while flush 1 is running
        await anyio.wait_all_tasks_blocked()
        gates[0].set()
        await anyio.wait_all_tasks_blocked()
        assert done == [1] and flushes == 2
        gates[1].set()
    assert done == [1, 2]


async def test_parked_calls_are_confirmed_in_groups_without_a_task_each() -> None:
    """A call parked while a flush slot is free gets its flush started in `park` itself
    (pipelined behind any running one, not held back until it ends); with every slot
    taken calls gather, and the first flush to end starts one for all of them; a failed
    flush answers exactly the calls it covered with its error; `close()` ends `run()`."""
    gates: list[anyio.Event] = []
    outcomes = [None, RuntimeError("flush refused"), None]

    def flush() -> Awaitable[None]:  # starts when called, as `NatsBus.flush` sends its PING
        gate = anyio.Event()
        gates.append(gate)
        outcome = outcomes[len(gates) - 1]

        async def ended() -> None:
            await gate.wait()
            if outcome is not None:
                raise outcome
        return ended()

    answered: dict[int, Exception | None] = {}

    async def settle(batch: list[int], error: Exception | None) -> None:
        for n in batch:
            answered[n] = error

    parked: ParkedConfirmations[int] = ParkedConfirmations(flush, settle, max_flushes=2)

    def done(n: int) -> int:
        return n

    async with anyio.create_task_group() as tg:
        tg.start_soon(parked.run)
        await anyio.wait_all_tasks_blocked()
        parked.park(done(0))
        assert len(gates) == 1  # started by `park`, before any task ran
        parked.park(done(1))  # parked while the first flush runs: its own flush, at once
        assert len(gates) == 2 and parked.parked == 0
        for n in range(2, 6):  # both slots taken: these four gather
            parked.park(done(n))
        await anyio.wait_all_tasks_blocked()
        assert len(gates) == 2 and answered == {} and parked.parked == 4
        gates[1].set()  # the second flush fails
        await anyio.wait_all_tasks_blocked()
        assert isinstance(answered.pop(1), RuntimeError) and answered == {}
        assert len(gates) == 3 and parked.parked == 0  # one flush for the four
        gates[0].set()
        gates[2].set()
        parked.close()
    assert answered == {0: None, 2: None, 3: None, 4: None, 5: None}
    assert parked.flushes == 3


async def test_a_flush_that_cannot_start_answers_its_calls_with_the_error() -> None:
    """`flush()` raising at the call (a closed bus) answers the call parked with it."""

    def flush() -> Awaitable[None]:
        raise BusClosed("closed")

    answered: list[Exception | None] = []

    async def settle(batch: list[str], error: Exception | None) -> None:
        answered.extend(error for _ in batch)

    parked: ParkedConfirmations[str] = ParkedConfirmations(flush, settle)
    async with anyio.create_task_group() as tg:
        tg.start_soon(parked.run)
        parked.park("call")
        await anyio.wait_all_tasks_blocked()
        parked.close()
    assert len(answered) == 1 and isinstance(answered[0], BusClosed)


# -- the shared limiter (buckets in a lease store every worker draws from) ------------------


async def test_workers_sharing_a_store_accept_one_rate_not_one_each() -> None:
    from lukhas.ratelimit import MemoryLeaseStore, SharedLimiter

    clock = FakeClock()
    store = MemoryLeaseStore(clock=clock)
    workers = [
        SharedLimiter(store, name="handoff", rate=100, burst=20, clock=clock) for _ in range(4)
    ]
    accepted = 0
    for step in range(5000):  # 10x the rate for 5 s, in 1 ms steps, round-robin
        accepted += (await workers[step % 4].decide("a")).allowed
        clock.advance(0.001)
    assert accepted == pytest.approx(100 * 5 + 20, abs=4)  # 4 workers may hold a token each


async def test_shared_retry_after_is_the_time_until_the_shared_bucket_has_a_token() -> None:
    from lukhas.ratelimit import MemoryLeaseStore, SharedLimiter

    clock = FakeClock()
    store = MemoryLeaseStore(clock=clock)
    a = SharedLimiter(store, name="h", rate=4, burst=1, clock=clock)
    b = SharedLimiter(store, name="h", rate=4, burst=1, clock=clock)
    assert (await a.decide("k")).allowed
    refused = await b.decide("k")
    assert not refused.allowed and refused.retry_after_s == pytest.approx(0.25)
    clock.advance(0.1)
    assert (await b.decide("k")).retry_after_s == pytest.approx(0.15)  # answered locally
    clock.advance(0.15)
    assert (await b.decide("k")).allowed
    assert not (await a.decide("k")).allowed


async def test_shared_refusal_by_one_bucket_spends_nothing_from_the_other() -> None:
    from lukhas.ratelimit import MemoryLeaseStore, SharedLimiter

    clock = FakeClock()
    limiter = SharedLimiter(MemoryLeaseStore(clock=clock), name="h", rate=1, burst=2,
                            key_rate=1, key_burst=1, clock=clock)
    assert (await limiter.decide("a")).allowed
    assert not (await limiter.decide("a")).allowed  # key bucket empty: global keeps its token
    assert (await limiter.decide("b")).allowed
    assert not (await limiter.decide("c")).allowed  # and now the global one is empty


async def test_concurrent_shared_callers_never_exceed_the_burst() -> None:
    from lukhas.ratelimit import MemoryLeaseStore, SharedLimiter

    clock = FakeClock()
    limiter = SharedLimiter(MemoryLeaseStore(clock=clock), name="h", rate=1, burst=50,
                            clock=clock)
    results: list[bool] = []

    async def caller() -> None:
        await anyio.lowlevel.checkpoint()
        results.append((await limiter.decide("k")).allowed)

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(caller)
    assert results.count(True) == 50


async def test_flushes_that_call_back_settle_in_place_and_hand_the_rest_to_a_task() -> None:
    """With `flush_calling`, a flush's end settles its calls in place (`settle_now`, no task),
    what `settle_now` hands back is settled by a confirming task with the same error, calls
    gathered at the flush bound get one flush when one ends, and `close()` ends `run()`."""
    ends: list[Callable[[Exception | None], None]] = []
    in_place: list[tuple[list[int], Exception | None]] = []
    by_task: list[tuple[list[int], Exception | None]] = []

    def flush() -> Awaitable[None]:
        raise AssertionError("flush_calling serves every flush here")

    def flush_calling(ended: Callable[[Exception | None], None]) -> bool:
        ends.append(ended)
        return True

    def settle_now(batch: list[int], error: Exception | None) -> list[int]:
        in_place.append((batch, error))
        return [n for n in batch if n % 2]  # the odd ones cannot be answered in place

    async def settle(batch: list[int], error: Exception | None) -> None:
        by_task.append((batch, error))

    parked: ParkedConfirmations[int] = ParkedConfirmations(
        flush, settle, flush_calling=flush_calling, settle_now=settle_now, max_flushes=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(parked.run)
        await anyio.wait_all_tasks_blocked()
        parked.park(0)
        parked.park(1)
        for n in range(2, 5):  # both flushes in flight: these gather
            parked.park(n)
        assert len(ends) == 2 and parked.parked == 3 and in_place == []
        ends[0](None)  # as nats-py's reader reads the first PONG
        assert in_place == [([0], None)] and len(ends) == 3 and parked.parked == 0
        refused = RuntimeError("refused")
        ends[1](refused)
        assert in_place[-1] == ([1], refused)
        await anyio.wait_all_tasks_blocked()
        assert by_task == [([1], refused)]  # handed back: a task settled it, same error
        parked.close()
        ends[2](None)  # the last flush in flight ends: `run()` returns
    assert in_place[-1] == ([2, 3, 4], None)
    assert by_task == [([1], refused), ([3], None)]
    assert parked.flushes == 3
