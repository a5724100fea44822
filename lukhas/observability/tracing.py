"""W3C trace context: the trace id a MATRIZ node carries, bound per task via a contextvar."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

TRACEPARENT = "traceparent"

# version-traceid-parentid-flags; an all-zero trace id or parent id is invalid by the spec.
_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

trace_id_var: ContextVar[str | None] = ContextVar("lukhas_trace_id", default=None)


def parse_traceparent(header: str | None) -> str | None:
    """Return the trace id of a valid `traceparent` header, or None."""
    if not header:
        return None
    match = _TRACEPARENT_RE.match(header.strip().lower())
    if match is None:
        return None
    version, trace_id, parent_id, _ = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id


def new_trace_id() -> str:
    """A fresh random 128-bit trace id in W3C form (32 lowercase hex digits)."""
    return os.urandom(16).hex()


def make_traceparent(trace_id: str | None = None) -> str:
    """A `traceparent` header value for `trace_id` (new if not given), with a fresh span id."""
    return f"00-{trace_id or new_trace_id()}-{os.urandom(8).hex()}-01"


def current_trace_id() -> str | None:
    """The trace id bound to this task, if any."""
    return trace_id_var.get()


@contextmanager
def bind_trace(trace_id: str | None) -> Iterator[str]:
    """Bind `trace_id` (or a new one) for the duration of the block; yields the id in force."""
    value = trace_id or new_trace_id()
    token = trace_id_var.set(value)
    try:
        yield value
    finally:
        trace_id_var.reset(token)
