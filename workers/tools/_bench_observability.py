"""The observability worker's capacity: MATRIZ nodes aggregated per second and CPU µs per node.

`measure_observability_capacity(url, nodes=N)` publishes N nodes (consent records, passkey
verifies and handoffs in turn, 0.5 % of them errors and 0.5 % slow) into a fresh MATRIZ stream,
then drains them through several durable consumers of that stream, one after the other, each
timed by wall clock and by this process's CPU (the publishing is outside the measurement):

- `natspy_fetch`: the baseline, nats-py's public API alone: `pull_subscribe`, `fetch(256)`,
  `msg.ack()` per message, no aggregation (what the worker did before it had its own reader);
- `pull_only`: `bus.nats.pull.PullConsumer` alone (explicit acks, no aggregation): the floor
  of the transport the worker uses;
- `worker`: an `ObservabilityWorker` on its own durable consumer (explicit acks, the default,
  safe with several workers), aggregation, canary judging and all;
- `worker_ack_all`: the same on a consumer with ack policy `all` (one ack per batch).

Each row gives `nodes_per_s` (the drain rate, with nats-server on the other core: the rate one
worker keeps up with), `cpu_us_per_node`, and `cpu_bound_nodes_per_s` = 10^6 / that (the rate
if the worker had a core to itself). The best of `repeats` runs is kept for each.
`measure_sustained(url, rates=...)` offers nodes at each rate from a publisher in its own
process for a few seconds while one worker consumes, and says how far behind the worker is
when the publishing stops: the deployed shape, with nats-server, publisher and worker sharing
the machine. Run both with
`python -m workers.tools._bench_observability [N] [repeats] [rate,rate,...]`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import msgspec
from nats.js.api import AckPolicy, ConsumerConfig

from bus import NatsServer, open_nats_bus
from bus.nats import NatsBus
from bus.nats.pull import PullConsumer
from lukhas.config import Settings
from lukhas.observability.matriz_emit import make_node
from workers.service.observability import ObservabilityWorker
from workers.service.streams import MATRIZ_STREAM, ensure_matriz_stream

#: This module, as `python -m` runs it (`__name__` is `__main__` there).
_MODULE = "workers.tools._bench_observability"

_POINTS = (
    ("CONSENT", "governance:record", "record_consent"),
    ("DECISION", "identity:passkey.verify", "verify_passkey"),
    ("CONTEXT", "orchestration:handoff", "handoff_context"),
)


def _payloads(count: int) -> list[tuple[str, bytes]]:
    """`count` distinct nodes over the three slices' main emit points."""
    out = []
    for i in range(count):
        node_type, label, capability = _POINTS[i % len(_POINTS)]
        node = make_node(
            node_type, label, outcome="error" if i % 200 == 199 else "ok",
            latency_ms=(1.0 + (i % 50) * 0.1) * (100 if i % 200 == 100 else 1),
            trace_id=f"{i:032x}", producer="lukhas:bench", capability=capability,
            subject_pseudonym=f"ps_{i % 97:08x}",
        )
        out.append((node.subject, msgspec.json.encode(node)))
    return out


async def _timed(nodes: int, drain: Callable[[], Awaitable[int]]) -> dict[str, Any]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    drained = await drain()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    cpu_us = cpu / nodes * 1e6
    return {"drained": drained, "seconds": round(wall, 3), "nodes_per_s": round(nodes / wall),
            "cpu_us_per_node": round(cpu_us, 1),
            "cpu_bound_nodes_per_s": round(1e6 / cpu_us) if cpu_us else None}


async def _add_consumer(bus: NatsBus, durable: str, ack_policy: AckPolicy) -> None:
    await bus.jetstream().add_consumer(MATRIZ_STREAM, ConsumerConfig(
        durable_name=durable, ack_policy=ack_policy, max_ack_pending=100_000,
    ))


