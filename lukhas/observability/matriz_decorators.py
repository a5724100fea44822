"""`@instrument`: one MATRIZ node per public API call.

The node carries the call's outcome and latency, the trace id bound by the worker edge (or a
fresh one), and the data subject only as a keyed pseudonym. Every decorated function is
recorded in `EMIT_POINTS`, so the acceptance gate can compare code with manifests.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

from lukhas.observability.matriz_emit import Outcome, make_node
from lukhas.observability.tracing import new_trace_id, trace_id_var
from lukhas.runtime import bound_runtime

P = ParamSpec("P")
R = TypeVar("R")

_REFUSALS: frozenset[str] = frozenset({"rate_limited", "backpressure"})


@dataclass(frozen=True, slots=True)
class EmitPoint:
    """Where a public API emits: `<node_type>:<label>`, e.g. `CONSENT:governance:record`."""

    node_type: str
    label: str
    module: str
    function: str

    @property
    def name(self) -> str:
        return f"{self.node_type}:{self.label}"


#: Every instrumented function, by `module.qualname`.
EMIT_POINTS: dict[str, EmitPoint] = {}


@dataclass(slots=True)
class _CallNotes:
    subject: str | None = None
    labels: list[str] = field(default_factory=list)
    consent_scopes: list[str] = field(default_factory=list)
    #: The canary arm each registry chose for this call (see `pin_arm`).
    arms: dict[str, str] = field(default_factory=dict)


_notes: ContextVar[_CallNotes | None] = ContextVar("lukhas_matriz_notes", default=None)


def annotate(
    *, subject: str | None = None, label: str | None = None, consent_scope: str | None = None
) -> None:
    """Add to the node of the instrumented call in progress.

    `subject` is a raw user id: only its keyed pseudonym reaches the node. `label` is an
    extra namespaced label such as `reason:counter_regression`; `consent_scope` goes to the
    node's `provenance.consent_scopes`.
    """
    notes = _notes.get()
    if notes is None:
        return
    if subject is not None:
        notes.subject = subject
    if label is not None:
        notes.labels.append(label)
    if consent_scope is not None:
        notes.consent_scopes.append(consent_scope)


def pin_arm(key: str, choose: Callable[[str | None], str]) -> str:
    """The arm (`canary` or `baseline`) serving the instrumented call in progress for `key`.

    The first ask in a call runs `choose(subject)` (the call's raw user id, or None) and
    labels the node `arm:<arm>`; later asks in the same call get the same arm, so a handler
    that looks at its provider twice talks to one. Outside an instrumented call every ask
    chooses afresh, with no subject.
    """
    notes = _notes.get()
    if notes is None:
        return choose(None)
    arm = notes.arms.get(key)
    if arm is None:
        arm = notes.arms[key] = choose(notes.subject)
        notes.labels.append(f"arm:{arm}")
    return arm


def outcome_of(result: object) -> Outcome:
    """Classify a reply dict: ok, or refused with a reason (rate_limited, backpressure...)."""
    if isinstance(result, Mapping):
        if result.get("ok") is True:
            return "ok"
        reason = result.get("reason")
        if reason in _REFUSALS:
            return cast(Outcome, reason)
        return "refused"
    return "ok"


def instrument(
    node_type: str,
    *,
    label: str,
    salience: float = 0.5,
    urgency: float = 0.5,
    subject_arg: str | None = None,
    subject_field: str | None = None,
    capability: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Emit one MATRIZ node per call of the decorated (async or sync) function.

    Args:
        node_type: the MATRIZ node type, e.g. `CONSENT`, `DECISION`, `CONTEXT`.
        label: the emit point label, e.g. `governance:record`.
        subject_arg: the parameter holding the raw user id, pseudonymized into the node.
        subject_field: for a handler taking one message, the message field holding the raw
            user id (pseudonymized into the node).
        capability: the node's capability (default: the function's name), e.g. the public
            API function a handler serves.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        point = EmitPoint(node_type, label, fn.__module__, fn.__qualname__)
        EMIT_POINTS[f"{fn.__module__}.{fn.__qualname__}"] = point
        name = capability or fn.__name__
        subject_index = _positional_index(fn, subject_arg)

        def subject_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
            if subject_field is not None:
                value = getattr(args[0], subject_field, None) if args else None
                return value if isinstance(value, str) else None
            return _subject_from(args, kwargs, subject_arg, subject_index)

        def begin(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
            notes = _CallNotes(subject=subject_of(args, kwargs))
            trace = trace_id_var.get()
            trace_token = trace_id_var.set(new_trace_id()) if trace is None else None
            return notes, _notes.set(notes), trace_token, time.perf_counter()

        def end(state: tuple[Any, ...], outcome: Outcome) -> None:
            notes, notes_token, trace_token, started = state
            latency_ms = (time.perf_counter() - started) * 1000.0
            trace_id = trace_id_var.get()
            _notes.reset(notes_token)
            if trace_token is not None:
                trace_id_var.reset(trace_token)
            _emit(point, name, salience, urgency, outcome, latency_ms, trace_id, notes)

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                state = begin(args, kwargs)
                outcome: Outcome = "error"
                try:
                    result = await fn(*args, **kwargs)
                    outcome = outcome_of(result)
                    return result
                finally:
                    end(state, outcome)

            wrapper: Callable[..., Any] = async_wrapper
        else:

            @functools.wraps(fn)
            def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                state = begin(args, kwargs)
                outcome: Outcome = "error"
                try:
                    result = fn(*args, **kwargs)
                    outcome = outcome_of(result)
                    return result
                finally:
                    end(state, outcome)

            wrapper = sync_wrapper
        wrapper.__matriz_emit_point__ = point  # type: ignore[attr-defined]
        return wrapper

    return decorate


def emit_rejected(point: EmitPoint, latency_ms: float, *, code: str) -> None:
    """Emit the node of a call refused before it reached its API (e.g. undecodable input).

    The service edge uses this so bad requests show in MATRIZ as errors of the emit point
    they were meant for; nothing about the input itself goes into the node.
    """
    trace_id = trace_id_var.get()
    notes = _CallNotes(labels=[f"error:{code}"])
    _emit(point, point.function, 0.5, 0.5, "error", latency_ms, trace_id, notes)


def emit_call(
    point: EmitPoint,
    *,
    capability: str,
    salience: float,
    urgency: float,
    outcome: Outcome,
    latency_ms: float,
    trace_id: str | None,
    labels: tuple[str, ...] = (),
) -> None:
    """Emit the node of a call that finished outside its `@instrument` wrapper.

    A deferred handler (`lukhas.endpoint.Deferral`) answers once its I/O is confirmed, in
    another task than the one it began in; it emits the node its instrumented twin would.
    """
    notes = _CallNotes(labels=list(labels))
    _emit(point, capability, salience, urgency, outcome, latency_ms, trace_id, notes)


def _positional_index(fn: Callable[..., Any], name: str | None) -> int | None:
    if name is None:
        return None
    params = list(inspect.signature(fn).parameters)
    if name not in params:
        raise TypeError(f"{fn.__qualname__} has no parameter {name!r} to pseudonymize")
    return params.index(name)


def _subject_from(
    args: tuple[Any, ...], kwargs: dict[str, Any], name: str | None, index: int | None
) -> str | None:
    if name is None:
        return None
    value = kwargs.get(name) if name in kwargs else (
        args[index] if index is not None and index < len(args) else None
    )
    return value if isinstance(value, str) else None


def _emit(
    point: EmitPoint,
    capability: str,
    salience: float,
    urgency: float,
    outcome: Outcome,
    latency_ms: float,
    trace_id: str | None,
    notes: _CallNotes,
) -> None:
    runtime = bound_runtime()
    if runtime is None:
        return  # not inside a runtime (e.g. a plain unit call): nothing to emit to
    node = make_node(
        point.node_type,
        point.label,
        outcome=outcome,
        latency_ms=latency_ms,
        trace_id=trace_id or new_trace_id(),
        producer=f"{runtime.producer}:{point.module}",
        capability=capability,
        tenant=runtime.settings.tenant,
        salience=salience,
        urgency=urgency,
        confidence=0.0 if outcome == "error" else 1.0,
        subject_pseudonym=runtime.pseudonymize(notes.subject) if notes.subject else None,
        consent_scopes=notes.consent_scopes,
        labels=tuple(notes.labels),
    )
    runtime.emitter.emit(node)
