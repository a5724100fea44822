"""The observability worker on a real nats-server: the MATRIZ stream and its durable consumer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from bus import NatsServer, open_nats_bus
from bus.nats import NatsBus
from lukhas.observability.matriz_emit import MatrizNode, make_node
from lukhas.subjects import OBSERVABILITY_STATS, alert_subject
from lukhas.testing import dry_run_settings
from workers.service._aggregate import Aggregator
from workers.service._slo import Slo
from workers.service.observability import (
    DURABLE_NAME,
    BurnAlert,
    ObservabilityWorker,
    StatsSnapshot,
)
from workers.service.streams import MATRIZ_STREAM, ensure_matriz_stream

pytestmark = pytest.mark.nats

_snapshot_decoder = msgspec.json.Decoder(StatsSnapshot)
RECORD = "CONSENT:governance:record"  # SLA p95 50 ms in its manifest


def node(latency_ms: float = 2.0) -> MatrizNode:
    return make_node(
        "CONSENT", "governance:record", outcome="ok", latency_ms=latency_ms,
        trace_id="0" * 32, producer="tests", capability="record_consent",
    )


async def publish_nodes(bus: NatsBus, count: int, latency_ms: float = 2.0) -> None:
    for _ in range(count):
        n = node(latency_ms)
        await bus.publish(n.subject, msgspec.json.encode(n))
    await bus.flush()


async def wait_stats(
    bus: NatsBus, done: Callable[[StatsSnapshot], bool], timeout: float = 15.0
) -> StatsSnapshot:
    """Ask for stats until `done` holds; every try is a real request/reply round trip."""
    with anyio.fail_after(timeout):
        while True:
            reply = await bus.request(OBSERVABILITY_STATS, b"{}", timeout=5.0)
            snap = _snapshot_decoder.decode(reply.data)
            if done(snap):
                return snap


def count(snap: StatsSnapshot) -> int:
    return snap.emit_points[RECORD].count


async def wait_consumer_settled(js: JetStreamContext, timeout: float = 10.0) -> Any:
    """Wait until the durable consumer has nothing pending and nothing awaiting an ack."""
    with anyio.fail_after(timeout):
        while True:
            info = await js.consumer_info(MATRIZ_STREAM, DURABLE_NAME)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return info


@asynccontextmanager
async def fresh_matriz(nats_url: str) -> AsyncIterator[tuple[NatsBus, JetStreamContext]]:
    """A client connection with no MATRIZ stream (nor consumer) left by another test."""
    async with open_nats_bus(nats_url) as bus:
        js = bus.jetstream()
        await _delete_stream(js)
        try:
            yield bus, js
        finally:
            await _delete_stream(js)


async def _delete_stream(js: JetStreamContext) -> None:
    try:
        await js.delete_stream(MATRIZ_STREAM)
    except nats.js.errors.NotFoundError:
        pass


def worker_on(bus: NatsBus, **options: Any) -> ObservabilityWorker:
    options.setdefault("metrics_port", None)
    options.setdefault("fetch_timeout_s", 0.2)  # bounds how long a graceful stop waits
    return ObservabilityWorker(bus, dry_run_settings(), **options)


async def test_stream_setup_is_idempotent(nats_url: str) -> None:
    async with fresh_matriz(nats_url) as (_bus, js):
        first = await ensure_matriz_stream(js, max_age_s=3600, max_bytes=8 * 1024 * 1024)
        again = await ensure_matriz_stream(js, max_age_s=60, max_bytes=1024)
        assert first.config.subjects == again.config.subjects == ["matriz.>"]
        # An existing stream keeps its limits.
        assert (again.config.max_age, again.config.max_bytes) == (3600, 8 * 1024 * 1024)
        with pytest.raises(ValueError):
            await ensure_matriz_stream(js, max_age_s=0, max_bytes=1)


async def test_durable_consumer_loses_nothing_and_counts_nothing_twice(nats_url: str) -> None:
    async with fresh_matriz(nats_url) as (client, js), open_nats_bus(nats_url) as worker_bus:
        # Published before any worker runs: the stream keeps them.
        await ensure_matriz_stream(js)
        await publish_nodes(client, 30)

        first = worker_on(worker_bus)
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            assert first.source == "jetstream"
            snap = await wait_stats(client, lambda s: count(s) == 30)
            assert snap.source == "jetstream"
            await publish_nodes(client, 10)
            await wait_stats(client, lambda s: count(s) == 40)
            await first.stop()
        assert first.statistics().acked == 40
        await wait_consumer_settled(js)

        # Published while no worker runs.
        await publish_nodes(client, 15)

        second = worker_on(worker_bus)
        async with anyio.create_task_group() as tg:
            await tg.start(second.run)
            await wait_stats(client, lambda s: count(s) >= 15)
            info = await wait_consumer_settled(js)
            # Settled, so nothing more can arrive: one more round trip shows the final count.
            snap = await wait_stats(client, lambda s: True)
            await second.stop()

    assert count(snap) == 15  # only what the first worker had not acked
    assert info.delivered.stream_seq == 55
    assert second.statistics().acked == 15


async def test_slo_alert_over_nats(nats_url: str) -> None:
    async with (
        fresh_matriz(nats_url) as (client, _js),
        open_nats_bus(nats_url) as worker_bus,
        client.subscribe(alert_subject(RECORD)) as alerts,
    ):
        worker = worker_on(worker_bus, check_interval_s=3600)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await publish_nodes(client, 25, latency_ms=120.0)  # all over the 50 ms SLO latency
            await wait_stats(client, lambda s: count(s) == 25)
            assert {a.severity for a in await worker.check_slos()} == {"page", "ticket"}
            alert = msgspec.json.decode((await alerts.next(timeout=5.0)).data, type=BurnAlert)
            await worker.stop()
    assert (alert.emit_point, alert.state, alert.latency_ms) == (RECORD, "firing", 50.0)
    assert alert.long_window_bad_events == alert.long_window_events == 25
    assert alert.long_burn_rate == pytest.approx(100.0)


async def test_two_workers_on_one_durable_report_the_merged_figures(nats_url: str) -> None:
    """The durable consumer splits the nodes; either worker answers with all of them."""
    latencies = [float(ms) for ms in range(1, 301)]
    reference = Aggregator({RECORD: 50.0}, slos={RECORD: Slo(0.99, 50.0)})
    for ms in latencies:
        reference.ingest(msgspec.json.encode(node(ms)))
    whole = reference.snapshot(source="jetstream").emit_points[RECORD]
    async with (
        fresh_matriz(nats_url) as (client, _js),
        open_nats_bus(nats_url) as bus_a,
        open_nats_bus(nats_url) as bus_b,
    ):
        a = worker_on(bus_a, check_interval_s=0.05, fetch_batch=16, worker_id="a")
        b = worker_on(bus_b, check_interval_s=0.05, fetch_batch=16, worker_id="b")
        async with anyio.create_task_group() as tg:
            await tg.start(a.run)
            await tg.start(b.run)
            for ms in latencies:
                n = node(ms)
                await client.publish(n.subject, msgspec.json.encode(n))
            await client.flush()
            with anyio.fail_after(15):
                while not all(
                    w.snapshot().emit_points[RECORD].count == len(latencies) for w in (a, b)
                ):  # each try is a real round trip, no sleep
                    await client.request(OBSERVABILITY_STATS, b"{}", timeout=5.0)
            snaps = [w.snapshot() for w in (a, b)]
            own = [w.statistics().consumed for w in (a, b)]
            leaders = [w.is_leader() for w in (a, b)]
            await a.stop()
            await b.stop()
    assert sum(own) == len(latencies) and all(own), own  # each took a part
    for snap in snaps:
        point = snap.emit_points[RECORD]
        assert snap.workers == 2
        assert (point.p50_ms, point.p95_ms, point.p99_ms) == (
            whole.p50_ms, whole.p95_ms, whole.p99_ms)
        assert point.bad_events == whole.bad_events == 250
    assert leaders == [True, False]


async def test_without_jetstream_it_subscribes() -> None:
    async with NatsServer(jetstream=False) as server, open_nats_bus(server.url) as bus:
        worker = worker_on(bus)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            assert worker.source == "subscription"
            await publish_nodes(bus, 5)
            snap = await wait_stats(bus, lambda s: count(s) == 5)
            await worker.stop()
    assert snap.source == "subscription"


async def test_deleted_consumer_resumes_after_the_last_ack(nats_url: str) -> None:
    async with fresh_matriz(nats_url) as (client, js), open_nats_bus(nats_url) as worker_bus:
        worker = worker_on(worker_bus)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await publish_nodes(client, 10)
            await client.publish("matriz.CONSENT.governance.record", b"not a node")
            await wait_stats(client, lambda s: count(s) == 10 and s.invalid_nodes == 1)
            await wait_consumer_settled(js)  # the invalid message was acked too

            await js.delete_consumer(MATRIZ_STREAM, DURABLE_NAME)
            await publish_nodes(client, 5)
            await wait_stats(client, lambda s: count(s) >= 15)
            await wait_consumer_settled(js)
            snap = await wait_stats(client, lambda s: True)
            await worker.stop()
    assert (count(snap), snap.invalid_nodes) == (15, 1)  # nothing replayed from the start


async def test_a_consumer_created_with_ack_all_is_read_with_one_ack_per_batch(
    nats_url: str,
) -> None:
    async with fresh_matriz(nats_url) as (client, js), open_nats_bus(nats_url) as worker_bus:
        worker = worker_on(worker_bus, ack_policy="all", fetch_batch=32)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            sent_before = worker_bus.client.stats["out_msgs"]
            await publish_nodes(client, 200)
            with anyio.fail_after(15):
                while worker.statistics().acked < 200:  # polls the consumer, not the worker
                    await wait_consumer_settled(js)
            # Acks and pull requests (and a state publish or two) from the worker's connection.
            sent = worker_bus.client.stats["out_msgs"] - sent_before
            snap = await wait_stats(client, lambda s: True)
            info = await js.consumer_info(MATRIZ_STREAM, DURABLE_NAME)
            await worker.stop()
    assert info.config.ack_policy == AckPolicy.ALL
    assert count(snap) == 200 and worker.statistics().acked == 200
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    assert sent < 100, sent  # far below one ack per node


async def test_an_existing_consumer_keeps_its_ack_policy(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with fresh_matriz(nats_url) as (client, js), open_nats_bus(nats_url) as worker_bus:
        await ensure_matriz_stream(js)
        await js.add_consumer(MATRIZ_STREAM, ConsumerConfig(
            durable_name=DURABLE_NAME, ack_policy=AckPolicy.ALL, ack_wait=30,
        ))
        await publish_nodes(client, 40)
        worker = worker_on(worker_bus)  # would create an `explicit` consumer
        with caplog.at_level(logging.INFO, logger="workers.service.observability"):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                await wait_stats(client, lambda s: count(s) == 40)
                info = await wait_consumer_settled(js)
                await worker.stop()
    assert info.config.ack_policy == AckPolicy.ALL
    assert worker.statistics().acked == 40
    assert any("exists with ack policy 'all'" in r.getMessage() for r in caplog.records)


async def test_an_unknown_ack_policy_is_refused(nats_url: str) -> None:
    async with open_nats_bus(nats_url) as bus:
        with pytest.raises(ValueError, match="ack_policy"):
            worker_on(bus, ack_policy="none")


async def test_stop_returns_at_once_while_waiting_for_nodes(nats_url: str) -> None:
    async with fresh_matriz(nats_url) as (client, js), open_nats_bus(nats_url) as worker_bus:
        # A pull that would wait 30 s for nodes: stop() must not wait for it.
        worker = worker_on(worker_bus, fetch_timeout_s=30.0)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await publish_nodes(client, 5)
            await wait_stats(client, lambda s: count(s) == 5)
            await wait_consumer_settled(js)
            with anyio.fail_after(5):
                await worker.stop()
        # Nothing was left waiting on the server for the stopped worker's inbox: a node
        # published now (and stored: the stream acks it) waits for the next worker instead
        # of going to a dead inbox and waiting out the ack wait.
        n = node()
        await js.publish(n.subject, msgspec.json.encode(n))
        info = await js.consumer_info(MATRIZ_STREAM, DURABLE_NAME)
    assert (info.num_pending, info.num_ack_pending) == (1, 0)
