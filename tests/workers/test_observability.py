"""The observability worker on the memory bus: aggregation, SLA alerts, stats, /metrics."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import pytest

from bus import Bus, open_memory_bus
from lukhas.errors import InvalidRequest
from lukhas.governance.consent_ledger.api import consent_status, record_consent
from lukhas.identity.passkey.api import passkey_challenge, verify_passkey
from lukhas.observability.matriz_emit import DropReport, MatrizNode, Outcome, make_node
from lukhas.orchestration.context.api import handoff_context
from lukhas.subjects import MATRIZ_DROPS, OBSERVABILITY_STATS
from lukhas.testing import dry_run_settings, open_test_runtime
from tests.workers._promtool import promtool
from workers.service.observability import (
    ObservabilityWorker,
    SloSettings,
    StatsSnapshot,
    load_manifests,
    sla_by_emit_point,
)

_encode = msgspec.json.encode
_snapshot_decoder = msgspec.json.Decoder(StatsSnapshot)

PASSKEY_VERIFY = "DECISION:identity:passkey.verify"  # SLA p95 30 ms in its manifest


class FakeClock:
    """Monotonic seconds the test moves by hand, to step from one SLA window to the next."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node(
    emit_point: str = PASSKEY_VERIFY, *, latency_ms: float = 1.0, outcome: Outcome = "ok"
) -> MatrizNode:
    node_type, label = emit_point.split(":", 1)
    return make_node(
        node_type, label, outcome=outcome, latency_ms=latency_ms, trace_id="0" * 32,
        producer="tests", capability="test",
    )


async def publish_nodes(bus: Bus, nodes: list[MatrizNode]) -> None:
    for n in nodes:
        await bus.publish(n.subject, _encode(n))


async def request_stats(bus: Bus) -> StatsSnapshot:
    reply = await bus.request(OBSERVABILITY_STATS, b"{}", timeout=5.0)
    return _snapshot_decoder.decode(reply.data)


async def wait_stats(
    bus: Bus, done: Callable[[StatsSnapshot], bool], timeout: float = 10.0
) -> StatsSnapshot:
    """Ask for stats until `done` holds; every try is a real request/reply round trip."""
    with anyio.fail_after(timeout):
        while True:
            snap = await request_stats(bus)
            if done(snap):
                return snap


def total(snap: StatsSnapshot) -> int:
    return sum(p.count for p in snap.emit_points.values())


def worker_on(bus: Bus, **options: Any) -> ObservabilityWorker:
    options.setdefault("metrics_port", None)
    return ObservabilityWorker(bus, dry_run_settings(), **options)


# -- aggregation of real slice calls -----------------------------------------------------------


async def test_counts_real_slice_calls_per_emit_point() -> None:
    async with open_test_runtime() as (runtime, _recorder):
        worker = worker_on(runtime.bus)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            for i in range(25):
                assert (await record_consent(f"usr_{i}", "gmail.read"))["ok"] is True
            assert (await consent_status("usr_0", "gmail.read"))["ok"] is False  # no ledger
            with pytest.raises(InvalidRequest):
                await record_consent("usr_bad", "not a scope!")
            for _ in range(3):
                assert (await verify_passkey({"challenge": "abc"}))["ok"] is True
            with pytest.raises(InvalidRequest):
                await verify_passkey("not an object")  # type: ignore[arg-type]
            assert (await passkey_challenge())["ok"] is False  # the null provider refuses
            for _ in range(4):
                assert (await handoff_context({"step": 1}, target="planner"))["ok"] is True

            snap = await wait_stats(runtime.bus, lambda s: total(s) == 36)
            await worker.stop()

    points = snap.emit_points
    record = points["CONSENT:governance:record"]
    assert (record.count, record.errors) == (26, 1)
    assert record.outcomes == {
        "ok": 25, "error": 1, "refused": 0, "rate_limited": 0, "backpressure": 0,
    }
    assert 0 <= record.p50_ms <= record.p95_ms <= record.p99_ms
    assert (record.sla_p95_ms, record.sla_ok) == (50.0, True)
    assert points["CONSENT:governance:status"].outcomes["refused"] == 1
    handoff = points["CONTEXT:orchestration:handoff"]
    assert (handoff.count, handoff.sla_p95_ms) == (4, 250.0)
    verify = points[PASSKEY_VERIFY]
    assert (verify.count, verify.errors, verify.outcomes["ok"]) == (4, 1, 3)
    assert (verify.sla_p95_ms, verify.sla_ok) == (30.0, True)
    assert points["DECISION:identity:passkey.challenge"].outcomes["refused"] == 1
    # Declared emit points are reported before their first node.
    assert points["CONSENT:governance:revoke"].count == 0
    assert (snap.source, snap.invalid_nodes, snap.dropped_nodes, snap.alerts) == (
        "subscription", 0, 0, 0,
    )


