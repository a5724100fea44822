"""The passkey path fails closed, and refuses replayed, tampered and cross-origin assertions.

Everything goes over the bus through the slice service, as an attacker's client would send
it. Without a real verifier outside DRY_RUN every passkey subject refuses. With the
WebAuthn provider wired (on a real nats-server), a software authenticator with real keys
enrols, then each attack is tried on a fresh challenge and refused for its exact reason;
afterwards the genuine credential still works and its counter moved only on successes.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from bus import Bus, open_memory_bus
from lukhas import subjects
from lukhas.config import Settings
from lukhas.runtime import open_runtime
from lukhas.testing import dry_run_settings
from tests.candidate._support import Names, nats_bus, nats_settings
from tests.candidate.authenticator import SoftAuthenticator, b64url, from_b64url
from workers.service.bootstrap import unwire_providers, wire_providers
from workers.service.slices import SliceService

Ask = Callable[[str, Any], Awaitable[dict[str, Any]]]


def asker(bus: Bus) -> Ask:
    async def ask(subject: str, body: Any) -> dict[str, Any]:
        reply = await bus.request(subject, json.dumps(body).encode(), timeout=10)
        return json.loads(reply.data)

    return ask


@asynccontextmanager
async def service_on(
    bus: Bus, settings: Settings, names: Names | None = None
) -> AsyncIterator[Ask]:
    unwire_providers()
    try:
        async with open_runtime(settings, bus=bus) as runtime:
            if names is not None:
                await wire_providers(runtime, passkey_options=names.passkey_options())
            service = SliceService(runtime, concurrency=4)
            async with anyio.create_task_group() as tg:
                await tg.start(service.run)
                yield asker(bus)
                await service.stop()
    finally:
        unwire_providers()


# -- fail closed -----------------------------------------------------------------------------

PASSKEY_CALLS = [
    (subjects.PASSKEY_VERIFY, {"challenge": "anything"}),
    (subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": "usr_fc"}),
    (subjects.PASSKEY_REGISTER_VERIFY, {"user_id": "usr_fc", "credential": {"id": "x"}}),
    (subjects.PASSKEY_CHALLENGE, {"user_id": "usr_fc"}),
]


@pytest.mark.parametrize("flag_on", [False, True], ids=["flag-off", "flag-on-no-provider"])
async def test_every_passkey_subject_refuses_outside_dry_run_without_a_verifier(
    flag_on: bool,
) -> None:
    settings = Settings(offline=True, pseudonym_key="k", feature_identity_passkey=flag_on)
    async with open_memory_bus() as bus, service_on(bus, settings) as ask:
        replies = [await ask(subject, body) for subject, body in PASSKEY_CALLS]
    for reply in replies:
        assert reply["ok"] is False, reply
        assert reply["provider"] == "null" and reply["reason"] == "no_verifier", reply


async def test_only_dry_run_lets_the_null_provider_accept() -> None:
    async with open_memory_bus() as bus, service_on(bus, dry_run_settings()) as ask:
        reply = await ask(subjects.PASSKEY_VERIFY, {"challenge": "c"})
    assert reply == {"ok": True, "provider": "null", "challenge": "c"}


def test_origins_read_from_the_environment_default_to_a_real_origin() -> None:
    """Workers build Settings from the environment; without LUKHAS_WEBAUTHN_ORIGINS every
    origin check must still compare against real origins (it raised TypeError instead)."""
    origins = Settings.from_env({}).webauthn_origins
    assert isinstance(origins, tuple) and origins == ("http://localhost:8000",)
    assert Settings.from_env({"LUKHAS_WEBAUTHN_ORIGINS": "https://a, https://b"}
                             ).webauthn_origins == ("https://a", "https://b")


# -- attacks against the WebAuthn provider ---------------------------------------------------


def tamper_auth_data(assertion: dict[str, Any]) -> dict[str, Any]:
    data = bytearray(from_b64url(assertion["response"]["authenticatorData"]))
    data[-1] ^= 0x01  # the signature counter, after signing
    assertion["response"]["authenticatorData"] = b64url(bytes(data))
    return assertion


def tamper_client_data(assertion: dict[str, Any]) -> dict[str, Any]:
    client = json.loads(from_b64url(assertion["response"]["clientDataJSON"]))
    client["tokenBinding"] = {"status": "present", "id": "forged"}  # still valid client data
    assertion["response"]["clientDataJSON"] = b64url(json.dumps(client).encode())
    return assertion


def tamper_signature(assertion: dict[str, Any]) -> dict[str, Any]:
    signature = bytearray(from_b64url(assertion["response"]["signature"]))
    signature[len(signature) // 2] ^= 0xFF
    assertion["response"]["signature"] = b64url(bytes(signature))
    return assertion


@pytest.mark.nats
async def test_replayed_tampered_and_cross_origin_assertions_are_refused(nats_url: str) -> None:
    uid, other = f"usr_attack_{secrets.token_hex(4)}", f"usr_other_{secrets.token_hex(4)}"
    names = Names(secrets.token_hex(5))
    authn = SoftAuthenticator()
    settings = nats_settings(nats_url, feature_identity_passkey=True)
    attempts: dict[str, dict[str, Any]] = {}
    async with nats_bus(nats_url, names) as bus, service_on(bus, settings, names) as ask:

        async def login(user: str | None = uid, **get: Any) -> dict[str, Any]:
            challenge = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": user})
            return authn.get(challenge["options"], **get)

        options = await ask(subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": uid})
        registration = authn.create(options["options"])
        enrolled = await ask(subjects.PASSKEY_REGISTER_VERIFY,
                             {"user_id": uid, "credential": registration})
        assert enrolled["ok"] is True, enrolled
        attempts["registration replayed"] = await ask(
            subjects.PASSKEY_REGISTER_VERIFY, {"user_id": uid, "credential": registration}
        )

        genuine = await login()
        first = await ask(subjects.PASSKEY_VERIFY, genuine)
        assert first["ok"] is True and first["new_sign_count"] == 1, first
        attempts["replayed"] = await ask(subjects.PASSKEY_VERIFY, genuine)
        attempts["tampered authenticatorData"] = await ask(
            subjects.PASSKEY_VERIFY, tamper_auth_data(await login()))
        attempts["tampered clientDataJSON"] = await ask(
            subjects.PASSKEY_VERIFY, tamper_client_data(await login()))
        attempts["tampered signature"] = await ask(
            subjects.PASSKEY_VERIFY, tamper_signature(await login()))
        attempts["other origin"] = await ask(
            subjects.PASSKEY_VERIFY, await login(origin="https://evil.example"))
        attempts["cross-origin iframe"] = await ask(
            subjects.PASSKEY_VERIFY, await login(cross_origin=True))
        attempts["other RP ID"] = await ask(
            subjects.PASSKEY_VERIFY, await login(rp_id="evil.example"))
        attempts["registration ceremony type"] = await ask(
            subjects.PASSKEY_VERIFY, await login(kind="webauthn.create"))
        attempts["another user's challenge"] = await ask(
            subjects.PASSKEY_VERIFY, await login(user=other))
        attempts["challenge never issued"] = await ask(
            subjects.PASSKEY_VERIFY, await login(challenge=b64url(secrets.token_bytes(32))))
        # A cloned key: another authenticator signs with the victim's credential id.
        clone = SoftAuthenticator(credential_id=authn.credential_id,
                                  user_handle=authn.user_handle)
        challenge = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": uid})
        attempts["other key, same credential id"] = await ask(
            subjects.PASSKEY_VERIFY, clone.get(challenge["options"]))

        last = await ask(subjects.PASSKEY_VERIFY, await login())

    expected = {
        "registration replayed": "challenge_reused",
        "replayed": "challenge_reused",
        "tampered authenticatorData": "bad_signature",
        "tampered clientDataJSON": "bad_signature",
        "tampered signature": "bad_signature",
        "other origin": "origin_mismatch",
        "cross-origin iframe": "origin_mismatch",
        "other RP ID": "rp_id_mismatch",
        "registration ceremony type": "invalid_assertion",
        "another user's challenge": "invalid_assertion",
        "challenge never issued": "challenge_expired",
        "other key, same credential id": "bad_signature",
    }
    got = {name: (reply["ok"], reply.get("reason")) for name, reply in attempts.items()}
    assert got == {name: (False, reason) for name, reason in expected.items()}
    # The genuine key still works; refused attempts never moved its counter past the
    # authenticator's own (each get() counted one more signature).
    assert last["ok"] is True and last["new_sign_count"] == authn.sign_count, last
