"""The observability worker is SIGKILLed and restarted: its durable consumer resumes exactly.

Also: a nats-server crash must not make a running observability worker count a node twice.
nats-server persists consumer acks lazily, so after a SIGKILL of the server it redelivers
nodes that were already acked; the worker has to recognise them by stream sequence.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import msgspec
import pytest

from bus import NatsServer, NoResponders, open_nats_bus
from bus.nats import NatsBus
from lukhas import subjects
from lukhas.config import Settings
from lukhas.observability.matriz_emit import make_node
from tests.faults._harness import (
    RECORD_POINT,
    RECORD_SUBJECT,
    eventually,
    lukhas_worker,
    point_count,
    request_json,
    sigkill,
    stats,
    stream_subject_count,
)
from tests.nats_servers import FaultServer
from workers.service.observability import DURABLE_NAME, ObservabilityWorker
from workers.service.streams import MATRIZ_STREAM

pytestmark = pytest.mark.nats

logger = logging.getLogger(__name__)


async def record(bus: NatsBus, count: int, tag: str) -> None:
    for i in range(count):
        body = {"user_id": f"usr_obs_{tag}_{i}", "scope": "observability.restart"}
        reply = await request_json(bus, subjects.CONSENT_RECORD, body)
        assert reply["ok"] is True, reply


async def settled_at(bus: NatsBus, count: int) -> bool:
    """The consumer has nothing pending or unacked, and the worker counted `count` records."""
    info = await bus.jetstream().consumer_info(MATRIZ_STREAM, DURABLE_NAME)
    if info.num_pending or info.num_ack_pending:
        return False
    counted = point_count(await stats(bus))
    assert counted <= count, f"counted {counted} > {count}: a node was counted twice"
    return counted == count


async def test_sigkilled_observability_worker_resumes_from_its_durable_consumer() -> None:
    server = NatsServer()
    await anyio.to_thread.run_sync(server.start)
    before, during = 40, 60
    try:
        env = {"NATS_URL": server.url}
        async with lukhas_worker("slices", env), open_nats_bus(server.url) as bus:
            async with lukhas_worker("observability", env) as first:
                await record(bus, before, "before")
                await eventually(lambda: settled_at(bus, before), 20, "the first count")
                assert await sigkill(first) == -9

            # Down: nobody answers stats, nodes keep going into the stream.
            with pytest.raises(NoResponders):
                await stats(bus)
            await record(bus, during, "during")
            js = bus.jetstream()

            async def all_stored() -> bool:
                n = await stream_subject_count(js, MATRIZ_STREAM, RECORD_SUBJECT)
                return n == before + during

            await eventually(all_stored, 10, "the stream to hold every node")

            async with lukhas_worker("observability", env):
                # A new process starts from zero and reads only what the first never acked.
                await eventually(lambda: settled_at(bus, during), 20, "the resumed count")
                snapshot = await stats(bus)
    finally:
        await anyio.to_thread.run_sync(server.stop)
    record_stats = snapshot["emit_points"][RECORD_POINT]
    logger.warning(
        "observability restart: %d emitted before the kill (counted by the first process), "
        "%d while down, counted by the second %d", before, during, record_stats["count"],
    )
    assert record_stats["count"] == during and record_stats["errors"] == 0
    assert snapshot["source"] == "jetstream"


def node() -> bytes:
    n = make_node(
        "CONSENT", "governance:record", outcome="ok", latency_ms=1.0,
        trace_id="0" * 32, producer="tests", capability="record_consent",
    )
    return msgspec.json.encode(n)


async def test_a_server_crash_does_not_make_the_worker_count_a_node_twice(
    tmp_path: Path,
) -> None:
    server = FaultServer(store_dir=tmp_path / "js")
    await anyio.to_thread.run_sync(server.start)
    count = 50
    try:
        async with (
            open_nats_bus(server.url, reconnect_wait=0.05) as worker_bus,
            open_nats_bus(server.url, reconnect_wait=0.05) as bus,
        ):
            # A short ack wait, so redeliveries of unacked nodes come within the test.
            worker = ObservabilityWorker(
                worker_bus, Settings(nats_url=server.url), metrics_port=None,
                ack_wait_s=1.0, fetch_timeout_s=0.2,
            )
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    await tg.start(worker.run)
                    for _ in range(count):
                        await bus.publish(RECORD_SUBJECT, node())
                    await bus.flush()
                    await eventually(lambda: settled_at(bus, count), 20, "the first count")

                    await anyio.to_thread.run_sync(server.kill)
                    await anyio.to_thread.run_sync(server.start)
                    await worker_bus.wait_reconnected(1)
                    await bus.wait_reconnected(1)
                    # Whatever the server forgot is redelivered now (or within the ack
                    # wait); once nothing is pending, the count must still be exact.
                    await eventually(lambda: settled_at(bus, count), 20, "the count after")
                    info = await bus.jetstream().consumer_info(MATRIZ_STREAM, DURABLE_NAME)
                    counted = worker.snapshot().emit_points[RECORD_POINT].count
                    await worker.stop()
    finally:
        await anyio.to_thread.run_sync(server.stop)
    logger.warning(
        "server crash under the observability worker: %d nodes, counted %d, redelivered "
        "(consumer delivered seq %d)", count, counted, info.delivered.stream_seq,
    )
    assert counted == count


@pytest.mark.soak
async def test_observability_killed_mid_stream_counts_each_unacked_node_once() -> None:
    """Killed while nodes flow: what it had taken but not acked is redelivered to the next
    process once the consumer's ack wait (30 s) runs out, and counted there exactly once."""
    server = NatsServer()
    await anyio.to_thread.run_sync(server.start)
    sent = 0
    try:
        env = {"NATS_URL": server.url}
        async with lukhas_worker("slices", env), open_nats_bus(server.url) as bus:
            js = bus.jetstream()
            stop = anyio.Event()

            async def load() -> None:
                nonlocal sent
                while not stop.is_set():
                    await record(bus, 1, f"mid{sent}")
                    sent += 1

            async with lukhas_worker("observability", env) as first:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(load)
                    await eventually(
                        lambda: _counted_at_least(bus, 100), 30, "the first worker to count"
                    )
                    assert await sigkill(first) == -9
                    killed_at = sent
                    with anyio.fail_after(30):
                        while sent < killed_at + 100:
                            await anyio.lowlevel.checkpoint()
                            await bus.flush()
                    stop.set()

            async def all_stored() -> bool:
                return await stream_subject_count(js, MATRIZ_STREAM, RECORD_SUBJECT) == sent

            await eventually(all_stored, 10, "the stream to hold every node")
            info = await js.consumer_info(MATRIZ_STREAM, DURABLE_NAME)
            acked_by_first = info.delivered.stream_seq - info.num_ack_pending
            async with lukhas_worker("observability", env):
                await eventually(
                    lambda: settled_at(bus, sent - acked_by_first), 90, "the second count"
                )
    finally:
        await anyio.to_thread.run_sync(server.stop)
    logger.warning(
        "observability killed mid-stream: %d nodes; the first process acked %d, %d were "
        "in flight (redelivered), the second counted %d",
        sent, acked_by_first, info.num_ack_pending, sent - acked_by_first,
    )


async def _counted_at_least(bus: NatsBus, count: int) -> bool:
    return point_count(await stats(bus)) >= count
