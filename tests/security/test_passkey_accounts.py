"""Passkey account attacks, over the bus through the slice service on a real nats-server.

Each test plays the attacker with real WebAuthn signatures (the software authenticator) and
raw nats-py access where an insider would have it: enrolment takeover, grants stolen, reused,
expired or read from KV, a deleted credential replayed, a flipped backup-eligibility flag,
a flood of usernameless challenges, and a pseudonym key rotation under existing passkeys.
Every refusal is asserted, and the legitimate path is shown to still work.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from bus.nats import NatsBus
from candidate.identity.passkey.webauthn_provider import WebAuthnOptions, WebAuthnPasskeyProvider
from lukhas import subjects
from lukhas.config import Settings
from lukhas.identity.passkey import registry as passkey_registry
from lukhas.runtime import open_runtime
from tests.candidate._support import PSEUDONYM_KEY, Names, nats_bus, nats_settings
from tests.candidate.authenticator import SoftAuthenticator, b64url
from workers.service.bootstrap import unwire_providers
from workers.service.slices import SliceService

pytestmark = pytest.mark.nats

Ask = Callable[[str, Any], Awaitable[dict[str, Any]]]
ROTATED_KEY = "rotated-candidate-pseudonym-key-9876543210"


@asynccontextmanager
async def serve(
    bus: NatsBus,
    names: Names,
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    **options: Any,
) -> AsyncIterator[Ask]:
    """The slice service with the WebAuthn provider on this test's buckets."""
    unwire_providers()
    try:
        async with open_runtime(settings, bus=bus) as runtime:
            provider = WebAuthnPasskeyProvider(
                bus, runtime.pseudonymize,
                WebAuthnOptions.from_settings(settings, **names.passkey_options(**options)),
                clock=clock,
            )
            await provider.ensure()
            passkey_registry.register(provider)
            service = SliceService(runtime, concurrency=4)

            async def ask(subject: str, body: Any) -> dict[str, Any]:
                reply = await bus.request(subject, json.dumps(body).encode(), timeout=10)
                return json.loads(reply.data)  # type: ignore[no-any-return]

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    await tg.start(service.run)
                    yield ask
                    await service.stop()
    finally:
        unwire_providers()


