"""`lukhas verify` writes its artifact bundle and reports each gate (test suite skipped here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.verify import gate_manifests, run_verify, write_artifacts

REPO = Path(__file__).resolve().parents[2]


def test_manifest_gate_passes_on_this_checkout() -> None:
    gate = gate_manifests()
    assert gate.passed, gate.reason
    assert len(gate.details["modules"]) == 3


@pytest.mark.nats
async def test_verify_writes_a_bundle_bound_to_the_commit(tmp_path: Path) -> None:
    lines: list[str] = []
    passed, artifacts = await run_verify(
        repo=REPO, out=lines.append, rate=100.0, duration_s=0.5, skip_tests=True
    )
    report = json.loads((artifacts / "verify.json").read_text())
    status = (artifacts / "STATUS.md").read_text()
    assert artifacts.name == report["commit"]
    names = [g["name"] for g in report["gates"]]
    assert names[:4] == ["ruff", "import-linter lane contract", "manifests", "tests"]
    sla = report["gates"][4]
    assert sla["name"].startswith("SLA")
    for module in ("lukhas.governance.consent_ledger", "lukhas.identity.passkey",
                   "lukhas.orchestration.context"):
        result = sla["details"][module]
        assert result["requests"] == 50 and result["errors"] == 0
        assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert report["machine"]["cpus"] and "nats-server" in report["machine"]["nats_server"]
    assert ("PASS" if report["passed"] else "FAIL") in status.splitlines()[0]
    assert passed == report["passed"]
    assert any(line.startswith(("PASS", "FAIL")) for line in lines)


def test_status_marks_failed_gates(tmp_path: Path) -> None:
    report = {
        "passed": False, "commit": "abc", "dirty": False, "finished_at": "now",
        "duration_s": 1.0, "machine": {"cpus": 2},
        "gates": [{"name": "ruff", "passed": False, "reason": "Found 1 error.\nx", "details": {}}],
    }
    write_artifacts(tmp_path, report)
    status = (tmp_path / "STATUS.md").read_text()
    assert "| ruff | FAIL | Found 1 error. |" in status
