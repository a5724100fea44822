"""Pure WebAuthn ceremony checks shared by the passkey providers (no I/O).

The cheap checks run here, before py_webauthn, so each refusal names its exact reason:
py_webauthn reports every failure as one exception type with a free-text message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from webauthn.helpers import parse_authenticator_data, parse_client_data_json
from webauthn.helpers.exceptions import WebAuthnException

Reason = Literal[
    "unknown_credential",
    "challenge_expired",
    "challenge_reused",
    "bad_signature",
    "origin_mismatch",
    "rp_id_mismatch",
    "counter_regression",
    "user_not_verified",
    "invalid_assertion",
]

#: Every reason a refused assertion may give (the closed set of the wire contract).
REASONS: frozenset[str] = frozenset(get_args(Reason))

#: Reasons of the enrolment, management and challenge subjects.
OtherReason = Literal[
    "enrolment_grant_required", "invalid_enrolment_grant", "not_found", "rate_limited"
]
RefusalReason = Reason | OtherReason

FLAG_UP = 0x01
FLAG_UV = 0x04
FLAG_BE = 0x08
FLAG_BS = 0x10
FLAG_AT = 0x40

CREATE = "webauthn.create"
GET = "webauthn.get"


class Refused(Exception):
    """A ceremony refusal: the reply is `{"ok": false, "reason": ..., "message": ...}`."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


_B64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


def b64url(data: bytes) -> str:
    """Unpadded base64url, as WebAuthn's JSON forms use it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def from_b64url(text: str, what: str) -> bytes:
    """Decode base64url (padding optional).

    Raises:
        Refused: invalid_assertion, the text is not base64url.
    """
    if not _B64URL.match(text):
        raise Refused("invalid_assertion", f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise Refused("invalid_assertion", f"{what} is not base64url") from None


@dataclass(frozen=True, slots=True)
class ClientData:
    type: str
    challenge: bytes
    origin: str
    cross_origin: bool


def parse_client_data(raw: bytes, *, expected_type: str) -> ClientData:
    """Parse clientDataJSON (py_webauthn's `parse_client_data_json`) and check its type.

    Raises:
        Refused: invalid_assertion, malformed or of the wrong ceremony type.
    """
    try:
        data = parse_client_data_json(raw)
    except (WebAuthnException, ValueError, TypeError, AttributeError, binascii.Error) as exc:
        raise Refused("invalid_assertion", f"clientDataJSON is malformed: {exc}") from None
    kind = str(getattr(data.type, "value", data.type))
    if not isinstance(data.origin, str):
        raise Refused("invalid_assertion", "clientDataJSON origin is not a string")
    if kind != expected_type:
        raise Refused(
            "invalid_assertion", f"clientDataJSON type is {kind!r}, not {expected_type!r}"
        )
    return ClientData(
        type=kind,
        challenge=data.challenge,
        origin=data.origin,
        cross_origin=data.cross_origin is True,
    )


def check_origin(client: ClientData, origins: tuple[str, ...]) -> None:
    """Raises Refused(origin_mismatch) unless the origin is one of ours, top-level."""
    if client.origin not in origins:
        raise Refused("origin_mismatch", f"origin {client.origin!r} is not an expected origin")
    if client.cross_origin:
        raise Refused("origin_mismatch", "the ceremony ran in a cross-origin frame")


@dataclass(frozen=True, slots=True)
class AuthDataHeader:
    """The fixed 37-byte head of authenticatorData."""

    rp_id_hash: bytes
    flags: int
    sign_count: int

    @property
    def user_present(self) -> bool:
        return bool(self.flags & FLAG_UP)

    @property
    def user_verified(self) -> bool:
        return bool(self.flags & FLAG_UV)

    @property
    def backup_eligible(self) -> bool:
        return bool(self.flags & FLAG_BE)

    @property
    def backed_up(self) -> bool:
        return bool(self.flags & FLAG_BS)


def parse_auth_data_header(raw: bytes) -> AuthDataHeader:
    """The head of authenticatorData, parsed by py_webauthn's `parse_authenticator_data`.

    Raises:
        Refused: invalid_assertion, authenticatorData is malformed (e.g. under 37 bytes).
    """
    try:
        parsed = parse_authenticator_data(raw)
    except (WebAuthnException, ValueError, TypeError, IndexError) as exc:
        raise Refused("invalid_assertion", f"authenticatorData is malformed: {exc}") from None
    flags = parsed.flags
    bits = (
        (FLAG_UP if flags.up else 0) | (FLAG_UV if flags.uv else 0)
        | (FLAG_BE if flags.be else 0) | (FLAG_BS if flags.bs else 0)
        | (FLAG_AT if flags.at else 0)
    )
    return AuthDataHeader(parsed.rp_id_hash, bits, parsed.sign_count)


def check_auth_data(header: AuthDataHeader, *, rp_id: str, require_uv: bool) -> None:
    """Compare the rpIdHash with ours and check the UP (and, if required, UV) flags."""
    if header.rp_id_hash != hashlib.sha256(rp_id.encode("utf-8")).digest():
        raise Refused("rp_id_mismatch", "authenticatorData was made for another RP ID")
    if not header.user_present:
        raise Refused("user_not_verified", "the authenticator reports no user presence")
    if require_uv and not header.user_verified:
        raise Refused("user_not_verified", "user verification is required but was not done")
    if header.backed_up and not header.backup_eligible:
        raise Refused("invalid_assertion", "flags BS set without BE: not a valid backup state")


def check_backup_eligibility(header: AuthDataHeader, *, registered: bool) -> None:
    """BE is fixed when a credential is registered; an assertion that differs is refused.

    Raises:
        Refused: invalid_assertion, naming the BE flag.
    """
    if header.backup_eligible != registered:
        raise Refused(
            "invalid_assertion",
            f"backup eligibility flag BE is {int(header.backup_eligible)} but was "
            f"{int(registered)} at registration",
        )


def check_counter(stored: int, new: int) -> None:
    """Sign counters must grow once either side is non-zero (synced passkeys report 0, 0).

    Raises:
        Refused: counter_regression, a possible cloned authenticator.
    """
    if stored > 0 and new <= stored:
        raise Refused(
            "counter_regression",
            f"sign count {new} does not exceed the stored {stored}: possible cloned authenticator",
        )


def user_handle(pseudonym: str) -> bytes:
    """The WebAuthn user handle of a data subject: 32 opaque bytes derived from the keyed
    pseudonym (domain-separated), so it carries no personal data and is stable."""
    return hashlib.sha256(b"lukhas.webauthn.user_handle\x00" + pseudonym.encode()).digest()


def reason_from_library(message: str) -> Reason:
    """Map a py_webauthn InvalidAuthenticationResponse/InvalidRegistrationResponse message to
    a reason. The cheap checks run first, so this is a fallback; it errs towards
    `invalid_assertion`, never towards acceptance."""
    text = message.lower()
    if "signature" in text:
        return "bad_signature"
    if "sign count" in text:
        return "counter_regression"
    if "origin" in text:
        return "origin_mismatch"
    if "rp id" in text:
        return "rp_id_mismatch"
    if "user verification" in text or "user was not" in text or "user presence" in text:
        return "user_not_verified"
    return "invalid_assertion"


def refusal(provider: str, reason: RefusalReason, message: str) -> dict[str, Any]:
    """The wire form of a refusal."""
    return {"ok": False, "provider": provider, "reason": reason, "message": message}
