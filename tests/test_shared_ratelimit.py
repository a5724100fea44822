"""One rate limit for the whole queue group: buckets in NATS KV, leased by every worker.

The accuracy tests offer 10x the rate for 3 s through 1, 2 and 4 limiters, each on its own
NATS connection to one real nats-server, and require rate x t + burst accepted within 2%.
The process test runs two real `lukhas worker slices` processes in one queue group and
checks that handoffs sent to both are limited once, not twice. The attack tests write
garbage into the shared bucket as an insider with KV access would.
"""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack

import anyio
import pytest
from nats.aio.client import Client

from bus import NatsServer, open_nats_bus
from lukhas import subjects
from lukhas.config import Settings
from lukhas.ratelimit import MemoryLeaseStore, SharedLimiter
from tests.integration.processes import running
from workers.service.leases import BUCKET, KvLeaseStore, open_lease_store
from workers.tools.loadgen import open_loop

pytestmark = pytest.mark.nats

RATE = 200.0
BURST = 20
OFFERED = 10 * RATE
SECONDS = 3.0


async def _fresh_bucket(url: str) -> None:
    client = Client()
    await client.connect(url)
    try:
        js = client.jetstream()
        try:
            await js.delete_key_value(BUCKET)
        except Exception:  # noqa: BLE001 - absent already
            pass
    finally:
        await client.close()


class Offers:
    """What one offered run did, with an exact single bucket replayed on the same offers.

    On a busy machine the load generator can stall for longer than the burst takes to
    refill, and no limiter can accept what was never offered: then only the upper bound
    is a fair check.
    """

    def __init__(self) -> None:
        self.accepted = self.refused = 0
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.retries: list[float] = []
        self.max_lag_s = 0.0

    def nominal(self) -> float:
        return RATE * (max(self.ends) - min(self.starts)) + BURST


async def _offer(limiters: list[SharedLimiter]) -> Offers:
    """Offer 10x the rate round-robin over `limiters` for SECONDS."""
    offers = Offers()
    turn = 0

    async def call() -> None:
        nonlocal turn
        limiter = limiters[turn % len(limiters)]
        turn += 1
        offers.starts.append(time.monotonic())
        decision = await limiter.decide("tenant")
        offers.ends.append(time.monotonic())
        if decision.allowed:
            offers.accepted += 1
        else:
            offers.refused += 1
            offers.retries.append(decision.retry_after_s)

    result = await open_loop(call, rate=OFFERED, duration_s=SECONDS, drain_timeout_s=10)
    offers.max_lag_s = result.max_start_lag_ms / 1000
    return offers


@pytest.mark.parametrize("workers", [1, 2, 4])
async def test_shared_limit_holds_within_2pct_across_workers(nats_url: str, workers: int) -> None:
    await _fresh_bucket(nats_url)
    settings = Settings()
    async with AsyncExitStack() as stack:
        limiters = []
        stores = []
        for i in range(workers):
            bus = await stack.enter_async_context(open_nats_bus(nats_url, name=f"w{i}"))
            # A generous timeout: a busy machine must not turn a slow bucket into the
            # per-process fallback this test is not about (the test after this one covers it).
            store = await open_lease_store(bus.jetstream(), settings,  # type: ignore[attr-defined]
                                           timeout_s=5.0)
            stores.append(store)
            limiters.append(SharedLimiter(store, name="handoff", rate=RATE, burst=BURST))
        offers = await _offer(limiters)
    accepted, refused, expected = offers.accepted, offers.refused, offers.nominal()
    # Never more than one limit for the group, however busy the machine.
    assert accepted <= 1.02 * expected, (accepted, expected, workers)
    assert refused > 0 and all(r > 0 for r in offers.retries)
    # Honest retry_after: never more than the time for the burst to refill.
    assert max(offers.retries) <= BURST / RATE + 0.001
    assert sum(s.fallbacks for s in stores) == 0
    # Refusals are answered locally; each accepted request costs a write per bucket (global
    # and per source), plus a lost race and a re-read per competing worker at saturation: a
    # figure to read (how busy the machine is moves it), not a bound to assert.
    print(f"workers={workers} accepted={accepted} rate*t+burst={expected:.1f} "
          f"max_lag_ms={offers.max_lag_s * 1000:.1f} refused={refused} "
          f"writes={sum(s.writes for s in stores)} reads={sum(s.reads for s in stores)} "
          f"conflicts={sum(s.conflicts for s in stores)}")
    if offers.max_lag_s > BURST / RATE / 2:
        pytest.skip(f"the load generator stalled {offers.max_lag_s * 1000:.0f} ms (machine "
                    f"busy): accepted {accepted} of rate x t + burst {expected:.0f}, the "
                    f"lower bound is not measurable")
    assert accepted >= 0.98 * expected, (accepted, expected, workers)


