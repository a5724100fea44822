"""Every MODULE_MANIFEST.json matches its schema and the code it describes."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from lukhas.manifest import (
    ModuleManifest,
    Slas,
    Slo,
    check_manifest,
    check_slo,
    load_manifest,
    manifest_paths,
)

PATHS = manifest_paths()


def test_the_three_slices_have_manifests() -> None:
    modules = {load_manifest(p).module for p in PATHS}
    assert modules == {
        "lukhas.governance.consent_ledger", "lukhas.identity.passkey",
        "lukhas.orchestration.context",
    }


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.parent.name)
def test_manifest_matches_the_code(path: Path) -> None:
    assert check_manifest(load_manifest(path)) == []


def test_the_plan_slas_and_emit_points() -> None:
    by_module = {m.module: m for m in map(load_manifest, PATHS)}
    assert by_module["lukhas.governance.consent_ledger"].slas.p95_ms == 50
    assert by_module["lukhas.identity.passkey"].slas.p95_ms == 30
    assert by_module["lukhas.orchestration.context"].slas.p95_ms == 250
    assert "CONSENT:governance:record" in by_module[
        "lukhas.governance.consent_ledger"].matriz_emit_points
    assert "DECISION:identity:passkey.verify" in by_module[
        "lukhas.identity.passkey"].matriz_emit_points
    assert by_module["lukhas.orchestration.context"].matriz_emit_points == [
        "CONTEXT:orchestration:handoff"]


def test_a_drifted_manifest_is_reported() -> None:
    good = load_manifest(next(p for p in PATHS if "consent_ledger" in str(p)))
    drifted = msgspec.structs.replace(
        good,
        capabilities=[*good.capabilities, "forget_everything"],
        matriz_emit_points=[*good.matriz_emit_points, "CONSENT:governance:forget"],
        feature_flag="FEATURE_NOT_A_FLAG",
    )
    problems = check_manifest(drifted)
    assert any("forget_everything is not a function" in p for p in problems)
    assert any("emit points differ" in p for p in problems)
    assert any("FEATURE_NOT_A_FLAG is not a setting" in p for p in problems)


def test_schema_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "MODULE_MANIFEST.json"
    bad.write_text('{"module": "lukhas.x", "owner": "@me", "capabilities": ["f"], '
                   '"feature_flag": "FEATURE_X", "dependencies": [], "slas": {"p95_ms": -1}, '
                   '"matriz_emit_points": ["X:a:b"], "acceptance_checklist": []}')
    with pytest.raises(msgspec.ValidationError, match=r"\$\.slas\.p95_ms"):
        load_manifest(bad)
    assert ModuleManifest.__struct_config__.forbid_unknown_fields


def test_every_manifest_has_an_slo_as_strict_as_its_sla() -> None:
    for manifest in map(load_manifest, PATHS):
        slo = manifest.slas.slo
        assert slo is not None, manifest.module
        assert 0.95 <= slo.objective < 1
        assert slo.latency_ms <= manifest.slas.p95_ms
        assert check_slo(manifest.slas) == []


@pytest.mark.parametrize(
    ("slo", "problem"),
    [
        (None, "slas.slo is missing"),
        (Slo(objective=0.9, latency_ms=50), "below 0.95"),
        (Slo(objective=0.99, latency_ms=80), "latency_ms 80 is over slas.p95_ms 50"),
    ],
)
def test_a_missing_or_loose_slo_fails_the_gate(slo: Slo | None, problem: str) -> None:
    good = load_manifest(next(p for p in PATHS if "consent_ledger" in str(p)))
    loose = msgspec.structs.replace(good, slas=Slas(p95_ms=50, slo=slo))
    problems = check_manifest(loose)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("slo", "field"),
    [
        ('{"objective": 1, "latency_ms": 5}', r"\$\.slas\.slo\.objective"),
        ('{"objective": 0, "latency_ms": 5}', r"\$\.slas\.slo\.objective"),
        ('{"objective": 0.99, "latency_ms": 0}', r"\$\.slas\.slo\.latency_ms"),
        ('{"objective": 0.99, "latency_ms": 5, "window": 1}', r"\$\.slas\.slo"),
    ],
)
def test_slo_schema_errors_name_the_field(tmp_path: Path, slo: str, field: str) -> None:
    bad = tmp_path / "MODULE_MANIFEST.json"
    bad.write_text('{"module": "lukhas.x", "owner": "@me", "capabilities": ["f"], '
                   '"feature_flag": "FEATURE_X", "dependencies": [], '
                   f'"slas": {{"p95_ms": 10, "slo": {slo}}}, '
                   '"matriz_emit_points": ["X:a:b"], "acceptance_checklist": []}')
    with pytest.raises(msgspec.ValidationError, match=field):
        load_manifest(bad)
