"""The observability worker's capacity: MATRIZ nodes aggregated per second and CPU µs per node.

`measure_observability_capacity(url, nodes=N)` publishes N consent-record nodes into a fresh
MATRIZ stream first, then starts an `ObservabilityWorker` on its durable consumer and times
it (wall clock and this process's CPU) until every node is consumed and acked; the
publishing is outside the measurement. Run it with `python -m workers.tools._bench_observability`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import msgspec

from bus import NatsServer, open_nats_bus
from lukhas.config import Settings
from lukhas.observability.matriz_emit import make_node
from workers.service.observability import ObservabilityWorker


async def measure_observability_capacity(url: str, *, nodes: int = 20_000) -> dict[str, Any]:
    """Nodes/s and CPU µs per node of one observability worker draining `nodes` nodes."""
    settings = Settings(nats_url=url, dry_run=True)
    async with open_nats_bus(url) as bus:
        node = make_node("CONSENT", "governance:record", outcome="ok", latency_ms=1.5,
                         trace_id="0" * 32, producer="lukhas:bench", capability="consent")
        data = msgspec.json.encode(node)
        worker = ObservabilityWorker(bus, settings, metrics_port=None)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)  # creates the stream and its durable consumer
            await worker.stop()
        for start in range(0, nodes, 1000):
            await bus.publish_batch([(node.subject, data)] * min(1000, nodes - start))
        await bus.flush()
        worker = ObservabilityWorker(bus, settings, metrics_port=None)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            # The worker has no completion hook: poll its counter (5 ms granularity).
            while worker.statistics().acked < nodes:  # noqa: ASYNC110
                await anyio.sleep(0.005)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            stats = worker.statistics()
            await worker.stop()
    return {"nodes": nodes, "consumed": stats.consumed, "acked": stats.acked,
            "seconds": round(wall, 3), "nodes_per_s": round(nodes / wall),
            "cpu_us_per_node": round(cpu / nodes * 1e6, 1)}


async def _main(nodes: int) -> None:
    async with NatsServer() as server:
        print(json.dumps(await measure_observability_capacity(server.url, nodes=nodes)))


if __name__ == "__main__":
    anyio.run(_main, int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
