"""Context handoff public API: publish a context to `lukhas.context.<target>` on the bus.

Each handoff is first checked by the token buckets (refused at once with an honest
`retry_after_ms`), then takes an in-flight slot (waiting briefly, else `backpressure`), is
published, and holds its slot until the bus confirms it: a flush in core mode, a JetStream
acknowledgement in feature mode. So `ok: true` means the server has it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from bus import BusError
from lukhas._validation import convert
from lukhas.errors import PayloadTooLarge, Unavailable
from lukhas.observability.matriz_decorators import annotate, instrument
from lukhas.observability.tracing import current_trace_id, make_traceparent, new_trace_id
from lukhas.orchestration.context.messages import ContextHandedOff, HandoffContext
from lukhas.orchestration.context.ratelimit import FlushConfirmer, HandoffLimiter, InflightGate
from lukhas.runtime import DurablePublish, Runtime, current_runtime
from lukhas.subjects import context_target

_encoder = msgspec.json.Encoder()
_STATE_KEY = "orchestration.context"


@dataclass(slots=True)
class HandoffControls:
    """The per-runtime limiter, in-flight gate and flush confirmer."""

    limiter: HandoffLimiter
    gate: InflightGate
    confirmer: FlushConfirmer


def handoff_controls(runtime: Runtime) -> HandoffControls:
    """The runtime's handoff controls, built from its settings on first use."""
    controls = runtime.slice_state.get(_STATE_KEY)
    if controls is None:
        s = runtime.settings
        controls = runtime.slice_state[_STATE_KEY] = HandoffControls(
            limiter=HandoffLimiter(
                rate=s.handoff_rate, burst=s.handoff_burst,
                key_rate=s.handoff_source_rate, key_burst=s.handoff_source_burst,
            ),
            gate=InflightGate(s.handoff_max_inflight, s.handoff_backpressure_timeout_ms / 1000),
            confirmer=FlushConfirmer(runtime.bus.flush),
        )
    return controls


def _durable_publish(runtime: Runtime) -> DurablePublish | None:
    """The JetStream publisher when FEATURE_ORCHESTRATION_HANDOFF is on outside DRY_RUN."""
    settings = runtime.settings
    if settings.dry_run or not settings.feature_orchestration_handoff:
        return None
    return runtime.durable_publish


def _refusal(reason: str, started: float, **extra: Any) -> dict[str, Any]:
    annotate(label=f"reason:{reason}")
    return {
        "ok": False,
        "reason": reason,
        "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
        **extra,
    }


@instrument("CONTEXT", label="orchestration:handoff", salience=0.4, urgency=0.7)
async def handoff_context(
    ctx: dict[str, Any], target: str = "default", *, source: str | None = None
) -> dict[str, Any]:
    """Hand `ctx` to the `target` orchestrator by publishing it on `lukhas.context.<target>`.

    `source` names the caller for per-source rate limiting (default: the tenant).

    Raises:
        InvalidRequest: `ctx` is not an object or `target` is not a single subject token.
        PayloadTooLarge: the encoded context is over LUKHAS_HANDOFF_MAX_BYTES.
        Unavailable: the bus could not confirm the publish.
    """
    started = time.perf_counter()
    runtime = current_runtime()
    cmd = convert(HandoffContext, {"ctx": ctx, "target": target, "source": source})
    trace_id = current_trace_id() or new_trace_id()
    body = _encoder.encode(
        ContextHandedOff(cmd.ctx, cmd.target, trace_id, time.time_ns() // 1_000_000)
    )
    limit = runtime.settings.handoff_max_bytes
    if len(body) > limit:
        raise PayloadTooLarge(len(body), limit, "context")

    controls = handoff_controls(runtime)
    decision = controls.limiter.decide(cmd.source or runtime.settings.tenant)
    if not decision.allowed:
        retry_after_ms = max(1, math.ceil(decision.retry_after_s * 1000))
        return _refusal("rate_limited", started, retry_after_ms=retry_after_ms)
    if not await controls.gate.enter():
        return _refusal("backpressure", started)

    subject = context_target(cmd.target)
    headers = {"traceparent": make_traceparent(trace_id)}
    reply: dict[str, Any] = {"ok": True, "mode": "dryrun"}
    durable = _durable_publish(runtime)
    try:
        if durable is not None:
            reply = {"ok": True, "mode": "feature", "seq": await durable(subject, body, headers)}
        else:
            await runtime.bus.publish(subject, body, headers=headers)
            await controls.confirmer.confirmed(controls.confirmer.published())
    except BusError as exc:
        raise Unavailable(f"handoff to {subject} not confirmed: {exc}") from None
    finally:
        controls.gate.leave()
    return {
        **reply,
        "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
        # The plan's meaning: the context's size as `str(ctx)` renders it, 0 when empty.
        "context_size": len(str(cmd.ctx)) if cmd.ctx else 0,
        # What was published on the bus: the encoded envelope (ctx, target, trace, ts).
        "envelope_bytes": len(body),
        "target": cmd.target,
        "subject": subject,
    }
