"""Admission rules of the slice service's load shedding, driven by explicit stamps and clocks.

No timing: every time here is a number handed to the code (a stamp, a fake clock), so the
rules are checked exactly; what they do under real load is measured by `lukhas bench`.
"""

from __future__ import annotations

import gc
from typing import Any

import anyio
import msgspec
import pytest

from bus import Envelope
from lukhas import subjects
from lukhas.testing import open_test_runtime
from tests.conftest import BusFactory
from tests.workers.test_slices import (
    FakeClock,
    call,
    held_passkey_verify,
    verifies_behind_a_held_one,
)
from workers.service._overload import Lane, overloaded_body, service_budget_ns
from workers.service.slices import SliceService, freeze_heap

MS = 1_000_000


@pytest.mark.parametrize(("budget_ms", "share_ms"), [
    (30, 7.5),      # the passkey's SLA: a quarter (half would leave 15 ms for the unseen)
    (40, 15.0),     # 25 ms left for what the service cannot see
    (50, 25.0),     # consent.record's: half, and still 25 ms left
    (250, 125.0),   # the handoff's: half
    (1000, 500.0),  # no SLA stated
    (10, 2.5),      # a tight client deadline: never under a quarter
    (1, 0.25),
])
def test_the_service_keeps_half_the_budget_and_25_ms_for_the_unseen_but_never_under_a_quarter(
    budget_ms: int, share_ms: float
) -> None:
    assert service_budget_ns(budget_ms * MS) == share_ms * MS


def test_admission_counts_the_queue_ahead_and_the_request_s_own_service() -> None:
    lane = Lane(budget_ns=30 * MS, queued=4, interval_ns=1.0 * MS)
    now = 1_000 * MS
    # 2.5 ms waited + 4 ahead + itself at 1 ms each = 7.5 ms: within the 7.5 ms share.
    assert lane.admits(now - 2_500_000, 30 * MS, now)
    # 3 ms waited: answered at 8 ms, past it (the queue alone, 7 ms, would fit).
    assert not lane.admits(now - 3 * MS, 30 * MS, now)
    # A client's 40 ms deadline leaves the service 15 ms: admitted.
    assert lane.admits(now - 3 * MS, 40 * MS, now)


def test_at_the_front_a_request_is_refused_once_its_service_would_end_past_the_share() -> None:
    lane = Lane(budget_ns=30 * MS, interval_ns=1.0 * MS)
    now = 1_000 * MS
    assert not lane.expired(now - 6_500_000, 30 * MS, now)  # answered at 7.5 ms: in time
    assert lane.expired(now - 6_600_000, 30 * MS, now)      # at 7.6 ms: refused


def _cycles(lane: Lane, count: int, *, in_slice: int, gap_ns: int, pass_ns: int) -> int:
    """`count` cycles of the worker's loop: `in_slice` requests leave `gap_ns` apart while a
    server runs, then a reader pass holds the loop `pass_ns`. Returns the time, just before
    the next pass: when the reader consults the estimate."""
    now = 1_000 * MS
    lane.queued = 1  # someone always waits: every gap is service
    for _ in range(count):
        for i in range(in_slice):
            now += pass_ns if i == 0 else gap_ns
            lane.took(now)
    return now


def test_the_service_interval_is_the_mean_over_whole_loop_cycles() -> None:
    """Sampled per request, the estimate decayed to the in-slice gaps by the time the reader
    looked, so queues were predicted to drain several times faster than they did."""
    lane = Lane(budget_ns=30 * MS)
    _cycles(lane, 40, in_slice=25, gap_ns=40_000, pass_ns=9 * MS)
    mean = (24 * 40_000 + 9 * MS) / 25  # 398.4 µs of wall time per request, all told
    assert lane.interval_ns == pytest.approx(mean, rel=0.1)


def test_until_a_whole_window_the_partial_mean_is_used_and_idle_gaps_never_count() -> None:
    lane = Lane(budget_ns=30 * MS)
    lane.queued = 1
    now = 1_000 * MS
    lane.took(now)
    for _ in range(100):  # 10 ms of service: not yet a window...
        now += 100_000
        lane.took(now)
    assert lane.interval_ns == 0.0
    assert lane.interval() == pytest.approx(100_000)  # ...but planned with what it has
    lane.queued = 0
    now += 100_000
    lane.took(now)          # the queue is empty now...
    now += 40 * MS
    lane.took(now)          # ...so this 40 ms gap was idle, not service
    lane.queued = 1
    for _ in range(100):
        now += 100_000
        lane.took(now)
    assert lane.interval_ns == pytest.approx(100_000)


