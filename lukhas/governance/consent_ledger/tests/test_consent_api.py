from __future__ import annotations

import pytest

from lukhas.errors import InvalidRequest, PayloadTooLarge, RuntimeNotBound
from lukhas.governance.consent_ledger import registry
from lukhas.governance.consent_ledger.api import (
    consent_status,
    record_consent,
    revoke_consent,
)
from lukhas.observability.tracing import bind_trace
from lukhas.testing import dry_run_settings, open_test_runtime


async def test_record_consent_null_provider_dryrun() -> None:
    async with open_test_runtime() as (_, matriz):
        out = await record_consent("usr_123", "gmail.read", {"just": "testing"})
        [node] = await matriz.take(1)
    assert out["ok"] is True
    assert out["provider"] == "null"
    assert out["entry"]["user_id"] == "usr_123"
    assert out["entry"]["scope"] == "gmail.read"
    assert out["entry"]["metadata"] == {"just": "testing"}
    assert node["type"] == "CONSENT"
    assert node["labels"][:2] == ["label:governance:record", "outcome:ok"]
    assert node["provenance"]["subject_pseudonym"].startswith("psn_")
    assert node["provenance"]["trace_id"] == out["entry"]["trace_id"]
    assert matriz.subjects == ["matriz.CONSENT.governance.record"]


async def test_traceparent_trace_id_becomes_entry_and_node_trace_id() -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with open_test_runtime() as (_, matriz):
        with bind_trace(trace):
            out = await record_consent("usr_9", "calendar.read")
        [node] = await matriz.take(1)
    assert out["entry"]["trace_id"] == trace
    assert node["provenance"]["trace_id"] == trace


async def test_same_user_same_pseudonym_different_users_differ() -> None:
    async with open_test_runtime() as (_, matriz):
        await record_consent("usr_a", "s1")
        await record_consent("usr_a", "s2")
        await record_consent("usr_b", "s1")
        a1, a2, b = await matriz.take(3)
    pseudonym = [n["provenance"]["subject_pseudonym"] for n in (a1, a2, b)]
    assert pseudonym[0] == pseudonym[1] != pseudonym[2]


@pytest.mark.parametrize(
    ("user_id", "scope", "metadata"),
    [
        ("", "gmail.read", None),
        ("usr_1", "", None),
        ("usr_1", "has space", None),
        ("usr_1", "a.*", None),
        (123, "gmail.read", None),
        ("usr_1", "gmail.read", ["not", "a", "dict"]),
        ("u" * 257, "gmail.read", None),
    ],
)
async def test_bad_input_raises_invalid_request_and_emits_error_node(
    user_id: object, scope: object, metadata: object
) -> None:
    async with open_test_runtime() as (_, matriz):
        with pytest.raises(InvalidRequest):
            await record_consent(user_id, scope, metadata)  # type: ignore[arg-type]
        [node] = await matriz.take(1)
    assert node["state"]["outcome"] == "error"


async def test_oversized_metadata_is_payload_too_large() -> None:
    async with open_test_runtime():
        with pytest.raises(PayloadTooLarge):
            await record_consent("usr_1", "gmail.read", {"blob": "x" * 10_000})


async def test_null_provider_has_no_ledger_to_read() -> None:
    async with open_test_runtime():
        revoked = await revoke_consent("usr_1", "gmail.read")
        status = await consent_status("usr_1", "gmail.read")
    assert revoked["ok"] is True and revoked["entry"]["action"] == "revoke"
    assert status == {
        "ok": False, "provider": "null", "reason": "no_ledger", "message": status["message"]
    }


class _FakeLedger:
    name = "fake"

    async def record(self, entry, *, idempotency_key):  # type: ignore[no-untyped-def]
        return {"ok": True, "provider": self.name, "entry": {"user_id": entry.user_id}}

    revoke = record

    async def status(self, user_id, scope):  # type: ignore[no-untyped-def]
        return {"ok": True, "status": "none"}

    async def history(self, user_id):  # type: ignore[no-untyped-def]
        return {"ok": True, "records": []}

    async def verify_chain(self, user_id):  # type: ignore[no-untyped-def]
        return {"ok": True, "valid": True, "length": 0}


@pytest.mark.parametrize(
    ("flag", "dry_run", "expected"),
    [(False, False, "null"), (True, True, "null"), (True, False, "fake")],
)
async def test_registered_provider_used_only_with_flag_and_outside_dry_run(
    flag: bool, dry_run: bool, expected: str
) -> None:
    registry.register(_FakeLedger())  # lacks the later operations
    try:
        settings = dry_run_settings(dry_run=dry_run, feature_governance_ledger=flag)
        async with open_test_runtime(settings):
            out = await record_consent("usr_1", "gmail.read")
    finally:
        registry.reset()
    assert out["provider"] == expected


async def test_calling_outside_a_runtime_is_a_clear_error() -> None:
    with pytest.raises(RuntimeNotBound, match="open_runtime"):
        await record_consent("usr_1", "gmail.read")
