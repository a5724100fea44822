"""The slice service's endpoints: one subject each, decoding JSON and calling a public API."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from lukhas import subjects
from lukhas._validation import decode
from lukhas.config import Settings
from lukhas.governance.consent_ledger import api as consent
from lukhas.governance.consent_ledger import registry as consent_registry
from lukhas.governance.consent_ledger.messages import (
    ConsentHistoryQuery,
    ConsentStatusQuery,
    RecordConsent,
    RevokeConsent,
    VerifyConsentChain,
)
from lukhas.identity.passkey import api as passkey
from lukhas.identity.passkey import registry as passkey_registry
from lukhas.identity.passkey.messages import (
    MAX_ASSERTION_BYTES,
    ChallengeRequest,
    DeletePasskey,
    ListPasskeys,
    RegisterOptionsRequest,
)
from lukhas.observability.matriz_decorators import EmitPoint
from lukhas.orchestration.context import api as context
from lukhas.orchestration.context.messages import HandoffContext

Reply = dict[str, Any]

#: Bytes a consent request body may take (its metadata is capped at 8 KiB).
CONSENT_MAX_BYTES = 16_384
#: Room for the handoff envelope around a context of LUKHAS_HANDOFF_MAX_BYTES.
HANDOFF_ENVELOPE_BYTES = 1024


class _RegisterVerify(msgspec.Struct, frozen=True):
    user_id: str
    credential: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A request subject served by the slice service.

    The body is decoded into `message` (size checked first), then `call` runs the public
    API. `api` is that public function, whose emit point the service reports a node for
    when a request fails before reaching it (bad JSON, wrong fields, too large).
    """

    name: str
    subject: str
    message: type[Any]
    call: Callable[[Any], Awaitable[Reply]]
    api: Callable[..., Any]
    max_bytes: int
    #: Whether a request may wait on I/O (a JetStream ack, a flush): such endpoints get the
    #: concurrent handler pool; the rest are answered inline by their reader, which in
    #: asyncio is several times cheaper than handing each message to another task.
    waits_on_io: bool = True

    @property
    def emit_point(self) -> EmitPoint:
        return self.api.__matriz_emit_point__  # type: ignore[attr-defined, no-any-return]

    def decode(self, data: bytes) -> Any:
        """Raises `PayloadTooLarge` or `InvalidRequest` (see `lukhas._validation.decode`)."""
        # An empty body reads as `{}`, so the error names the missing fields.
        return decode(self.message, data or b"{}", max_bytes=self.max_bytes)


def build_endpoints(settings: Settings) -> tuple[Endpoint, ...]:
    """Every endpoint, with body limits checked before decoding.

    Consent and passkey endpoints wait on I/O only when a real provider answers them (the
    builtin null providers never do); handoffs always wait for their publish to be confirmed.
    """
    cap = settings.request_max_bytes
    consent_io = consent_registry.get_provider(settings).name != "null"
    passkey_io = passkey_registry.get_provider(settings).name != "null"
    consent_max = min(CONSENT_MAX_BYTES, cap)
    passkey_max = min(2 * MAX_ASSERTION_BYTES, cap)
    handoff_max = min(settings.handoff_max_bytes + HANDOFF_ENVELOPE_BYTES, cap)
    return (
        Endpoint(
            "consent_record", subjects.CONSENT_RECORD, RecordConsent,
            lambda m: consent.record_consent(
                m.user_id, m.scope, m.metadata, idempotency_key=m.idempotency_key
            ),
            consent.record_consent, consent_max, waits_on_io=consent_io,
        ),
        Endpoint(
            "consent_revoke", subjects.CONSENT_REVOKE, RevokeConsent,
            lambda m: consent.revoke_consent(
                m.user_id, m.scope, idempotency_key=m.idempotency_key
            ),
            consent.revoke_consent, consent_max, waits_on_io=consent_io,
        ),
        Endpoint(
            "consent_status", subjects.CONSENT_STATUS, ConsentStatusQuery,
            lambda m: consent.consent_status(m.user_id, m.scope),
            consent.consent_status, consent_max, waits_on_io=consent_io,
        ),
        Endpoint(
            "consent_history", subjects.CONSENT_HISTORY, ConsentHistoryQuery,
            lambda m: consent.consent_history(m.user_id),
            consent.consent_history, consent_max, waits_on_io=consent_io,
        ),
        Endpoint(
            "consent_verify", subjects.CONSENT_VERIFY, VerifyConsentChain,
            lambda m: consent.verify_consent_chain(m.user_id),
            consent.verify_consent_chain, consent_max, waits_on_io=consent_io,
        ),
        Endpoint(
            "passkey_verify", subjects.PASSKEY_VERIFY, dict[str, Any],
            passkey.verify_passkey, passkey.verify_passkey, passkey_max, waits_on_io=passkey_io,
        ),
        Endpoint(
            "passkey_register_options", subjects.PASSKEY_REGISTER_OPTIONS,
            RegisterOptionsRequest,
            lambda m: passkey.passkey_registration_options(
                m.user_id, m.user_name, enrolment_grant=m.enrolment_grant
            ),
            passkey.passkey_registration_options, passkey_max, waits_on_io=passkey_io,
        ),
        Endpoint(
            "passkey_register_verify", subjects.PASSKEY_REGISTER_VERIFY, _RegisterVerify,
            lambda m: passkey.register_passkey(m.user_id, m.credential),
            passkey.register_passkey, passkey_max, waits_on_io=passkey_io,
        ),
        Endpoint(
            "passkey_challenge", subjects.PASSKEY_CHALLENGE, ChallengeRequest,
            lambda m: passkey.passkey_challenge(m.user_id, source=m.source),
            passkey.passkey_challenge, passkey_max, waits_on_io=passkey_io,
        ),
        Endpoint(
            "passkey_list", subjects.PASSKEY_LIST, ListPasskeys,
            lambda m: passkey.list_passkeys(m.user_id),
            passkey.list_passkeys, passkey_max, waits_on_io=passkey_io,
        ),
        Endpoint(
            "passkey_delete", subjects.PASSKEY_DELETE, DeletePasskey,
            lambda m: passkey.delete_passkey(m.user_id, m.credential_id),
            passkey.delete_passkey, passkey_max, waits_on_io=passkey_io,
        ),
        Endpoint(
            "context_handoff", subjects.CONTEXT_HANDOFF, HandoffContext,
            lambda m: context.handoff_context(m.ctx, m.target, source=m.source),
            context.handoff_context, handoff_max,
        ),
    )
