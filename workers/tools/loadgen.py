"""Load generation for the benchmark and the acceptance gate: open and closed loops.

`open_loop` sends on a clock: request `i` is due at `start + i / rate`, whatever happened
to the requests before it, and its latency is measured from that *scheduled* time. So a
server that stalls cannot hide the stall by slowing the sender down (the "coordinated
omission" of closed-loop benchmarks): requests that had to wait to be sent carry the wait
in their latency. `closed_loop` keeps `concurrency` requests in flight, one after another
per slot, and measures throughput.

Latencies go into an HDR histogram (microseconds, 3 significant digits), so percentiles
stay exact to 0.1 % however long the run. Results travel between processes as `to_wire()`
dicts (histograms encoded whole) and `merge_open` / `merge_closed` add several generators'
results up exactly: counts are summed and histograms merged, never percentiles averaged.
Each open-loop result also says how late its generator sent (`send_lag`), so a generator
that could not keep its schedule is told apart from a slow service.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from hdrh.histogram import HdrHistogram

__all__ = [
    "Call",
    "ClosedLoopResult",
    "LatencyRecorder",
    "OpenLoopResult",
    "closed_loop",
    "merge_closed",
    "merge_open",
    "open_loop",
]

#: One request: an async callable with no arguments. Raising counts as an error.
Call = Callable[[], Awaitable[Any]]

_clock = time.perf_counter


class LatencyRecorder:
    """An HDR histogram of latencies in microseconds (3 significant digits).

    Values above `max_seconds` are recorded as `max_seconds` (and counted in `clamped`),
    values below one microsecond as one microsecond.
    """

    __slots__ = ("_hist", "_highest_us", "clamped")

    def __init__(self, *, max_seconds: float = 60.0) -> None:
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, not {max_seconds}")
        self._highest_us = max(2, int(max_seconds * 1_000_000))
        self._hist = HdrHistogram(1, self._highest_us, 3)
        self.clamped = 0

    def __repr__(self) -> str:
        return (
            f"<LatencyRecorder count={self.count} p50={self.percentile_ms(50):.3f}ms "
            f"p99={self.percentile_ms(99):.3f}ms>"
        )

    def record(self, seconds: float) -> None:
        """Record one latency, given in seconds."""
        value = int(seconds * 1_000_000)
        if value < 1:
            value = 1
        elif value > self._highest_us:
            value = self._highest_us
            self.clamped += 1
        self._hist.record_value(value)

    def record_all(self, seconds: Iterable[float]) -> None:
        """Record every latency in `seconds`, as `record` would one by one.

        Values are counted per microsecond first and each distinct one recorded once with
        its count: one HDR record per distinct value instead of one per value (an HDR record
        costs about 2 µs in Python; a run's latencies share a few thousand values).
        """
        highest = self._highest_us
        counts = Counter(int(value * 1_000_000) for value in seconds)
        for value, count in counts.items():
            if value < 1:
                value = 1
            elif value > highest:
                value = highest
                self.clamped += count
            self._hist.record_value(value, count)

    def percentile_ms(self, p: float) -> float:
        """The latency at percentile `p` (0-100) in milliseconds; 0.0 when nothing is recorded."""
        if not 0 <= p <= 100:
            raise ValueError(f"a percentile is between 0 and 100, not {p}")
        if self.count == 0:
            return 0.0
        return float(self._hist.get_value_at_percentile(p)) / 1000.0

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    @property
    def mean_ms(self) -> float:
        return float(self._hist.get_mean_value()) / 1000.0 if self.count else 0.0

    @property
    def max_ms(self) -> float:
        return float(self._hist.get_max_value()) / 1000.0 if self.count else 0.0

    def count_within(self, seconds: float) -> int:
        """How many recorded latencies were at most `seconds` (to the histogram's precision)."""
        limit = seconds * 1_000_000
        return sum(
            int(item.count_at_value_iterated_to)
            for item in self._hist.get_recorded_iterator()
            if item.value_iterated_to <= limit
        )

    def merge(self, other: LatencyRecorder) -> None:
        """Add every value `other` recorded to this recorder."""
        self._hist.add(other._hist)
        self.clamped += other.clamped

    def to_wire(self) -> dict[str, Any]:
        """The whole histogram as JSON-safe data (HDR's compressed V2 encoding)."""
        return {"hdr": self._hist.encode().decode("ascii"), "clamped": self.clamped,
                "max_us": self._highest_us}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LatencyRecorder:
        """The recorder `to_wire` described, every value in it."""
        recorder = cls(max_seconds=int(data["max_us"]) / 1_000_000)
        recorder._hist.decode_and_add(data["hdr"].encode("ascii"))
        recorder.clamped = int(data["clamped"])
        return recorder

    @classmethod
    def merged(cls, recorders: Iterable[LatencyRecorder]) -> LatencyRecorder:
        """One recorder holding every value of `recorders`."""
        total = cls()
        for recorder in recorders:
            total.merge(recorder)
        return total

    def summary(self) -> dict[str, float]:
        """count, p50/p95/p99/max and mean in milliseconds, rounded to the microsecond."""
        return {
            "count": self.count,
            "p50_ms": round(self.percentile_ms(50), 3),
            "p95_ms": round(self.percentile_ms(95), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "max_ms": round(self.max_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
        }


@dataclass(frozen=True, slots=True)
class OpenLoopResult:
    """What an open-loop run did. Latencies are from each request's scheduled send time."""

    rate: float
    duration_s: float
    #: Requests started (all that were due, unless the run was cut short).
    sent: int
    completed: int
    errors: int
    #: Requests still in flight when the drain timeout ran out (neither completed nor errors).
    incomplete: int
    latency: LatencyRecorder
    #: Requests sent / seconds from the first scheduled send to the last actual send.
    achieved_rate: float
    #: Requests that started more than `late_after_s` after their scheduled time.
    late_starts: int
    #: The largest gap between a request's scheduled and actual send time.
    max_start_lag_ms: float
    #: Seconds from the first scheduled send until the last request finished.
    elapsed_s: float
    error_types: dict[str, int] = field(default_factory=dict)
    #: When the call returns a string (an outcome such as "ok" or "overloaded"), the
    #: latencies of each outcome, also from the scheduled send time.
    by_outcome: dict[str, LatencyRecorder] = field(default_factory=dict)
    #: How late each request left against its schedule (from its due time to when its
    #: task began sending; an early start, within the timer slack, counts as 1 µs). A
    #: generator whose lag grows is saturated itself: its late sends count in `latency`.
    send_lag: LatencyRecorder = field(default_factory=LatencyRecorder)
    #: Latencies of completed requests from when each actually left (not its schedule): what
    #: the service and network took, without the generator's own lateness.
    latency_from_send: LatencyRecorder = field(default_factory=LatencyRecorder)
    #: `time.perf_counter()` at the first scheduled send and at the last actual send
    #: (CLOCK_MONOTONIC on Linux: comparable across the processes of one machine).
    started_at: float = 0.0
    last_send_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "duration_s": self.duration_s,
            "sent": self.sent,
            "completed": self.completed,
            "errors": self.errors,
            "incomplete": self.incomplete,
            "achieved_rate": round(self.achieved_rate, 1),
            "late_starts": self.late_starts,
            "max_start_lag_ms": round(self.max_start_lag_ms, 3),
            "elapsed_s": round(self.elapsed_s, 3),
            "latency": self.latency.summary(),
            "latency_from_send": self.latency_from_send.summary(),
            "send_lag": self.send_lag.summary(),
            "error_types": dict(self.error_types),
            "by_outcome": {k: v.summary() for k, v in self.by_outcome.items()},
        }

    def to_wire(self) -> dict[str, Any]:
        """Everything, histograms whole, as JSON-safe data for `from_wire` in another process."""
        return {
            "rate": self.rate, "duration_s": self.duration_s, "sent": self.sent,
            "completed": self.completed, "errors": self.errors, "incomplete": self.incomplete,
            "achieved_rate": self.achieved_rate, "late_starts": self.late_starts,
            "max_start_lag_ms": self.max_start_lag_ms, "elapsed_s": self.elapsed_s,
            "error_types": dict(self.error_types),
            "latency": self.latency.to_wire(),
            "by_outcome": {k: v.to_wire() for k, v in self.by_outcome.items()},
            "send_lag": self.send_lag.to_wire(),
            "latency_from_send": self.latency_from_send.to_wire(),
            "started_at": self.started_at, "last_send_at": self.last_send_at,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> OpenLoopResult:
        return cls(
            rate=float(data["rate"]), duration_s=float(data["duration_s"]),
            sent=int(data["sent"]), completed=int(data["completed"]),
            errors=int(data["errors"]), incomplete=int(data["incomplete"]),
            latency=LatencyRecorder.from_wire(data["latency"]),
            achieved_rate=float(data["achieved_rate"]), late_starts=int(data["late_starts"]),
            max_start_lag_ms=float(data["max_start_lag_ms"]),
            elapsed_s=float(data["elapsed_s"]), error_types=dict(data["error_types"]),
            by_outcome={k: LatencyRecorder.from_wire(v) for k, v in data["by_outcome"].items()},
            send_lag=LatencyRecorder.from_wire(data["send_lag"]),
            latency_from_send=LatencyRecorder.from_wire(data["latency_from_send"]),
            started_at=float(data["started_at"]), last_send_at=float(data["last_send_at"]),
        )


@dataclass(frozen=True, slots=True)
class ClosedLoopResult:
    """What a closed-loop run did. Latencies are from each request's actual send time."""

    concurrency: int
    completed: int
    errors: int
    latency: LatencyRecorder
    #: Seconds from the start until the last request finished.
    elapsed_s: float
    error_types: dict[str, int] = field(default_factory=dict)
    #: When the call returns a string (an outcome such as "ok" or "overloaded"): how many
    #: calls had each outcome.
    by_outcome: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Completed requests per second."""
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_wire(self) -> dict[str, Any]:
        """Everything, the histogram whole, as JSON-safe data for `from_wire`."""
        return {
            "concurrency": self.concurrency, "completed": self.completed,
            "errors": self.errors, "latency": self.latency.to_wire(),
            "elapsed_s": self.elapsed_s, "error_types": dict(self.error_types),
            "by_outcome": dict(self.by_outcome),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ClosedLoopResult:
        return cls(**{**data, "latency": LatencyRecorder.from_wire(data["latency"])})

    def as_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "completed": self.completed,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "throughput": round(self.throughput, 1),
            "latency": self.latency.summary(),
            "error_types": dict(self.error_types),
            "by_outcome": dict(self.by_outcome),
        }


async def open_loop(
    call: Call,
    *,
    rate: float,
    duration_s: float,
    max_outstanding: int = 10_000,
    late_after_s: float = 0.001,
    drain_timeout_s: float | None = None,
    timer_slack_s: float = 0.001,
    start_at: float | None = None,
    total: int | None = None,
) -> OpenLoopResult:
    """Send `floor(rate * duration_s)` requests, request `i` due at `i / rate` seconds.

    Sending never waits for replies, except that at most `max_outstanding` requests are in
    flight: beyond that the next send waits for a slot, and that wait counts in its latency
    (it is still measured from the scheduled time). After the last send, in-flight
    requests are awaited, for at most `drain_timeout_s` seconds if given; those cut off
    are reported as `incomplete`.

    The event loop's timers fire up to a millisecond late (epoll counts milliseconds), so
    a request may leave up to `timer_slack_s` *before* its due time rather than after it;
    its latency is then measured from when it actually left. Either way the latency is
    from the earlier of the scheduled and the actual send, never from a late send.

    `start_at` (a `time.perf_counter()` instant, by default half a millisecond from now)
    is when request 0 is due, and `total` overrides how many requests are sent: together
    they let several generators, in several processes, interleave one schedule.

    Raises:
        ValueError: a non-positive rate, duration or `max_outstanding`, a negative total.
    """
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number, not {rate}")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, not {duration_s}")
    if max_outstanding < 1:
        raise ValueError(f"max_outstanding must be at least 1, not {max_outstanding}")
    if timer_slack_s < 0:
        raise ValueError(f"timer_slack_s must not be negative, not {timer_slack_s}")
    if total is not None and total < 0:
        raise ValueError(f"total must not be negative, not {total}")
    if total is None:
        # The tiny epsilon keeps e.g. 0.3 s * 10/s at 3 requests despite float rounding.
        total = math.floor(rate * duration_s + 1e-9)
    interval = 1.0 / rate
    latency = LatencyRecorder()
    from_send = LatencyRecorder()
    send_lag = LatencyRecorder()
    slots = anyio.Semaphore(max_outstanding)
    errors: Counter[str] = Counter()
    completed = 0
    sent = 0
    late = 0
    max_lag = 0.0
    last_send = 0.0
    last_done = 0.0

    by_outcome: dict[str, LatencyRecorder] = {}

    async def one(scheduled: float) -> None:
        nonlocal completed, last_done, late, max_lag, last_send
        left = _clock()  # the task begins sending now: the generator's lag ends here
        lag = left - scheduled
        send_lag.record(lag)
        if lag > late_after_s:
            late += 1
        if lag > max_lag:
            max_lag = lag
        if left > last_send:
            last_send = left
        origin = min(left, scheduled)
        try:
            outcome = await call()
        except Exception as exc:  # the load generator's boundary: a failed call is a count
            errors[type(exc).__name__] += 1
        else:
            done = _clock()
            took = done - origin
            latency.record(took)
            from_send.record(done - left)
            if isinstance(outcome, str):
                if outcome not in by_outcome:
                    by_outcome[outcome] = LatencyRecorder()
                by_outcome[outcome].record(took)
            completed += 1
        finally:
            last_done = _clock()
            slots.release()

    start = _clock() + 0.0005 if start_at is None else start_at
    with anyio.CancelScope() as drain_scope:
        async with anyio.create_task_group() as tg:
            for i in range(total):
                scheduled = start + i * interval
                delay = scheduled - timer_slack_s - _clock()
                if delay > 0:
                    await anyio.sleep(delay)
                await slots.acquire()
                tg.start_soon(one, scheduled)
                sent += 1
            if drain_timeout_s is not None:
                drain_scope.deadline = anyio.current_time() + drain_timeout_s
    failed = sum(errors.values())
    send_span = max(duration_s, last_send - start)
    return OpenLoopResult(
        rate=rate,
        duration_s=duration_s,
        sent=sent,
        completed=completed,
        errors=failed,
        incomplete=sent - completed - failed,
        latency=latency,
        achieved_rate=sent / send_span if send_span > 0 else 0.0,
        late_starts=late,
        max_start_lag_ms=max_lag * 1000.0,
        elapsed_s=max(last_done, last_send, start) - start,
        error_types=dict(errors),
        by_outcome=by_outcome,
        send_lag=send_lag,
        latency_from_send=from_send,
        started_at=start,
        last_send_at=max(last_send, start),
    )


def merge_open(parts: Sequence[OpenLoopResult]) -> OpenLoopResult:
    """Several generators' parts of one open-loop run as one result, exactly.

    The parts ran at the same time (on interleaved schedules, as `open_loop`'s `start_at`
    and `total` allow): counts add up, histograms merge, the rate is the sum of the parts'
    rates and the achieved rate is every send over the span from the first due time to the
    last send of any part.

    Raises:
        ValueError: no parts.
    """
    if not parts:
        raise ValueError("nothing to merge")
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part.error_types)
    outcomes = sorted({name for part in parts for name in part.by_outcome})
    start = min(p.started_at for p in parts)
    last_send = max(p.last_send_at for p in parts)
    sent = sum(p.sent for p in parts)
    duration = max(p.duration_s for p in parts)
    span = max(duration, last_send - start)
    return OpenLoopResult(
        rate=sum(p.rate for p in parts),
        duration_s=duration,
        sent=sent,
        completed=sum(p.completed for p in parts),
        errors=sum(p.errors for p in parts),
        incomplete=sum(p.incomplete for p in parts),
        latency=LatencyRecorder.merged(p.latency for p in parts),
        achieved_rate=sent / span if span > 0 else 0.0,
        late_starts=sum(p.late_starts for p in parts),
        max_start_lag_ms=max(p.max_start_lag_ms for p in parts),
        elapsed_s=max(p.started_at + p.elapsed_s for p in parts) - start,
        error_types=dict(errors),
        by_outcome={
            name: LatencyRecorder.merged(
                p.by_outcome[name] for p in parts if name in p.by_outcome
            )
            for name in outcomes
        },
        send_lag=LatencyRecorder.merged(p.send_lag for p in parts),
        latency_from_send=LatencyRecorder.merged(p.latency_from_send for p in parts),
        started_at=start,
        last_send_at=last_send,
    )


def merge_closed(parts: Sequence[ClosedLoopResult]) -> ClosedLoopResult:
    """Several generators' closed loops, run at the same time, as one (counts summed,
    histograms merged, elapsed the longest part's, so throughput is the total's).

    Raises:
        ValueError: no parts.
    """
    if not parts:
        raise ValueError("nothing to merge")
    errors: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for part in parts:
        errors.update(part.error_types)
        outcomes.update(part.by_outcome)
    return ClosedLoopResult(
        concurrency=sum(p.concurrency for p in parts),
        completed=sum(p.completed for p in parts),
        errors=sum(p.errors for p in parts),
        latency=LatencyRecorder.merged(p.latency for p in parts),
        elapsed_s=max(p.elapsed_s for p in parts),
        error_types=dict(errors),
        by_outcome=dict(outcomes),
    )


async def closed_loop(
    call: Call,
    *,
    concurrency: int,
    duration_s: float | None = None,
    total: int | None = None,
) -> ClosedLoopResult:
    """Keep `concurrency` calls in flight until `total` were made or `duration_s` passed.

    Give either bound or both (whichever is reached first ends the run). No call starts
    after the deadline; calls in flight then are awaited and counted.

    Raises:
        ValueError: no bound, or a non-positive bound or concurrency.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    if duration_s is None and total is None:
        raise ValueError("give duration_s, total, or both")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be positive, not {duration_s}")
    if total is not None and total < 0:
        raise ValueError(f"total must not be negative, not {total}")
    latency = LatencyRecorder()
    errors: Counter[str] = Counter()
    completed = 0
    issued = 0
    limit = math.inf if total is None else total
    start = _clock()
    deadline = math.inf if duration_s is None else start + duration_s

    outcomes: Counter[str] = Counter()

    async def worker() -> None:
        nonlocal completed, issued
        while issued < limit:
            sent_at = _clock()
            if sent_at >= deadline:
                return
            issued += 1
            try:
                outcome = await call()
            except Exception as exc:  # the load generator's boundary: a failed call is a count
                errors[type(exc).__name__] += 1
            else:
                latency.record(_clock() - sent_at)
                completed += 1
                if isinstance(outcome, str):
                    outcomes[outcome] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return ClosedLoopResult(
        concurrency=concurrency,
        completed=completed,
        errors=sum(errors.values()),
        latency=latency,
        elapsed_s=_clock() - start,
        error_types=dict(errors),
        by_outcome=dict(outcomes),
    )
