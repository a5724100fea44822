"""The plan's extension point works as the plan shows it: `_wire()` plus `register(...)`."""

from __future__ import annotations

import dataclasses

from lukhas.governance.consent_ledger.api import record_consent, revoke_consent
from lukhas.testing import dry_run_settings, open_test_runtime
from tests.candidate._support import LEDGER_SIGNING_KEY, LEDGER_WRAPPING_KEY
from workers.service.bootstrap import unwire_providers, wire_module

PLAN_MODULE = "tests.candidate.plan_cloud_ledger"


async def test_a_record_only_provider_serves_record_and_refuses_the_rest() -> None:
    settings = dataclasses.replace(
        dry_run_settings(), dry_run=False, feature_governance_ledger=True,
        ledger_signing_key=LEDGER_SIGNING_KEY, ledger_wrapping_key=LEDGER_WRAPPING_KEY
    )
    try:
        async with open_test_runtime(settings) as (runtime, matriz):
            await wire_module(PLAN_MODULE, runtime)
            recorded = await record_consent("u1", "gmail.read")
            revoked = await revoke_consent("u1", "gmail.read")
            nodes = await matriz.take(2)
    finally:
        unwire_providers()
    assert recorded["ok"] is True and recorded["provider"] == "cloud"
    assert recorded["entry"].scope == "gmail.read"
    assert revoked == {
        "ok": False, "provider": "cloud", "reason": "not_supported",
        "message": "provider 'cloud' does not support revoke",
    }
    assert [n["state"]["outcome"] for n in nodes] == ["ok", "refused"]


async def test_under_dry_run_or_with_the_flag_off_the_null_provider_answers() -> None:
    try:
        async with open_test_runtime() as (runtime, _):
            await wire_module(PLAN_MODULE, runtime)
            assert (await record_consent("u1", "gmail.read"))["provider"] == "null"
    finally:
        unwire_providers()
