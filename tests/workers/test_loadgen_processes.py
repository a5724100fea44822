"""The multi-process load generator against a real nats-server: the parts add up exactly.

Three generator processes share each job; a plain nats-py responder answers `ok` and
`overloaded` alternately. Checked: every scheduled request was sent once, every request has
exactly one outcome, the merged histograms hold every part's values, and merging through
the wire format loses nothing. Nothing here depends on the machine's speed.
"""

from __future__ import annotations

import itertools
import math
import time

import anyio
import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from workers.tools._bench_client import LoadGenerators
from workers.tools.loadgen import (
    LatencyRecorder,
    OpenLoopResult,
    merge_closed,
    merge_open,
    open_loop,
)

pytestmark = pytest.mark.nats

OK = msgspec.json.encode({"ok": True})
OVERLOADED = msgspec.json.encode({"ok": False, "reason": "overloaded", "retry_after_ms": 5})


async def _responder(url: str, subject: str) -> Client:
    """Answers ok, overloaded, ok, overloaded, ... on `subject`."""
    client = Client()
    await client.connect(url, name="test-loadgen-responder", allow_reconnect=False)
    answers = itertools.cycle((OK, OVERLOADED))

    async def reply(msg: Msg) -> None:
        await msg.respond(next(answers))

    await client.subscribe(subject, cb=reply)
    await client.flush()
    return client


async def test_open_loop_split_over_processes_merges_exactly(
    nats_url: str, subject_root: str
) -> None:
    subject = f"{subject_root}.svc"
    responder = await _responder(nats_url, subject)
    rate, duration = 700.0, 0.5
    scheduled = math.floor(rate * duration)  # 350, dealt 117/117/116
    try:
        async with LoadGenerators(3) as generators:
            assert len(set(generators.pids)) == 3
            result = await generators.run({
                "url": nats_url, "subject": subject, "body": {"x": 1}, "mode": "open",
                "rate": rate, "duration_s": duration, "warmup": 30, "sla_ms": 1000,
                "timeout_s": 5, "cpu_pids": {},
            })
    finally:
        await responder.close()

    parts = result["generators"]
    assert [p["sent"] for p in parts] == [117, 117, 116]
    assert result["rate"] == pytest.approx(rate)
    assert result["sent"] == scheduled
    # Every request has exactly one outcome: a reply (ok or overloaded), an error, or none.
    assert result["sent"] == result["completed"] + result["errors"] + result["incomplete"]
    assert result["completed"] == sum(result["outcomes"].values())
    assert result["latency"]["count"] == result["completed"]
    assert result["latency_from_send"]["count"] == result["completed"]
    assert result["send_lag"]["count"] == result["sent"]
    assert sum(o["count"] for o in result["by_outcome"].values()) == result["completed"]
    if result["errors"] == 0 and result["incomplete"] == 0:
        # The responder alternates, so the two outcomes differ by at most the warm-ups' parity.
        assert set(result["outcomes"]) == {"ok", "overloaded"}
        assert abs(result["outcomes"]["ok"] - result["outcomes"]["overloaded"]) <= 1
    assert result["ok_within_sla"] <= result["outcomes"].get("ok", 0)
    assert result["answered_within_sla"] <= result["completed"]
    assert isinstance(result["generators_behind"], bool)
    assert set(result["cpu_s"]) == set(result["preemptions"]) == {"generator"}
    assert result["preemptions"]["generator"] >= 0  # counted from /proc, never negative


async def test_closed_loop_split_over_processes_counts_every_call(
    nats_url: str, subject_root: str
) -> None:
    subject = f"{subject_root}.svc"
    responder = await _responder(nats_url, subject)
    try:
        async with LoadGenerators(2) as generators:
            result = await generators.run({
                "url": nats_url, "subject": subject, "body": {}, "mode": "closed",
                "concurrency": 9, "duration_s": 0.2, "warmup": 0, "timeout_s": 5,
                "cpu_pids": {},
            })
    finally:
        await responder.close()
    assert result["concurrency"] == 9
    assert result["completed"] > 0
    assert sum(result["by_outcome"].values()) == result["completed"]
    assert result["latency"]["count"] == result["completed"]
    assert result["ok_rps"] > 0


async def test_a_generator_that_cannot_start_a_job_is_an_error(nats_url: str) -> None:
    async with LoadGenerators(1) as generators:
        with pytest.raises(RuntimeError, match="exited"):
            await generators.run({
                "url": "nats://127.0.0.1:1", "subject": "x", "body": {}, "mode": "open",
                "rate": 10, "duration_s": 0.1, "connect_timeout_s": 0.3,
            })


