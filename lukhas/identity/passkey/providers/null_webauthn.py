"""The builtin passkey provider: deterministic, local; accepts only in DRY_RUN."""

from __future__ import annotations

from typing import Any

from lukhas._validation import convert
from lukhas.identity.passkey.messages import DryRunAssertion

_REFUSAL = {
    "ok": False,
    "provider": "null",
    "reason": "no_verifier",
    "message": "no real passkey verifier is wired (enable FEATURE_IDENTITY_PASSKEY outside "
    "DRY_RUN); the null provider accepts only in DRY_RUN",
}


class NullWebAuthnProvider:
    """Echoes the challenge in DRY_RUN; refuses everything otherwise (fail closed)."""

    name = "null"
    waits_on_io = False

    def __init__(self, *, accept: bool) -> None:
        self._accept = accept

    async def verify(self, assertion: dict[str, Any]) -> dict[str, Any]:
        if not self._accept:
            return dict(_REFUSAL)
        challenge = assertion.get("challenge", "dryrun")
        checked = convert(DryRunAssertion, {"challenge": challenge})
        return {"ok": True, "provider": self.name, "challenge": checked.challenge}

    async def register_options(
        self, user_id: str, user_name: str | None, enrolment_grant: str | None = None
    ) -> dict[str, Any]:
        return dict(_REFUSAL)

    async def register_verify(self, user_id: str, credential: dict[str, Any]) -> dict[str, Any]:
        return dict(_REFUSAL)

    async def challenge(self, user_id: str | None) -> dict[str, Any]:
        return dict(_REFUSAL)

    async def list_credentials(self, user_id: str) -> dict[str, Any]:
        return dict(_REFUSAL)

    async def delete_credential(self, user_id: str, credential_id: str) -> dict[str, Any]:
        return dict(_REFUSAL)
