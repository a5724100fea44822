"""Passkey wire messages (JSON): W3C WebAuthn JSON forms, base64url strings throughout."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
UserName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
B64Url = Annotated[str, msgspec.Meta(max_length=16_384, pattern=r"^[A-Za-z0-9_\-]*={0,2}$")]
Challenge = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
#: An opaque enrolment grant, as a verify reply returned it.
Grant = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
#: Who asks for an anonymous challenge (an app's client address, a session): the rate-limit key.
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
CredentialId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=16_384, pattern=r"^[A-Za-z0-9_\-]*={0,2}$")
]

#: Encoded JSON bytes one assertion or credential may take.
MAX_ASSERTION_BYTES = 32_768


class AssertionResponse(msgspec.Struct, frozen=True):
    clientDataJSON: B64Url  # noqa: N815 - W3C field names
    authenticatorData: B64Url  # noqa: N815
    signature: B64Url
    userHandle: B64Url | None = None  # noqa: N815


class AuthenticationResponse(msgspec.Struct, frozen=True):
    """AuthenticationResponseJSON, as a browser's `PublicKeyCredential.toJSON()` gives it."""

    id: B64Url
    rawId: B64Url  # noqa: N815
    response: AssertionResponse
    type: str = "public-key"
    authenticatorAttachment: str | None = None  # noqa: N815
    clientExtensionResults: dict[str, Any] = {}  # noqa: N815


class DryRunAssertion(msgspec.Struct, frozen=True):
    """The DRY_RUN form: a challenge to echo and nothing else required."""

    challenge: Challenge = "dryrun"


class AttestationResponse(msgspec.Struct, frozen=True):
    clientDataJSON: B64Url  # noqa: N815
    attestationObject: B64Url  # noqa: N815
    transports: list[str] = []


class RegistrationResponse(msgspec.Struct, frozen=True):
    """RegistrationResponseJSON."""

    id: B64Url
    rawId: B64Url  # noqa: N815
    response: AttestationResponse
    type: str = "public-key"
    authenticatorAttachment: str | None = None  # noqa: N815
    clientExtensionResults: dict[str, Any] = {}  # noqa: N815


class RegisterOptionsRequest(msgspec.Struct, frozen=True, tag="passkey.register.options"):
    """Options to register a passkey. An account that already has one must present the
    `enrolment_grant` a successful verify of that account returned."""

    user_id: UserId
    user_name: UserName | None = None
    enrolment_grant: Grant | None = None


class RegisterCredential(msgspec.Struct, frozen=True, tag="passkey.register.verify"):
    """What `lukhas.identity.passkey.register.verify` takes: the credential stays an open
    object here, since the provider parses RegistrationResponseJSON with py_webauthn."""

    user_id: UserId
    credential: dict[str, Any]


class ChallengeRequest(msgspec.Struct, frozen=True, tag="passkey.challenge"):
    """A login challenge for `user_id`, or (without one) for a usernameless login, which is
    rate limited per `source` and globally."""

    user_id: UserId | None = None
    source: Source | None = None


class ListPasskeys(msgspec.Struct, frozen=True, tag="passkey.list"):
    user_id: UserId


class DeletePasskey(msgspec.Struct, frozen=True, tag="passkey.delete"):
    user_id: UserId
    credential_id: CredentialId


class PasskeySummary(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a `passkey.list` reply. Times are ms since the epoch."""

    credential_id: str
    created: int
    last_used: int | None
    transports: list[str]
    backup_eligible: bool
    backup_state: bool
    sign_count: int


class PasskeyList(msgspec.Struct, frozen=True, kw_only=True):
    """The `passkey.list` reply."""

    ok: bool
    provider: str
    credentials: list[PasskeySummary]