async def test_a_request_read_12_ms_late_is_refused_on_a_30_ms_budget_and_served_on_40(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Half of 30 ms (15 ms) would have let it wait; the service keeps only a quarter
    (7.5 ms), so it gets `overloaded`, while a 40 ms deadline (15 ms share) is served."""
    clock = FakeClock()
    async with (
        held_passkey_verify(monkeypatch) as release,
        open_test_runtime() as (runtime, _),
    ):
        service = SliceService(runtime, concurrency=2, clock=clock)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            replies = await verifies_behind_a_held_one(
                runtime.bus, clock, release, "held", {"tight": "30", "looser": "40"}, 12 * MS)
            await service.stop()
    tight = replies["tight"]
    assert msgspec.json.decode(tight.data)["reason"] == "overloaded"
    assert tight.headers["Nats-Service-Error-Code"] == "503"
    assert msgspec.json.decode(replies["looser"].data)["ok"] is True
    assert msgspec.json.decode(replies["held"].data)["ok"] is True
    assert service.statistics().overloaded == 1


@pytest.mark.usefixtures("unfrozen")
def test_freeze_heap_leaves_what_lives_now_out_of_later_collections() -> None:
    gc.unfreeze()
    kept = [[i] for i in range(1000)]  # tracked containers, alive at the freeze
    freeze_heap()
    assert gc.get_freeze_count() >= len(kept)


@pytest.mark.usefixtures("unfrozen")
async def test_a_worker_freezes_its_heap_once_it_serves_and_still_answers() -> None:
    gc.unfreeze()
    async with open_test_runtime() as (runtime, _):
        service = SliceService(runtime, freeze_heap=True)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            assert gc.get_freeze_count() > 0
            reply = await call(runtime.bus, subjects.PASSKEY_VERIFY, {"challenge": "c"})
            await service.stop()
    assert reply["ok"] is True


def _request(subject: str, i: int, **headers: str) -> Envelope:
    return Envelope(subject, b'{"challenge":"c"}', headers, f"_INBOX.batch.{i}")


async def test_a_reader_pass_decides_each_request_as_lane_admits_would_one_by_one(
    open_bus: BusFactory,
) -> None:
    """The reader's pass decides the common case inline; every decision must be the one
    `Lane.admits` makes, request by request, with the queue growing as requests are admitted:
    here 30 requests found waiting over 6 ms, a 1 ms service interval and a 7.5 ms share
    (30 ms budget), a client deadline, a bad deadline, a reply subject that is no inbox, and a
    queue that fills up."""
    async with (
        open_bus() as bus,
        open_test_runtime(bus=bus) as (runtime, _),
        bus.subscribe("_INBOX.batch.>") as inbox,
    ):
        clock = FakeClock()
        service = SliceService(runtime, clock=clock)
        served = next(ep for ep in service.endpoints if ep.subject == subjects.PASSKEY_VERIFY)
        lane = Lane(budget_ns=30 * MS, interval_ns=1.0 * MS)
        batch = [_request(served.subject, i) for i in range(30)]
        batch[3] = _request(served.subject, 3, **{"Lukhas-Deadline-Ms": "40"})
        batch[5] = _request(served.subject, 5, **{"Lukhas-Deadline-Ms": "soon"})
        batch[7] = Envelope(served.subject, b"{}", {}, "lukhas.control.canary.rollback")
        since, step, now = 1_000 * MS, 200_000.0, 1_006 * MS
        clock.now = now  # what the pass reads every 16 requests
        send, receive = anyio.create_memory_object_stream[Any](6)

        reference = Lane(budget_ns=30 * MS, interval_ns=1.0 * MS)
        expected: dict[str, Any] = {}
        for i, env in enumerate(batch):
            stamp = int(since + step * (i + 1))
            if i == 7:
                continue  # not an inbox: neither served nor answered
            if i == 5:
                expected[env.reply] = "invalid_request"
                continue
            budget = 40 * MS if i == 3 else 30 * MS
            if reference.admits(stamp, budget, now) and reference.queued < 6:
                reference.queued += 1
                expected[env.reply] = ("queued", stamp, budget)
            else:
                expected[env.reply] = ("overloaded", reference.retry_after_ms())

        await service._admit_batch(served, lane, batch, since, step, now, send)
        send.close()
        with receive:
            queued = {item.env.reply: ("queued", item.stamp_ns, item.budget_ns)
                      async for item in receive}
        answered: dict[str, Any] = {}
        while len(queued) + len(answered) < len(expected):
            reply = await inbox.next(timeout=5)
            body = msgspec.json.decode(reply.data)
            if body.get("reason") == "overloaded":
                assert reply.headers["Nats-Service-Error"] == "overloaded"
                assert reply.headers["Nats-Service-Error-Code"] == "503"
                answered[reply.subject] = ("overloaded", body["retry_after_ms"])
            else:
                answered[reply.subject] = body["error"]["code"]
    assert {**queued, **answered} == expected
    refused = sum(1 for outcome in expected.values() if outcome[0] == "overloaded")
    assert lane.queued == reference.queued == len(queued)
    # Some of each: admitted ones (the 40 ms deadline among them), refusals, a full queue.
    assert expected[batch[3].reply][0] == "queued"
    assert 0 < refused and len(queued) == 6
    assert lane.overloaded == refused
    assert service.statistics().refused_replies == 1
    stats = service._counters[served.subject]
    assert stats.overloaded == refused


def test_an_overloaded_body_is_encoded_once_per_retry_after() -> None:
    assert overloaded_body(7) is overloaded_body(7)
    assert msgspec.json.decode(overloaded_body(7)) == {
        "ok": False, "reason": "overloaded", "retry_after_ms": 7,
    }
