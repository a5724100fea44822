"""SLO burn-rate alerts and mergeable aggregates, with an injected clock (windows in seconds).

The policies are the workbook's (page 14.4x, ticket 6x) with windows scaled down:
page 60 s / 5 s, ticket 360 s / 30 s. The passkey verify SLO is 99 % within 30 ms.
"""

from __future__ import annotations

import random
from typing import Any

import anyio
import msgspec
import pytest

from bus import Bus, open_memory_bus
from lukhas.observability.matriz_emit import MatrizNode, Outcome, Timestamps, make_node
from lukhas.subjects import OBSERVABILITY_STATS, alert_subject
from lukhas.testing import dry_run_settings
from workers.service._aggregate import Aggregator
from workers.service._slo import Slo
from workers.service.observability import BurnAlert, ObservabilityWorker, SloSettings, StatsSnapshot

POINT = "DECISION:identity:passkey.verify"
SETTINGS = SloSettings.workbook(
    page_long_s=60, page_short_s=5, ticket_long_s=360, ticket_short_s=30, period_s=3600,
)
_alert_decoder = msgspec.json.Decoder(BurnAlert)
_snapshot_decoder = msgspec.json.Decoder(StatsSnapshot)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def node(at: float, *, latency_ms: float = 2.0, outcome: Outcome = "ok") -> MatrizNode:
    n = make_node("DECISION", "identity:passkey.verify", outcome=outcome, latency_ms=latency_ms,
                  trace_id="0" * 32, producer="tests", capability="verify_passkey")
    return msgspec.structs.replace(n, timestamps=Timestamps(created_ts=round(at * 1000)))


class Harness:
    """A worker on the memory bus, its alert subscription, and the fake clock."""

    def __init__(self, bus: Bus, worker: ObservabilityWorker, clock: Clock) -> None:
        self.bus, self.worker, self.clock = bus, worker, clock
        self.sent = 0

    async def send(self, count: int, **kwargs: Any) -> None:
        for _ in range(count):
            n = node(self.clock.now, **kwargs)
            await self.bus.publish(n.subject, msgspec.json.encode(n))
        self.sent += count
        with anyio.fail_after(10):  # every try is a real stats round trip
            while True:
                reply = await self.bus.request(OBSERVABILITY_STATS, b"{}", timeout=5)
                if _snapshot_decoder.decode(reply.data).emit_points[POINT].count == self.sent:
                    return

    async def check(self) -> list[tuple[str, str]]:
        return [(a.severity, a.state) for a in await self.worker.check_slos()]


