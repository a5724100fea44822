"""The load generator with fake calls: counts, bounds and coordinated-omission correction.

No assertion depends on the machine being fast: the latency checks are lower bounds that
the scheduling logic guarantees, which a slow machine only makes larger.
"""

from __future__ import annotations

import anyio
import pytest

from workers.tools.loadgen import LatencyRecorder, OpenLoopResult, closed_loop, open_loop


class Boom(RuntimeError):
    pass


class FakeCall:
    """Counts calls and the most that ran at once; fails every `fail_every`-th call."""

    def __init__(self, *, fail_every: int = 0, hold: anyio.Event | None = None) -> None:
        self.calls = 0
        self.running = 0
        self.max_running = 0
        self.fail_every = fail_every
        self.hold = hold

    async def __call__(self) -> None:
        self.calls += 1
        number = self.calls
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.hold is not None:
                await self.hold.wait()
            else:
                await anyio.lowlevel.checkpoint()
            if self.fail_every and number % self.fail_every == 0:
                raise Boom(f"call {number}")
        finally:
            self.running -= 1


def test_recorder_percentiles_in_milliseconds() -> None:
    recorder = LatencyRecorder()
    for ms in range(1, 101):
        recorder.record(ms / 1000)
    assert recorder.count == 100
    assert recorder.percentile_ms(50) == pytest.approx(50, rel=1e-3)
    assert recorder.percentile_ms(95) == pytest.approx(95, rel=1e-3)
    assert recorder.percentile_ms(100) == pytest.approx(100, rel=1e-3)
    summary = recorder.summary()
    assert summary["count"] == 100 and summary["p99_ms"] == pytest.approx(99, rel=1e-3)


def test_recorder_clamps_and_merges() -> None:
    a, b = LatencyRecorder(max_seconds=1.0), LatencyRecorder(max_seconds=1.0)
    a.record(0.0)  # below a microsecond: recorded as one
    a.record(5.0)  # above the range: recorded as the maximum and counted
    b.record(0.002)
    a.merge(b)
    assert a.count == 3 and a.clamped == 1
    assert a.percentile_ms(0) == pytest.approx(0.001)
    assert a.max_ms == pytest.approx(1000, rel=1e-3)
    assert LatencyRecorder().percentile_ms(99) == 0.0
    with pytest.raises(ValueError):
        a.percentile_ms(101)


def test_recording_all_at_once_equals_recording_one_by_one() -> None:
    values = [0.0, 2e-7, 0.000123, 0.000123, 0.0123456, 0.0123456, 0.5, 2.0, 7.0, 0.03]
    values += [0.001 * (i % 53) + 1e-7 * i for i in range(2000)]
    one_by_one, at_once = LatencyRecorder(max_seconds=5.0), LatencyRecorder(max_seconds=5.0)
    for seconds in values:
        one_by_one.record(seconds)
    at_once.record_all(values)
    assert at_once.count == one_by_one.count == len(values)
    assert at_once.clamped == one_by_one.clamped == 1
    for p in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert at_once.percentile_ms(p) == one_by_one.percentile_ms(p)
    assert at_once.count_within(0.03) == one_by_one.count_within(0.03)
    assert at_once.to_wire() == one_by_one.to_wire()


async def test_open_loop_sends_exactly_rate_times_duration() -> None:
    call = FakeCall()
    result = await open_loop(call, rate=2000, duration_s=0.05)
    assert result.sent == call.calls == 100
    assert result.completed == 100 and result.errors == 0 and result.incomplete == 0
    assert result.latency.count == 100
    assert result.achieved_rate > 0


async def test_open_loop_counts_errors_and_keeps_their_types() -> None:
    call = FakeCall(fail_every=3)
    result = await open_loop(call, rate=1000, duration_s=0.03)
    assert result.sent == 30
    assert result.errors == 10 and result.completed == 20
    assert result.error_types == {"Boom": 10}
    assert result.latency.count == 20  # failed calls have no latency


