"""The builtin handoff delivery: a core publish on the runtime's bus, confirmed by a flush."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lukhas.orchestration.context.ratelimit import FlushConfirmer
from lukhas.runtime import current_runtime

_STATE_KEY = "orchestration.context.confirmer"
#: What a delivery by core publish adds to the handoff's reply.
DELIVERED: dict[str, Any] = {"mode": "dryrun"}


class BusPublisher:
    """Publishes on the bound runtime's bus; `deliver` returns once a flush has covered it.

    Flushes are shared: one round trip confirms every publish made before it (see
    `FlushConfirmer`), so `ok: true` means the server has the context.
    """

    name = "bus"
    waits_on_io = True

    async def deliver(
        self, subject: str, body: bytes, headers: Mapping[str, str]
    ) -> dict[str, Any]:
        runtime = current_runtime()
        confirmer = runtime.slice_state.get(_STATE_KEY)
        if confirmer is None:
            confirmer = runtime.slice_state[_STATE_KEY] = FlushConfirmer(runtime.bus.flush)
        await runtime.bus.publish(subject, body, headers=dict(headers))
        await confirmer.confirmed(confirmer.published())
        return DELIVERED
