"""The benchmark's measurements, one function per section; `workers/tools/bench.py` runs them.

Every comparison is made in the same run, against the same nats-server, from the same kind
of client, so a ratio says what LUKHAS costs over plain nats-py on this machine right now.
Nothing here prints: each function returns a plain dict for the JSON report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import itertools
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client

from bus import open_nats_bus
from lukhas.config import Settings
from lukhas.identity.passkey import api as passkey
from lukhas.observability.matriz_emit import MatrizEmitter, MatrizNode, make_node
from lukhas.observability.tracing import make_traceparent, new_trace_id
from lukhas.orchestration.context import api as context
from lukhas.orchestration.context.messages import ContextHandedOff
from lukhas.ratelimit import MemoryLeaseStore, SharedLimiter
from lukhas.runtime import open_runtime
from lukhas.subjects import context_target
from workers.service.bootstrap import LEDGER_MODULE, close_providers, wire_providers
from workers.tools.loadgen import (
    Call,
    ClosedLoopResult,
    LatencyRecorder,
    OpenLoopResult,
    closed_loop,
    open_loop,
)

#: Seconds one request may take before it counts as an error.
REQUEST_TIMEOUT_S = 10.0
#: Seconds an open loop waits for its last replies.
DRAIN_TIMEOUT_S = 10.0
#: Where the raw nats-py echo subscriber answers.
ECHO_SUBJECT = "bench.echo"
#: The target of every benchmark handoff: `lukhas.context.bench`, which nobody consumes.
HANDOFF_TARGET = "bench"
#: Limits high enough that the handoff limiter and in-flight gate never refuse.
UNLIMITED_HANDOFFS = {
    "handoff_rate": 1e12,
    "handoff_burst": 2**62,
    "handoff_max_inflight": 1 << 20,
}
RAW_LEDGER_STREAM = "BENCH_RAW_LEDGER"

_OK_REPLY = re.compile(rb'"ok"\s*:\s*true')

Check = Callable[[bytes], bool]


class UnexpectedReply(Exception):
    """A reply that was not the success the benchmark asked for (so it is not counted)."""

    def __init__(self, subject: str, data: bytes) -> None:
        super().__init__(subject, data)
        self.subject = subject
        self.data = data

    def __str__(self) -> str:
        return f"unexpected reply on {self.subject}: {self.data[:200]!r}"


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how hard each section runs."""

    quick: bool
    #: Seconds of each measurement, split over `rounds` alternating with its baseline.
    duration_s: float
    rounds: int
    #: Cap on requests per closed-loop round (quick mode keeps the test suite fast).
    max_requests: int | None
    warmup: int
    concurrency: int
    rate: float
    emitter_nodes: int
    paced_rate: float
    paced_duration_s: float
    limiter_rate: float
    limiter_burst: int
    limiter_offer_factor: float
    limiter_duration_s: float
    limiter_decisions: int


def make_plan(*, duration_s: float, quick: bool, rate: float, concurrency: int) -> Plan:
    """Full runs measure for `duration_s` each; quick runs for a fraction of a second."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, not {duration_s}")
    if not rate > 0:
        raise ValueError(f"rate must be positive, not {rate}")
    if quick:
        return Plan(
            quick=True, duration_s=min(duration_s, 0.15), rounds=1, max_requests=1000,
            warmup=100,
            concurrency=concurrency, rate=rate, emitter_nodes=3000,
            paced_rate=10_000, paced_duration_s=0.2,
            limiter_rate=200, limiter_burst=200, limiter_offer_factor=10,
            limiter_duration_s=0.5, limiter_decisions=20_000,
        )
    return Plan(
        quick=False, duration_s=duration_s, rounds=3, max_requests=None, warmup=2000,
        concurrency=concurrency, rate=rate, emitter_nodes=100_000,
        paced_rate=10_000, paced_duration_s=max(3.0, duration_s),
        limiter_rate=200, limiter_burst=200, limiter_offer_factor=10,
        limiter_duration_s=5.0, limiter_decisions=500_000,
    )


# -- request/reply -------------------------------------------------------------------------


def ok_reply(data: bytes) -> bool:
    """A slice's success reply (`"ok": true`, whatever the JSON spacing)."""
    return _OK_REPLY.search(data) is not None