async def test_merging_through_the_wire_equals_one_recorder_of_every_value() -> None:
    values = [[0.001 * (i % 37 + 1) for i in range(300)], [0.05 + 0.0001 * i for i in range(200)]]
    parts: list[OpenLoopResult] = []

    async def call() -> str:
        await anyio.lowlevel.checkpoint()
        return "ok"

    for k, latencies in enumerate(values):
        part = await open_loop(call, rate=10_000, duration_s=len(latencies) / 10_000)
        # Replace the measured latencies by known ones, as another process would send them.
        known = LatencyRecorder()
        for seconds in latencies:
            known.record(seconds)
        parts.append(OpenLoopResult.from_wire({**part.to_wire(), "latency": known.to_wire()}))
        assert parts[-1].sent == len(values[k])
    merged = merge_open(parts)
    every = LatencyRecorder()
    for seconds in itertools.chain(*values):
        every.record(seconds)
    assert merged.sent == merged.completed == 500
    assert merged.latency.count == every.count == 500
    for p in (0, 50, 90, 95, 99, 99.9, 100):
        assert merged.latency.percentile_ms(p) == every.percentile_ms(p)
    assert merged.by_outcome["ok"].count == 500
    assert merged.send_lag.count == 500
    with pytest.raises(ValueError):
        merge_open([])


async def test_merging_closed_loops_sums_counts_and_keeps_the_longest_elapsed() -> None:
    from workers.tools.loadgen import ClosedLoopResult, closed_loop

    async def call() -> str:
        await anyio.lowlevel.checkpoint()
        return "ok"

    parts = [await closed_loop(call, concurrency=c, total=n) for c, n in ((2, 40), (3, 70))]
    wired = [ClosedLoopResult.from_wire(p.to_wire()) for p in parts]
    merged = merge_closed(wired)
    assert merged.concurrency == 5 and merged.completed == 110
    assert merged.by_outcome == {"ok": 110} and merged.latency.count == 110
    assert merged.elapsed_s == max(p.elapsed_s for p in parts)
    with pytest.raises(ValueError):
        merge_closed([])


def test_the_summary_counts_late_answers_by_outcome() -> None:
    """Which answers came past the SLA: served late (`ok`) or refused late (`overloaded`)."""
    from workers.tools._bench_client import summarize_open

    by_outcome = {"ok": LatencyRecorder(), "overloaded": LatencyRecorder()}
    for seconds in (0.005, 0.029, 0.031, 0.2):
        by_outcome["ok"].record(seconds)
    for seconds in (0.010, 0.045):
        by_outcome["overloaded"].record(seconds)
    latency = LatencyRecorder.merged(by_outcome.values())
    result = OpenLoopResult(
        rate=6.0, duration_s=1.0, sent=6, completed=6, errors=0, incomplete=0,
        latency=latency, achieved_rate=6.0, late_starts=0, max_start_lag_ms=0.0,
        elapsed_s=1.0, by_outcome=by_outcome, latency_from_send=latency,
    )
    summary = summarize_open(result, sla_ms=30.0)
    assert summary["late_by_outcome"] == {"ok": 2, "overloaded": 1}
    assert summary["answered_within_sla"] == 3
    assert summary["ok_within_sla"] == 2


async def test_the_runs_match_every_reply_through_the_wire(nats_url: str) -> None:
    """The generator's closed and open runs on `RawWire`: each reply to its request,
    outcomes from headered replies too, a subject nobody serves as no responders."""
    from workers.tools._bench_client import _closed_run, _open_run
    from workers.tools._bench_wire import RawWire

    async def headered(msg: Msg) -> None:  # as the slice service refuses: with headers
        await responder.publish(msg.reply, OVERLOADED, headers={
            "Nats-Service-Error": "overloaded", "Nats-Service-Error-Code": "503"})

    responder = Client()
    await responder.connect(nats_url, allow_reconnect=False)
    await responder.subscribe("test.wire", cb=headered)
    await responder.flush()
    wire = RawWire(nats_url, "test.wire", b"{}", echo=False, timeout_s=5.0)
    nobody = RawWire(nats_url, "test.nobody", b"{}", echo=False, timeout_s=5.0)
    try:
        await wire.open()
        closed = await _closed_run(wire, concurrency=8, total=300)
        assert closed.completed == 300 and closed.errors == 0
        assert closed.by_outcome == {"overloaded": 300}
        opened = await _open_run(wire, rate=2000, duration_s=0.1, total=200,
                                 start_at=time.perf_counter() + 0.01)
        assert opened.completed == 200 and opened.latency.count == 200
        assert opened.by_outcome["overloaded"].count == 200
        assert opened.send_lag is not None and opened.send_lag.count == 200
        assert wire.outstanding == 0
        await nobody.open()
        missed = await _closed_run(nobody, concurrency=4, total=20)
        assert missed.errors == 20 and missed.error_types == {"NoRespondersError": 20}
    finally:
        await wire.close()
        await nobody.close()
        await responder.close()
