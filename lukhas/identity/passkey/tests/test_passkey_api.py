from __future__ import annotations

import pytest

from lukhas.errors import InvalidRequest, PayloadTooLarge
from lukhas.identity.passkey.api import passkey_challenge, verify_passkey
from lukhas.testing import dry_run_settings, open_test_runtime


async def test_passkey_verify_null_provider_dryrun() -> None:
    async with open_test_runtime() as (_, matriz):
        out = await verify_passkey({"challenge": "xyz"})
        [node] = await matriz.take(1)
    assert out["ok"] is True
    assert out["provider"] == "null"
    assert out["challenge"] == "xyz"
    assert node["type"] == "DECISION"
    assert node["labels"][0] == "label:identity:passkey.verify"
    assert matriz.subjects == ["matriz.DECISION.identity.passkey.verify"]


async def test_null_provider_fails_closed_outside_dry_run() -> None:
    async with open_test_runtime(dry_run_settings(dry_run=False)) as (_, matriz):
        out = await verify_passkey({"challenge": "xyz"})
        [node] = await matriz.take(1)
    assert out["ok"] is False
    assert out["reason"] == "no_verifier"
    assert node["state"]["outcome"] == "refused"
    assert "reason:no_verifier" in node["labels"]


async def test_null_provider_refuses_registration_and_challenges() -> None:
    async with open_test_runtime():
        out = await passkey_challenge("usr_1")
    assert out["ok"] is False and out["reason"] == "no_verifier"


@pytest.mark.parametrize("assertion", [None, "xyz", ["challenge"], {"challenge": 42}])
async def test_bad_assertions_are_invalid_requests(assertion: object) -> None:
    async with open_test_runtime():
        with pytest.raises(InvalidRequest):
            await verify_passkey(assertion)  # type: ignore[arg-type]


async def test_huge_assertion_is_payload_too_large() -> None:
    async with open_test_runtime():
        with pytest.raises(PayloadTooLarge):
            await verify_passkey({"challenge": "x", "pad": "y" * 40_000})
