"""A canary of the real JetStream consent ledger: wired with the flag off, sticky per data
subject, and what a rollback leaves behind (README, "Canary runs")."""

from __future__ import annotations

import dataclasses

import pytest

from lukhas.governance.consent_ledger import registry as consent_registry
from lukhas.governance.consent_ledger.api import consent_history, record_consent
from lukhas.testing import dry_run_settings, open_test_runtime
from tests.candidate._support import Stack, user
from workers.service.bootstrap import wire_providers

pytestmark = pytest.mark.nats


async def test_a_canary_wires_the_ledger_with_the_flag_off_and_keeps_each_user_on_one_arm(
    wired: Stack,
) -> None:
    users = [user() for _ in range(16)]
    async with wired(canary_governance_ledger=50.0) as (runtime, matriz):
        settings = runtime.settings
        assert settings.feature_governance_ledger is False
        assert consent_registry.REGISTRY.canary_state(settings)["state"] == "running"
        providers = {}
        for uid in users:
            first = await record_consent(uid, "gmail.read")
            second = await record_consent(uid, "calendar.read")
            assert first["provider"] == second["provider"], uid  # one user, one arm
            providers[uid] = first["provider"]
        histories = {uid: await consent_history(uid) for uid in users}
        nodes = await matriz.take(3 * len(users))
        canary = [u for u, p in providers.items() if p == "jetstream"]
        baseline = [u for u, p in providers.items() if p == "null"]
        assert canary and baseline and len(canary) + len(baseline) == len(users)
        # A canary user's whole history is in the ledger; a baseline user's reads stay on
        # the null provider too, never half in one place and half in the other.
        for uid in canary:
            records = histories[uid]["records"]
            assert [r["scope"] for r in records] == ["gmail.read", "calendar.read"]
        for uid in baseline:
            assert histories[uid]["provider"] == "null"
        arms = [x for n in nodes for x in n["labels"] if x.startswith("arm:")]
        assert arms.count("arm:canary") == 3 * len(canary)
        assert arms.count("arm:baseline") == 3 * len(baseline)

        # Rollback: the canary users' new writes go to the baseline; what the canary wrote
        # stays in the ledger (append-only: nothing is deleted), readable once the flag is on.
        assert consent_registry.REGISTRY.stop_canary("error_rate")
        assert (await record_consent(canary[0], "drive.read"))["provider"] == "null"
        full = dataclasses.replace(settings, feature_governance_ledger=True)
        kept = await consent_registry.REGISTRY.call(full, "history", canary[0])
    assert [r["scope"] for r in kept["records"]] == ["gmail.read", "calendar.read"]


async def test_dry_run_never_canaries() -> None:
    settings = dry_run_settings(canary_governance_ledger=100.0, canary_identity_passkey=100.0,
                                canary_orchestration_handoff=100.0)
    async with open_test_runtime(settings) as (runtime, _):
        await wire_providers(runtime)
        assert (await record_consent(user(), "gmail.read"))["provider"] == "null"
    assert consent_registry.REGISTRY.canary_state(settings)["state"] == "off"
    assert consent_registry.REGISTRY.get(
        dry_run_settings(feature_governance_ledger=True)
    ).name == "null"