async def _natspy_fetch(bus: NatsBus, nodes: int, durable: str) -> dict[str, Any]:
    await _add_consumer(bus, durable, AckPolicy.EXPLICIT)
    sub = await bus.jetstream().pull_subscribe("matriz.>", durable=durable, stream=MATRIZ_STREAM)

    async def drain() -> int:
        done = 0
        while done < nodes:
            for msg in await sub.fetch(256, timeout=5):
                await msg.ack()
                done += 1
        await bus.flush()
        return done

    try:
        return await _timed(nodes, drain)
    finally:
        await sub.unsubscribe()


async def _pull_only(bus: NatsBus, nodes: int, durable: str) -> dict[str, Any]:
    await _add_consumer(bus, durable, AckPolicy.EXPLICIT)

    async def drain() -> int:
        done = 0
        async with PullConsumer(bus, MATRIZ_STREAM, durable, batch=256) as pull:
            while done < nodes:
                batch = await pull.next_batch(5.0)
                await pull.ack(batch)
                done += len(batch.messages)
        return done

    return await _timed(nodes, drain)


async def _worker(
    bus: NatsBus, nodes: int, durable: str, ack_policy: AckPolicy
) -> dict[str, Any]:
    await _add_consumer(bus, durable, ack_policy)
    worker = ObservabilityWorker(
        bus, Settings(nats_url="nats://unused", dry_run=True), metrics_port=None,
        durable=durable,
    )

    async def drain() -> int:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            # The worker has no completion hook: poll its counter (5 ms granularity).
            while worker.statistics().acked < nodes:  # noqa: ASYNC110
                await anyio.sleep(0.005)
            await worker.stop()
        return worker.statistics().consumed

    row = await _timed(nodes, drain)
    counted = sum(p.count for p in worker.snapshot().emit_points.values())
    if counted != nodes:
        raise RuntimeError(f"the worker counted {counted} of {nodes} nodes")
    return row


async def measure_observability_capacity(
    url: str, *, nodes: int = 20_000, repeats: int = 1
) -> dict[str, Any]:
    """Drain rate and CPU µs per node of one observability worker and of its baselines
    (see the module docstring); rows keyed by name, plus the worker's headline figures."""
    async with open_nats_bus(url) as bus:
        js = bus.jetstream()
        await ensure_matriz_stream(js)
        await js.purge_stream(MATRIZ_STREAM)
        payloads = _payloads(nodes)
        for start in range(0, nodes, 1000):
            await bus.publish_batch(payloads[start:start + 1000])
        await bus.flush()
        while (await js.stream_info(MATRIZ_STREAM)).state.messages < nodes:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        runs: dict[str, Callable[[str], Awaitable[dict[str, Any]]]] = {
            "natspy_fetch": lambda d: _natspy_fetch(bus, nodes, d),
            "pull_only": lambda d: _pull_only(bus, nodes, d),
            "worker": lambda d: _worker(bus, nodes, d, AckPolicy.EXPLICIT),
            "worker_ack_all": lambda d: _worker(bus, nodes, d, AckPolicy.ALL),
        }
        rows: dict[str, dict[str, Any]] = {}
        for attempt in range(repeats):
            for name, run in runs.items():
                durable = f"bench_{name}_{attempt}"
                row = await run(durable)
                await js.delete_consumer(MATRIZ_STREAM, durable)
                if name not in rows or row["cpu_us_per_node"] < rows[name]["cpu_us_per_node"]:
                    rows[name] = row
    base = rows["natspy_fetch"]["cpu_us_per_node"]
    for row in rows.values():
        row["cpu_vs_natspy_fetch"] = round(row["cpu_us_per_node"] / base, 2)
    worker = rows["worker"]
    return {"nodes": nodes, "repeats": repeats, "consumed": worker["drained"],
            "nodes_per_s": worker["nodes_per_s"], "cpu_us_per_node": worker["cpu_us_per_node"],
            "cpu_bound_nodes_per_s": worker["cpu_bound_nodes_per_s"], "rows": rows}