def requester(client: Client, subject: str, payload: bytes, check: Check) -> Call:
    """One request on `client`'s shared reply inbox; a reply `check` refuses is an error."""

    async def call() -> None:
        msg = await client.request(subject, payload, timeout=REQUEST_TIMEOUT_S)
        if not check(msg.data):
            raise UnexpectedReply(subject, msg.data)

    return call


#: Quick mode's closed loops end by count (`max_requests`); this only stops a stuck one.
QUICK_CLOSED_DEADLINE_S = 10.0


async def throughput(call: Call, plan: Plan, *, rounds: int = 1) -> ClosedLoopResult:
    """Warm up, then keep `plan.concurrency` requests in flight for `plan.duration_s / rounds`.

    Quick runs are bounded by count instead: with a 0.15 s deadline, a busy machine could
    let the deadline pass before any of the 256 workers got to start, and the run measured
    nothing (0 req/s).
    """
    await closed_loop(call, concurrency=plan.concurrency, total=plan.warmup)
    return await closed_loop(
        call, concurrency=plan.concurrency,
        duration_s=QUICK_CLOSED_DEADLINE_S if plan.quick else plan.duration_s / rounds,
        total=plan.max_requests,
    )


async def latency(call: Call, plan: Plan, *, rounds: int = 1) -> OpenLoopResult:
    """Warm up, then send at `plan.rate` per second, latency from each scheduled time."""
    await closed_loop(call, concurrency=min(plan.concurrency, 32), total=plan.warmup)
    return await open_loop(
        call, rate=plan.rate, duration_s=plan.duration_s / rounds,
        drain_timeout_s=DRAIN_TIMEOUT_S,
    )


def combined_closed(results: list[ClosedLoopResult]) -> ClosedLoopResult:
    """Several rounds of one closed-loop measurement as one (totals, merged histogram)."""
    latency_ = LatencyRecorder()
    errors: Counter[str] = Counter()
    for result in results:
        latency_.merge(result.latency)
        errors.update(result.error_types)
    return ClosedLoopResult(
        concurrency=results[0].concurrency,
        completed=sum(r.completed for r in results),
        errors=sum(r.errors for r in results),
        latency=latency_,
        elapsed_s=sum(r.elapsed_s for r in results),
        error_types=dict(errors),
    )


def combined_open(results: list[OpenLoopResult]) -> OpenLoopResult:
    """Several rounds of one open-loop measurement as one (totals, merged histogram)."""
    latency_ = LatencyRecorder()
    errors: Counter[str] = Counter()
    for result in results:
        latency_.merge(result.latency)
        errors.update(result.error_types)
    sent = sum(r.sent for r in results)
    return dataclasses.replace(
        results[0],
        duration_s=sum(r.duration_s for r in results),
        sent=sent,
        completed=sum(r.completed for r in results),
        errors=sum(r.errors for r in results),
        incomplete=sum(r.incomplete for r in results),
        latency=latency_,
        achieved_rate=sent / sum(r.sent / r.achieved_rate for r in results if r.achieved_rate),
        late_starts=sum(r.late_starts for r in results),
        max_start_lag_ms=max(r.max_start_lag_ms for r in results),
        elapsed_s=sum(r.elapsed_s for r in results),
        error_types=dict(errors),
    )


def ratio(value: float, baseline: float) -> float | None:
    """`value / baseline`, rounded; None when there is no baseline to compare with."""
    if baseline <= 0 or value < 0:
        return None
    return round(value / baseline, 3)


# -- MATRIZ --------------------------------------------------------------------------------


def _bench_node(index: int) -> MatrizNode:
    return make_node(
        "DECISION",
        "identity:passkey.verify",
        outcome="ok",
        latency_ms=0.05 + index % 7 / 100,
        trace_id=new_trace_id(),
        producer="lukhas-bench:workers.tools.bench",
        capability="verify_passkey",
    )


async def _raw_publish_rate(
    client: Client, subject: str, data: bytes, count: int, headers: dict[str, str] | None = None
) -> float:
    started = time.perf_counter()
    for _ in range(count):
        await client.publish(subject, data, headers=headers)
    # Twice, as NatsBus.flush does: nats-py writes its PING ahead of queued publishes.
    await client.flush()
    await client.flush()
    return count / (time.perf_counter() - started)


