"""The context handoff endpoint: its instrumented handler and its declaration.

Each handoff is first checked by the token buckets (refused at once with an honest
`retry_after_ms`), then takes an in-flight slot (waiting briefly, else `backpressure`), and
is delivered by the registry's provider, holding its slot until delivery is confirmed: a
flush in core mode, a JetStream acknowledgement in feature mode. So `ok: true` means the
server has it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from bus import BusError
from lukhas import subjects
from lukhas.config import Settings
from lukhas.endpoint import Endpoint, Reply
from lukhas.errors import PayloadTooLarge, Unavailable
from lukhas.observability.matriz_decorators import annotate, instrument
from lukhas.observability.tracing import current_trace_id, make_traceparent, new_trace_id
from lukhas.orchestration.context.messages import (
    HANDOFF_REPLY,
    ContextHandedOff,
    HandoffContext,
)
from lukhas.orchestration.context.ratelimit import InflightGate
from lukhas.orchestration.context.registry import REGISTRY
from lukhas.ratelimit import SharedLimiter, lease_store
from lukhas.runtime import Runtime, current_runtime
from lukhas.subjects import context_target

#: Room for the handoff envelope around a context of LUKHAS_HANDOFF_MAX_BYTES.
ENVELOPE_BYTES = 1024

_encoder = msgspec.json.Encoder()
_STATE_KEY = "orchestration.context"


@dataclass(slots=True)
class HandoffControls:
    """The limiter (its buckets shared by the queue group) and this runtime's in-flight gate."""

    limiter: SharedLimiter
    gate: InflightGate


def handoff_controls(runtime: Runtime) -> HandoffControls:
    """The runtime's handoff controls, built from its settings on first use."""
    controls = runtime.slice_state.get(_STATE_KEY)
    if controls is None:
        s = runtime.settings
        controls = runtime.slice_state[_STATE_KEY] = HandoffControls(
            limiter=SharedLimiter(
                lease_store(runtime), name="handoff", scope=s.tenant,
                rate=s.handoff_rate, burst=s.handoff_burst,
                key_rate=s.handoff_source_rate, key_burst=s.handoff_source_burst,
            ),
            gate=InflightGate(s.handoff_max_inflight, s.handoff_backpressure_timeout_ms / 1000),
        )
    return controls


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def _refusal(reason: str, started: float, **extra: Any) -> Reply:
    annotate(label=f"reason:{reason}")
    return {"ok": False, "reason": reason, "latency_ms": _elapsed_ms(started), **extra}


@instrument(
    "CONTEXT", label="orchestration:handoff", salience=0.4, urgency=0.7,
    capability="handoff_context",
)
async def handoff(cmd: HandoffContext) -> Reply:
    """Raises `PayloadTooLarge` over LUKHAS_HANDOFF_MAX_BYTES, `Unavailable` if unconfirmed."""
    started = time.perf_counter()
    runtime = current_runtime()
    trace_id = current_trace_id() or new_trace_id()
    body = _encoder.encode(
        ContextHandedOff(cmd.ctx, cmd.target, trace_id, time.time_ns() // 1_000_000)
    )
    limit = runtime.settings.handoff_max_bytes
    if len(body) > limit:
        raise PayloadTooLarge(len(body), limit, "context")

    controls = handoff_controls(runtime)
    decision = await controls.limiter.decide(cmd.source or runtime.settings.tenant)
    if not decision.allowed:
        retry_after_ms = max(1, math.ceil(decision.retry_after_s * 1000))
        return _refusal("rate_limited", started, retry_after_ms=retry_after_ms)
    if not await controls.gate.enter():
        return _refusal("backpressure", started)

    subject = context_target(cmd.target)
    headers = {"traceparent": make_traceparent(trace_id)}
    try:
        delivered = await REGISTRY.get(runtime.settings).deliver(subject, body, headers)
    except BusError as exc:
        raise Unavailable(f"handoff to {subject} not confirmed: {exc}") from None
    finally:
        controls.gate.leave()
    return {
        "ok": True,
        **delivered,
        "latency_ms": _elapsed_ms(started),
        # The plan's measure of the context; the bytes on the wire are `envelope_bytes`.
        "context_size": len(str(cmd.ctx)) if cmd.ctx else 0,
        "envelope_bytes": len(body),
        "target": cmd.target,
        "subject": subject,
    }


def _handoff_max_bytes(settings: Settings) -> int:
    return settings.handoff_max_bytes + ENVELOPE_BYTES


HANDOFF = Endpoint("context_handoff", subjects.CONTEXT_HANDOFF, HandoffContext, handoff,
                   "handoff_context", _handoff_max_bytes, reply=HANDOFF_REPLY)

ENDPOINTS: tuple[Endpoint[Any], ...] = (HANDOFF,)
