"""The context handoff endpoint: its instrumented handler and its declaration.

Each handoff is first checked by the token buckets (refused at once with an honest
`retry_after_ms`), then takes an in-flight slot (else `backpressure`), and is delivered by
the registry's provider, holding its slot until delivery is confirmed: a flush in core
mode, a JetStream acknowledgement in feature mode. So `ok: true` means the server has it.

The slice service answers handoffs deferred when the builtin bus publisher serves every
call (`HandoffDeferral`): a handoff parked on its flush holds its in-flight slot and a
little memory, not a task, and on NATS the flush's PONG answers every handoff it confirmed
in place, from nats-py's reader (else one task does). The public API (and a real provider)
awaits the same steps in `handoff`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from bus import BusError, EncodedHeaders
from lukhas import subjects
from lukhas.config import Settings
from lukhas.endpoint import Answer, Endpoint, Reply
from lukhas.errors import PayloadTooLarge, Unavailable
from lukhas.observability.matriz_decorators import EmitPoint, annotate, instrument, outcome_of
from lukhas.observability.matriz_emit import Outcome, make_node
from lukhas.observability.tracing import current_trace_id, make_traceparent, new_trace_id
from lukhas.orchestration.context.messages import (
    HANDOFF_REPLY,
    ContextHandedOff,
    HandoffContext,
)
from lukhas.orchestration.context.providers.bus_publisher import DELIVERED
from lukhas.orchestration.context.ratelimit import InflightGate, ParkedConfirmations
from lukhas.orchestration.context.registry import REGISTRY
from lukhas.ratelimit import MemoryLeaseStore, SharedLimiter, lease_store
from lukhas.runtime import Runtime, current_runtime
from lukhas.subjects import context_target

#: Room for the handoff envelope around a context of LUKHAS_HANDOFF_MAX_BYTES.
ENVELOPE_BYTES = 1024
#: The MATRIZ node of a handoff, whichever way it is answered.
_CAPABILITY = "handoff_context"
_SALIENCE = 0.4
_URGENCY = 0.7

logger = logging.getLogger(__name__)

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
    return {"ok": False, "reason": reason, "latency_ms": _elapsed_ms(started), **extra}


def _envelope(cmd: HandoffContext, runtime: Runtime, trace_id: str) -> bytes:
    """What the target receives. Raises `PayloadTooLarge` over LUKHAS_HANDOFF_MAX_BYTES."""
    body = _encoder.encode(
        ContextHandedOff(cmd.ctx, cmd.target, trace_id, time.time_ns() // 1_000_000)
    )
    limit = runtime.settings.handoff_max_bytes
    if len(body) > limit:
        raise PayloadTooLarge(len(body), limit, "context")
    return body


async def _admit(cmd: HandoffContext, runtime: Runtime, started: float, *, wait: bool
                 ) -> Reply | None:
    """The refusal of a handoff the limits do not let through now, else None (a slot taken).

    `wait`: wait up to LUKHAS_HANDOFF_BACKPRESSURE_TIMEOUT_MS for an in-flight slot.
    """
    controls = handoff_controls(runtime)
    decision = await controls.limiter.decide(cmd.source or runtime.settings.tenant)
    if not decision.allowed:
        retry_after_ms = max(1, math.ceil(decision.retry_after_s * 1000))
        return _refusal("rate_limited", started, retry_after_ms=retry_after_ms)
    if not (await controls.gate.enter() if wait else controls.gate.enter_nowait()):
        return _refusal("backpressure", started)
    return None


def _delivered(
    cmd: HandoffContext, delivered: dict[str, Any], subject: str, body: bytes, started: float
) -> Reply:
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


def _unconfirmed(subject: str, exc: BusError) -> Unavailable:
    return Unavailable(f"handoff to {subject} not confirmed: {exc}")


@instrument(
    "CONTEXT", label="orchestration:handoff", salience=_SALIENCE, urgency=_URGENCY,
    capability=_CAPABILITY,
)
async def handoff(cmd: HandoffContext) -> Reply:
    """Raises `PayloadTooLarge` over LUKHAS_HANDOFF_MAX_BYTES, `Unavailable` if unconfirmed."""
    started = time.perf_counter()
    runtime = current_runtime()
    trace_id = current_trace_id() or new_trace_id()
    body = _envelope(cmd, runtime, trace_id)
    refusal = await _admit(cmd, runtime, started, wait=True)
    if refusal is not None:
        annotate(label=f"reason:{refusal['reason']}")
        return refusal
    subject = context_target(cmd.target)
    headers = {"traceparent": make_traceparent(trace_id)}
    try:
        delivered = await REGISTRY.get(runtime.settings).deliver(subject, body, headers)
    except BusError as exc:
        raise _unconfirmed(subject, exc) from None
    finally:
        handoff_controls(runtime).gate.leave()
    return _delivered(cmd, delivered, subject, body, started)


_POINT: EmitPoint = handoff.__matriz_emit_point__  # type: ignore[attr-defined]


def _emit(
    runtime: Runtime, outcome: Outcome, started: float, trace_id: str,
    labels: tuple[str, ...] = (), ended: float | None = None,
) -> None:
    """The MATRIZ node `handoff`'s `@instrument` would emit, emitted to `runtime` as named:
    a deferred handoff may be answered from a task (nats-py's reader) with none bound."""
    latency_ms = ((time.perf_counter() if ended is None else ended) - started) * 1000.0
    runtime.emitter.emit(make_node(
        _POINT.node_type, _POINT.label, outcome=outcome, latency_ms=latency_ms,
        trace_id=trace_id, producer=f"{runtime.producer}:{_POINT.module}",
        capability=_CAPABILITY, tenant=runtime.settings.tenant, salience=_SALIENCE,
        urgency=_URGENCY, confidence=0.0 if outcome == "error" else 1.0, labels=labels,
    ))


class _Parked:
    """A handoff published and waiting for the flush covering it."""

    __slots__ = ("answer", "body", "message", "reply", "started", "subject", "trace_id")

    def __init__(self, answer: Answer, message: HandoffContext, subject: str, body: bytes,
                 started: float, trace_id: str) -> None:
        self.answer = answer
        self.message = message
        self.subject = subject
        self.body = body
        self.started = started
        self.trace_id = trace_id
        #: Its reply once confirmed (`latency_ms` filled in then), built by `prepare`.
        self.reply: Reply | None = None

    def prepare(self) -> Reply:
        self.reply = _delivered(self.message, DELIVERED, self.subject, self.body, self.started)
        return self.reply

    def outcome(self, error: Exception | None, ended: float) -> Reply | Exception:
        if error is not None:
            return _unconfirmed(self.subject, error) if isinstance(error, BusError) else error
        reply = self.reply if self.reply is not None else self.prepare()
        reply["latency_ms"] = round((ended - self.started) * 1000.0, 3)
        return reply


class HandoffDeferral:
    """Handoffs answered without a task parked on each one's flush (see `Deferral`).

    `begin` runs the steps of `handoff` up to the core publish, refusing at once where
    `handoff` would (an in-flight slot is not waited for: there is no task to wait in), and
    parks the call, which sends the PING of the flush covering it (see
    `ParkedConfirmations`); the reply is built while that round trip is under way. On the
    NATS bus the PONG answers each handoff its flush covered in place, from nats-py's
    reader (`NatsBus.flush_calling`): an `answer` with a `nowait(outcome) -> bool` method
    (the slice service's) queues the reply there and then, each MATRIZ node is emitted
    behind it, and the queue is written to the socket at once (`NatsBus.write_queued`), so
    no task switch sits between the PONG and the reply. Otherwise
    `confirm` awaits the flushes and answers each handoff they covered. The same reply, the
    same MATRIZ node for every call, and `ok: true` still means the server has the context:
    a refused publish's -ERR arrives before the PONG, and fails its flush.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._gate = handoff_controls(runtime).gate
        bus = runtime.bus
        flush_calling = getattr(bus, "flush_calling", None)
        self._write_queued: Callable[[], bool] | None = getattr(bus, "write_queued", None)
        self._publish_nowait: Callable[..., bool] | None = getattr(bus, "publish_nowait", None)
        self._parked: ParkedConfirmations[_Parked] = ParkedConfirmations(
            bus.flush, self._settle, flush_calling=flush_calling,
            settle_now=self._settle_now if flush_calling is not None else None,
        )
        self._waiting = 0

    @property
    def parked(self) -> int:
        """Handoffs published and waiting for their flush (at most LUKHAS_HANDOFF_MAX_INFLIGHT)."""
        return self._waiting

    @property
    def flushes(self) -> int:
        return self._parked.flushes

    @property
    def waits_on_io(self) -> bool:
        """Whether `begin` may wait on I/O: only the rate limiter's lease store can (a
        shared KV store refilling a lease); the builtin one in memory never does."""
        return type(lease_store(self._runtime)) is not MemoryLeaseStore

    async def begin(self, message: HandoffContext, answer: Answer) -> Reply | None:
        started = time.perf_counter()
        runtime = self._runtime
        trace_id = current_trace_id() or new_trace_id()
        try:
            body = _envelope(message, runtime, trace_id)
            refusal = await _admit(message, runtime, started, wait=False)
            if refusal is not None:
                _emit(runtime, outcome_of(refusal), started, trace_id,
                      (f"reason:{refusal['reason']}",))
                return refusal
            subject = context_target(message.target)
            headers = {"traceparent": make_traceparent(trace_id)}
            try:
                # Queued without waking nats-py's flusher: parking writes it with its PING.
                if self._publish_nowait is None or not self._publish_nowait(
                        subject, body, headers=EncodedHeaders(headers), wake=False):
                    await runtime.bus.publish(subject, body, headers=headers)
            except BusError as exc:
                self._gate.leave()
                raise _unconfirmed(subject, exc) from None
        except Exception:
            _emit(runtime, "error", started, trace_id)
            raise
        self._waiting += 1
        call = _Parked(answer, message, subject, body, started, trace_id)
        self._parked.park(call)  # its PING is on the wire: the rest overlaps the round trip
        if call.reply is None:
            call.prepare()
        return None

    def _done(self, call: _Parked, error: Exception | None, ended: float) -> None:
        self._gate.leave()
        self._waiting -= 1
        _emit(self._runtime, "ok" if error is None else "error", call.started, call.trace_id,
              ended=ended)

    def _settle_now(self, batch: list[_Parked], error: Exception | None) -> list[_Parked]:
        """Answer in place what can be (called from the bus's reader at the PONG): the
        replies are queued, then the MATRIZ nodes (a node costs ~2 µs to build, so it
        barely delays its reply, and the two share the one write, as before: a write after
        the reply's cost the worker a syscall and nats-server a wake-up per handoff), then
        the queue is written at once. Returns the rest (errors, and replies the bus would
        not take now), for `_settle`. Never raises."""
        ended = time.perf_counter()
        answered: list[_Parked] = []
        rest: list[_Parked] = []
        for call in batch:
            nowait = getattr(call.answer, "nowait", None)
            try:
                done = nowait is not None and nowait(call.outcome(error, ended))
            except Exception:
                logger.exception("answering a confirmed handoff in place failed")
                done = False
            (answered if done else rest).append(call)
        for call in answered:
            try:
                self._done(call, error, ended)
            except Exception:
                logger.exception("finishing a confirmed handoff failed")
        if answered and self._write_queued is not None:
            try:
                self._write_queued()
            except Exception:  # the flusher task writes it
                logger.exception("writing handoff replies at once failed")
        return rest

    async def _settle(self, batch: list[_Parked], error: Exception | None) -> None:
        for call in batch:
            ended = time.perf_counter()
            try:
                await call.answer(call.outcome(error, ended))
            finally:
                self._done(call, error, ended)

    async def confirm(self) -> None:
        await self._parked.run()

    def close(self) -> None:
        self._parked.close()


def _deferral(runtime: Runtime) -> HandoffDeferral | None:
    """Deferred when the builtin publisher serves every call (no real provider or canary)."""
    s = runtime.settings
    if s.dry_run or (
        not s.feature_orchestration_handoff and REGISTRY.canary_percent(s, configured=True) <= 0
    ):
        return HandoffDeferral(runtime)
    return None


def _handoff_max_bytes(settings: Settings) -> int:
    return settings.handoff_max_bytes + ENVELOPE_BYTES


HANDOFF = Endpoint("context_handoff", subjects.CONTEXT_HANDOFF, HandoffContext, handoff,
                   "handoff_context", _handoff_max_bytes, reply=HANDOFF_REPLY,
                   deferral=_deferral)

ENDPOINTS: tuple[Endpoint[Any], ...] = (HANDOFF,)
