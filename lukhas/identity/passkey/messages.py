"""Passkey wire messages (JSON): W3C WebAuthn JSON forms, base64url strings throughout.

The replies are built as dicts by the providers and described by the reply Structs at the
end, for the published contract and the contract tests, which check every reply against them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from lukhas.replies import Refusal

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

    ok: Literal[True]
    provider: str
    credentials: list[PasskeySummary]


# -- replies --------------------------------------------------------------------------------
# Fields typed `X | UnsetType` may be absent (never null).


class PasskeyVerified(msgspec.Struct, frozen=True, kw_only=True):
    """A verified assertion. The WebAuthn provider names the account (`user_handle`, and
    `user_id` when the challenge was issued for one) and returns an enrolment grant."""

    ok: Literal[True]
    provider: str
    credential_id: str
    new_sign_count: int
    user_handle: str | UnsetType = UNSET
    user_id: str | UnsetType = UNSET
    backup_eligible: bool | UnsetType = UNSET
    backup_state: bool | UnsetType = UNSET
    #: Single use: lets this account register a further passkey.
    enrolment_grant: str | UnsetType = UNSET
    #: Epoch ms.
    enrolment_grant_expires_at: int | UnsetType = UNSET


class DryRunVerified(msgspec.Struct, frozen=True, kw_only=True):
    """The DRY_RUN null provider's answer: the challenge echoed."""

    ok: Literal[True]
    provider: str
    challenge: str


class PasskeyOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Options for the browser: PublicKeyCredentialCreationOptionsJSON (`register.options`)
    or PublicKeyCredentialRequestOptionsJSON (`challenge`), as W3C WebAuthn defines them."""

    ok: Literal[True]
    provider: str
    options: dict[str, Any]


class PasskeyRegistered(msgspec.Struct, frozen=True, kw_only=True):
    """A registered passkey; `user_handle` is what a later verify names the account by."""

    ok: Literal[True]
    provider: str
    credential_id: str
    user_handle: str | UnsetType = UNSET
    sign_count: int | UnsetType = UNSET
    attestation_format: str | UnsetType = UNSET
    aaguid: str | UnsetType = UNSET
    backup_eligible: bool | UnsetType = UNSET
    backed_up: bool | UnsetType = UNSET


class PasskeyDeleted(msgspec.Struct, frozen=True, kw_only=True):
    ok: Literal[True]
    provider: str
    deleted: Literal[True]


RefusalReason = Literal[
    # a refused assertion
    "unknown_credential", "challenge_expired", "challenge_reused", "bad_signature",
    "origin_mismatch", "rp_id_mismatch", "counter_regression", "user_not_verified",
    "invalid_assertion",
    # enrolment, management and challenges
    "enrolment_grant_required", "invalid_enrolment_grant", "not_found", "rate_limited",
    # no real verifier wired (the null provider outside DRY_RUN), and every endpoint's
    "no_verifier", "not_supported", "overloaded",
]


class PasskeyRefusal(Refusal, frozen=True, kw_only=True):
    """A passkey request declined, with the exact reason."""

    reason: RefusalReason


#: What each passkey subject may answer, success shapes first (`ErrorReply` is implied).
VERIFY_REPLY: tuple[type, ...] = (PasskeyVerified, DryRunVerified, PasskeyRefusal)
OPTIONS_REPLY: tuple[type, ...] = (PasskeyOptions, PasskeyRefusal)
REGISTER_REPLY: tuple[type, ...] = (PasskeyRegistered, PasskeyRefusal)
LIST_REPLY: tuple[type, ...] = (PasskeyList, PasskeyRefusal)
DELETE_REPLY: tuple[type, ...] = (PasskeyDeleted, PasskeyRefusal)