def _cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) process `pid` has used, from /proc; None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_sustained(
    url: str, *, rates: Sequence[int] = (10_000, 20_000, 30_000, 40_000), seconds: float = 3.0,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Offer each rate of nodes for `seconds` from a publisher in its own process while one
    worker (here, on a fresh durable consumer) consumes; how far behind it is when the
    publishing stops tells whether it keeps up (behind by under 250 ms of nodes).

    Each row also gives the CPU share (of one core) of the worker, the publisher and, with
    `server_pid`, nats-server: on a small machine the ceiling may be theirs, not the worker's.
    """
    rows = []
    async with open_nats_bus(url) as bus:
        js = bus.jetstream()
        await ensure_matriz_stream(js)
        for rate in rates:
            await js.purge_stream(MATRIZ_STREAM)
            durable = f"bench_sustained_{rate}"
            await _add_consumer(bus, durable, AckPolicy.EXPLICIT)
            worker = ObservabilityWorker(
                bus, Settings(nats_url="nats://unused", dry_run=True), metrics_port=None,
                durable=durable,
            )
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                consumed0 = worker.statistics().consumed
                server0, children0 = _cpu_s(server_pid), _children_cpu_s()
                cpu0, wall0 = time.process_time(), time.perf_counter()
                done = await anyio.run_process(
                    [sys.executable, "-m", _MODULE, "--publish", url, str(rate), str(seconds)],
                )
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                publisher_cpu = _children_cpu_s() - children0
                server1 = _cpu_s(server_pid)
                published = json.loads(done.stdout)["published"]
                consumed = worker.statistics().consumed - consumed0
                behind = published - consumed
                with anyio.fail_after(60):  # how long until it has caught up
                    while worker.statistics().consumed - consumed0 < published:  # noqa: ASYNC110
                        await anyio.sleep(0.005)
                catch_up_s = time.perf_counter() - wall0 - wall
                await worker.stop()
            await js.delete_consumer(MATRIZ_STREAM, durable)
            rows.append({
                "offered_per_s": rate, "published_per_s": round(published / wall),
                "consumed_per_s": round(consumed / wall), "behind_at_end": behind,
                "behind_ms": round(behind / rate * 1000), "catch_up_s": round(catch_up_s, 3),
                "cpu_us_per_node": round(cpu / max(consumed, 1) * 1e6, 1),
                "worker_cpu_share": round(cpu / wall, 2),
                "publisher_cpu_share": round(publisher_cpu / wall, 2),
                "server_cpu_share": None if server0 is None or server1 is None
                else round((server1 - server0) / wall, 2),
                "kept_up": behind < rate * 0.25,
            })
    kept = [row["offered_per_s"] for row in rows if row["kept_up"]]
    return {"seconds": seconds, "rows": rows, "keeps_up_with": max(kept) if kept else 0}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _publish(url: str, rate: int, seconds: float) -> None:
    """The publisher of `measure_sustained`: `rate` nodes/s, open loop, in 1 ms steps."""
    payloads = _payloads(3000)
    sent = 0
    async with open_nats_bus(url) as bus:
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            due = int(rate * elapsed) - sent
            if due > 0:
                await bus.publish_batch(
                    payloads[(sent + i) % len(payloads)] for i in range(due)
                )
                sent += due
            await anyio.sleep(0.001)
        await bus.flush()
    print(json.dumps({"published": sent}))


async def _main(nodes: int, repeats: int, rates: list[int]) -> None:
    async with NatsServer() as server:
        result = await measure_observability_capacity(server.url, nodes=nodes, repeats=repeats)
        result["sustained"] = await measure_sustained(
            server.url, rates=rates, server_pid=server.pid
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--publish"]:
        anyio.run(_publish, sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        anyio.run(
            _main,
            int(sys.argv[1]) if len(sys.argv) > 1 else 20_000,
            int(sys.argv[2]) if len(sys.argv) > 2 else 3,
            [int(r) for r in sys.argv[3].split(",")] if len(sys.argv) > 3
            else [10_000, 20_000, 30_000, 40_000],
        )
