"""How handoffs are delivered: the bus by default, a durable stream when one is registered.

`workers/service/bootstrap.py` registers the JetStream publisher under FEATURE_ORCHESTRATION_HANDOFF
outside DRY_RUN; then a handoff's `ok: true` is the stream's acknowledgement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from lukhas.orchestration.context.providers.bus_publisher import BusPublisher
from lukhas.registry import ProviderRegistry


class HandoffDelivery(Protocol):
    """Delivers an encoded context on its subject; the reply part says how (`mode`, `seq`)."""

    name: str

    async def deliver(
        self, subject: str, body: bytes, headers: Mapping[str, str]
    ) -> dict[str, Any]: ...


_bus = BusPublisher()

REGISTRY: ProviderRegistry[HandoffDelivery] = ProviderRegistry(
    "feature_orchestration_handoff", lambda settings: _bus
)
register = REGISTRY.register
reset = REGISTRY.reset
get_provider = REGISTRY.get