async def run_scenario(scenario: Any) -> list[BurnAlert]:
    clock = Clock()
    async with open_memory_bus() as bus, bus.subscribe(alert_subject(POINT)) as alerts:
        worker = ObservabilityWorker(
            bus, dry_run_settings(), metrics_port=None, slo_settings=SETTINGS, clock=clock,
            check_interval_s=3600,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await scenario(Harness(bus, worker, clock))
            await worker.stop()
        published = []
        while alerts.statistics().pending:
            published.append(_alert_decoder.decode((await alerts.next(timeout=1)).data))
    return published


async def test_a_fast_burn_pages_and_resolves() -> None:
    async def scenario(h: Harness) -> None:
        for _ in range(10):  # a healthy minute: 20 calls every 5 s
            await h.send(20)
            h.clock.now += 5
        assert await h.check() == []
        await h.send(40, outcome="error")  # then an outage: every call fails
        assert sorted(await h.check()) == [("page", "firing"), ("ticket", "firing")]
        assert await h.check() == []  # fires once
        snap = h.worker.snapshot().emit_points[POINT]
        assert snap.sla_ok is False and snap.alerts == 2
        h.clock.now += 6  # the outage is over: the 5 s window empties, the page resolves
        await h.send(20)
        assert await h.check() == [("page", "resolved")]
        h.clock.now += 31  # and the 30 s window: the ticket resolves too
        await h.send(20)
        assert await h.check() == [("ticket", "resolved")]
        assert h.worker.snapshot().emit_points[POINT].sla_ok is True

    alerts = await run_scenario(scenario)
    assert [(a.severity, a.state) for a in alerts] == [
        ("page", "firing"), ("ticket", "firing"), ("page", "resolved"), ("ticket", "resolved"),
    ]
    page = alerts[0]
    assert page.emit_point == POINT
    assert (page.objective, page.latency_ms, page.burn_rate_threshold) == (0.99, 30.0, 14.4)
    assert (page.long_window_s, page.short_window_s) == (60, 5)
    # 40 bad of 240 in the last minute: 16.7 % against a 1 % budget.
    assert page.long_burn_rate == pytest.approx(40 / 240 / 0.01, rel=1e-4)
    assert page.short_burn_rate == pytest.approx(100.0)
    assert (page.long_window_events, page.long_window_bad_events) == (240, 40)
    assert page.error_budget_remaining == pytest.approx(1 - 40 / (0.01 * 240), rel=1e-4)
    assert page.budget_period_s == 3600 and page.ts == 1_700_000_050_000
    assert alerts[2].short_burn_rate == 0.0


async def test_a_slow_burn_files_a_ticket_but_does_not_page() -> None:
    async def scenario(h: Harness) -> None:
        # 8 % of calls slower than the 30 ms SLO latency for five minutes: burn rate 8.
        for _ in range(30):
            await h.send(23)
            await h.send(2, latency_ms=45.0)
            h.clock.now += 10
            assert ("page", "firing") not in await h.check()
        states = h.worker.snapshot().emit_points[POINT].burn
        assert [(s.severity, s.firing) for s in states] == [("page", False), ("ticket", True)]
        assert states[0].long_burn_rate == pytest.approx(8.0, rel=0.05)
        for _ in range(4):  # fixed: only fast calls for 40 s
            await h.send(25)
            h.clock.now += 10
            await h.check()

    alerts = await run_scenario(scenario)
    assert [(a.severity, a.state) for a in alerts] == [("ticket", "firing"), ("ticket", "resolved")]
    assert 6 <= alerts[0].long_burn_rate < 14.4


async def test_a_blip_does_not_page() -> None:
    async def scenario(h: Harness) -> None:
        for _ in range(12):
            await h.send(100)
            h.clock.now += 5
        await h.send(20, outcome="error")  # two percent of the minute, all at once
        assert await h.check() == []
        states = h.worker.snapshot().emit_points[POINT].burn
        assert states[0].short_burn_rate > 14.4 > states[0].long_burn_rate

    assert await run_scenario(scenario) == []


async def test_too_few_events_never_alert() -> None:
    async def scenario(h: Harness) -> None:
        await h.send(5, outcome="error")  # under min_events (20) in the long window
        assert await h.check() == []

    assert await run_scenario(scenario) == []


# -- merging ------------------------------------------------------------------------------------


def test_two_workers_merged_equal_one_worker_over_the_same_nodes() -> None:
    clock = Clock()
    rng = random.Random(7)
    slos = {POINT: Slo(0.99, 30.0)}
    one, left, right = (
        Aggregator({POINT: 30.0}, slos=slos, slo_settings=SETTINGS, clock=clock)
        for _ in range(3)
    )
    for i in range(3000):
        clock.now += 0.01
        body = msgspec.json.encode(node(
            clock.now, latency_ms=rng.lognormvariate(2, 1),
            outcome="error" if rng.random() < 0.02 else "ok",
        ))
        one.ingest(body)
        (left if i % 3 else right).ingest(body)  # an uneven split, as a queue group does
    whole = one.snapshot(source="jetstream").emit_points[POINT]
    peer = msgspec.json.decode(msgspec.json.encode(right.export_state("b")), type=type(
        right.export_state("b")))  # over the wire and back
    merged_snap = left.snapshot(source="jetstream", worker_id="a", peers=[peer])
    merged = merged_snap.emit_points[POINT]
    assert merged_snap.workers == 2
    assert (merged.count, merged.errors, merged.bad_events) == (
        whole.count, whole.errors, whole.bad_events)
    assert (merged.p50_ms, merged.p95_ms, merged.p99_ms) == (
        whole.p50_ms, whole.p95_ms, whole.p99_ms)
    assert merged.burn == whole.burn
    assert merged.error_budget_remaining == whole.error_budget_remaining
    alone = left.snapshot(source="jetstream").emit_points[POINT]
    assert alone.count < whole.count  # without the peer, a part only


def test_a_peer_with_other_windows_is_not_merged() -> None:
    clock = Clock()
    ours = Aggregator({POINT: 30.0}, slo_settings=SETTINGS, clock=clock)
    theirs = Aggregator({POINT: 30.0}, slo_settings=SloSettings.workbook(), clock=clock)
    theirs.ingest(msgspec.json.encode(node(clock.now)))
    snap = ours.snapshot(source="jetstream", peers=[theirs.export_state("x")])
    assert snap.emit_points[POINT].count == 0


async def test_forged_peer_states_are_ignored() -> None:
    async with open_memory_bus() as bus:
        worker = ObservabilityWorker(bus, dry_run_settings(), metrics_port=None,
                                     check_interval_s=3600, worker_id="w1")
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await bus.publish("lukhas.observability.state.w2", b"not json")
            await bus.publish("lukhas.observability.state.w3",
                              msgspec.json.encode(worker.aggregate.export_state("w4")))
            await bus.publish("lukhas.observability.state.w1",
                              msgspec.json.encode(worker.aggregate.export_state("w1")))
            await bus.publish("lukhas.observability.state.w0",  # a genuine peer, sent last
                              msgspec.json.encode(worker.aggregate.export_state("w0")))
            with anyio.fail_after(5):
                while worker.statistics().peers == 0:
                    await bus.request(OBSERVABILITY_STATS, b"{}", timeout=5)
            assert [s.worker_id for s in worker.peer_states()] == ["w0"]
            assert not worker.is_leader()  # w0 < w1: the peer publishes the alerts
            await worker.stop()
