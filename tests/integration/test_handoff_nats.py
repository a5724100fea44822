"""Handoff backpressure against a real nats-server that stops answering (SIGSTOP).

A stopped server neither confirms flushes (core mode) nor acknowledges JetStream publishes
(feature mode), so handoffs pile up at the in-flight bound: offered 10x the bound, the rest
are refused with `backpressure`, memory stays bounded, and once the server resumes every
accepted handoff is where it should be.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from bus import NatsServer, open_nats_bus
from lukhas.orchestration.context.api import handoff_context
from lukhas.orchestration.context.endpoints import handoff_controls
from lukhas.testing import dry_run_settings, open_test_runtime
from tests.nats_servers import stop_server
from workers.service.bootstrap import unwire_providers, wire_providers
from workers.service.streams import HANDOFF_STREAM

pytestmark = pytest.mark.nats

BOUND = 8


@pytest.fixture
def server(tmp_path: Any) -> Iterator[NatsServer]:
    srv = NatsServer(store_dir=tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        if srv.pid is not None:
            os.kill(srv.pid, signal.SIGCONT)
        srv.stop()


def settings_for(*, feature: bool) -> Any:
    return dry_run_settings(
        dry_run=False, offline=False, feature_orchestration_handoff=feature,
        handoff_rate=1e6, handoff_burst=1_000_000,
        handoff_max_inflight=BOUND, handoff_backpressure_timeout_ms=50,
    )


async def offer_while_stopped(server: NatsServer, offered: int) -> list[dict[str, Any]]:
    """Stop the server, offer `offered` handoffs at once, resume it once refusals are in."""
    replies: list[dict[str, Any]] = []
    refusals = anyio.Event()

    async def one(i: int) -> None:
        reply = await handoff_context({"n": i}, target="stalled")
        replies.append(reply)
        if sum(r.get("reason") == "backpressure" for r in replies) == offered - BOUND:
            refusals.set()

    assert server.pid is not None
    # Stopped for sure before the first offer: a PONG answered in the window after kill()
    # would free a slot, and one more handoff than BOUND would be let through.
    await stop_server(server.pid)
    try:
        async with anyio.create_task_group() as tg:
            for i in range(offered):
                tg.start_soon(one, i)
            with anyio.fail_after(10):
                await refusals.wait()
            os.kill(server.pid, signal.SIGCONT)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    return replies


async def test_core_mode_refuses_beyond_the_bound_and_delivers_every_accepted(
    server: NatsServer,
) -> None:
    async with open_nats_bus(server.url) as bus, open_nats_bus(server.url) as consumer_bus:
        async with consumer_bus.subscribe("lukhas.context.stalled") as target:
            await consumer_bus.flush()
            async with open_test_runtime(settings_for(feature=False), bus=bus) as (runtime, _):
                replies = await offer_while_stopped(server, offered=BOUND * 10)
                stats = handoff_controls(runtime).gate.statistics()
            received = [json.loads((await target.next(5)).data)["ctx"]["n"] for _ in range(BOUND)]
    assert sum(r["ok"] for r in replies) == BOUND
    assert sum(r.get("reason") == "backpressure" for r in replies) == BOUND * 9
    assert all(r["mode"] == "dryrun" for r in replies if r["ok"])
    assert stats.in_flight == 0 and stats.refused == BOUND * 9
    assert len(set(received)) == BOUND


async def test_feature_mode_acks_are_durable_and_bounded(server: NatsServer) -> None:
    settings = settings_for(feature=True)
    async with open_nats_bus(server.url) as bus:
        async with open_test_runtime(settings, bus=bus) as (runtime, matriz):
            await wire_providers(runtime)
            try:
                replies = await offer_while_stopped(server, offered=BOUND * 10)
            finally:
                unwire_providers()
            nodes = await matriz.take(BOUND * 10)
        info = await bus.jetstream().stream_info(HANDOFF_STREAM)
    ok = [r for r in replies if r["ok"]]
    assert len(ok) == BOUND and all(r["mode"] == "feature" for r in ok)
    assert sorted(r["seq"] for r in ok) == list(range(1, BOUND + 1))
    assert info.state.messages == BOUND
    outcomes = [n["state"]["outcome"] for n in nodes]
    assert outcomes.count("backpressure") == BOUND * 9 and outcomes.count("ok") == BOUND