async def enrol(
    ask: Ask, authn: SoftAuthenticator, uid: str, grant: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": uid}
    if grant is not None:
        body["enrolment_grant"] = grant
    options = await ask(subjects.PASSKEY_REGISTER_OPTIONS, body)
    if not options["ok"]:
        return options
    return await ask(
        subjects.PASSKEY_REGISTER_VERIFY,
        {"user_id": uid, "credential": authn.create(options["options"])},
    )


async def login(ask: Ask, authn: SoftAuthenticator, uid: str | None, **get: Any) -> dict[str, Any]:
    challenge = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": uid} if uid else {})
    assert challenge["ok"] is True, challenge
    return await ask(subjects.PASSKEY_VERIFY, authn.get(challenge["options"], **get))


def uid(tag: str) -> str:
    return f"usr_{tag}_{secrets.token_hex(4)}"


def refused(reply: dict[str, Any]) -> tuple[bool, str | None]:
    return reply["ok"], reply.get("reason")


async def test_enrolment_takeover_needs_a_grant_of_that_account(nats_url: str) -> None:
    names = Names(secrets.token_hex(5))
    victim, attacker = uid("victim"), uid("attacker")
    victims_key, attackers_key = SoftAuthenticator(), SoftAuthenticator()
    rogue = SoftAuthenticator()
    now = [time.time()]
    settings = nats_settings(nats_url, feature_identity_passkey=True)
    async with nats_bus(nats_url, names) as bus, serve(
        bus, names, settings, clock=lambda: now[0], enrolment_ttl_s=60
    ) as ask:
        # Before the victim has a passkey, the attacker takes open registration options for
        # the victim's account (sign-up is the app's business) but does not finish them yet.
        early = await ask(subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": victim})
        assert early["ok"] is True
        first = await enrol(ask, victims_key, victim)
        assert first["ok"] is True, first
        assert (await enrol(ask, attackers_key, attacker))["ok"] is True
        attackers_grant = (await login(ask, attackers_key, attacker))["enrolment_grant"]

        attempts = {
            "no grant": await enrol(ask, rogue, victim),
            "made-up grant": await enrol(ask, rogue, victim, b64url(secrets.token_bytes(32))),
            "attacker's own grant": await enrol(ask, rogue, victim, attackers_grant),
            "stale open options": await ask(
                subjects.PASSKEY_REGISTER_VERIFY,
                {"user_id": victim, "credential": rogue.create(early["options"])},
            ),
        }
        # An insider reading the grant bucket sees only hashes, which are not grants.
        genuine = await login(ask, victims_key, victim)
        kv = await bus.jetstream().key_value(names.grants_bucket)
        stored_keys = await kv.keys()
        assert stored_keys and all(genuine["enrolment_grant"] not in k for k in stored_keys)
        attempts["grant key read from KV"] = await enrol(
            ask, rogue, victim, stored_keys[0].removeprefix("grant.")
        )
        # Options issued for one user do not register for another.
        theirs = await ask(subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": uid("fresh")})
        attempts["options of another user"] = await ask(
            subjects.PASSKEY_REGISTER_VERIFY,
            {"user_id": victim, "credential": rogue.create(theirs["options"])},
        )
        # The attacker's authenticator was never enrolled: it cannot pass the victim's login.
        attempts["rogue login"] = await login(ask, rogue, victim)

        # The victim's own grant works once, and only once.
        second = SoftAuthenticator()
        assert (await enrol(ask, second, victim, genuine["enrolment_grant"]))["ok"] is True
        attempts["grant reused"] = await enrol(ask, rogue, victim, genuine["enrolment_grant"])
        # An expired grant is refused.
        late = (await login(ask, victims_key, victim))["enrolment_grant"]
        now[0] += 61
        attempts["grant expired"] = await enrol(ask, rogue, victim, late)
        now[0] -= 61
        assert (await login(ask, second, victim))["ok"] is True

    assert {name: refused(reply) for name, reply in attempts.items()} == {
        "no grant": (False, "enrolment_grant_required"),
        "made-up grant": (False, "invalid_enrolment_grant"),
        "attacker's own grant": (False, "invalid_enrolment_grant"),
        "stale open options": (False, "enrolment_grant_required"),
        "grant key read from KV": (False, "invalid_enrolment_grant"),
        "options of another user": (False, "invalid_assertion"),
        "rogue login": (False, "unknown_credential"),
        "grant reused": (False, "invalid_enrolment_grant"),
        "grant expired": (False, "invalid_enrolment_grant"),
    }


async def test_concurrent_grant_spenders_have_one_winner(nats_url: str) -> None:
    names = Names(secrets.token_hex(5))
    user, authn = uid("race"), SoftAuthenticator()
    settings = nats_settings(nats_url, feature_identity_passkey=True)
    replies: list[dict[str, Any]] = []
    async with nats_bus(nats_url, names) as bus, serve(bus, names, settings) as ask:
        assert (await enrol(ask, authn, user))["ok"] is True
        grant = (await login(ask, authn, user))["enrolment_grant"]

        async def spend() -> None:
            replies.append(await ask(
                subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": user, "enrolment_grant": grant}
            ))

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(spend)
    assert [r["ok"] for r in replies].count(True) == 1
    assert {r["reason"] for r in replies if not r["ok"]} == {"invalid_enrolment_grant"}


async def test_verify_names_the_account(nats_url: str) -> None:
    names = Names(secrets.token_hex(5))
    user, authn = uid("who"), SoftAuthenticator()
    settings = nats_settings(nats_url, feature_identity_passkey=True)
    async with nats_bus(nats_url, names) as bus, serve(bus, names, settings) as ask:
        registered = await enrol(ask, authn, user)
        handle = registered["user_handle"]
        bound = await login(ask, authn, user)
        usernameless = await login(ask, authn, None)
        assert (await bus.jetstream().key_value(names.challenges_bucket)) is not None
        kv = await bus.jetstream().key_value(names.challenges_bucket)
        for key in await kv.keys():  # the sealed user id is never stored in the clear
            assert user.encode() not in ((await kv.get(key)).value or b"")
    assert bound["ok"] and bound["user_id"] == user and bound["user_handle"] == handle
    assert usernameless["ok"] and usernameless["user_handle"] == handle
    assert "user_id" not in usernameless


async def test_list_and_delete_passkeys(nats_url: str) -> None:
    names = Names(secrets.token_hex(5))
    alice, bob = uid("alice"), uid("bob")
    keep, lose, bobs = (
        SoftAuthenticator(),
        SoftAuthenticator(backup_eligible=True, alg="EdDSA"),
        SoftAuthenticator(),
    )
    settings = nats_settings(nats_url, feature_identity_passkey=True)
    async with nats_bus(nats_url, names) as bus, serve(bus, names, settings) as ask:
        assert (await enrol(ask, keep, alice))["ok"] is True
        grant = (await login(ask, keep, alice))["enrolment_grant"]
        assert (await enrol(ask, lose, alice, grant))["ok"] is True
        assert (await enrol(ask, bobs, bob))["ok"] is True
        assert (await login(ask, lose, alice))["ok"] is True

        listed = await ask(subjects.PASSKEY_LIST, {"user_id": alice})
        assert listed["ok"] is True
        by_id = {c["credential_id"]: c for c in listed["credentials"]}
        assert set(by_id) == {keep.id, lose.id}
        entry = by_id[lose.id]
        assert set(entry) == {
            "credential_id", "created", "last_used", "transports", "backup_eligible",
            "backup_state", "sign_count",
        }
        assert entry["backup_eligible"] is True and entry["backup_state"] is False
        assert entry["sign_count"] == 1 and entry["last_used"] >= entry["created"] > 0
        assert entry["transports"] == ["internal", "hybrid"]

        # A challenge signed before the delete is verified after it.
        pending = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": alice})
        signed_before = lose.get(pending["options"])

        cross = await ask(subjects.PASSKEY_DELETE, {"user_id": bob, "credential_id": lose.id})
        assert refused(cross) == (False, "not_found")
        unknown = await ask(
            subjects.PASSKEY_DELETE, {"user_id": alice, "credential_id": b64url(b"nope")}
        )
        assert refused(unknown) == (False, "not_found")
        deleted = await ask(subjects.PASSKEY_DELETE, {"user_id": alice, "credential_id": lose.id})
        assert deleted == {"ok": True, "provider": "webauthn", "deleted": True}
        again = await ask(subjects.PASSKEY_DELETE, {"user_id": alice, "credential_id": lose.id})
        assert refused(again) == (False, "not_found")

        listed = await ask(subjects.PASSKEY_LIST, {"user_id": alice})
        assert [c["credential_id"] for c in listed["credentials"]] == [keep.id]
        offered = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": alice})
        assert [c["id"] for c in offered["options"]["allowCredentials"]] == [keep.id]
        replays = {
            "signed before delete": await ask(subjects.PASSKEY_VERIFY, signed_before),
            "fresh, user-bound": await login(ask, lose, alice),
            "fresh, usernameless": await login(ask, lose, None),
        }
        assert {k: refused(v) for k, v in replays.items()} == {
            k: (False, "unknown_credential") for k in replays
        }
        # The raw user index no longer holds it, and bob's passkey was untouched.
        kv = await bus.jetstream().key_value(names.credentials_bucket)
        for key in await kv.keys():
            assert lose.id not in key
            assert lose.id.encode() not in ((await kv.get(key)).value or b"")
        assert (await login(ask, bobs, bob))["ok"] is True
        assert (await login(ask, keep, alice))["ok"] is True
        bad = await ask(subjects.PASSKEY_DELETE, {"user_id": alice})
        assert bad["ok"] is False and bad["error"]["code"] == "invalid_request"


async def test_backup_eligibility_is_fixed_and_backup_state_reported(nats_url: str) -> None:
    names = Names(secrets.token_hex(5))
    user = uid("backup")
    single = SoftAuthenticator()
    synced = SoftAuthenticator(backup_eligible=True, counter_step=0)
    settings = nats_settings(nats_url, feature_identity_passkey=True)
    async with nats_bus(nats_url, names) as bus, serve(bus, names, settings) as ask:
        assert (await enrol(ask, single, user))["ok"] is True
        grant = (await login(ask, single, user))["enrolment_grant"]
        assert (await enrol(ask, synced, user, grant))["ok"] is True

        single.backup_eligible = True  # a clone that claims to be a syncable credential
        flipped_on = await login(ask, single, user)
        single.backup_eligible = False
        synced.backup_eligible = False
        flipped_off = await login(ask, synced, user)
        synced.backup_eligible = True

        before = await login(ask, synced, user)
        synced.backed_up = True
        after = await login(ask, synced, user)
        listed = await ask(subjects.PASSKEY_LIST, {"user_id": user})
    for reply in (flipped_on, flipped_off):
        assert refused(reply) == (False, "invalid_assertion") and "BE" in reply["message"]
    assert before["ok"] and before["backup_state"] is False and before["backup_eligible"]
    assert after["ok"] and after["backup_state"] is True
    state = {c["credential_id"]: c["backup_state"] for c in listed["credentials"]}
    assert state == {single.id: False, synced.id: True}


async def test_anonymous_challenges_are_rate_limited_and_bounded(nats_url: str) -> None:
    names = Names(secrets.token_hex(5))
    settings = nats_settings(
        nats_url, feature_identity_passkey=True,
        passkey_challenge_rate=1.0, passkey_challenge_burst=5,
        passkey_challenge_global_rate=1.0, passkey_challenge_global_burst=8,
    )
    async with nats_bus(nats_url, names) as bus, serve(
        bus, names, settings, challenges_max_bytes=8192
    ) as ask:
        flood = [await ask(subjects.PASSKEY_CHALLENGE, {"source": "10.0.0.1"}) for _ in range(12)]
        assert [r["ok"] for r in flood] == [True] * 5 + [False] * 7
        for reply in flood[5:]:
            assert reply["reason"] == "rate_limited" and reply["retry_after_ms"] > 0
        # Another source has its own bucket, until the global one runs dry.
        others = [
            await ask(subjects.PASSKEY_CHALLENGE, {"source": f"10.0.1.{i}"}) for i in range(6)
        ]
        assert [r["ok"] for r in others] == [True] * 3 + [False] * 3
        assert all(r["reason"] == "rate_limited" for r in others[3:])
        # No source given: the "anonymous" bucket (the global one is empty by now).
        assert refused(await ask(subjects.PASSKEY_CHALLENGE, {})) == (False, "rate_limited")

        # Challenges bound to user ids are not rate limited here, but the bucket is bounded:
        # a flood of them is refused once it is full, and storage stays under the bound.
        kv_info = await bus.jetstream().stream_info(f"KV_{names.challenges_bucket}")
        assert kv_info.config.max_bytes == 8192 and kv_info.config.max_age == 120
        issued = refusals = 0
        for i in range(200):
            reply = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": f"usr_flood_{i}"})
            if reply["ok"]:
                issued += 1
            else:
                assert reply["reason"] == "rate_limited" and reply["retry_after_ms"] > 0
                refusals += 1
        state = (await bus.jetstream().stream_info(f"KV_{names.challenges_bucket}")).state
        assert state.bytes <= 8192 and refusals > 0 and 0 < issued < 200
        assert state.messages == issued + 8


async def test_passkeys_survive_a_pseudonym_key_rotation(nats_url: str) -> None:
    names = Names(secrets.token_hex(5))
    user, old, new = uid("rotate"), SoftAuthenticator(), SoftAuthenticator()
    before = nats_settings(nats_url, feature_identity_passkey=True)
    after = dataclasses.replace(
        before, pseudonym_key=ROTATED_KEY, pseudonym_previous_keys=(PSEUDONYM_KEY,)
    )
    async with nats_bus(nats_url, names) as bus:
        async with serve(bus, names, before) as ask:
            handle = (await enrol(ask, old, user))["user_handle"]
        async with serve(bus, names, after) as ask:
            listed = await ask(subjects.PASSKEY_LIST, {"user_id": user})
            assert [c["credential_id"] for c in listed["credentials"]] == [old.id]
            offered = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": user})
            assert [c["id"] for c in offered["options"]["allowCredentials"]] == [old.id]
            verified = await ask(subjects.PASSKEY_VERIFY, old.get(offered["options"]))
            assert verified["ok"] is True, verified
            assert verified["user_id"] == user and verified["user_handle"] == handle
            # The account still has a passkey: a new one needs a grant, which works.
            assert refused(await enrol(ask, new, user)) == (False, "enrolment_grant_required")
            added = await enrol(ask, new, user, verified["enrolment_grant"])
            assert added["ok"] is True and added["user_handle"] == handle
            assert (await login(ask, new, user))["ok"] is True
            deleted = await ask(
                subjects.PASSKEY_DELETE, {"user_id": user, "credential_id": old.id}
            )
            assert deleted["ok"] is True
            listed = await ask(subjects.PASSKEY_LIST, {"user_id": user})
            assert [c["credential_id"] for c in listed["credentials"]] == [new.id]
