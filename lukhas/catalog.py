"""Every endpoint the slices declare, in the order the service subscribes them.

Slices never import each other; this module is the one place that lists them all, for the
slice service, discovery, the manifest check and the generated contract.
"""

from __future__ import annotations

from typing import Any

from lukhas.endpoint import Endpoint
from lukhas.governance.consent_ledger.endpoints import ENDPOINTS as CONSENT_ENDPOINTS
from lukhas.identity.passkey.endpoints import ENDPOINTS as PASSKEY_ENDPOINTS
from lukhas.orchestration.context.endpoints import ENDPOINTS as CONTEXT_ENDPOINTS

#: The endpoints of each slice package, by package name.
BY_SLICE: dict[str, tuple[Endpoint[Any], ...]] = {
    "lukhas.governance.consent_ledger": CONSENT_ENDPOINTS,
    "lukhas.identity.passkey": PASSKEY_ENDPOINTS,
    "lukhas.orchestration.context": CONTEXT_ENDPOINTS,
}

ENDPOINTS: tuple[Endpoint[Any], ...] = tuple(ep for eps in BY_SLICE.values() for ep in eps)
