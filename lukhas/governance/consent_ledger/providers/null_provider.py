"""The builtin consent provider: safe, local, ephemeral; nothing leaves the process."""

from __future__ import annotations

from typing import Any

import msgspec

from lukhas.governance.consent_ledger.messages import ConsentEntry


class NullConsentProvider:
    """Echoes each entry with an acknowledgement and keeps no state.

    It has no ledger, so status, history, chain verification, checkpoints, proofs, erasure
    and receipts say so plainly (`ok: false`, reason `no_ledger`) instead of inventing an
    answer.
    """

    name = "null"
    waits_on_io = False

    async def record(self, entry: ConsentEntry, *, idempotency_key: str | None) -> dict[str, Any]:
        return {"ok": True, "provider": self.name, "entry": msgspec.structs.asdict(entry)}

    async def revoke(self, entry: ConsentEntry, *, idempotency_key: str | None) -> dict[str, Any]:
        return {"ok": True, "provider": self.name, "entry": msgspec.structs.asdict(entry)}

    async def status(self, user_id: str, scope: str) -> dict[str, Any]:
        return self._no_ledger()

    async def history(self, user_id: str) -> dict[str, Any]:
        return self._no_ledger()

    async def verify_chain(self, user_id: str) -> dict[str, Any]:
        return self._no_ledger()

    async def checkpoint(self, size: int | None = None) -> dict[str, Any]:
        return self._no_ledger()

    async def proof(
        self, user_id: str, *, scope: str | None = None, seq: int | None = None,
        from_size: int | None = None,
    ) -> dict[str, Any]:
        return self._no_ledger()

    async def erase(self, user_id: str, *, idempotency_key: str | None = None
                    ) -> dict[str, Any]:
        return self._no_ledger()

    async def receipt(self, user_id: str, seq: int) -> dict[str, Any]:
        return self._no_ledger()

    def _no_ledger(self) -> dict[str, Any]:
        return {
            "ok": False,
            "provider": self.name,
            "reason": "no_ledger",
            "message": "the null provider keeps no ledger; enable FEATURE_GOVERNANCE_LEDGER "
            "outside DRY_RUN to use the JetStream ledger",
        }
