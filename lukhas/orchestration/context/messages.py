"""Context handoff wire messages (JSON)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

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
