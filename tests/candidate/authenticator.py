"""A software WebAuthn authenticator for the tests: real key pairs, real signatures.

It plays both the authenticator and the browser: from the options the provider issues it
builds the W3C JSON forms a browser's `PublicKeyCredential.toJSON()` gives, i.e. a
RegistrationResponseJSON (attestationObject in CBOR, "none" or "packed" self attestation,
authenticatorData with attested credential data and a COSE public key) and an
AuthenticationResponseJSON (authenticatorData, clientDataJSON and a signature over
authenticatorData || sha256(clientDataJSON)). Every knob a test needs to provoke a refusal
is a keyword argument.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

Algorithm = Literal["ES256", "RS256", "EdDSA"]

RP_ID = "localhost"
ORIGIN = "http://localhost:8000"

FLAG_UP = 0x01
FLAG_UV = 0x04
FLAG_BE = 0x08
FLAG_BS = 0x10
FLAG_AT = 0x40

_COSE_ALG = {"ES256": -7, "RS256": -257, "EdDSA": -8}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def from_b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class SoftAuthenticator:
    """One credential on a software authenticator."""

    alg: Algorithm = "ES256"
    rp_id: str = RP_ID
    origin: str = ORIGIN
    #: Added to the sign count on every assertion; 0 models a synced passkey.
    counter_step: int = 1
    sign_count: int = 0
    backup_eligible: bool = False
    backed_up: bool = False
    aaguid: bytes = bytes(16)
    credential_id: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    user_handle: bytes | None = None

    def __post_init__(self) -> None:
        if self.alg == "ES256":
            self._key: Any = ec.generate_private_key(ec.SECP256R1())
        elif self.alg == "RS256":
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif self.alg == "EdDSA":
            self._key = ed25519.Ed25519PrivateKey.generate()
        else:  # pragma: no cover - a typo in a test
            raise ValueError(self.alg)

    @property
    def id(self) -> str:
        return b64url(self.credential_id)

    # -- keys -----------------------------------------------------------------------------

    def cose_public_key(self) -> bytes:
        public = self._key.public_key()
        if self.alg == "ES256":
            numbers = public.public_numbers()
            key = {
                1: 2, 3: -7, -1: 1,
                -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big"),
            }
        elif self.alg == "RS256":
            numbers = public.public_numbers()
            n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
            e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
            key = {1: 3, 3: -257, -1: n, -2: e}
        else:
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
            key = {1: 1, 3: -8, -1: 6, -2: raw}
        return cbor2.dumps(key)

    def sign(self, data: bytes) -> bytes:
        if self.alg == "ES256":
            return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
        if self.alg == "RS256":
            return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return self._key.sign(data)

    # -- data -----------------------------------------------------------------------------

    def auth_data(
        self,
        *,
        flags: int,
        sign_count: int,
        rp_id: str | None = None,
        attested: bool = False,
    ) -> bytes:
        rp_hash = hashlib.sha256((rp_id or self.rp_id).encode()).digest()
        if self.backup_eligible:
            flags |= FLAG_BE
        if self.backed_up:
            flags |= FLAG_BS
        out = rp_hash + bytes([flags | (FLAG_AT if attested else 0)])
        out += sign_count.to_bytes(4, "big")
        if attested:
            out += self.aaguid + len(self.credential_id).to_bytes(2, "big")
            out += self.credential_id + self.cose_public_key()
        return out

    @staticmethod
    def client_data(
        kind: str, challenge: str, origin: str, *, cross_origin: bool = False
    ) -> bytes:
        return json.dumps(
            {"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": cross_origin},
            separators=(",", ":"),
        ).encode()

    # -- ceremonies -----------------------------------------------------------------------

    def create(
        self,
        options: dict[str, Any],
        *,
        fmt: Literal["none", "packed"] = "none",
        origin: str | None = None,
        rp_id: str | None = None,
        challenge: str | None = None,
        kind: str = "webauthn.create",
        user_present: bool = True,
        user_verified: bool = True,
        bad_attestation_signature: bool = False,
        transports: tuple[str, ...] = ("internal", "hybrid"),
    ) -> dict[str, Any]:
        """navigator.credentials.create(options), as RegistrationResponseJSON."""
        self.user_handle = from_b64url(options["user"]["id"])
        client = self.client_data(kind, challenge or options["challenge"], origin or self.origin)
        flags = (FLAG_UP if user_present else 0) | (FLAG_UV if user_verified else 0)
        auth_data = self.auth_data(
            flags=flags, sign_count=self.sign_count, rp_id=rp_id, attested=True
        )
        if fmt == "none":
            statement: dict[str, Any] = {}
        else:
            signature = self.sign(auth_data + hashlib.sha256(client).digest())
            if bad_attestation_signature:
                signature = self.sign(b"something else")
            statement = {"alg": _COSE_ALG[self.alg], "sig": signature}
        attestation = cbor2.dumps({"fmt": fmt, "attStmt": statement, "authData": auth_data})
        return {
            "id": self.id,
            "rawId": self.id,
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client),
                "attestationObject": b64url(attestation),
                "transports": list(transports),
            },
            "authenticatorAttachment": "platform",
            "clientExtensionResults": {},
        }

    def get(
        self,
        options: dict[str, Any],
        *,
        origin: str | None = None,
        rp_id: str | None = None,
        challenge: str | None = None,
        kind: str = "webauthn.get",
        cross_origin: bool = False,
        user_present: bool = True,
        user_verified: bool = True,
        sign_count: int | None = None,
        corrupt_signature: bool = False,
        user_handle: bytes | None = None,
        credential_id: bytes | None = None,
    ) -> dict[str, Any]:
        """navigator.credentials.get(options), as AuthenticationResponseJSON."""
        if sign_count is None:
            self.sign_count += self.counter_step
            sign_count = self.sign_count
        client = self.client_data(
            kind, challenge or options["challenge"], origin or self.origin,
            cross_origin=cross_origin,
        )
        flags = (FLAG_UP if user_present else 0) | (FLAG_UV if user_verified else 0)
        auth_data = self.auth_data(flags=flags, sign_count=sign_count, rp_id=rp_id)
        signature = self.sign(auth_data + hashlib.sha256(client).digest())
        if corrupt_signature:
            signature = self.sign(auth_data + hashlib.sha256(client + b" ").digest())
        handle = user_handle if user_handle is not None else self.user_handle
        cred_id = b64url(credential_id) if credential_id is not None else self.id
        return {
            "id": cred_id,
            "rawId": cred_id,
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
                "userHandle": b64url(handle) if handle is not None else None,
            },
            "authenticatorAttachment": "platform",
            "clientExtensionResults": {},
        }
