"""workers/service/bootstrap.py wires the candidate providers only under their flags, never
in DRY_RUN."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from candidate.governance.consent_ledger.jetstream_ledger import (
    JetStreamConsentLedger,
    LedgerOptions,
)
from candidate.identity.passkey.fido2_mock import Fido2MockProvider
from lukhas.config import Settings
from lukhas.errors import ConfigError
from lukhas.governance.consent_ledger import registry as consent_registry
from lukhas.governance.consent_ledger.api import consent_status, record_consent
from lukhas.identity.passkey import registry as passkey_registry
from lukhas.identity.passkey.api import (
    passkey_challenge,
    passkey_registration_options,
    register_passkey,
    verify_passkey,
)
from lukhas.testing import open_test_runtime
from tests.candidate._support import PSEUDONYM_KEY, Names, Stack, nats_bus, nats_settings, user
from tests.candidate.authenticator import SoftAuthenticator, b64url, from_b64url
from workers.service.bootstrap import close_providers, unwire_providers, wire_providers

pytestmark = pytest.mark.nats


def _all_flags(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings, feature_governance_ledger=True, feature_identity_passkey=True
    )


async def test_flags_off_leave_the_null_providers(wired: Stack) -> None:
    uid = user()
    async with wired() as (runtime, _):
        # Nothing was registered: even with the flags on, the registries would answer null.
        flagged = _all_flags(runtime.settings)
        assert consent_registry.get_provider(flagged).name == "null"
        assert passkey_registry.get_provider(flagged).name == "null"
        assert (await record_consent(uid, "gmail.read"))["provider"] == "null"
        refused = await verify_passkey({"challenge": "abc"})
        assert refused == {**refused, "ok": False, "provider": "null", "reason": "no_verifier"}


async def test_flags_on_wire_the_real_providers(wired: Stack, names: Names) -> None:
    uid = user()
    async with wired(ledger=True, passkey=True) as (runtime, _):
        assert (await record_consent(uid, "gmail.read"))["provider"] == "jetstream"
        assert (await consent_status(uid, "gmail.read"))["status"] == "granted"
        assert (await passkey_challenge(uid))["provider"] == "webauthn"
        js = runtime.bus.jetstream()  # type: ignore[attr-defined]
        info = await js.stream_info(names.stream)
        assert info.config.num_replicas == runtime.settings.ledger_replicas == 1
        assert info.config.deny_delete and info.config.deny_purge
        challenges = await (await js.key_value(names.challenges_bucket)).status()
        assert challenges.ttl == runtime.settings.webauthn_challenge_ttl_s

        unwire_providers()
        assert (await record_consent(uid, "gmail.read"))["provider"] == "null"
        assert (await passkey_challenge(uid))["provider"] == "null"


async def test_closing_the_providers_hands_the_ledger_lease_back_with_a_checkpoint(
    wired: Stack, names: Names
) -> None:
    """A worker's graceful shutdown: the writer (lingering for an hour here) finishes, signs
    a checkpoint of what it appended and hands its lease back while the bus is open."""
    uid = user()
    async with wired(ledger=True, ledger_options={"linger_s": 3600.0}) as (runtime, _):
        recorded = await record_consent(uid, "gmail.read")
        kv = await runtime.bus.jetstream().key_value(names.tree_bucket)  # type: ignore[attr-defined]
        assert json.loads((await kv.get("lease")).value or b"{}")["owner"] != ""

        await close_providers()

        assert json.loads((await kv.get("lease")).value or b"{}")["owner"] == ""
        checkpoint = json.loads((await kv.get("checkpoint")).value or b"{}")
        assert checkpoint["last_seq"] == recorded["seq"] and checkpoint["size"] == 1
        assert (await record_consent(uid, "gmail.read"))["provider"] == "null"


async def test_one_flag_wires_only_its_slice(wired: Stack) -> None:
    uid = user()
    async with wired(passkey=True):
        assert (await record_consent(uid, "gmail.read"))["provider"] == "null"
        assert (await passkey_challenge(uid))["provider"] == "webauthn"


async def test_dry_run_wires_nothing_and_answers_null(nats_url: str, names: Names) -> None:
    uid = user()
    settings = _all_flags(nats_settings(nats_url, dry_run=True))
    async with nats_bus(nats_url, names) as bus:
        async with open_test_runtime(settings, bus=bus) as (runtime, _):
            await wire_providers(runtime, ledger_options=names.ledger_options())
            js = bus.jetstream()
            with pytest.raises(NotFoundError):
                await js.stream_info(names.stream)  # ensure() never ran
            # Whatever is registered, DRY_RUN answers with the null providers.
            ledger = JetStreamConsentLedger(
                bus, runtime.pseudonymize, LedgerOptions(**names.ledger_options())
            )
            consent_registry.register(ledger)
            passkey_registry.register(Fido2MockProvider(runtime.pseudonymize))
            assert consent_registry.get_provider(settings).name == "null"
            assert (await record_consent(uid, "gmail.read"))["provider"] == "null"
            reply = await verify_passkey({"challenge": "xyz"})
            assert reply == {"ok": True, "provider": "null", "challenge": "xyz"}


@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("FEATURE_GOVERNANCE_LEDGER", "feature_governance_ledger"),
        ("FEATURE_IDENTITY_PASSKEY", "feature_identity_passkey"),
    ],
)
async def test_a_flag_on_the_memory_bus_outside_dry_run_is_a_config_error(
    flag: str, field: str
) -> None:
    settings = Settings(offline=True, pseudonym_key=PSEUDONYM_KEY, **{field: True})
    async with open_test_runtime(settings) as (runtime, _):
        with pytest.raises(ConfigError) as caught:
            await wire_providers(runtime)
        assert caught.value.variable == flag and "JetStream" in str(caught.value)
        assert consent_registry.get_provider(settings).name == "null"
        assert passkey_registry.get_provider(settings).name == "null"


async def test_the_real_providers_need_a_stable_pseudonym_key(
    nats_url: str, names: Names
) -> None:
    settings = _all_flags(nats_settings(nats_url, pseudonym_key=None))
    async with nats_bus(nats_url, names) as bus:
        async with open_test_runtime(settings, bus=bus) as (runtime, _):
            with pytest.raises(ConfigError) as caught:
                await wire_providers(runtime, ledger_options=names.ledger_options())
            assert caught.value.variable == "LUKHAS_PSEUDONYM_KEYS"


async def test_wiring_is_all_or_nothing(nats_url: str, names: Names) -> None:
    settings = _all_flags(nats_settings(nats_url))
    async with nats_bus(nats_url, names) as bus:
        async with open_test_runtime(settings, bus=bus) as (runtime, _):
            with pytest.raises(ValueError, match="unknown passkey provider"):
                await wire_providers(
                    runtime,
                    passkey_provider="bogus",  # type: ignore[arg-type]
                    ledger_options=names.ledger_options(),
                )
            assert consent_registry.get_provider(settings).name == "null"


def _mock_assertion(authn: SoftAuthenticator, options: dict[str, Any]) -> dict[str, Any]:
    """The software authenticator's assertion, signed the fido2_mock way."""
    assertion = authn.get(options)
    response = assertion["response"]
    signature = Fido2MockProvider.sign(
        authn.credential_id,
        from_b64url(response["authenticatorData"]),
        from_b64url(response["clientDataJSON"]),
    )
    return {**assertion, "response": {**response, "signature": b64url(signature)}}


