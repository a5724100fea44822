"""Passkey wire messages (JSON): W3C WebAuthn JSON forms, base64url strings throughout."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
UserName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
B64Url = Annotated[str, msgspec.Meta(max_length=16_384, pattern=r"^[A-Za-z0-9_\-]*={0,2}$")]
Challenge = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]

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
    user_id: UserId
    user_name: UserName | None = None


class RegisterCredential(msgspec.Struct, frozen=True, tag="passkey.register.verify"):
    """What `lukhas.identity.passkey.register.verify` takes: the credential stays an open
    object here, since the provider parses RegistrationResponseJSON with py_webauthn."""

    user_id: UserId
    credential: dict[str, Any]


class ChallengeRequest(msgspec.Struct, frozen=True, tag="passkey.challenge"):
    user_id: UserId | None = None
