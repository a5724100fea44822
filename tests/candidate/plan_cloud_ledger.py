"""The promotion plan's extension-point example (§7), as the plan writes it.

A provider with the plan's single method, registered by a guarded `_wire()`.
"""

from typing import Any

from lukhas.governance.consent_ledger.registry import register


class CloudConsentProvider:
    name = "cloud"

    def record(self, entry: Any) -> dict[str, Any]:
        return {"ok": True, "provider": self.name, "entry": entry}


def _wire() -> None:
    register(CloudConsentProvider())


if __name__ == "__main__":
    _wire()
