"""WebAuthn passkeys: py_webauthn verification against credentials and challenges in KV.

* Credentials live in KV bucket `passkey_credentials` under `cred.<base64url id>` (public
  key, algorithm, sign count, user handle, transports, backup flags), with a per-user index
  `user.<pseudonym>` for allow/exclude lists and management. The user handle is derived from
  the keyed pseudonym, so no raw user id is stored or sent to an authenticator as `user.id`.
  Readers look under every pseudonym key version, so a key rotation keeps passkeys usable.
* Challenges are 32 random bytes in KV bucket `passkey_challenges`, whose TTL is the
  challenge lifetime and whose size is bounded (a flood is refused, never stored).
  Verification marks a challenge used with a compare-and-set on its revision, so of two
  concurrent responses to one challenge exactly one proceeds.
* Enrolment: an account's first passkey is open; a further one needs an enrolment grant,
  which a successful verify of that account returns (single use, short-lived, in KV bucket
  `passkey_enrolment_grants`, spent by a compare-and-set delete).
* Checks run in the W3C order (credential, client data, RP ID hash, flags, challenge,
  signature, counter). The cheap ones are done here, on py_webauthn's parsers, before its
  verifiers, so that every refusal names its exact reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
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
from webauthn.helpers import (
    decode_credential_public_key,
    parse_attestation_object,
    parse_authentication_credential_json,
    parse_registration_credential_json,
)
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import (
    InvalidAuthenticationResponse,
    InvalidRegistrationResponse,
    WebAuthnException,
)
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticationCredential,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    RegistrationCredential,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from candidate._jetstream import ensure_kv, jetstream_of
from candidate.identity.passkey import _ceremony as ceremony
from candidate.identity.passkey._ceremony import Refused, b64url, from_b64url
from candidate.identity.passkey._seal import UserSealer
from candidate.identity.passkey._store import (
    ChallengeStore,
    CredentialRef,
    CredentialStore,
    GrantStore,
    StoredCredential,
    ensure_bounded_kv,
)
from lukhas.config import Settings
from lukhas.identity.passkey import registry
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.runtime import Runtime

logger = logging.getLogger(__name__)

CREDENTIALS_BUCKET = "passkey_credentials"
CHALLENGES_BUCKET = "passkey_challenges"
GRANTS_BUCKET = "passkey_enrolment_grants"

#: ES256, RS256 and EdDSA, in the order offered to authenticators.
SUPPORTED_ALGORITHMS: tuple[COSEAlgorithmIdentifier, ...] = (
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.EDDSA,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
)
_CAS_ATTEMPTS = 64
#: Live enrolment grants take far less room than challenges.
_GRANTS_MAX_BYTES_SHARE = 4


@dataclass(frozen=True, slots=True)
class WebAuthnOptions:
    """The relying party and where its state lives."""

    rp_id: str = "localhost"
    rp_name: str = "LUKHAS"
    origins: tuple[str, ...] = ("http://localhost:8000",)
    require_uv: bool = True
    challenge_ttl_s: float = 120.0
    enrolment_ttl_s: float = 300.0
    challenges_max_bytes: int = 64 * 1024 * 1024
    credentials_bucket: str = CREDENTIALS_BUCKET
    challenges_bucket: str = CHALLENGES_BUCKET
    grants_bucket: str = GRANTS_BUCKET
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
            "enrolment_ttl_s": float(settings.passkey_enrolment_ttl_s),
            "challenges_max_bytes": settings.passkey_challenges_max_bytes,
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
        self._sealer = UserSealer(pseudonymize)
        self.options = options or WebAuthnOptions()
        self._clock = clock
        self._credentials: CredentialStore | None = None
        self._challenges: ChallengeStore | None = None
        self._grants: GrantStore | None = None

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
        """Open (creating if missing) the credential, challenge and grant buckets."""
        opts = self.options
        credentials = await ensure_kv(self._js, opts.credentials_bucket, replicas=opts.replicas)
        challenges = await ensure_bounded_kv(
            self._js, opts.challenges_bucket, replicas=opts.replicas,
            ttl_s=opts.challenge_ttl_s, max_bytes=opts.challenges_max_bytes,
        )
        grants = await ensure_bounded_kv(
            self._js, opts.grants_bucket, replicas=opts.replicas, ttl_s=opts.enrolment_ttl_s,
            max_bytes=max(4096, opts.challenges_max_bytes // _GRANTS_MAX_BYTES_SHARE),
        )
        self._credentials = CredentialStore(credentials)
        self._challenges = ChallengeStore(challenges, clock=self._clock)
        self._grants = GrantStore(grants, clock=self._clock)

    # -- PasskeyProvider ------------------------------------------------------------------

    async def register_options(
        self, user_id: str, user_name: str | None, enrolment_grant: str | None = None
    ) -> dict[str, Any]:
        try:
            return await self._register_options(user_id, user_name, enrolment_grant)
        except Refused as refused:
            logger.info("passkey registration options refused: %s", refused.reason)
            return ceremony.refusal(self.name, refused.reason, refused.message)

    async def register_verify(self, user_id: str, credential: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._register(self._versions(user_id), credential)
        except Refused as refused:
            logger.info("passkey registration refused: %s", refused.reason)
            return ceremony.refusal(self.name, refused.reason, refused.message)

    async def challenge(self, user_id: str | None) -> dict[str, Any]:
        try:
            return await self._challenge(user_id)
        except Refused as refused:
            logger.info("passkey challenge refused: %s", refused.reason)
            reply = ceremony.refusal(self.name, refused.reason, refused.message)
            if refused.reason == "rate_limited":
                reply["retry_after_ms"] = _FULL_RETRY_MS
            return reply

    async def verify(self, assertion: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._authenticate(assertion)
        except Refused as refused:
            logger.info("passkey assertion refused: %s", refused.reason)
            return ceremony.refusal(self.name, refused.reason, refused.message)

    async def list_credentials(self, user_id: str) -> dict[str, Any]:
        creds = self._creds()
        listed: list[dict[str, Any]] = []
        for ref in await creds.refs_of(self._versions(user_id)):
            found = await creds.get(from_b64url(ref.id, "credential id"))
            if found is None:
                continue  # an interrupted delete: the credential is gone already
            stored = found[0]
            listed.append({
                "credential_id": stored.credential_id,
                "created": stored.created_at,
                "last_used": stored.last_used_at,
                "transports": list(stored.transports),
                "backup_eligible": stored.backup_eligible,
                "backup_state": stored.backed_up,
                "sign_count": stored.sign_count,
            })
        return {"ok": True, "provider": self.name, "credentials": listed}

    async def delete_credential(self, user_id: str, credential_id: str) -> dict[str, Any]:
        try:
            raw = from_b64url(credential_id, "credential_id")
        except Refused:
            raw = b""
        if not raw or not await self._creds().delete(raw, self._versions(user_id)):
            return ceremony.refusal(
                self.name, "not_found", "this user has no passkey with that credential id"
            )
        logger.info("passkey deleted for %s", self._pseudonymize(user_id))
        return {"ok": True, "provider": self.name, "deleted": True}

    # -- registration ---------------------------------------------------------------------

    async def _register_options(
        self, user_id: str, user_name: str | None, enrolment_grant: str | None
    ) -> dict[str, Any]:
        pseudonyms = self._versions(user_id)
        refs = await self._creds().refs_of(pseudonyms)
        granted = False
        if refs:
            if enrolment_grant is None:
                raise Refused(
                    "enrolment_grant_required",
                    "the account already has a passkey: verify with it first and present "
                    "the enrolment_grant from that reply",
                )
            await self._grants_store().consume(enrolment_grant, pseudonyms)
            granted = True
        challenge = await self._chals().issue(
            "registration", ttl_s=self.options.challenge_ttl_s, pseudonyms=pseudonyms,
            granted=granted,
        )
        options = generate_registration_options(
            rp_id=self.options.rp_id,
            rp_name=self.options.rp_name,
            user_name=user_name or user_id,
            user_id=await self._handle_for(pseudonyms, refs),
            challenge=challenge,
            timeout=int(self.options.challenge_ttl_s * 1000),
            attestation=self.options.attestation,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.PREFERRED,
                user_verification=self._uv_requirement(),
            ),
            exclude_credentials=[_descriptor(ref) for ref in refs],
            supported_pub_key_algs=list(self.options.algorithms),
        )
        return {"ok": True, "provider": self.name, "options": json.loads(options_to_json(options))}

    async def _register(
        self, pseudonyms: Sequence[str], credential: dict[str, Any]
    ) -> dict[str, Any]:
        parsed = _parse_registration(credential)
        raw_id = _checked_raw_id(parsed.id, credential.get("rawId"), parsed.raw_id)
        client = ceremony.parse_client_data(
            parsed.response.client_data_json, expected_type=ceremony.CREATE
        )
        ceremony.check_origin(client, self.options.origins)
        try:
            attestation = parse_attestation_object(parsed.response.attestation_object)
        except (WebAuthnException, ValueError, TypeError, KeyError, IndexError) as exc:
            raise Refused("invalid_assertion", f"attestationObject is malformed: {exc}") from None
        flags = attestation.auth_data.flags
        header = ceremony.AuthDataHeader(
            attestation.auth_data.rp_id_hash,
            (ceremony.FLAG_UP if flags.up else 0) | (ceremony.FLAG_UV if flags.uv else 0)
            | (ceremony.FLAG_BE if flags.be else 0) | (ceremony.FLAG_BS if flags.bs else 0),
            attestation.auth_data.sign_count,
        )
        ceremony.check_auth_data(
            header, rp_id=self.options.rp_id, require_uv=self.options.require_uv
        )
        challenges = self._chals()
        record, revision = await challenges.lookup(client.challenge, "registration")
        # Bound to the options issued: the same user (any key version) and, for a further
        # passkey, to the grant presented then.
        if record.pseudonym is None or not record.owners & set(pseudonyms):
            raise Refused("invalid_assertion", "the challenge was issued to another user")
        await challenges.consume(client.challenge, record, revision=revision)
        try:
            verified = verify_registration_response(
                credential=parsed,
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
        pseudonym = pseudonyms[0]  # writers use the current key
        refs = await self._creds().refs_of(pseudonyms)
        stored = StoredCredential(
            credential_id=b64url(verified.credential_id),
            public_key=b64url(verified.credential_public_key),
            alg=int(alg),
            sign_count=verified.sign_count,
            user_handle=b64url(await self._handle_for(pseudonyms, refs)),
            pseudonym=pseudonym,
            transports=[_enum_text(t) for t in parsed.response.transports or []],
            backup_eligible=header.backup_eligible,
            backed_up=verified.credential_backed_up,
            device_type=_enum_text(verified.credential_device_type),
            aaguid=verified.aaguid,
            attestation_format=_enum_text(verified.fmt),
            created_at=challenges.now_ms(),
        )
        # Without a grant the options were for a first passkey: if the account has gained
        # one since (another enrolment won the race), this one needs a grant too.
        first_for = None if record.granted else pseudonyms
        if not await self._creds().add(stored, verified.credential_id, first_for=first_for):
            raise Refused("invalid_assertion", "this credential is already registered")
        logger.info(
            "passkey registered for %s (alg %s, fmt %s)", pseudonym, alg, stored.attestation_format
        )
        return {
            "ok": True,
            "provider": self.name,
            "credential_id": stored.credential_id,
            "user_handle": stored.user_handle,
            "sign_count": stored.sign_count,
            "attestation_format": stored.attestation_format,
            "aaguid": stored.aaguid,
            "backup_eligible": stored.backup_eligible,
            "backed_up": stored.backed_up,
        }

    # -- authentication -------------------------------------------------------------------

    async def _challenge(self, user_id: str | None) -> dict[str, Any]:
        pseudonyms = self._versions(user_id) if user_id is not None else ()
        refs = await self._creds().refs_of(pseudonyms) if pseudonyms else []

        def seal(challenge: bytes) -> str | None:
            return self._sealer.seal(user_id, challenge) if user_id is not None else None

        challenge = await self._chals().issue(
            "authentication", ttl_s=self.options.challenge_ttl_s, pseudonyms=pseudonyms,
            seal=seal,
        )
        options = generate_authentication_options(
            rp_id=self.options.rp_id,
            challenge=challenge,
            timeout=int(self.options.challenge_ttl_s * 1000),
            allow_credentials=[_descriptor(ref) for ref in refs],
            user_verification=self._uv_requirement(),
        )
        return {"ok": True, "provider": self.name, "options": json.loads(options_to_json(options))}

    async def _authenticate(self, assertion: dict[str, Any]) -> dict[str, Any]:
        parsed = _parse_authentication(assertion)
        raw_id = _checked_raw_id(parsed.id, assertion.get("rawId"), parsed.raw_id)
        found = await self._creds().get(raw_id)
        if found is None:
            raise Refused("unknown_credential", "no passkey is registered with this id")
        stored, revision = found
        response = parsed.response
        if response.user_handle and response.user_handle != from_b64url(
            stored.user_handle, "stored user handle"
        ):
            raise Refused("invalid_assertion", "userHandle does not own this credential")
        client = ceremony.parse_client_data(response.client_data_json, expected_type=ceremony.GET)
        ceremony.check_origin(client, self.options.origins)
        header = ceremony.parse_auth_data_header(response.authenticator_data)
        ceremony.check_auth_data(
            header, rp_id=self.options.rp_id, require_uv=self.options.require_uv
        )
        ceremony.check_backup_eligibility(header, registered=stored.backup_eligible)
        challenges = self._chals()
        record, chal_revision = await challenges.lookup(client.challenge, "authentication")
        if record.pseudonym is not None and stored.pseudonym not in record.owners:
            raise Refused("invalid_assertion", "the challenge was issued to another user")
        await challenges.consume(client.challenge, record, revision=chal_revision)
        try:
            # The counter is checked below, after the signature (W3C order), so py_webauthn
            # is given 0 here and cannot report a regression in place of a bad signature.
            verified = verify_authentication_response(
                credential=parsed,
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
        grant, grant_expires_at = await self._grants_store().issue(
            stored.pseudonym, ttl_s=self.options.enrolment_ttl_s
        )
        logger.info("passkey verified for %s", stored.pseudonym)
        reply: dict[str, Any] = {
            "ok": True,
            "provider": self.name,
            "credential_id": stored.credential_id,
            "new_sign_count": new_count,
            "user_handle": stored.user_handle,
        }
        user_id = self._sealer.open(record.sealed_user, client.challenge)
        if user_id is not None:
            reply["user_id"] = user_id
        reply.update(
            backup_eligible=stored.backup_eligible,
            backup_state=header.backed_up,
            enrolment_grant=grant,
            enrolment_grant_expires_at=grant_expires_at,
        )
        return reply

    async def _advance_counter(
        self,
        raw_id: bytes,
        stored: StoredCredential,
        revision: int,
        new_count: int,
        header: ceremony.AuthDataHeader,
    ) -> None:
        """Check the counter against the stored one and store it (and the BS flag),
        compare-and-set; a concurrent verify that stored a higher count first makes this one
        a regression, and a concurrent delete makes it unknown."""
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

    def _versions(self, user_id: str) -> tuple[str, ...]:
        """The user's pseudonym under every key version, current first."""
        versions = getattr(self._pseudonymize, "all_versions", None)
        return tuple(versions(user_id)) if versions else (self._pseudonymize(user_id),)

    async def _handle_for(self, pseudonyms: Sequence[str], refs: list[CredentialRef]) -> bytes:
        """The account's WebAuthn user handle: that of its passkeys if it has any (so a key
        rotation does not split one account into two handles), else derived anew."""
        for ref in refs:
            found = await self._creds().get(from_b64url(ref.id, "credential id"))
            if found is not None:
                return from_b64url(found[0].user_handle, "stored user handle")
        return ceremony.user_handle(pseudonyms[0])

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

    def _grants_store(self) -> GrantStore:
        if self._grants is None:
            raise RuntimeError("WebAuthnPasskeyProvider.ensure() was not awaited before use")
        return self._grants


#: retry_after_ms when the challenge bucket is full: room appears as challenges expire.
_FULL_RETRY_MS = 1000


def _parse_authentication(assertion: dict[str, Any]) -> AuthenticationCredential:
    try:
        return parse_authentication_credential_json(assertion)
    except (WebAuthnException, ValueError, TypeError) as exc:
        raise Refused(
            "invalid_assertion", f"not an AuthenticationResponseJSON: {exc}"
        ) from None


def _parse_registration(credential: dict[str, Any]) -> RegistrationCredential:
    try:
        return parse_registration_credential_json(credential)
    except (WebAuthnException, ValueError, TypeError) as exc:
        raise Refused("invalid_assertion", f"not a RegistrationResponseJSON: {exc}") from None


def _checked_raw_id(id_: str, raw_id_text: object, raw: bytes) -> bytes:
    """`id` and `rawId` must be the same unpadded base64url text of the credential id."""
    if not isinstance(raw_id_text, str) or raw_id_text != id_ or b64url(raw) != id_:
        raise Refused("invalid_assertion", "id and rawId differ or are not unpadded base64url")
    return raw


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
