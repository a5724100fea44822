"""WebAuthn passkeys: py_webauthn verification against credentials and challenges in KV.

* Credentials live in KV bucket `passkey_credentials` under `cred.<base64url id>` (public
  key, algorithm, sign count, user handle, transports, backup flags), with a per-user index
  `user.<pseudonym>` for allow/exclude lists. The user handle is derived from the keyed
  pseudonym, so no raw user id is stored or sent to an authenticator as `user.id`.
* Challenges are 32 random bytes in KV bucket `passkey_challenges`, whose TTL is the
  challenge lifetime. Verification marks a challenge used with a compare-and-set on its
  revision, so of two concurrent responses to one challenge exactly one proceeds.
* Checks run in the W3C order (credential, client data, RP ID hash, flags, challenge,
  signature, counter). The cheap ones are done here before py_webauthn so that every
  refusal names its exact reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.js import JetStreamContext
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import decode_credential_public_key, parse_cbor
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import (
    InvalidAuthenticationResponse,
    InvalidCBORData,
    InvalidRegistrationResponse,
    WebAuthnException,
)
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from candidate._jetstream import ensure_kv, jetstream_of
from candidate.identity.passkey import _ceremony as ceremony
from candidate.identity.passkey._ceremony import Refused, b64url, from_b64url
from candidate.identity.passkey._store import (
    ChallengeStore,
    CredentialRef,
    CredentialStore,
    StoredCredential,
)
from lukhas.config import Settings
from lukhas.identity.passkey import registry
from lukhas.identity.passkey.messages import AuthenticationResponse, RegistrationResponse
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.runtime import Runtime

logger = logging.getLogger(__name__)

CREDENTIALS_BUCKET = "passkey_credentials"
CHALLENGES_BUCKET = "passkey_challenges"

#: ES256, RS256 and EdDSA, in the order offered to authenticators.
SUPPORTED_ALGORITHMS: tuple[COSEAlgorithmIdentifier, ...] = (
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.EDDSA,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
)
_CAS_ATTEMPTS = 64


@dataclass(frozen=True, slots=True)
class WebAuthnOptions:
    """The relying party and where its state lives."""

    rp_id: str = "localhost"
    rp_name: str = "LUKHAS"
    origins: tuple[str, ...] = ("http://localhost:8000",)
    require_uv: bool = True
    challenge_ttl_s: float = 120.0
    credentials_bucket: str = CREDENTIALS_BUCKET
    challenges_bucket: str = CHALLENGES_BUCKET
    replicas: int = 1
    attestation: AttestationConveyancePreference = AttestationConveyancePreference.NONE
    algorithms: tuple[COSEAlgorithmIdentifier, ...] = field(default=SUPPORTED_ALGORITHMS)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> WebAuthnOptions:
        values: dict[str, Any] = {
            "rp_id": settings.webauthn_rp_id,
            "rp_name": settings.webauthn_rp_name,
            "origins": settings.webauthn_origins,
            "require_uv": settings.webauthn_require_uv,
            "challenge_ttl_s": float(settings.webauthn_challenge_ttl_s),
            "replicas": settings.ledger_replicas,
        }
        values.update(overrides)
        return cls(**values)


class WebAuthnPasskeyProvider:
    """`PasskeyProvider` with py_webauthn and JetStream KV. Await `ensure()` before use."""

    name = "webauthn"
    waits_on_io = True

    def __init__(
        self,
        js: JetStreamContext | Any,
        pseudonymize: Pseudonymizer | Callable[[str], str],
        options: WebAuthnOptions | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """
        Args:
            js: nats-py's JetStream context, or a bus (or client) with a `jetstream()` method.
            pseudonymize: the runtime's keyed pseudonymizer (stable across workers).
            clock: seconds since the epoch; injectable so tests can outlive a challenge.
        """
        self._js: JetStreamContext = js.jetstream() if hasattr(js, "jetstream") else js
        self._pseudonymize = pseudonymize
        self.options = options or WebAuthnOptions()
        self._clock = clock
        self._credentials: CredentialStore | None = None
        self._challenges: ChallengeStore | None = None

    @classmethod
    def from_settings(
        cls,
        js: JetStreamContext | Any,
        pseudonymize: Pseudonymizer | Callable[[str], str],
        settings: Settings,
        **overrides: Any,
    ) -> WebAuthnPasskeyProvider:
        return cls(js, pseudonymize, WebAuthnOptions.from_settings(settings, **overrides))

    def __repr__(self) -> str:
        return f"<WebAuthnPasskeyProvider rp_id={self.options.rp_id}>"

    async def ensure(self) -> None:
        """Open (creating if missing) the credential and challenge buckets."""
        opts = self.options
        credentials = await ensure_kv(self._js, opts.credentials_bucket, replicas=opts.replicas)
        challenges = await ensure_kv(
            self._js, opts.challenges_bucket, replicas=opts.replicas, ttl_s=opts.challenge_ttl_s
        )
        self._credentials = CredentialStore(credentials)
        self._challenges = ChallengeStore(challenges, clock=self._clock)

    # -- PasskeyProvider ------------------------------------------------------------------

    async def register_options(self, user_id: str, user_name: str | None) -> dict[str, Any]:
        pseudonym = self._pseudonymize(user_id)
        refs = await self._creds().refs_of(pseudonym)
        challenge = await self._chals().issue(
            "registration", ttl_s=self.options.challenge_ttl_s, pseudonym=pseudonym
        )
        uv = self._uv_requirement()
        options = generate_registration_options(
            rp_id=self.options.rp_id,
            rp_name=self.options.rp_name,
            user_name=user_name or user_id,
            user_id=ceremony.user_handle(pseudonym),
            challenge=challenge,
            timeout=int(self.options.challenge_ttl_s * 1000),
            attestation=self.options.attestation,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.PREFERRED, user_verification=uv
            ),
            exclude_credentials=[_descriptor(ref) for ref in refs],
            supported_pub_key_algs=list(self.options.algorithms),
        )
        return {"ok": True, "provider": self.name, "options": json.loads(options_to_json(options))}

    async def register_verify(self, user_id: str, credential: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._register(self._pseudonymize(user_id), credential)
        except Refused as refused:
            logger.info("passkey registration refused: %s", refused.reason)
            return ceremony.refusal(self.name, refused.reason, refused.message)

    async def challenge(self, user_id: str | None) -> dict[str, Any]:
        pseudonym = self._pseudonymize(user_id) if user_id is not None else None
        refs = await self._creds().refs_of(pseudonym) if pseudonym is not None else []
        challenge = await self._chals().issue(
            "authentication", ttl_s=self.options.challenge_ttl_s, pseudonym=pseudonym
        )
        options = generate_authentication_options(
            rp_id=self.options.rp_id,
            challenge=challenge,
            timeout=int(self.options.challenge_ttl_s * 1000),
            allow_credentials=[_descriptor(ref) for ref in refs],
            user_verification=self._uv_requirement(),
        )
        return {"ok": True, "provider": self.name, "options": json.loads(options_to_json(options))}

    async def verify(self, assertion: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._authenticate(assertion)
        except Refused as refused:
            logger.info("passkey assertion refused: %s", refused.reason)
            return ceremony.refusal(self.name, refused.reason, refused.message)

    # -- registration ---------------------------------------------------------------------

    async def _register(self, pseudonym: str, credential: dict[str, Any]) -> dict[str, Any]:
        try:
            parsed = msgspec.convert(credential, type=RegistrationResponse)
        except msgspec.ValidationError as exc:
            raise Refused("invalid_assertion", f"not a RegistrationResponseJSON: {exc}") from None
        raw_id = _checked_raw_id(parsed.id, parsed.rawId, parsed.type)
        client_raw = from_b64url(parsed.response.clientDataJSON, "clientDataJSON")
        client = ceremony.parse_client_data(client_raw, expected_type=ceremony.CREATE)
        ceremony.check_origin(client, self.options.origins)
        auth_data = _attested_auth_data(parsed.response.attestationObject)
        header = ceremony.parse_auth_data_header(auth_data)
        ceremony.check_auth_data(
            header, rp_id=self.options.rp_id, require_uv=self.options.require_uv
        )
        challenges = self._chals()
        record, revision = await challenges.lookup(client.challenge, "registration")
        if record.pseudonym != pseudonym:
            raise Refused("invalid_assertion", "the challenge was issued to another user")
        await challenges.consume(client.challenge, record, revision=revision)
        try:
            verified = verify_registration_response(
                credential=credential,
                expected_challenge=client.challenge,
                expected_rp_id=self.options.rp_id,
                expected_origin=list(self.options.origins),
                require_user_verification=self.options.require_uv,
                supported_pub_key_algs=list(self.options.algorithms),
            )
        except InvalidRegistrationResponse as exc:
            raise Refused(ceremony.reason_from_library(str(exc)), str(exc)) from None
        except (WebAuthnException, ValueError, KeyError, TypeError) as exc:  # malformed inside
            raise Refused("invalid_assertion", f"malformed registration: {exc}") from None
        if verified.credential_id != raw_id:
            raise Refused("invalid_assertion", "rawId differs from the attested credential id")
        alg = decode_credential_public_key(verified.credential_public_key).alg
        stored = StoredCredential(
            credential_id=b64url(verified.credential_id),
            public_key=b64url(verified.credential_public_key),
            alg=int(alg),
            sign_count=verified.sign_count,
            user_handle=b64url(ceremony.user_handle(pseudonym)),
            pseudonym=pseudonym,
            transports=list(parsed.response.transports),
            backup_eligible=header.backup_eligible,
            backed_up=verified.credential_backed_up,
            device_type=_enum_text(verified.credential_device_type),
            aaguid=verified.aaguid,
            attestation_format=_enum_text(verified.fmt),
            created_at=challenges.now_ms(),
        )
        if not await self._creds().add(stored, verified.credential_id):
            raise Refused("invalid_assertion", "this credential is already registered")
        logger.info(
            "passkey registered for %s (alg %s, fmt %s)", pseudonym, alg, stored.attestation_format
        )
        return {
            "ok": True,
            "provider": self.name,
            "credential_id": stored.credential_id,
            "sign_count": stored.sign_count,
            "attestation_format": stored.attestation_format,
            "aaguid": stored.aaguid,
            "backup_eligible": stored.backup_eligible,
            "backed_up": stored.backed_up,
        }

    # -- authentication -------------------------------------------------------------------

    async def _authenticate(self, assertion: dict[str, Any]) -> dict[str, Any]:
        try:
            parsed = msgspec.convert(assertion, type=AuthenticationResponse)
        except msgspec.ValidationError as exc:
            raise Refused(
                "invalid_assertion", f"not an AuthenticationResponseJSON: {exc}"
            ) from None
        raw_id = _checked_raw_id(parsed.id, parsed.rawId, parsed.type)
        found = await self._creds().get(raw_id)
        if found is None:
            raise Refused("unknown_credential", "no passkey is registered with this id")
        stored, revision = found
        response = parsed.response
        if response.userHandle and from_b64url(response.userHandle, "userHandle") != from_b64url(
            stored.user_handle, "stored user handle"
        ):
            raise Refused("invalid_assertion", "userHandle does not own this credential")
        client_raw = from_b64url(response.clientDataJSON, "clientDataJSON")
        client = ceremony.parse_client_data(client_raw, expected_type=ceremony.GET)
        ceremony.check_origin(client, self.options.origins)
        header = ceremony.parse_auth_data_header(
            from_b64url(response.authenticatorData, "authenticatorData")
        )
        ceremony.check_auth_data(
            header, rp_id=self.options.rp_id, require_uv=self.options.require_uv
        )
        challenges = self._chals()
        record, chal_revision = await challenges.lookup(client.challenge, "authentication")
        if record.pseudonym is not None and record.pseudonym != stored.pseudonym:
            raise Refused("invalid_assertion", "the challenge was issued to another user")
        await challenges.consume(client.challenge, record, revision=chal_revision)
        try:
            # The counter is checked below, after the signature (W3C order), so py_webauthn
            # is given 0 here and cannot report a regression in place of a bad signature.
            verified = verify_authentication_response(
                credential=assertion,
                expected_challenge=client.challenge,
                expected_rp_id=self.options.rp_id,
                expected_origin=list(self.options.origins),
                credential_public_key=from_b64url(stored.public_key, "stored public key"),
                credential_current_sign_count=0,
                require_user_verification=self.options.require_uv,
            )
        except InvalidAuthenticationResponse as exc:
            raise Refused(ceremony.reason_from_library(str(exc)), str(exc)) from None
        except (WebAuthnException, ValueError, KeyError, TypeError) as exc:  # malformed inside
            raise Refused("invalid_assertion", f"malformed assertion: {exc}") from None
        new_count = verified.new_sign_count
        await self._advance_counter(raw_id, stored, revision, new_count, header)
        logger.info("passkey verified for %s", stored.pseudonym)
        return {
            "ok": True,
            "provider": self.name,
            "credential_id": stored.credential_id,
            "new_sign_count": new_count,
        }

    async def _advance_counter(
        self,
        raw_id: bytes,
        stored: StoredCredential,
        revision: int,
        new_count: int,
        header: ceremony.AuthDataHeader,
    ) -> None:
        """Check the counter against the stored one and store it, compare-and-set; a
        concurrent verify that stored a higher count first makes this one a regression."""
        creds = self._creds()
        for _ in range(_CAS_ATTEMPTS):
            ceremony.check_counter(stored.sign_count, new_count)
            updated = msgspec.structs.replace(
                stored,
                # Never overwrite a non-zero count with 0 (check_counter refuses that anyway).
                sign_count=max(stored.sign_count, new_count),
                backed_up=header.backed_up,
                last_used_at=int(self._clock() * 1000),
            )
            if await creds.replace(raw_id, updated, revision=revision):
                return
            found = await creds.get(raw_id)
            if found is None:
                raise Refused("unknown_credential", "the passkey was removed during verification")
            stored, revision = found
        raise Refused("counter_regression", "the sign count kept changing under verification")

    # -- helpers --------------------------------------------------------------------------

    def _uv_requirement(self) -> UserVerificationRequirement:
        if self.options.require_uv:
            return UserVerificationRequirement.REQUIRED
        return UserVerificationRequirement.PREFERRED

    def _creds(self) -> CredentialStore:
        if self._credentials is None:
            raise RuntimeError("WebAuthnPasskeyProvider.ensure() was not awaited before use")
        return self._credentials

    def _chals(self) -> ChallengeStore:
        if self._challenges is None:
            raise RuntimeError("WebAuthnPasskeyProvider.ensure() was not awaited before use")
        return self._challenges


def _checked_raw_id(id_: str, raw_id: str, kind: str) -> bytes:
    raw = from_b64url(raw_id, "rawId")
    if from_b64url(id_, "id") != raw:
        raise Refused("invalid_assertion", "id and rawId differ")
    if b64url(raw) != id_ or b64url(raw) != raw_id:
        raise Refused("invalid_assertion", "id and rawId must be unpadded base64url")
    if kind != "public-key":
        raise Refused("invalid_assertion", f"credential type is {kind!r}, not 'public-key'")
    return raw


def _attested_auth_data(attestation_object: str) -> bytes:
    """The authData inside an attestationObject, for the checks made before py_webauthn."""
    raw = from_b64url(attestation_object, "attestationObject")
    try:
        decoded = parse_cbor(raw)
    except InvalidCBORData:
        raise Refused("invalid_assertion", "attestationObject is not CBOR") from None
    auth_data = decoded.get("authData") if isinstance(decoded, dict) else None
    if not isinstance(auth_data, bytes):
        raise Refused("invalid_assertion", "attestationObject has no authData")
    return auth_data


def _enum_text(value: Any) -> str:
    """py_webauthn returns some fields as str enums and some as plain str."""
    return str(getattr(value, "value", value))


def _descriptor(ref: CredentialRef) -> PublicKeyCredentialDescriptor:
    transports = []
    for name in ref.transports:
        try:
            transports.append(AuthenticatorTransport(name))
        except ValueError:
            continue  # a transport this py_webauthn does not know: leave it out
    return PublicKeyCredentialDescriptor(
        id=from_b64url(ref.id, "credential id"), transports=transports or None
    )


async def _wire(runtime: Runtime, **overrides: Any) -> None:
    """Build the provider on the runtime's JetStream, ensure its buckets, and register it
    (the bootstrap calls this only under FEATURE_IDENTITY_PASSKEY outside DRY_RUN)."""
    js = jetstream_of(runtime, "FEATURE_IDENTITY_PASSKEY", "the WebAuthn passkey provider")
    provider = WebAuthnPasskeyProvider.from_settings(
        js, runtime.pseudonymize, runtime.settings, **overrides
    )
    await provider.ensure()
    registry.register(provider)
    logger.info("FEATURE_IDENTITY_PASSKEY: passkey provider %r registered", provider.name)
