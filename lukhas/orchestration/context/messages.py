"""Context handoff wire messages (JSON), and the shapes of the handoff's replies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from lukhas.replies import Refusal

#: A target is one subject token: no dots, wildcards or spaces.
Target = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


#: Who is handing off, for per-source rate limiting.
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class HandoffContext(msgspec.Struct, frozen=True, tag="context.handoff"):
    ctx: dict[str, Any]
    target: Target = "default"
    source: Source | None = None


class ContextHandedOff(msgspec.Struct, frozen=True, tag="context.handed_off"):
    """What a target subscriber receives on `lukhas.context.<target>`."""

    ctx: dict[str, Any]
    target: str
    trace_id: str
    ts: int


class HandoffDelivered(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of a handoff the server has (flushed in core mode, acked in feature mode)."""

    ok: Literal[True]
    #: `dryrun`: a core publish; `feature`: captured by the JetStream stream.
    mode: Literal["dryrun", "feature"]
    latency_ms: float
    #: The plan's measure of the context, `len(str(ctx))` (0 for `{}`).
    context_size: int
    #: The size of what was published on `lukhas.context.<target>`.
    envelope_bytes: int
    target: str
    subject: str
    #: The stream sequence, in feature mode.
    seq: int | UnsetType = UNSET


class HandoffRefusal(Refusal, frozen=True, kw_only=True):
    """A handoff declined before delivery: `rate_limited` (with `retry_after_ms`),
    `backpressure` (no in-flight slot freed in time), `overloaded`, `not_supported`."""

    reason: Literal["rate_limited", "backpressure", "overloaded", "not_supported"]
    latency_ms: float | UnsetType = UNSET


#: What the handoff subject may answer, success first (`ErrorReply` is implied).
HANDOFF_REPLY: tuple[type, ...] = (HandoffDelivered, HandoffRefusal)
