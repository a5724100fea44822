"""WebAuthn passkeys against a real nats-server, with a software authenticator."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import anyio
import msgspec
import pytest
from nats.js.errors import KeyNotFoundError

from candidate.identity.passkey._ceremony import REASONS, user_handle
from candidate.identity.passkey._store import StoredCredential, credential_key
from candidate.identity.passkey.webauthn_provider import WebAuthnOptions, WebAuthnPasskeyProvider
from lukhas import subjects
from lukhas.identity.passkey import registry as passkey_registry
from lukhas.identity.passkey.api import (
    passkey_challenge,
    passkey_registration_options,
    register_passkey,
    verify_passkey,
)
from lukhas.runtime import Runtime
from tests.candidate._support import Names, Stack, user
from tests.candidate.authenticator import SoftAuthenticator, b64url, from_b64url
from workers.service.slices import SliceService

pytestmark = pytest.mark.nats


async def enrol(
    authn: SoftAuthenticator,
    uid: str,
    *,
    name: str | None = "Test User",
    grant: str | None = None,
    **create: Any,
) -> dict[str, Any]:
    """Registration options -> authenticator -> register, through the public API."""
    options = await passkey_registration_options(uid, name, enrolment_grant=grant)
    assert options["ok"] is True, options
    return await register_passkey(uid, authn.create(options["options"], **create))


async def enrol_another(
    authn: SoftAuthenticator, uid: str, existing: SoftAuthenticator, **create: Any
) -> dict[str, Any]:
    """Enrol a further passkey: log in with an existing one and present its grant."""
    verified = await login(existing, uid)
    assert verified["ok"] is True, verified
    return await enrol(authn, uid, grant=verified["enrolment_grant"], **create)


async def login(authn: SoftAuthenticator, uid: str | None = None, **get: Any) -> dict[str, Any]:
    """Challenge -> authenticator -> verify, through the public API."""
    challenge = await passkey_challenge(uid)
    assert challenge["ok"] is True, challenge
    return await verify_passkey(authn.get(challenge["options"], **get))


async def stored_credential(runtime: Runtime, names: Names, cred_id: bytes) -> StoredCredential:
    kv = await runtime.bus.jetstream().key_value(names.credentials_bucket)  # type: ignore[attr-defined]
    entry = await kv.get(credential_key(cred_id))
    return msgspec.json.decode(entry.value or b"", type=StoredCredential)


@pytest.mark.parametrize("fmt", ["none", "packed"])
@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
async def test_register_challenge_verify(wired: Stack, names: Names, alg: str, fmt: str) -> None:
    uid = user()
    authn = SoftAuthenticator(alg=alg)  # type: ignore[arg-type]
    async with wired(passkey=True) as (runtime, recorder):
        options = await passkey_registration_options(uid, "Ada")
        creation = options["options"]
        assert options["provider"] == "webauthn"
        assert creation["rp"]["id"] == "localhost"
        assert {p["alg"] for p in creation["pubKeyCredParams"]} == {-7, -8, -257}
        assert len(from_b64url(creation["challenge"])) == 32
        handle = from_b64url(creation["user"]["id"])
        assert handle == user_handle(runtime.pseudonymize(uid)) and uid.encode() not in handle
        assert creation["authenticatorSelection"]["userVerification"] == "required"

        registered = await register_passkey(uid, authn.create(creation, fmt=fmt))  # type: ignore[arg-type]
        assert registered["ok"] is True, registered
        assert registered["provider"] == "webauthn" and registered["credential_id"] == authn.id
        assert registered["attestation_format"] == fmt
        assert registered["user_handle"] == creation["user"]["id"]

        request = await passkey_challenge(uid)
        assert [c["id"] for c in request["options"]["allowCredentials"]] == [authn.id]
        assert request["options"]["rpId"] == "localhost"
        first = await verify_passkey(authn.get(request["options"]))
        grant = first.pop("enrolment_grant")
        assert first.pop("enrolment_grant_expires_at") > time.time() * 1000
        assert len(from_b64url(grant)) == 32
        assert first == {
            "ok": True, "provider": "webauthn", "credential_id": authn.id, "new_sign_count": 1,
            "user_handle": creation["user"]["id"], "user_id": uid,
            "backup_eligible": False, "backup_state": False,
        }
        second = await login(authn, uid)
        assert second["ok"] is True and second["new_sign_count"] == 2

        stored = await stored_credential(runtime, names, authn.credential_id)
        assert stored.sign_count == 2 and stored.pseudonym == runtime.pseudonymize(uid)
        assert stored.alg == {"ES256": -7, "RS256": -257, "EdDSA": -8}[alg]
        assert stored.transports == ["internal", "hybrid"]

        again = await passkey_registration_options(
            uid, "Ada", enrolment_grant=second["enrolment_grant"]
        )
        assert [c["id"] for c in again["options"]["excludeCredentials"]] == [authn.id]
        assert again["options"]["user"]["id"] == creation["user"]["id"]  # one handle per account

        nodes = await recorder.take(6)
        assert {n["type"] for n in nodes} == {"DECISION"}
        assert all("outcome:ok" in n["labels"] for n in nodes)


async def test_discoverable_login_without_a_user_id(wired: Stack) -> None:
    uid = user()
    authn = SoftAuthenticator()
    async with wired(passkey=True):
        assert (await enrol(authn, uid))["ok"] is True
        challenge = await passkey_challenge()
        assert challenge["options"]["allowCredentials"] == []
        reply = await verify_passkey(authn.get(challenge["options"]))
        assert reply["ok"] is True
        # A usernameless login still names the account, by the handle the app stored at
        # registration; no user id was given, so none is claimed.
        assert reply["user_handle"] == b64url(authn.user_handle or b"")
        assert "user_id" not in reply


async def test_full_flow_over_the_bus(wired: Stack) -> None:
    uid = user()
    authn = SoftAuthenticator(alg="EdDSA")
    encode = msgspec.json.encode

    async with wired(passkey=True) as (runtime, _):
        bus = runtime.bus

        async def ask(subject: str, body: Any) -> dict[str, Any]:
            reply = await bus.request(subject, encode(body), timeout=5)
            return msgspec.json.decode(reply.data)

        service = SliceService(runtime, concurrency=4)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(service.run)
                options = await ask(subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": uid})
                credential = authn.create(options["options"], fmt="packed")
                registered = await ask(
                    subjects.PASSKEY_REGISTER_VERIFY, {"user_id": uid, "credential": credential}
                )
                assert registered["ok"] is True and registered["credential_id"] == authn.id
                challenge = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": uid})
                assertion = authn.get(challenge["options"])
                verified = await ask(subjects.PASSKEY_VERIFY, assertion)
                assert verified == {
                    **verified, "ok": True, "provider": "webauthn", "credential_id": authn.id,
                    "new_sign_count": 1, "user_id": uid,
                    "user_handle": registered["user_handle"], "backup_state": False,
                }
                assert isinstance(verified["enrolment_grant"], str)
                replayed = await ask(subjects.PASSKEY_VERIFY, assertion)
                assert replayed["ok"] is False and replayed["reason"] == "challenge_reused"
                await service.stop()


async def test_every_refusal_reason_is_reached(wired: Stack) -> None:
    """One refusal of each kind; each emits a DECISION node that is not ok."""
    uid = user()
    authn = SoftAuthenticator()
    seen: list[str] = []

    async def refused(reply: dict[str, Any], reason: str) -> None:
        assert reply["ok"] is False, reply
        assert reply["provider"] == "webauthn" and reply["reason"] == reason, reply
        assert "usr_" not in reply.get("message", "")
        seen.append(reason)

    async with wired(passkey=True) as (_, recorder):
        assert (await enrol(authn, uid))["ok"] is True
        calls = 2

        await refused(await login(SoftAuthenticator(), uid), "unknown_credential")
        never_issued = b64url(secrets.token_bytes(32))
        await refused(await login(authn, uid, challenge=never_issued), "challenge_expired")
        challenge = await passkey_challenge(uid)
        assertion = authn.get(challenge["options"])
        assert (await verify_passkey(assertion))["ok"] is True
        await refused(await verify_passkey(assertion), "challenge_reused")
        await refused(await login(authn, uid, corrupt_signature=True), "bad_signature")
        await refused(await login(authn, uid, origin="https://evil.example"), "origin_mismatch")
        await refused(await login(authn, uid, rp_id="evil.example"), "rp_id_mismatch")
        await refused(await login(authn, uid, sign_count=1), "counter_regression")
        await refused(await login(authn, uid, user_verified=False), "user_not_verified")
        await refused(await login(authn, uid, kind="webauthn.create"), "invalid_assertion")
        calls += 2 * 9 + 1  # a challenge and a verify each, but the replay has no challenge

        assert set(seen) == REASONS
        nodes = await recorder.take(calls)
        verdicts = [n for n in nodes if "label:identity:passkey.verify" in n["labels"]]
        refusals = [n for n in verdicts if "outcome:refused" in n["labels"]]
        assert len(verdicts) == 10 and len(refusals) == 9
        labels = {label for n in refusals for label in n["labels"]}
        assert {label for label in labels if label.startswith("reason:")} == {
            f"reason:{r}" for r in REASONS
        }
        assert all(n["state"]["outcome"] == "refused" for n in refusals)


@pytest.mark.parametrize(
    ("get", "reason"),
    [
        ({"cross_origin": True}, "origin_mismatch"),
        ({"user_present": False}, "user_not_verified"),
        ({"user_handle": b"\x01" * 32}, "invalid_assertion"),
        # py_webauthn's clientDataJSON parser decodes leniently; no such challenge exists.
        ({"challenge": "!!not-base64!!"}, "challenge_expired"),
        ({"challenge": b64url(b"short")}, "challenge_expired"),
    ],
)
async def test_more_refusals(wired: Stack, get: dict[str, Any], reason: str) -> None:
    uid = user()
    authn = SoftAuthenticator()
    async with wired(passkey=True):
        assert (await enrol(authn, uid))["ok"] is True
        reply = await login(authn, uid, **get)
        assert reply["ok"] is False and reply["reason"] == reason, reply
        assert (await login(authn, uid))["ok"] is True  # the credential still works


@pytest.mark.parametrize(
    "assertion",
    [
        {},
        {"id": "abc", "rawId": "abc", "type": "public-key"},
        {"id": "abc", "rawId": "abd", "type": "public-key",
         "response": {"clientDataJSON": "", "authenticatorData": "", "signature": ""}},
        {"id": "abc", "rawId": "abc", "type": "password",
         "response": {"clientDataJSON": "", "authenticatorData": "", "signature": ""}},
    ],
)
async def test_malformed_assertions_are_refused(wired: Stack, assertion: dict[str, Any]) -> None:
    async with wired(passkey=True):
        reply = await verify_passkey(assertion)
        assert reply["ok"] is False and reply["reason"] == "invalid_assertion"


async def test_user_verification_can_be_optional(wired: Stack) -> None:
    uid = user()
    authn = SoftAuthenticator()
    async with wired(passkey=True, webauthn_require_uv=False):
        assert (await enrol(authn, uid, user_verified=False))["ok"] is True
        assert (await login(authn, uid, user_verified=False))["ok"] is True
        # Presence is never optional.
        reply = await login(authn, uid, user_present=False)
        assert reply["reason"] == "user_not_verified"


async def test_counter_rules(wired: Stack, names: Names) -> None:
    uid = user()
    counting = SoftAuthenticator()
    synced = SoftAuthenticator(alg="EdDSA", counter_step=0, backup_eligible=True, backed_up=True)
    async with wired(passkey=True) as (runtime, _):
        assert (await enrol(counting, uid))["ok"] is True
        assert (await enrol_another(synced, uid, counting))["ok"] is True

        # Zero on both sides is accepted, again and again (synced passkeys).
        for _ in range(3):
            reply = await login(synced, uid)
            assert reply["ok"] is True and reply["new_sign_count"] == 0
        stored = await stored_credential(runtime, names, synced.credential_id)
        assert stored.sign_count == 0 and stored.backup_eligible and stored.backed_up
        assert stored.device_type == "multi_device"

        # Growing counts are accepted; a jump is fine.
        assert (await login(counting, uid))["new_sign_count"] == 2
        assert (await login(counting, uid, sign_count=7))["new_sign_count"] == 7
        # Equal, lower or zero after a non-zero count: a possible clone.
        for count in (7, 3, 0):
            reply = await login(counting, uid, sign_count=count)
            assert reply["ok"] is False and reply["reason"] == "counter_regression"
        stored = await stored_credential(runtime, names, counting.credential_id)
        assert stored.sign_count == 7  # never overwritten by 0 or a lower count
        assert (await login(counting, uid, sign_count=8))["new_sign_count"] == 8


async def test_concurrent_verifies_of_one_challenge_have_one_winner(wired: Stack) -> None:
    uid = user()
    authn = SoftAuthenticator()
    replies: list[dict[str, Any]] = []
    async with wired(passkey=True):
        assert (await enrol(authn, uid))["ok"] is True
        challenge = await passkey_challenge(uid)
        assertion = authn.get(challenge["options"])

        async def submit() -> None:
            replies.append(await verify_passkey(assertion))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(submit)
        assert [r["ok"] for r in replies].count(True) == 1
        assert {r["reason"] for r in replies if not r["ok"]} == {"challenge_reused"}


async def test_a_challenge_expires_with_the_clock(wired: Stack, names: Names) -> None:
    uid = user()
    authn = SoftAuthenticator()
    now = [time.time()]
    async with wired(passkey=True) as (runtime, _):
        provider = WebAuthnPasskeyProvider(
            runtime.bus,
            runtime.pseudonymize,
            WebAuthnOptions(**names.passkey_options(challenge_ttl_s=30)),
            clock=lambda: now[0],
        )
        await provider.ensure()
        passkey_registry.register(provider)
        assert (await enrol(authn, uid))["ok"] is True
        challenge = await passkey_challenge(uid)
        now[0] += 31
        reply = await verify_passkey(authn.get(challenge["options"]))
        assert reply["ok"] is False and reply["reason"] == "challenge_expired"
        # A registration challenge expires the same way.
        newcomer = user()
        options = await passkey_registration_options(newcomer, None)
        now[0] += 31
        late = await register_passkey(newcomer, SoftAuthenticator().create(options["options"]))
        assert late["ok"] is False and late["reason"] == "challenge_expired"


async def test_the_bucket_ttl_removes_challenges(wired: Stack, names: Names) -> None:
    uid = user()
    authn = SoftAuthenticator()
    async with wired(passkey=True, passkey_options={"challenge_ttl_s": 1}) as (runtime, _):
        assert (await enrol(authn, uid))["ok"] is True
        challenge = await passkey_challenge(uid)
        kv = await runtime.bus.jetstream().key_value(names.challenges_bucket)  # type: ignore[attr-defined]
        key = challenge["options"]["challenge"]
        with anyio.fail_after(15):  # the server expires entries past the bucket's max age
            while True:
                try:
                    await kv.get(key)
                except KeyNotFoundError:
                    break
                await anyio.sleep(0.05)
        reply = await verify_passkey(authn.get(challenge["options"]))
        assert reply["ok"] is False and reply["reason"] == "challenge_expired"


async def test_registration_refusals(wired: Stack) -> None:
    uid, other = user(), user()
    async with wired(passkey=True):
        async def attempt(**create: Any) -> dict[str, Any]:
            return await enrol(SoftAuthenticator(alg="ES256"), uid, **create)

        cases = [
            ({"fmt": "packed", "bad_attestation_signature": True}, "bad_signature"),
            ({"origin": "https://evil.example"}, "origin_mismatch"),
            ({"rp_id": "evil.example"}, "rp_id_mismatch"),
            ({"user_verified": False}, "user_not_verified"),
            ({"user_present": False}, "user_not_verified"),
            ({"kind": "webauthn.get"}, "invalid_assertion"),
        ]
        for create, reason in cases:
            reply = await attempt(**create)
            assert reply["ok"] is False and reply["reason"] == reason, (create, reply)

        authn = SoftAuthenticator()
        options = await passkey_registration_options(uid, None)
        assert (await register_passkey(uid, authn.create(options["options"])))["ok"] is True
        # The same registration challenge cannot be used twice...
        reuse = await register_passkey(uid, SoftAuthenticator().create(options["options"]))
        assert reuse["reason"] == "challenge_reused"
        # ...nor can a credential id be registered twice...
        twice = await enrol_another(authn, uid, authn)
        assert twice["ok"] is False and twice["reason"] == "invalid_assertion"
        # ...nor a challenge issued to one user serve another...
        theirs = await passkey_registration_options(other, None)
        stolen = await register_passkey(uid, SoftAuthenticator().create(theirs["options"]))
        assert stolen["reason"] == "invalid_assertion"
        # ...nor an authentication challenge a registration.
        login_challenge = await passkey_challenge(uid)
        crossed = SoftAuthenticator().create(
            {**options["options"], "challenge": login_challenge["options"]["challenge"]}
        )
        assert (await register_passkey(uid, crossed))["reason"] == "invalid_assertion"
        assert (await register_passkey(uid, {"id": "x"}))["reason"] == "invalid_assertion"


async def test_a_challenge_for_one_user_does_not_serve_another(wired: Stack) -> None:
    alice, bob = user(), user()
    alices, bobs = SoftAuthenticator(), SoftAuthenticator()
    async with wired(passkey=True):
        assert (await enrol(alices, alice))["ok"] is True
        assert (await enrol(bobs, bob))["ok"] is True
        challenge = await passkey_challenge(alice)
        reply = await verify_passkey(bobs.get(challenge["options"]))
        assert reply["ok"] is False and reply["reason"] == "invalid_assertion"


async def test_no_raw_user_id_is_stored(wired: Stack, names: Names) -> None:
    uid = user()
    authn = SoftAuthenticator()
    async with wired(passkey=True) as (runtime, _):
        assert (await enrol(authn, uid, name=None))["ok"] is True
        assert (await login(authn, uid))["ok"] is True
        js = runtime.bus.jetstream()  # type: ignore[attr-defined]
        for bucket in (names.credentials_bucket, names.challenges_bucket):
            kv = await js.key_value(bucket)
            for key in await kv.keys():
                assert uid not in key
                entry = await kv.get(key)
                assert uid.encode() not in (entry.value or b"")
        stored = await stored_credential(runtime, names, authn.credential_id)
        assert from_b64url(stored.user_handle) == user_handle(runtime.pseudonymize(uid))


def test_long_credential_ids_get_a_hashed_key() -> None:
    short, long = b"\x01" * 64, b"\x02" * 600
    assert credential_key(short) == "cred." + b64url(short)
    assert credential_key(long) == "cred.h." + hashlib.sha256(long).hexdigest()