async def emitter_throughput(url: str, raw: Client, plan: Plan) -> dict[str, Any]:
    """Nodes/s through `MatrizEmitter` on a `NatsBus` (flushed) vs raw publish of their bytes.

    Both run `plan.rounds` times, alternating, and the totals are compared.
    """
    pool = [_bench_node(i) for i in range(1024)]
    count = plan.emitter_nodes
    data = msgspec.json.encode(pool[0])
    emitter_s = raw_s = 0.0
    async with open_nats_bus(url, name="lukhas-bench-matriz") as bus:
        emitter = MatrizEmitter(bus, producer="lukhas-bench", buffer=count + len(pool))
        async with anyio.create_task_group() as tg:
            await tg.start(emitter.run)
            for node in pool:  # warm-up
                emitter.emit(node)
            await emitter.flush()
            await _raw_publish_rate(raw, pool[0].subject, data, min(count, 2000))
            for _ in range(plan.rounds):
                started = time.perf_counter()
                for index in range(count):
                    emitter.emit(pool[index % len(pool)])
                await emitter.flush()
                emitter_s += time.perf_counter() - started
                raw_s += count / await _raw_publish_rate(raw, pool[0].subject, data, count)
            stats = emitter.statistics()
            await emitter.aclose()
    emitter_rate = count * plan.rounds / emitter_s
    raw_rate = count * plan.rounds / raw_s
    return {
        "nodes": count * plan.rounds,
        "node_bytes": len(data),
        "emitter_nodes_per_s": round(emitter_rate, 1),
        "raw_publish_per_s": round(raw_rate, 1),
        "ratio_vs_raw": ratio(emitter_rate, raw_rate),
        "dropped": stats.dropped,
    }


async def emitter_paced(url: str, settings: Settings, plan: Plan) -> dict[str, Any]:
    """Instrumented calls at `plan.paced_rate`/s for a few seconds; every node must get out."""
    peak = 0
    async with (
        open_nats_bus(url, name="lukhas-bench-paced") as bus,
        open_runtime(settings, bus=bus, producer="lukhas-bench-paced") as runtime,
    ):
        emitter = runtime.emitter
        before = emitter.statistics()
        assertion = {"challenge": "bench-paced"}

        async def call() -> None:
            nonlocal peak
            reply = await passkey.verify_passkey(assertion)
            if reply.get("ok") is not True:
                raise UnexpectedReply("verify_passkey", msgspec.json.encode(reply))
            buffered = emitter.statistics().buffered
            if buffered > peak:
                peak = buffered

        result = await open_loop(
            call, rate=plan.paced_rate, duration_s=plan.paced_duration_s,
            drain_timeout_s=DRAIN_TIMEOUT_S,
        )
        await emitter.flush()
        after = emitter.statistics()
    return {
        "rate": plan.paced_rate,
        "duration_s": plan.paced_duration_s,
        "calls": result.completed,
        "call_errors": result.errors,
        "achieved_rate": round(result.achieved_rate, 1),
        "emitted": after.emitted - before.emitted,
        "published": after.published - before.published,
        "dropped": after.dropped - before.dropped,
        "peak_buffered": peak,
        "buffer": after.max_buffer,
    }


# -- handoff -------------------------------------------------------------------------------


async def limiter_accuracy(url: str, settings: Settings, plan: Plan) -> dict[str, Any]:
    """Offer `limiter_offer_factor` x the handoff rate; accepted should be rate x t + burst."""
    limited = dataclasses.replace(
        settings,
        handoff_rate=plan.limiter_rate,
        handoff_burst=plan.limiter_burst,
        handoff_source_rate=None,
        handoff_source_burst=None,
        handoff_max_inflight=UNLIMITED_HANDOFFS["handoff_max_inflight"],
    )
    accepted = refused = other = 0
    first = last = 0.0
    ctx = {"task": "bench", "step": 1}
    async with (
        open_nats_bus(url, name="lukhas-bench-limiter") as bus,
        open_runtime(limited, bus=bus, producer="lukhas-bench-limiter"),
    ):

        async def call() -> None:
            nonlocal accepted, refused, other, first, last
            now = time.perf_counter()
            if not first:
                first = now
            last = now
            reply = await context.handoff_context(ctx, HANDOFF_TARGET)
            if reply["ok"] is True:
                accepted += 1
            elif reply.get("reason") == "rate_limited":
                refused += 1
            else:
                other += 1

        offered_rate = plan.limiter_rate * plan.limiter_offer_factor
        result = await open_loop(
            call, rate=offered_rate, duration_s=plan.limiter_duration_s,
            drain_timeout_s=DRAIN_TIMEOUT_S,
        )
    window = last - first
    expected = plan.limiter_burst + plan.limiter_rate * window
    error_pct = (accepted - expected) / expected * 100.0
    return {
        "rate": plan.limiter_rate,
        "burst": plan.limiter_burst,
        "offered_rate": offered_rate,
        "duration_s": plan.limiter_duration_s,
        "window_s": round(window, 4),
        "offered": result.sent,
        "accepted": accepted,
        "rate_limited": refused,
        "other": other + result.errors,
        "expected": round(expected, 1),
        "error_pct": round(error_pct, 3),
        "within_2pct": abs(error_pct) <= 2.0,
        **(await limiter_decision_ns(plan.limiter_decisions)),
    }