@pytest.mark.parametrize("bus", ["nats", "memory"])
async def test_fido2_mock_is_never_wired_by_configuration(
    nats_url: str, names: Names, bus: str
) -> None:
    """The mock's signatures are HMACs under a public seed: anyone can forge them. Naming it
    outside DRY_RUN is a startup error, from the environment and from the wiring alike."""
    with pytest.raises(ConfigError) as from_env:
        Settings.from_env({"LUKHAS_PASSKEY_PROVIDER": "fido2_mock"})
    assert from_env.value.variable == "LUKHAS_PASSKEY_PROVIDER"
    assert Settings.from_env(
        {"LUKHAS_PASSKEY_PROVIDER": "fido2_mock", "LUKHAS_DRY_RUN_MODE": "true"}
    ).passkey_provider == "fido2_mock"
    if bus == "nats":
        settings = nats_settings(nats_url, feature_identity_passkey=True)
    else:
        settings = Settings(
            offline=True, pseudonym_key=PSEUDONYM_KEY, feature_identity_passkey=True
        )
    async with nats_bus(nats_url, names) as nats:
        async with open_test_runtime(settings, bus=nats if bus == "nats" else None) as (rt, _):
            with pytest.raises(ConfigError) as wiring:
                await wire_providers(rt, passkey_provider="fido2_mock")
            assert wiring.value.variable == "LUKHAS_PASSKEY_PROVIDER"
            assert passkey_registry.get_provider(settings).name == "null"


async def test_fido2_mock_registered_explicitly_in_a_test() -> None:
    """Tests that need the mock register it themselves; it keeps the ceremony checks."""
    uid = user()
    authn = SoftAuthenticator()
    settings = Settings(offline=True, pseudonym_key=PSEUDONYM_KEY, feature_identity_passkey=True)
    async with open_test_runtime(settings) as (runtime, _):
        passkey_registry.register(Fido2MockProvider(runtime.pseudonymize))
        options = await passkey_registration_options(uid, None)
        assert options["provider"] == "fido2_mock"
        registered = await register_passkey(uid, authn.create(options["options"]))
        assert registered == {"ok": True, "provider": "fido2_mock", "credential_id": authn.id}
        challenge = await passkey_challenge(uid)
        assertion = _mock_assertion(authn, challenge["options"])
        verified = await verify_passkey(assertion)
        assert verified == {
            "ok": True, "provider": "fido2_mock", "credential_id": authn.id, "new_sign_count": 1
        }
        replay = await verify_passkey(assertion)
        assert replay["ok"] is False and replay["reason"] == "challenge_reused"
        forged = authn.get((await passkey_challenge(uid))["options"])  # a real ECDSA signature
        assert (await verify_passkey(forged))["reason"] == "bad_signature"


async def test_fido2_mock_is_deterministic() -> None:
    def pseudonymize(user_id: str) -> str:
        return "psn_" + hashlib.sha256(user_id.encode()).hexdigest()[:32]

    first, second = Fido2MockProvider(pseudonymize), Fido2MockProvider(pseudonymize)
    uid = user()
    a = [json.dumps(await first.challenge(uid), sort_keys=True) for _ in range(3)]
    b = [json.dumps(await second.challenge(uid), sort_keys=True) for _ in range(3)]
    assert a == b and len(set(a)) == 3
