"""The live feed: node summaries and reasons, from the nodes the worker counted.

On the memory bus (the worker's plain-subscription path) and on NATS (its JetStream path,
two workers sharing the durable consumer: together their messages show every node, and the
reasons are merged over both).
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import nats.js.errors
import pytest

from bus import Bus, open_memory_bus, open_nats_bus
from lukhas.observability.matriz_emit import MatrizNode, Outcome, make_node
from lukhas.subjects import OBSERVABILITY_NODES
from lukhas.testing import dry_run_settings
from workers.service._aggregate import Aggregator
from workers.service._livefeed import NodesMessage
from workers.service.observability import ObservabilityWorker
from workers.service.streams import MATRIZ_STREAM

VERIFY = "DECISION:identity:passkey.verify"
_nodes_decoder = msgspec.json.Decoder(NodesMessage)


def node(outcome: Outcome = "ok", *labels: str, pseudonym: str | None = None) -> MatrizNode:
    return make_node(
        "DECISION", "identity:passkey.verify", outcome=outcome, latency_ms=1.0,
        trace_id="0" * 32, producer="tests", capability="verify_passkey", labels=labels,
        subject_pseudonym=pseudonym,
    )


async def publish(bus: Bus, nodes: list[MatrizNode]) -> None:
    for n in nodes:
        await bus.publish(n.subject, msgspec.json.encode(n))
    await bus.flush()


def worker_on(bus: Bus, **options: Any) -> ObservabilityWorker:
    options.setdefault("metrics_port", None)
    options.setdefault("fetch_timeout_s", 0.2)
    return ObservabilityWorker(bus, dry_run_settings(), **options)


async def test_summaries_and_reasons_of_the_counted_nodes() -> None:
    nodes = [
        node("ok", pseudonym="ps_1"),
        node("refused", "reason:invalid_assertion"),
        node("refused", "reason:invalid_assertion"),
        node("refused", "reason:challenge_reused"),
        node("error", "error:timeout"),
        node("error"),
    ]
    async with open_memory_bus() as bus, bus.subscribe(OBSERVABILITY_NODES) as feed:
        worker = worker_on(bus)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await publish(bus, nodes)
            seen: list[NodesMessage] = []
            with anyio.fail_after(5):
                while sum(len(m.nodes) for m in seen) < len(nodes):
                    seen.append(_nodes_decoder.decode((await feed.next()).data))
            await worker.stop()
    summaries = [s for m in seen for s in m.nodes]
    assert [s.id for s in summaries] == [n.id for n in nodes]
    assert [(s.outcome, s.reason) for s in summaries] == [
        ("ok", None), ("refused", "invalid_assertion"), ("refused", "invalid_assertion"),
        ("refused", "challenge_reused"), ("error", "error:timeout"), ("error", None),
    ]
    assert summaries[0].subject_pseudonym == "ps_1"
    assert {s.emit_point for s in summaries} == {VERIFY}
    assert seen[-1].reasons == {
        VERIFY: {"invalid_assertion": 2, "challenge_reused": 1, "error:timeout": 1, "error": 1}
    }


def test_reasons_merge_over_peers_and_stay_bounded() -> None:
    mine, theirs = Aggregator({VERIFY: 50.0}), Aggregator({VERIFY: 50.0})
    for _ in range(3):
        mine.ingest(msgspec.json.encode(node("refused", "reason:rate_limited")))
    theirs.ingest(msgspec.json.encode(node("refused", "reason:rate_limited")))
    theirs.ingest(msgspec.json.encode(node("error", "error:boom")))
    for i in range(100):  # made-up reasons: only the first 64 distinct ones are kept
        theirs.ingest(msgspec.json.encode(node("refused", f"reason:r{i}")))
    merged = mine.reasons([theirs.export_state("theirs")])
    assert merged[VERIFY]["rate_limited"] == 4
    assert merged[VERIFY]["error:boom"] == 1
    assert len(merged[VERIFY]) == 64
    assert mine.reasons() == {VERIFY: {"rate_limited": 3}}


@pytest.mark.nats
async def test_two_workers_together_show_every_node(nats_url: str) -> None:
    nodes = [node("refused", "reason:invalid_assertion") for _ in range(120)]
    async with open_nats_bus(nats_url) as client:
        js = client.jetstream()
        try:
            await js.delete_stream(MATRIZ_STREAM)
        except nats.js.errors.NotFoundError:
            pass
        async with (
            open_nats_bus(nats_url) as bus_a,
            open_nats_bus(nats_url) as bus_b,
            client.subscribe(OBSERVABILITY_NODES) as feed,
        ):
            a = worker_on(bus_a, fetch_batch=16, check_interval_s=0.05, worker_id="a")
            b = worker_on(bus_b, fetch_batch=16, check_interval_s=0.05, worker_id="b")
            async with anyio.create_task_group() as tg:
                await tg.start(a.run)
                await tg.start(b.run)
                await publish(client, nodes)
                ids: set[str] = set()
                publishers: set[str] = set()
                with anyio.fail_after(15):
                    while len(ids) < len(nodes):
                        message = _nodes_decoder.decode((await feed.next()).data)
                        ids.update(s.id for s in message.nodes)
                        publishers.add(message.worker_id)
                    # The reasons either worker publishes merge both workers' counts, once
                    # their states (published every 50 ms) have reached each other.
                    while not all(
                        w.aggregate.reasons(w.peer_states()).get(VERIFY)
                        == {"invalid_assertion": len(nodes)} for w in (a, b)
                    ):
                        await client.flush()  # a round trip, not a sleep
                own = [w.aggregate.reasons().get(VERIFY, {}) for w in (a, b)]
                await a.stop()
                await b.stop()
        await js.delete_stream(MATRIZ_STREAM)
    assert ids == {n.id for n in nodes}
    assert publishers == {"a", "b"}  # each published the nodes it counted
    assert sum(r.get("invalid_assertion", 0) for r in own) == len(nodes)