async def test_percentiles_come_from_the_histogram() -> None:
    async with open_memory_bus() as bus:
        worker = worker_on(bus)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            # 1..200 ms, shuffled order does not matter to a histogram.
            await publish_nodes(bus, [node(latency_ms=float(ms)) for ms in range(200, 0, -1)])
            snap = await wait_stats(bus, lambda s: total(s) == 200)
            await worker.stop()
    point = snap.emit_points[PASSKEY_VERIFY]
    # HDR with 3 significant digits: within 0.1% of the exact rank values.
    assert point.p50_ms == pytest.approx(100.0, rel=1e-3)
    assert point.p95_ms == pytest.approx(190.0, rel=1e-3)
    assert point.p99_ms == pytest.approx(198.0, rel=1e-3)


async def test_malformed_nodes_are_counted_and_skipped() -> None:
    valid = node()
    as_dict = msgspec.to_builtins(valid)
    bad_label = {**as_dict, "labels": ["outcome:ok"]}
    bad_outcome = {**as_dict, "state": {**as_dict["state"], "outcome": "maybe"}}
    negative = {**as_dict, "state": {**as_dict["state"], "latency_ms": -1}}
    bad_type = {**as_dict, "type": "not a type"}
    wildcard_label = {**as_dict, "labels": ["label:identity:*"]}
    bodies = [b"not json", b"[]", b'{"type": "DECISION"}', *map(_encode, (
        bad_label, bad_outcome, negative, bad_type, wildcard_label))]
    async with open_memory_bus() as bus:
        worker = worker_on(bus)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            for body in bodies:
                await bus.publish(valid.subject, body)
            await publish_nodes(bus, [valid])
            snap = await wait_stats(bus, lambda s: total(s) == 1)
            await worker.stop()
    assert snap.invalid_nodes == len(bodies)
    assert snap.emit_points[PASSKEY_VERIFY].count == 1
    assert worker.statistics().invalid_nodes == len(bodies)


async def test_emitter_drop_reports_keep_the_latest_per_producer() -> None:
    reports = [DropReport("p1", 3, 10), DropReport("p2", 2, 4), DropReport("p1", 5, 20)]
    async with open_memory_bus() as bus:
        worker = worker_on(bus)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await bus.publish(MATRIZ_DROPS, b'{"producer": 1}')
            for report in reports:
                await bus.publish(MATRIZ_DROPS, _encode(report))
            snap = await wait_stats(bus, lambda s: s.dropped_by_producer.get("p1") == 5)
            await worker.stop()
    assert (snap.dropped_nodes, snap.dropped_by_producer) == (7, {"p1": 5, "p2": 2})
    assert worker.statistics().invalid_drop_reports == 1


async def test_stop_aggregates_what_was_already_delivered() -> None:
    async with open_memory_bus() as bus:
        worker = worker_on(bus)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await publish_nodes(bus, [node() for _ in range(500)])
            await worker.stop()  # at once: the subscription drains its buffer first
        assert worker.snapshot().emit_points[PASSKEY_VERIFY].count == 500
        assert worker.statistics().consumed == 500
        await worker.stop()  # idempotent


# -- /metrics ------------------------------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


