"""Context handoff public API: publish a context to `lukhas.context.<target>` on the bus.

The function validates its arguments into the slice's message and calls the same
instrumented handler the service's endpoint calls (`endpoints.py`).
"""

from __future__ import annotations

from typing import Any

from lukhas.orchestration.context import endpoints


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
    return await endpoints.HANDOFF.call(ctx=ctx, target=target, source=source)