async def limiter_decision_ns(count: int) -> dict[str, float]:
    """Nanoseconds per handoff limiter decision (`SharedLimiter.decide`, tokens leased from
    an in-process store) when it allows and when it refuses."""
    key = "default"

    async def timed(limiter: SharedLimiter) -> float:
        started = time.perf_counter_ns()
        for _ in range(count):
            await limiter.decide(key)
        return (time.perf_counter_ns() - started) / count

    allowing = SharedLimiter(MemoryLeaseStore(), name="h", rate=1e12, burst=2**62)
    refusing = SharedLimiter(MemoryLeaseStore(), name="h", rate=1.0, burst=1)
    await refusing.decide(key)  # the only token
    allowed_ns, refused_ns = await timed(allowing), await timed(refusing)
    return {"decide_ns_allowed": round(allowed_ns, 1), "decide_ns_refused": round(refused_ns, 1)}


async def handoff_throughput(
    url: str, settings: Settings, raw: Client, plan: Plan
) -> dict[str, Any]:
    """Confirmed handoffs/s over NATS (limits high) vs raw publish of the same message."""
    ctx = {"task": "bench", "step": 1}
    async with (
        open_nats_bus(url, name="lukhas-bench-handoff") as bus,
        open_runtime(settings, bus=bus, producer="lukhas-bench-handoff"),
    ):

        async def call() -> None:
            reply = await context.handoff_context(ctx, HANDOFF_TARGET)
            if reply["ok"] is not True:
                raise UnexpectedReply("handoff_context", msgspec.json.encode(reply))

        result = await throughput(call, plan)
    subject = context_target(HANDOFF_TARGET)
    trace_id = new_trace_id()
    body = msgspec.json.encode(
        ContextHandedOff(ctx, HANDOFF_TARGET, trace_id, time.time_ns() // 1_000_000)
    )
    headers = {"traceparent": make_traceparent(trace_id)}

    async def publish() -> None:
        await raw.publish(subject, body, headers=headers)

    raw_result = await throughput(publish, plan)
    flush_started = time.perf_counter()
    await raw.flush()
    await raw.flush()
    raw_elapsed = raw_result.elapsed_s + time.perf_counter() - flush_started
    raw_rate = raw_result.completed / raw_elapsed
    return {
        "concurrency": plan.concurrency,
        "handoffs_per_s": round(result.throughput, 1),
        "errors": result.errors,
        "latency": result.latency.summary(),
        "raw_publish_per_s": round(raw_rate, 1),
        "ratio_vs_raw": ratio(result.throughput, raw_rate),
    }


# -- ledger --------------------------------------------------------------------------------


async def ledger_throughput(
    url: str, settings: Settings, raw: Client, plan: Plan
) -> dict[str, Any]:
    """Consent records/s through the JetStream ledger (tagged leaves, the Merkle tree,
    state values and signed checkpoints on; each call returns after its record and state
    value are acked) vs raw `js.publish` of the same bytes, awaited per call and with async
    acks. Appends are measured at the provider (`ledger.record`, what the issue's figure
    counts), alternating with the async-ack baseline in `plan.rounds` rounds, and through the
    public `record_consent` (validation, registry, MATRIZ node)."""
    import base64
    import secrets

    from lukhas.governance.consent_ledger import api as consent
    from lukhas.governance.consent_ledger import registry as consent_registry
    from lukhas.governance.consent_ledger.messages import ConsentEntry
    from lukhas.transparency.note import Signer

    ledger_settings = dataclasses.replace(
        settings, dry_run=False, feature_governance_ledger=True,
        feature_identity_passkey=False, feature_orchestration_handoff=False,
        ledger_signing_key=settings.ledger_signing_key
        or Signer.generate("bench.lukhas.invalid/consent").private_key_string(),
        ledger_wrapping_key=settings.ledger_wrapping_key
        or base64.b64encode(secrets.token_bytes(32)).decode(),
    )
    users = itertools.count()
    js = raw.jetstream()
    await js.add_stream(name=RAW_LEDGER_STREAM, subjects=["bench.raw.ledger.>"])
    subjects = itertools.count()
    sample = b"{}"

    async def publish() -> None:
        await js.publish(f"bench.raw.ledger.{next(subjects) % 1024}", sample)

    async def publish_async() -> None:
        # As many publishes in flight as the ledger had callers, acks awaited per window.
        acks = [await js.publish_async(f"bench.raw.ledger.{next(subjects) % 1024}", sample)
                for _ in range(plan.concurrency)]
        await asyncio.gather(*acks)

    # One call publishes a window of `concurrency`: warmed up with as many publishes as the
    # ledger's warm-up appends.
    async_plan = dataclasses.replace(plan, concurrency=1,
                                     warmup=max(1, plan.warmup // plan.concurrency))
    appends: list[ClosedLoopResult] = []
    publishes_async: list[ClosedLoopResult] = []
    async with (
        open_nats_bus(url, name="lukhas-bench-ledger") as bus,
        open_runtime(ledger_settings, bus=bus, producer="lukhas-bench-ledger") as runtime,
    ):
        await wire_providers(runtime)
        try:
            ledger = consent_registry.REGISTRY.get(ledger_settings)

            async def append() -> None:
                entry = ConsentEntry(trace_id="bench", ts=int(time.time() * 1000),
                                     user_id=f"bench-{next(users)}", scope="bench.read",
                                     metadata={})
                reply = await ledger.record(entry, idempotency_key=None)
                if reply.get("ok") is not True or reply.get("provider") != "jetstream":
                    raise UnexpectedReply("ledger.record", msgspec.json.encode(reply))

            async def record() -> None:
                reply = await consent.record_consent(f"bench-{next(users)}", "bench.read")
                if reply.get("ok") is not True or reply.get("provider") != "jetstream":
                    raise UnexpectedReply("record_consent", msgspec.json.encode(reply))

            # Appends and their baseline alternate, in the same minutes of a noisy machine;
            # the baseline publishes a record the ledger wrote (same bytes).
            stream = importlib.import_module(LEDGER_MODULE).STREAM
            for _ in range(plan.rounds):
                appends.append(await throughput(append, plan, rounds=plan.rounds))
                if not publishes_async:  # after the first appends
                    sample = (await bus.jetstream().get_msg(stream, seq=1)).data or sample
                publishes_async.append(
                    await throughput(publish_async, async_plan, rounds=plan.rounds))
            api_result = await throughput(record, plan)
            checkpoint = await consent.consent_checkpoint()
        finally:
            await close_providers()  # the writer's lease handed back while the bus is open

    raw_result = await throughput(publish, plan)
    result = combined_closed(appends)
    async_rate = combined_closed(publishes_async).throughput * plan.concurrency
    return {
        "concurrency": plan.concurrency,
        "appends_per_s": round(result.throughput, 1),
        "errors": result.errors,
        "error_types": result.error_types,
        "latency": result.latency.summary(),
        "checkpoint_size": checkpoint.get("size"),
        "raw_js_publish_per_s": round(raw_result.throughput, 1),
        "raw_js_publish_async_per_s": round(async_rate, 1),
        "raw_errors": raw_result.errors,
        "record_bytes": len(sample),
        "ratio_vs_raw": ratio(result.throughput, raw_result.throughput),
        "ratio_vs_raw_async": ratio(result.throughput, async_rate),
        "api_appends_per_s": round(api_result.throughput, 1),
        "api_errors": api_result.errors,
        "api_ratio_vs_raw_async": ratio(api_result.throughput, async_rate),
    }