async def test_metrics_endpoint_serves_the_aggregate() -> None:
    async with open_memory_bus() as bus:
        worker = worker_on(bus, metrics_port=0, slo_settings=SloSettings.workbook(min_events=1))
        assert worker.metrics_port is None
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            port = worker.metrics_port
            assert port is not None and port > 0
            await publish_nodes(bus, [node("CONSENT:governance:record", latency_ms=12.0)
                                      for _ in range(3)])
            await publish_nodes(bus, [node("CONSENT:governance:record", outcome="error")])
            await bus.publish("matriz.CONSENT.governance.record", b"garbage")
            await bus.publish(MATRIZ_DROPS, _encode(DropReport("usr-free-producer", 4, 9)))
            await wait_stats(bus, lambda s: total(s) == 4 and s.dropped_nodes == 4)
            await worker.check_slos()  # 1 error in 4 calls: burn rate 25 pages (min_events 1)
            text = await anyio.to_thread.run_sync(_scrape, port)
            await worker.stop()
        with pytest.raises(urllib.error.URLError):
            await anyio.to_thread.run_sync(_scrape, port)  # the server is gone

    point = 'emit_point="CONSENT:governance:record"'
    for series in (
        f'lukhas_matriz_nodes_total{{{point},outcome="ok"}} 3.0',
        f'lukhas_matriz_nodes_total{{{point},outcome="error"}} 1.0',
        f"lukhas_matriz_errors_total{{{point}}} 1.0",
        f"lukhas_slo_events_total{{{point}}} 4.0",
        f"lukhas_slo_bad_events_total{{{point}}} 1.0",
        f'lukhas_matriz_latency_seconds_bucket{{{point},le="0.001"}} 1.0',
        f'lukhas_matriz_latency_seconds_bucket{{{point},le="0.02"}} 4.0',
        f'lukhas_matriz_latency_seconds_bucket{{{point},le="+Inf"}} 4.0',
        f"lukhas_matriz_latency_seconds_count{{{point}}} 4.0",
        f"lukhas_matriz_latency_seconds_sum{{{point}}} 0.037",
        f'lukhas_matriz_latency_merged_seconds{{{point},quantile="0.95"}} 0.012',
        f"lukhas_matriz_sla_p95_seconds{{{point}}} 0.05",
        f"lukhas_slo_objective{{{point}}} 0.99",
        f"lukhas_slo_latency_seconds{{{point}}} 0.05",
        f'lukhas_slo_burn_rate{{{point},window="3600s"}} 25.0',
        f'lukhas_slo_alert_firing{{{point},severity="page"}} 1.0',
        'lukhas_matriz_sla_p95_seconds{emit_point="DECISION:identity:passkey.verify"} 0.03',
        "lukhas_matriz_dropped_nodes_total 4.0",
        'lukhas_matriz_producer_dropped_nodes_total{producer="usr-free-producer"} 4.0',
        "lukhas_matriz_invalid_nodes_total 1.0",
    ):
        assert series in text, f"{series!r} missing from:\n{text}"
    assert "_ms" not in text
    check = await promtool("check", "metrics", stdin=text)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_metrics_port_in_use_fails_the_start() -> None:
    async with open_memory_bus() as bus:
        first = worker_on(bus, metrics_port=0)
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            second = worker_on(bus, metrics_port=first.metrics_port)
            with pytest.raises(OSError):
                await second.run()
            await first.stop()


# -- manifests -----------------------------------------------------------------------------------


def test_every_manifest_emit_point_gets_its_sla() -> None:
    slas = sla_by_emit_point(load_manifests())
    assert slas["CONSENT:governance:record"] == 50.0
    assert slas[PASSKEY_VERIFY] == 30.0
    assert slas["CONTEXT:orchestration:handoff"] == 250.0
    manifests = load_manifests()
    listed = {p for m in manifests for p in m["matriz_emit_points"]}
    assert set(slas) == listed


@pytest.mark.parametrize(
    "manifest",
    [
        {"module": "m", "slas": {"p95_ms": 0}, "matriz_emit_points": ["A:b"]},
        {"module": "m", "slas": {"p95_ms": "fast"}, "matriz_emit_points": ["A:b"]},
        {"module": "m", "slas": {"p95_ms": 10}, "matriz_emit_points": "A:b"},
    ],
)
def test_bad_manifests_are_startup_errors(manifest: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="m: "):
        sla_by_emit_point([manifest])


async def test_injected_manifests_replace_the_packaged_ones() -> None:
    manifests = [{"module": "x", "slas": {"p95_ms": 5}, "matriz_emit_points": ["EVENT:x:y"]}]
    async with open_memory_bus() as bus:
        worker = worker_on(bus, manifests=manifests)
        assert worker.slas == {"EVENT:x:y": 5.0}
        assert list(worker.snapshot().emit_points) == ["EVENT:x:y"]


async def test_a_cancelled_worker_still_closes_its_metrics_server() -> None:
    async with open_memory_bus() as bus:
        worker = worker_on(bus, metrics_port=0)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            port = worker.metrics_port
            assert port is not None
            assert "lukhas_matriz_invalid_nodes_total" in await anyio.to_thread.run_sync(
                _scrape, port
            )
            tg.cancel_scope.cancel()
        with pytest.raises(urllib.error.URLError):
            await anyio.to_thread.run_sync(_scrape, port)
        with pytest.raises(RuntimeError):
            await worker.run()  # a worker runs once


async def test_run_returns_when_the_bus_closes_under_it() -> None:
    async with open_memory_bus() as bus:
        worker = worker_on(bus)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                await publish_nodes(bus, [node()])
                await wait_stats(bus, lambda s: total(s) == 1)
                await bus.close()
            # The group exits: `run` returned by itself, without `stop()`.
        assert worker.snapshot().emit_points[PASSKEY_VERIFY].count == 1
