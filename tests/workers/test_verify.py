"""`lukhas verify` writes its artifact bundle and reports each gate (test suite skipped here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.tools.verify import (
    gate_manifests,
    gate_tests,
    gate_tests_from,
    run_verify,
    write_artifacts,
    write_system_status,
)

REPO = Path(__file__).resolve().parents[2]


def test_manifest_gate_passes_on_this_checkout() -> None:
    gate = gate_manifests()
    assert gate.passed, gate.reason
    assert len(gate.details["modules"]) == 3


@pytest.mark.nats
async def test_verify_writes_a_bundle_bound_to_the_commit(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = tmp_path / "LUKHAS_SYSTEM_STATUS.md"
    passed, artifacts = await run_verify(
        repo=REPO, out=lines.append, rate=100.0, duration_s=0.5, skip_tests=True,
        status_file=summary,
    )
    report = json.loads((artifacts / "verify.json").read_text())
    status = (artifacts / "STATUS.md").read_text()
    system = summary.read_text()
    assert f"commit `{report['commit']}" in system
    assert f"phase1-artifacts-{report['commit']}" in system
    for flag, module in (("FEATURE_GOVERNANCE_LEDGER", "lukhas.governance.consent_ledger"),
                         ("FEATURE_IDENTITY_PASSKEY", "lukhas.identity.passkey"),
                         ("FEATURE_ORCHESTRATION_HANDOFF", "lukhas.orchestration.context")):
        [row] = [line for line in system.splitlines() if line.startswith(f"| `{module}`")]
        result = report["gates"][4]["details"][module]
        assert f"`{flag}`=false" in row and "not run" in row
        assert f"{result['p95_ms']:.2f} / {result['sla_p95_ms']:g} ms" in row
        assert result["provider"] in row
    assert {report["gates"][4]["details"][m]["provider"] for m in (
        "lukhas.governance.consent_ledger", "lukhas.identity.passkey")} == {"null"}
    assert any("summary in" in line and str(summary) in line for line in lines)
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


def _tiny_repo(root: Path, body: str) -> Path:
    tests = root / "lukhas" / "governance" / "consent_ledger" / "tests"
    tests.mkdir(parents=True)
    for package in (root / "lukhas", root / "lukhas" / "governance", tests.parent, tests):
        (package / "__init__.py").write_text("")
    (tests / "test_tiny.py").write_text(body)
    (root / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    return root


async def test_tests_gate_fails_on_a_failing_test_with_pytests_exit_status(
    tmp_path: Path,
) -> None:
    repo = _tiny_repo(tmp_path / "repo", "def test_ok():\n    pass\n\n"
                      "def test_broken():\n    assert 1 == 2\n")
    gate = await gate_tests(repo, tmp_path)
    assert not gate.passed
    assert gate.reason.startswith("1 passed, 1 failed, 0 errors, 0 skipped")
    assert "pytest exited 1" in gate.reason
    per_slice = gate.details["per_slice"]["lukhas.governance.consent_ledger"]
    assert per_slice == {"passed": 1, "failed": 1, "errors": 0, "skipped": 0}
    # The same file, as `make test` leaves it for `make verify REUSE_TESTS=1`:
    reused = gate_tests_from(tmp_path / "junit.xml")
    assert not reused.passed and reused.details["failed"] == 1


async def test_tests_gate_fails_when_nothing_ran(tmp_path: Path) -> None:
    repo = _tiny_repo(tmp_path / "repo", "X = 1\n")
    gate = await gate_tests(repo, tmp_path)
    assert not gate.passed and "pytest exited 5" in gate.reason


def test_reused_junit_must_exist_and_pass(tmp_path: Path) -> None:
    missing = gate_tests_from(tmp_path / "junit.xml")
    assert not missing.passed and "missing" in missing.reason
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite tests="2">'
        '<testcase classname="lukhas.identity.passkey.tests.test_a" name="t1"/>'
        '<testcase classname="tests.test_b" name="t2"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    reused = gate_tests_from(tmp_path / "junit.xml")
    assert reused.passed
    assert reused.details["per_slice"] == {
        "lukhas.identity.passkey": {"passed": 1, "failed": 0, "errors": 0, "skipped": 0}
    }


def test_system_status_marks_a_breach_and_failed_gates(tmp_path: Path) -> None:
    module = "lukhas.orchestration.context"
    report = {
        "passed": False, "commit": "c0ffee" * 6 + "abcd", "dirty": True, "finished_at": "now",
        "gates": [
            {"name": "tests", "passed": True, "reason": "3 passed",
             "details": {"per_slice": {module: {"passed": 3, "failed": 0, "errors": 0,
                                                "skipped": 0}}}},
            {"name": "SLA (open loop)", "passed": False, "reason": "breach", "details": {
                module: {"p95_ms": 300.0, "sla_p95_ms": 250.0, "errors": 0,
                         "provider": "mode=dryrun"}}},
        ],
    }
    write_system_status(tmp_path / "S.md", report)
    text = (tmp_path / "S.md").read_text()
    [row] = [line for line in text.splitlines() if line.startswith(f"| `{module}`")]
    assert "3 passed, 0 failed" in row and "300.00 / 250 ms" in row and "BREACH" in row
    assert "mode=dryrun" in row and "`c0ffeec0ffee`" in row
    assert "| SLA (open loop) | FAIL | breach |" in text
    assert "with uncommitted changes" in text and "**FAIL**" in text
