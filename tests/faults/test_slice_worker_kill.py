"""A slice worker is SIGKILLed in a queue group of two; the other one keeps serving.

Only requests that were already on their way to the killed worker may fail: every request
started after the server dropped its connection succeeds, and no more requests fail than
the client had in flight when the worker died.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import anyio
import pytest

from bus import Bus, BusError, NatsServer, RequestTimeout, open_nats_bus
from lukhas import subjects
from tests.faults._harness import connection_count, eventually, lukhas_worker, request_json, sigkill

pytestmark = pytest.mark.nats

logger = logging.getLogger(__name__)

CLIENTS = 16
DEADLINE_S = 1.0


@dataclass
class Calls:
    #: (started, finished, outcome) of every request, on the monotonic clock.
    log: list[tuple[float, float, str]] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def ok_since(self, t: float) -> int:
        return sum(1 for started, _, outcome in self.log if started >= t and outcome == "ok")

    async def wait_ok_since(self, t: float, count: int, timeout: float) -> None:
        with anyio.fail_after(timeout):
            while self.ok_since(t) < count:
                await self._changed.wait()

    def add(self, entry: tuple[float, float, str]) -> None:
        self.log.append(entry)
        self._changed.set()
        self._changed = anyio.Event()


async def client(bus: Bus, calls: Calls, n: int, stop: anyio.Event) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        body = {"user_id": f"usr_qg_{n}_{i}", "scope": "queue.group"}
        started = time.monotonic()
        try:
            reply = await request_json(bus, subjects.CONSENT_RECORD, body, timeout=DEADLINE_S)
            outcome = "ok" if reply.get("ok") is True else f"error:{reply}"
        except RequestTimeout:
            outcome = "timeout"
        except BusError as exc:
            outcome = type(exc).__name__
        calls.add((started, time.monotonic(), outcome))


async def instance_request_counts(bus: Bus) -> dict[str, int]:
    """Requests served per slice service instance, from `$SRV.STATS` (NATS micro)."""
    inbox = f"_INBOX.faults.{time.monotonic_ns()}"
    counts: dict[str, int] = {}
    async with bus.subscribe(inbox) as sub:
        await bus.publish(f"$SRV.STATS.{subjects.SERVICE_NAME}", b"", reply=inbox)
        with anyio.move_on_after(1.0):
            while len(counts) < 2:
                env = await sub.next()
                if env.data:
                    stats = json.loads(env.data)
                    counts[stats["id"]] = sum(e["num_requests"] for e in stats["endpoints"])
    return counts


async def test_sigkill_of_one_slice_worker_fails_at_most_its_in_flight_requests() -> None:
    server = NatsServer(monitor=True)
    await anyio.to_thread.run_sync(server.start)
    try:
        env = {"NATS_URL": server.url}
        async with (
            lukhas_worker("slices", env),
            lukhas_worker("slices", env) as victim,
            open_nats_bus(server.url) as bus,
        ):
            calls = Calls()
            stop = anyio.Event()
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for n in range(CLIENTS):
                        tg.start_soon(client, bus, calls, n, stop)
                    await calls.wait_ok_since(0.0, 300, 20)

                    async def both_serve() -> bool:
                        counts = await instance_request_counts(bus)
                        return len(counts) == 2 and min(counts.values()) > 0

                    await eventually(both_serve, 10, "both workers to serve requests")

                    connections = await anyio.to_thread.run_sync(connection_count, server)
                    killed_at = time.monotonic()
                    assert await sigkill(victim) == -9

                    async def connection_dropped() -> bool:
                        now = await anyio.to_thread.run_sync(connection_count, server)
                        return now == connections - 1

                    await eventually(connection_dropped, 10, "the server to drop the worker")
                    gone_at = time.monotonic()
                    await calls.wait_ok_since(gone_at, 300, 20)
                    stop.set()
            survivors = await instance_request_counts(bus)
    finally:
        await anyio.to_thread.run_sync(server.stop)

    failed = [(s, f, o) for s, f, o in calls.log if o != "ok"]
    after = [o for s, _, o in calls.log if s >= gone_at]
    logger.warning(
        "queue group kill: %d requests, %d failed (%s), %d after the drop all ok=%s",
        len(calls.log), len(failed), sorted({o for _, _, o in failed}), len(after),
        all(o == "ok" for o in after),
    )
    assert len(survivors) == 1
    assert len(failed) <= CLIENTS, failed
    assert all(started < gone_at for started, _, _ in failed), failed
    assert {o for _, _, o in failed} <= {"timeout"}, failed
    assert all(finished - started <= DEADLINE_S + 1.0 for started, finished, _ in failed)
    assert after and all(o == "ok" for o in after)
    assert killed_at < gone_at
