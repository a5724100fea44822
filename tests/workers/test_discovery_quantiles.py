"""`$SRV.STATS` carries each endpoint's latency quantiles, which nats.micro's average cannot."""

from __future__ import annotations

import pytest

from bus import open_memory_bus
from lukhas import subjects
from tests.workers.test_slices import call, serving
from workers.service.discovery import EndpointCounters, latency_quantiles


def test_quantiles_come_from_the_recorded_processing_times() -> None:
    counters = EndpointCounters()
    assert latency_quantiles(counters) == {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    for ms in range(1, 101):  # 1..100 ms; the average (50.5) says nothing of the tail
        counters.record(ms * 1_000_000, None)
    q = latency_quantiles(counters)
    assert (q["p50"], q["p95"], q["p99"]) == pytest.approx((50.0, 95.0, 99.0), rel=1e-3)
    assert counters.processing_time_ns // counters.num_requests == 50_500_000


async def test_srv_stats_endpoints_carry_latency_quantiles() -> None:
    async with open_memory_bus() as bus, serving(bus) as (_, _matriz, service):
        for i in range(20):
            await call(bus, subjects.CONSENT_RECORD, {"user_id": f"usr_{i}", "scope": "s"})
        stats = await call(bus, f"$SRV.STATS.{subjects.SERVICE_NAME}.{service.identity.id}", b"")
    record = next(e for e in stats["endpoints"] if e["subject"] == subjects.CONSENT_RECORD)
    latency = record["data"]["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert record["data"]["max_pending"] > 0  # the buffer figures are still there
    idle = next(e for e in stats["endpoints"] if e["subject"] == subjects.CONTEXT_HANDOFF)
    assert idle["data"]["latency_ms"] == {"p50": 0.0, "p95": 0.0, "p99": 0.0}
