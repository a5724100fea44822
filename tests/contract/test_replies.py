"""Every subject answers in its published shapes, success and refusal/error, on the wire.

Real providers (the JetStream consent ledger, WebAuthn with a software authenticator) behind
the slice service on a real nats-server; then the DRY_RUN builtin providers. Each reply is
checked against the AsyncAPI document's reply schemas (strictly: no undeclared fields), and
each subject must have shown its success shape and at least one `ok: false` shape.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest

from bus import Bus
from candidate.governance.consent_ledger._state import scope_token
from lukhas import subjects
from lukhas.catalog import ENDPOINTS
from lukhas.config import Settings
from lukhas.runtime import Runtime
from lukhas.testing import dry_run_settings, open_test_runtime
from tests.candidate._support import Names, nats_bus, nats_settings, user
from tests.candidate.authenticator import SoftAuthenticator
from tests.contract._replies import current_audit
from workers.service import discovery
from workers.service.bootstrap import unwire_providers, wire_providers
from workers.service.slices import ERROR_CODE_HEADER, ERROR_HEADER, SliceService

Seen = list[tuple[str, bytes, dict[str, str]]]


class Client:
    """Sends requests and keeps every reply with its headers, for the contract checks."""

    def __init__(self, bus: Bus, runtime: Runtime) -> None:
        self._bus = bus
        self.runtime = runtime
        self.seen: Seen = []

    async def ask(self, subject: str, body: Any, **headers: str) -> dict[str, Any]:
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        reply = await self._bus.request(subject, data, headers=headers or None, timeout=10)
        self.seen.append((subject, reply.data, dict(reply.headers)))
        decoded: dict[str, Any] = msgspec.json.decode(reply.data)
        return decoded


@asynccontextmanager
async def serving(
    settings: Settings, bus: Bus | None = None, names: Names | None = None
) -> AsyncIterator[Client]:
    async with open_test_runtime(settings, bus=bus) as (runtime, _):
        if bus is not None:
            assert names is not None, "the real providers need the test's JetStream names"
            await wire_providers(
                runtime, ledger_options=names.ledger_options(),
                passkey_options=names.passkey_options(),
            )
        service = SliceService(runtime)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            try:
                yield Client(runtime.bus, runtime)
            finally:
                await service.stop()


def check(seen: Seen) -> dict[str, set[str]]:
    """Assert each reply conforms; return the published shapes seen per subject."""
    audit = current_audit()
    problems = [p for subject, data, hdrs in seen for p in audit.problems(subject, data, hdrs)]
    assert problems == []
    shapes: dict[str, set[str]] = defaultdict(set)
    for subject, data, _ in seen:
        matched = audit.matching(subject, data)
        assert matched, (subject, data)
        shapes[subject].update(matched)
    return shapes


@pytest.mark.nats
async def test_real_providers_answer_in_their_published_shapes(nats_url: str) -> None:
    names = Names(uuid.uuid4().hex[:10])
    settings = nats_settings(
        nats_url, feature_governance_ledger=True, feature_identity_passkey=True,
        handoff_rate=0.001, handoff_burst=1,
    )
    uid, authn = user(), SoftAuthenticator()
    try:
        async with nats_bus(nats_url, names) as bus, serving(settings, bus, names) as client:
            ask = client.ask
            # consent ledger
            rec = await ask(subjects.CONSENT_RECORD, {"user_id": uid, "scope": "gmail.read",
                                                      "idempotency_key": "k1"})
            assert rec["ok"] is True and rec["provider"] == "jetstream" and "seq" in rec, rec
            again = await ask(subjects.CONSENT_RECORD, {"user_id": uid, "scope": "gmail.read",
                                                        "idempotency_key": "k1"})
            assert again["duplicate"] is True
            conflict = await ask(subjects.CONSENT_RECORD, {"user_id": uid, "scope": "other",
                                                           "idempotency_key": "k1"})
            assert conflict["error"]["code"] == "idempotency_conflict"
            never = await ask(subjects.CONSENT_REVOKE, {"user_id": uid, "scope": "never"})
            assert never["reason"] == "not_granted" and never["ok"] is False
            assert (await ask(subjects.CONSENT_REVOKE, {"user_id": uid, "scope": "gmail.read"})
                    )["entry"]["action"] == "revoke"
            status = await ask(subjects.CONSENT_STATUS, {"user_id": uid, "scope": "gmail.read"})
            assert status["status"] == "revoked"
            history = await ask(subjects.CONSENT_HISTORY, {"user_id": uid})
            assert len(history["records"]) == 2
            chain = await ask(subjects.CONSENT_VERIFY, {"user_id": uid})
            assert chain["valid"] is True and chain["tree"]["problems"] == [], chain
            # the consent model's refusals
            renew = await ask(subjects.CONSENT_RECORD, {"user_id": uid, "scope": "maps",
                                                        "event": "renewed"})
            assert renew["reason"] == "not_given" and renew["event"] == "renewed", renew
            given = await ask(subjects.CONSENT_RECORD, {
                "user_id": uid, "scope": "maps", "metadata": {"ip": "192.0.2.1"},
                "controller": "Example Ltd", "notice": "https://example.com/n",
                "expires_at": 4_102_444_800_000})
            assert given["dpv"] == "dpv:ConsentGiven" and given["expires_at"], given
            already = await ask(subjects.CONSENT_RECORD, {"user_id": uid, "scope": "maps",
                                                          "event": "refused"})
            assert already["reason"] == "already_given", already
            # checkpoints, proofs, receipts
            cp = await ask(subjects.CONSENT_CHECKPOINT, {})
            assert cp["ok"] is True and cp["size"] >= 3 and cp["checkpoint"].startswith(
                cp["origin"]), cp
            kept = await ask(subjects.CONSENT_CHECKPOINT, {"size": 10**9})
            assert kept["reason"] == "no_such_checkpoint" and kept["size"] == 10**9, kept
            proof = await ask(subjects.CONSENT_PROOF, {"user_id": uid, "from_size": 1})
            assert proof["records"] == 3 and proof["bundle"]["consistency"], proof
            too_large = await ask(subjects.CONSENT_PROOF, {"user_id": uid, "from_size": 10**9})
            assert too_large["reason"] == "from_size_too_large", too_large
            receipt = await ask(subjects.CONSENT_RECEIPT, {"user_id": uid, "seq": rec["seq"]})
            assert receipt["ok"] is True and receipt["index"] == rec["index"], receipt
            elsewhere = await ask(subjects.CONSENT_RECEIPT, {"user_id": uid, "seq": 10**9})
            assert elsewhere["reason"] == "no_such_record", elsewhere
            # an insider appends a record without the ledger key: reported, never admitted
            pseudonym = client.runtime.pseudonymize(uid)
            forged = await bus.jetstream().publish(
                f"{names.subject_prefix}.{pseudonym}.{scope_token('gmail.read')}",
                b'{"action":"grant"}')
            status = await ask(subjects.CONSENT_STATUS, {"user_id": uid, "scope": "gmail.read"})
            assert status["unauthenticated_seqs"] == [forged.seq], status
            history = await ask(subjects.CONSENT_HISTORY, {"user_id": uid})
            assert history["records"][-1]["unauthenticated"] is True, history
            chain = await ask(subjects.CONSENT_VERIFY, {"user_id": uid})
            assert chain["valid"] is False and chain["refused"][0]["seq"] == forged.seq, chain
            proof = await ask(subjects.CONSENT_PROOF, {"user_id": uid})
            assert proof["refused_seqs"] == [forged.seq], proof
            unsigned = await ask(subjects.CONSENT_RECEIPT, {"user_id": uid, "seq": forged.seq})
            assert unsigned["reason"] == "unauthenticated", unsigned
            # erasure: the personal data is gone, the records (and their proofs) stay
            erased = await ask(subjects.CONSENT_ERASE, {"user_id": uid, "idempotency_key": "e"})
            assert erased["erased"] is True and erased["duplicate"] is False, erased
            assert (await ask(subjects.CONSENT_ERASE, {"user_id": uid, "idempotency_key": "e"})
                    )["duplicate"] is True
            history = await ask(subjects.CONSENT_HISTORY, {"user_id": uid})
            maps = [r for r in history["records"] if r.get("scope") == "maps"]
            assert maps[0]["erased"] is True and maps[0]["metadata"] is None, maps
            assert history["records"][-1]["event"] == "erased", history
            for subject in (subjects.CONSENT_RECORD, subjects.CONSENT_REVOKE,
                            subjects.CONSENT_STATUS, subjects.CONSENT_HISTORY,
                            subjects.CONSENT_VERIFY, subjects.CONSENT_PROOF,
                            subjects.CONSENT_ERASE, subjects.CONSENT_RECEIPT):
                bad = await ask(subject, {"user_id": ""})
                assert bad["error"]["code"] == "invalid_request"
            bad = await ask(subjects.CONSENT_CHECKPOINT, {"size": -1})
            assert bad["error"]["code"] == "invalid_request"
            huge = await ask(subjects.CONSENT_RECORD, b"{" + b" " * 100_000 + b"}")
            assert huge["error"]["code"] == "payload_too_large"

            # passkeys
            options = await ask(subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": uid})
            assert options["ok"] is True, options
            registered = await ask(subjects.PASSKEY_REGISTER_VERIFY,
                                   {"user_id": uid, "credential": authn.create(options["options"])})
            assert registered["credential_id"] == authn.id, registered
            replayed = await ask(subjects.PASSKEY_REGISTER_VERIFY,
                                 {"user_id": uid, "credential": authn.create(options["options"])})
            assert replayed["ok"] is False and "reason" in replayed
            challenge = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": uid})
            assertion = authn.get(challenge["options"])
            verified = await ask(subjects.PASSKEY_VERIFY, assertion)
            assert verified["ok"] is True and verified["user_id"] == uid, verified
            reused = await ask(subjects.PASSKEY_VERIFY, assertion)
            assert reused["reason"] == "challenge_reused", reused
            needs_grant = await ask(subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": uid})
            assert needs_grant["reason"] == "enrolment_grant_required"
            challenge_bad = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": 5})
            assert challenge_bad["error"]["code"] == "invalid_request"
            listed = await ask(subjects.PASSKEY_LIST, {"user_id": uid})
            assert [c["credential_id"] for c in listed["credentials"]] == [authn.id]
            assert (await ask(subjects.PASSKEY_LIST, {}))["error"]["code"] == "invalid_request"
            missing = await ask(subjects.PASSKEY_DELETE, {"user_id": uid, "credential_id": "AAAA"})
            assert missing["reason"] == "not_found"
            deleted = await ask(subjects.PASSKEY_DELETE,
                                {"user_id": uid, "credential_id": authn.id})
            assert deleted == {"ok": True, "provider": "webauthn", "deleted": True}
            assert (await ask(subjects.PASSKEY_VERIFY, b"[]"))["error"]["code"] == "invalid_request"

            # handoff: the bucket holds one, so the second is refused
            handoff = {"ctx": {"task": "plan"}, "target": "planner"}
            delivered = await ask(subjects.CONTEXT_HANDOFF, handoff,
                                  traceparent=f"00-{'ab' * 16}-{'cd' * 8}-01")
            assert delivered["ok"] is True and delivered["subject"] == "lukhas.context.planner"
            limited = await ask(subjects.CONTEXT_HANDOFF, handoff)
            assert limited["reason"] == "rate_limited" and limited["retry_after_ms"] >= 1
            bad_target = await ask(subjects.CONTEXT_HANDOFF, {"ctx": {}, "target": "a.b"})
            assert bad_target["error"]["code"] == "invalid_request"

            # service discovery
            for verb in discovery.VERBS:
                answer = await ask(discovery.control_subject(verb, subjects.SERVICE_NAME), b"")
                assert answer["type"] == f"io.nats.micro.v1.{verb.lower()}_response"
    finally:
        unwire_providers()

    shapes = check(client.seen)
    errors = [h for s, d, h in client.seen if b'"error"' in d]
    assert errors and all(ERROR_HEADER in h and ERROR_CODE_HEADER in h for h in errors)
    for endpoint in ENDPOINTS:
        seen = shapes[endpoint.subject]
        assert endpoint.reply[0].__name__ in seen, (endpoint.name, seen)
        assert seen & {"ErrorReply", *(t.__name__ for t in endpoint.reply[1:])}, endpoint.name
    for refusal in ("ConsentWriteRefusal", "CheckpointRefusal", "ProofRefusal",
                    "ReceiptRefusal", "PasskeyRefusal", "HandoffRefusal"):
        assert any(refusal in s for s in shapes.values()), refusal


async def test_builtin_providers_answer_in_their_published_shapes() -> None:
    """DRY_RUN: the null providers' echo, and their refusals for what they cannot do."""
    async with serving(dry_run_settings()) as client:
        ask = client.ask
        echoed = await ask(subjects.PASSKEY_VERIFY, {"challenge": "c1"})
        assert echoed == {"ok": True, "provider": "null", "challenge": "c1"}
        recorded = await ask(subjects.CONSENT_RECORD, {"user_id": "usr_1", "scope": "s"})
        assert recorded["entry"]["scope"] == "s" and "seq" not in recorded
        no_ledger = await ask(subjects.CONSENT_STATUS, {"user_id": "usr_1", "scope": "s"})
        assert no_ledger["reason"] == "no_ledger"
        for subject, body in ((subjects.CONSENT_CHECKPOINT, {}),
                              (subjects.CONSENT_PROOF, {"user_id": "usr_1"}),
                              (subjects.CONSENT_ERASE, {"user_id": "usr_1"}),
                              (subjects.CONSENT_RECEIPT, {"user_id": "usr_1", "seq": 1})):
            assert (await ask(subject, body))["reason"] == "no_ledger", subject
        for subject in (subjects.PASSKEY_REGISTER_OPTIONS, subjects.PASSKEY_CHALLENGE,
                        subjects.PASSKEY_LIST):
            refused = await ask(subject, {"user_id": "usr_1"})
            assert refused["reason"] == "no_verifier", refused
        delivered = await ask(subjects.CONTEXT_HANDOFF, {"ctx": {}})
        assert delivered["mode"] == "dryrun" and delivered["context_size"] == 0
    shapes = check(client.seen)
    assert "DryRunVerified" in shapes[subjects.PASSKEY_VERIFY]


def test_an_undeclared_field_or_shape_is_caught() -> None:
    """The audit is strict: what the document does not say is a problem."""
    audit = current_audit()
    ok = {"ok": True, "provider": "null", "challenge": "c"}
    assert audit.problems(subjects.PASSKEY_VERIFY, msgspec.json.encode(ok), {}) == []
    for bad in (
        {**ok, "debug": "stack trace"},  # an undeclared field
        {"ok": False, "reason": "because"},  # an undeclared reason
        {"ok": False, "error": {"code": "internal"}},  # no message
        {"ok": True},  # no shape
    ):
        assert audit.problems(subjects.PASSKEY_VERIFY, msgspec.json.encode(bad)), bad
    error = msgspec.json.encode({"ok": False, "error": {"code": "internal", "message": "m"}})
    assert audit.problems(subjects.PASSKEY_VERIFY, error, {}), "error reply without headers"
    assert audit.problems(subjects.PASSKEY_VERIFY, error, None) == []  # the Python API path
