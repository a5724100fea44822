"""Group confirmation of core handoff publishes (`FlushConfirmer`) on a real nats-server.

Many concurrent handoffs share few flushes, yet every one that answers `ok: true` was
received by a subscriber; a flush that fails fails exactly the callers it covered.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from bus import BusError, NatsServer, open_nats_bus
from lukhas.orchestration.context.api import handoff_context
from lukhas.orchestration.context.providers.bus_publisher import _STATE_KEY
from lukhas.orchestration.context.ratelimit import FlushConfirmer
from lukhas.testing import dry_run_settings, open_test_runtime

pytestmark = pytest.mark.nats

N = 400


async def test_concurrent_handoffs_share_flushes_and_all_arrive(nats_server: NatsServer) -> None:
    settings = dry_run_settings(dry_run=False, offline=False, handoff_rate=1e6,
                                handoff_burst=1_000_000, handoff_max_inflight=N)
    replies: list[dict[str, Any]] = []
    async with open_nats_bus(nats_server.url) as bus, open_nats_bus(nats_server.url) as sink:
        async with sink.subscribe("lukhas.context.confirmer") as target:
            await sink.flush()
            async with open_test_runtime(settings, bus=bus) as (runtime, _):
                async def one(i: int) -> None:
                    replies.append(await handoff_context({"n": i}, target="confirmer"))

                async with anyio.create_task_group() as tg:
                    for i in range(N):
                        tg.start_soon(one, i)
                confirmer = runtime.slice_state[_STATE_KEY]
            # ok: true means the server had it, so the subscriber gets every one.
            got = {json.loads((await target.next(5)).data)["ctx"]["n"] for _ in range(N)}
    assert [r["ok"] for r in replies] == [True] * N
    assert got == set(range(N))
    assert 1 <= confirmer.flushes <= N // 4, confirmer.flushes


async def test_a_failed_flush_fails_the_callers_it_covered_and_the_next_recovers(
    nats_server: NatsServer,
) -> None:
    async with open_nats_bus(nats_server.url) as bus:
        fail = {"next": True}
        gate = anyio.Event()

        async def flush() -> None:
            await gate.wait()
            if fail["next"]:
                fail["next"] = False
                raise BusError("flush refused")
            await bus.flush()

        confirmer = FlushConfirmer(flush)
        outcomes: dict[int, str] = {}

        async def caller(i: int) -> None:
            await bus.publish("confirmer.test", b"x")
            try:
                await confirmer.confirmed(confirmer.published())
                outcomes[i] = "ok"
            except BusError:
                outcomes[i] = "failed"

        async with anyio.create_task_group() as tg:
            tg.start_soon(caller, 0)   # leads the first (failing) flush
            await anyio.wait_all_tasks_blocked()
            for i in range(1, 6):      # park on the next flush
                tg.start_soon(caller, i)
            await anyio.wait_all_tasks_blocked()
            gate.set()
        assert outcomes == {0: "failed", 1: "ok", 2: "ok", 3: "ok", 4: "ok", 5: "ok"}
        assert confirmer.flushes == 2