async def test_open_loop_latency_includes_the_time_a_request_waited_to_be_sent() -> None:
    """A stalled server cannot hide latency: requests due during the stall carry it.

    Five requests are due at 0, 10, 20, 30, 40 ms; only one may be in flight, and the first
    takes 100 ms. An uncorrected (closed-loop) measurement would report requests 2-5 as
    instant; measured from their scheduled time they took at least 100 - 40 = 60 ms.
    """

    async def first_call_stalls() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.sleep(0.1)

    calls = 0
    result = await open_loop(first_call_stalls, rate=100, duration_s=0.05, max_outstanding=1)
    assert result.sent == result.completed == 5
    assert result.late_starts == 4
    assert result.max_start_lag_ms >= 59
    assert result.latency.percentile_ms(0) >= 59  # even the fastest waited out the stall
    assert result.latency.percentile_ms(100) >= 99


async def test_open_loop_never_exceeds_max_outstanding() -> None:
    hold = anyio.Event()
    call = FakeCall(hold=hold)
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            result = await open_loop(call, rate=10_000, duration_s=0.01, max_outstanding=3)
            assert result.sent == result.completed == 100

        tg.start_soon(run)
        while call.running < 3:
            await anyio.lowlevel.checkpoint()
        hold.set()
    assert call.max_running == 3


async def test_open_loop_drain_timeout_reports_incomplete_requests() -> None:
    never = FakeCall(hold=anyio.Event())
    result = await open_loop(never, rate=1000, duration_s=0.005, drain_timeout_s=0.01)
    assert result.sent == 5
    assert result.incomplete == 5 and result.completed == 0 and result.errors == 0


async def test_closed_loop_total_is_exact_and_concurrency_is_held() -> None:
    call = FakeCall(fail_every=4)
    result = await closed_loop(call, concurrency=8, total=200)
    assert call.calls == 200
    assert result.completed == 150 and result.errors == 50
    assert result.latency.count == 150
    assert call.max_running == 8
    assert result.throughput > 0


async def test_closed_loop_by_duration_stops_and_counts() -> None:
    call = FakeCall()
    result = await closed_loop(call, concurrency=4, duration_s=0.02)
    assert result.completed == call.calls > 0
    assert result.errors == 0


async def test_closed_loop_with_both_bounds_stops_at_the_first() -> None:
    call = FakeCall()
    result = await closed_loop(call, concurrency=2, duration_s=60, total=10)
    assert result.completed == call.calls == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0, "duration_s": 1},
        {"rate": 10, "duration_s": 0},
        {"rate": 10, "duration_s": 1, "max_outstanding": 0},
    ],
)
async def test_open_loop_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        await open_loop(FakeCall(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"concurrency": 1}, {"concurrency": 0, "total": 1}, {"concurrency": 1, "duration_s": 0}],
)
async def test_closed_loop_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        await closed_loop(FakeCall(), **kwargs)  # type: ignore[arg-type]


async def test_open_loop_total_and_start_at_let_generators_share_one_schedule() -> None:
    """Two loops on interleaved halves of one schedule send exactly the whole schedule."""
    import time

    start = time.perf_counter() + 0.01
    calls = [FakeCall(), FakeCall()]
    async with anyio.create_task_group() as tg:
        results: list[OpenLoopResult] = []

        async def part(k: int, total: int) -> None:
            results.append(await open_loop(calls[k], rate=500, duration_s=0.02,
                                           start_at=start + k / 1000, total=total))

        tg.start_soon(part, 0, 11)
        tg.start_soon(part, 1, 10)
    assert sorted(r.sent for r in results) == [10, 11]
    assert sum(c.calls for c in calls) == 21
    for r in results:
        assert r.send_lag.count == r.sent and r.latency_from_send.count == r.completed
        assert r.started_at >= start
    with pytest.raises(ValueError):
        await open_loop(FakeCall(), rate=10, duration_s=1, total=-1)