async def test_a_bucket_that_stops_answering_falls_back_to_a_per_process_limit() -> None:
    """nats-server gone: a lease gives up after its timeout and this process limits alone
    (the configured burst, no more), counted in `fallbacks`, until the cool-down ends."""
    async with NatsServer() as server:
        bus_cm = open_nats_bus(server.url, name="w0")
        bus = await bus_cm.__aenter__()
        try:
            store = await open_lease_store(bus.jetstream(), Settings(),  # type: ignore[attr-defined]
                                           timeout_s=0.2)
            limiter = SharedLimiter(store, name="handoff", rate=1.0, burst=3)
            assert (await limiter.decide("t")).allowed and store.fallbacks == 0
            server.stop()
            decisions = [await limiter.decide("t") for _ in range(10)]
        finally:
            with anyio.move_on_after(5):
                await bus_cm.__aexit__(None, None, None)
    assert store.fallbacks >= 1
    # The local bucket starts full: its burst, then honest refusals.
    assert sum(d.allowed for d in decisions) == 3
    assert all(d.retry_after_s > 0 for d in decisions if not d.allowed)


async def test_per_process_limits_would_have_let_through_twice_the_rate(nats_url: str) -> None:
    """The bug this fixes, shown with the in-memory store: one bucket per worker."""
    limiters = [
        SharedLimiter(MemoryLeaseStore(), name="handoff", rate=RATE, burst=BURST)
        for _ in range(2)
    ]
    offers = await _offer(limiters)
    if offers.max_lag_s > BURST / RATE / 2:
        pytest.skip(f"the load generator stalled {offers.max_lag_s * 1000:.0f} ms")
    assert offers.accepted > 1.8 * offers.nominal()


async def test_a_tampered_bucket_neither_locks_the_limit_nor_opens_it(nats_url: str) -> None:
    """An insider writes a TAT far in the future, then garbage: the limit stays the limit."""
    await _fresh_bucket(nats_url)
    async with open_nats_bus(nats_url, name="insider") as bus:
        js = bus.jetstream()  # type: ignore[attr-defined]
        store = await open_lease_store(js, Settings())
        kv = await js.key_value(BUCKET)
        limiter = SharedLimiter(store, name="handoff", rate=1000, burst=5)
        await kv.put("handoff.global", b"\x7f\xef\xff\xff\xff\xff\xff\xff")  # ~1.8e308 s
        decision = await limiter.decide("t")
        # Clamped: a bucket never owes more than its burst, so at most burst/rate to wait.
        assert decision.allowed or decision.retry_after_s <= 5 / 1000 + 1e-3
        await kv.put("handoff.global", b"not a number")
        other = SharedLimiter(KvLeaseStore(kv), name="handoff", rate=1000, burst=5)
        allowed = sum([(await other.decide("t")).allowed for _ in range(20)])
        assert allowed <= 5  # an unreadable value reads as a full bucket, never more


async def test_two_worker_processes_share_one_handoff_limit(tmp_path) -> None:  # noqa: ANN001
    """Two `lukhas worker slices` in one queue group: accepted is one rate, not two."""
    rate, burst, seconds = 50.0, 10, 2.0
    async with NatsServer(store_dir=str(tmp_path / "js")) as server:
        env = {
            "NATS_URL": server.url,
            "LUKHAS_HANDOFF_RATE": str(rate),
            "LUKHAS_HANDOFF_BURST": str(burst),
            "LUKHAS_LOG_LEVEL": "WARNING",
        }
        with running("worker", "slices", env=env), running("worker", "slices", env=env):
            client = Client()
            await client.connect(server.url)
            try:
                body = json.dumps({"ctx": {"k": "v"}, "target": "limit"}).encode()
                outcomes: dict[str, int] = {}
                times: list[float] = []

                async def call() -> None:
                    times.append(time.monotonic())
                    msg = await client.request(subjects.CONTEXT_HANDOFF, body, timeout=10)
                    reply = json.loads(msg.data)
                    key = "ok" if reply["ok"] else reply.get("reason", "error")
                    outcomes[key] = outcomes.get(key, 0) + 1

                await open_loop(call, rate=10 * rate, duration_s=seconds, drain_timeout_s=10)
                served_by = await _responders(client)
            finally:
                await client.close()
    expected = rate * (times[-1] - times[0]) + burst
    assert served_by >= 2, "both workers answer in the queue group"
    assert set(outcomes) <= {"ok", "rate_limited"}, outcomes
    assert abs(outcomes["ok"] - expected) <= 0.05 * expected, (outcomes, expected)


async def _responders(client: Client) -> int:
    """How many slice service instances answer `$SRV.PING` (each worker is one)."""
    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    await client.publish("$SRV.PING", b"", reply=inbox)
    seen = 0
    with anyio.move_on_after(1.0):
        async for _ in sub.messages:
            seen += 1
    await sub.unsubscribe()
    return seen
