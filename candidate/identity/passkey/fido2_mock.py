"""A deterministic passkey provider for CI: same contract as WebAuthn, no keys, no I/O.

It runs the real ceremony checks (client data type, origin, challenge single use, RP ID
hash, flags, counter) but replaces public-key signatures with an HMAC under a key derived
from a public seed and the credential id, so a test can play the authenticator with
`Fido2MockProvider.sign(...)`. State is in memory; challenges come from a counter, so two
runs of the same script see the same challenges. It is a test double: anyone can forge its
signatures, so it is never wired by configuration outside DRY_RUN (LUKHAS_PASSKEY_PROVIDER
refuses it); tests register it explicitly. It has no enrolment rule and no credential
management (those answer `not_supported`).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from candidate.identity.passkey import _ceremony as ceremony
from candidate.identity.passkey._ceremony import Refused, b64url, from_b64url
from lukhas.identity.passkey.messages import AuthenticationResponse, RegistrationResponse
from lukhas.observability.pseudonym import Pseudonymizer

DEFAULT_SEED = b"lukhas.fido2_mock"
#: Challenges held before expired ones are dropped.
_PRUNE_AT = 1024


@dataclass(slots=True)
class _Credential:
    credential_id: bytes
    pseudonym: str
    sign_count: int = 0


@dataclass(slots=True)
class _Challenge:
    kind: str
    pseudonym: str | None
    expires_at: float
    used: bool = False


class Fido2MockProvider:
    """`PasskeyProvider` named "fido2_mock"; deterministic and local."""

    name = "fido2_mock"
    waits_on_io = False

    def __init__(
        self,
        pseudonymize: Pseudonymizer | Callable[[str], str],
        *,
        seed: bytes = DEFAULT_SEED,
        rp_id: str = "localhost",
        origins: tuple[str, ...] = ("http://localhost:8000",),
        require_uv: bool = True,
        challenge_ttl_s: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pseudonymize = pseudonymize
        self._seed = seed
        self.rp_id = rp_id
        self.origins = origins
        self.require_uv = require_uv
        self.challenge_ttl_s = challenge_ttl_s
        self._clock = clock
        self._issued = 0
        self._credentials: dict[bytes, _Credential] = {}
        self._challenges: dict[bytes, _Challenge] = {}

    async def ensure(self) -> None:
        """Nothing to create: the mock keeps its state in memory."""

    @staticmethod
    def sign(
        credential_id: bytes, authenticator_data: bytes, client_data_json: bytes,
        *, seed: bytes = DEFAULT_SEED,
    ) -> bytes:
        """The mock authenticator's "signature" over authData || sha256(clientDataJSON)."""
        key = hashlib.sha256(seed + b"\x00" + credential_id).digest()
        message = authenticator_data + hashlib.sha256(client_data_json).digest()
        return hmac.digest(key, message, "sha256")

    # -- PasskeyProvider ------------------------------------------------------------------

    async def register_options(
        self, user_id: str, user_name: str | None, enrolment_grant: str | None = None
    ) -> dict[str, Any]:
        pseudonym = self._pseudonymize(user_id)
        challenge = self._issue("registration", pseudonym)
        options = {
            "rp": {"id": self.rp_id, "name": "LUKHAS (fido2 mock)"},
            "user": {
                "id": b64url(ceremony.user_handle(pseudonym)),
                "name": user_name or user_id,
                "displayName": user_name or user_id,
            },
            "challenge": b64url(challenge),
            "pubKeyCredParams": [{"type": "public-key", "alg": -7}],
            "timeout": int(self.challenge_ttl_s * 1000),
            "attestation": "none",
        }
        return {"ok": True, "provider": self.name, "options": options}

    async def register_verify(self, user_id: str, credential: dict[str, Any]) -> dict[str, Any]:
        try:
            parsed = msgspec.convert(credential, type=RegistrationResponse)
            raw_id = from_b64url(parsed.rawId, "rawId")
            client = ceremony.parse_client_data(
                from_b64url(parsed.response.clientDataJSON, "clientDataJSON"),
                expected_type=ceremony.CREATE,
            )
            ceremony.check_origin(client, self.origins)
            pseudonym = self._pseudonymize(user_id)
            self._consume(client.challenge, "registration", pseudonym)
            if raw_id in self._credentials:
                raise Refused("invalid_assertion", "this credential is already registered")
        except msgspec.ValidationError as exc:
            return ceremony.refusal(self.name, "invalid_assertion", str(exc))
        except Refused as refused:
            return ceremony.refusal(self.name, refused.reason, refused.message)
        self._credentials[raw_id] = _Credential(raw_id, pseudonym)
        return {"ok": True, "provider": self.name, "credential_id": b64url(raw_id)}

    async def challenge(self, user_id: str | None) -> dict[str, Any]:
        pseudonym = self._pseudonymize(user_id) if user_id is not None else None
        challenge = self._issue("authentication", pseudonym)
        allow = [
            {"type": "public-key", "id": b64url(c.credential_id)}
            for c in self._credentials.values()
            if pseudonym is not None and c.pseudonym == pseudonym
        ]
        options = {
            "challenge": b64url(challenge),
            "rpId": self.rp_id,
            "allowCredentials": allow,
            "userVerification": "required" if self.require_uv else "preferred",
            "timeout": int(self.challenge_ttl_s * 1000),
        }
        return {"ok": True, "provider": self.name, "options": options}

    async def verify(self, assertion: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._verify(assertion)
        except Refused as refused:
            return ceremony.refusal(self.name, refused.reason, refused.message)

    # -- internals ------------------------------------------------------------------------

    def _verify(self, assertion: dict[str, Any]) -> dict[str, Any]:
        try:
            parsed = msgspec.convert(assertion, type=AuthenticationResponse)
        except msgspec.ValidationError as exc:
            raise Refused("invalid_assertion", str(exc)) from None
        raw_id = from_b64url(parsed.rawId, "rawId")
        stored = self._credentials.get(raw_id)
        if stored is None:
            raise Refused("unknown_credential", "no passkey is registered with this id")
        client_raw = from_b64url(parsed.response.clientDataJSON, "clientDataJSON")
        client = ceremony.parse_client_data(client_raw, expected_type=ceremony.GET)
        ceremony.check_origin(client, self.origins)
        auth_data = from_b64url(parsed.response.authenticatorData, "authenticatorData")
        header = ceremony.parse_auth_data_header(auth_data)
        ceremony.check_auth_data(header, rp_id=self.rp_id, require_uv=self.require_uv)
        self._consume(client.challenge, "authentication", None, owner=stored.pseudonym)
        expected = self.sign(raw_id, auth_data, client_raw, seed=self._seed)
        if not hmac.compare_digest(expected, from_b64url(parsed.response.signature, "signature")):
            raise Refused("bad_signature", "the mock signature does not verify")
        ceremony.check_counter(stored.sign_count, header.sign_count)
        stored.sign_count = max(stored.sign_count, header.sign_count)
        return {
            "ok": True,
            "provider": self.name,
            "credential_id": b64url(raw_id),
            "new_sign_count": header.sign_count,
        }

    def _issue(self, kind: str, pseudonym: str | None) -> bytes:
        if len(self._challenges) >= _PRUNE_AT:  # keep memory bounded: forget expired ones
            now = self._clock()
            self._challenges = {c: r for c, r in self._challenges.items() if r.expires_at > now}
        self._issued += 1
        challenge = hashlib.sha256(self._seed + self._issued.to_bytes(8, "big")).digest()
        self._challenges[challenge] = _Challenge(
            kind, pseudonym, self._clock() + self.challenge_ttl_s
        )
        return challenge

    def _consume(
        self, challenge: bytes, kind: str, pseudonym: str | None, *, owner: str | None = None
    ) -> None:
        record = self._challenges.get(challenge)
        if record is None:
            raise Refused(
                "challenge_expired", "no live challenge matches (expired or never issued)"
            )
        if record.used:
            raise Refused("challenge_reused", "the challenge was already used")
        if self._clock() >= record.expires_at:
            raise Refused("challenge_expired", "the challenge has expired")
        if record.kind != kind:
            raise Refused("invalid_assertion", f"the challenge was issued for {record.kind}")
        bound = pseudonym if pseudonym is not None else owner
        if record.pseudonym is not None and record.pseudonym != bound:
            raise Refused("invalid_assertion", "the challenge was issued to another user")
        record.used = True  # single-threaded event loop: check and set cannot interleave

