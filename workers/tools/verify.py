"""`lukhas verify` (`make verify`): the acceptance gate, bound to the commit it ran on.

Each gate reports PASS/FAIL with its reason: ruff, the import-linter lane contract, every
MODULE_MANIFEST.json against its schema and the code, the test suite (counts), and the SLA
check, which drives each slice over a real nats-server at a fixed open-loop rate and
compares p95 with the manifest. Results go to `artifacts/<git sha>/verify.json` and a
readable `STATUS.md`, and the per-slice summary the promotion plan names goes to
`LUKHAS_SYSTEM_STATUS.md` at the repository root; any failed gate makes the command exit
non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from bus import NatsServer, open_nats_bus
from bus.server import find_nats_server
from lukhas import subjects
from lukhas.config import Settings
from lukhas.errors import ConfigError
from lukhas.manifest import check_manifest, load_manifest, manifest_paths
from lukhas.runtime import open_runtime
from workers.service.slices import SliceService
from workers.tools.loadgen import open_loop

Out = Callable[[str], None]
BIN = Path(sys.executable).parent

#: What the SLA check sends to each slice, keyed by the manifest's module.
SLA_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lukhas.governance.consent_ledger": (
        subjects.CONSENT_RECORD, {"user_id": "verify-user", "scope": "gate.check"}),
    "lukhas.identity.passkey": (subjects.PASSKEY_VERIFY, {"challenge": "verify"}),
    "lukhas.orchestration.context": (
        subjects.CONTEXT_HANDOFF, {"ctx": {"gate": "sla"}, "target": "verify"}),
}


@dataclasses.dataclass
class Gate:
    name: str
    passed: bool
    reason: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


async def _run(cmd: list[str], cwd: Path) -> tuple[int, str]:
    result = await anyio.run_process(cmd, cwd=cwd, check=False, stderr=subprocess.STDOUT)
    return result.returncode, result.stdout.decode(errors="replace")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


async def gate_ruff(repo: Path) -> Gate:
    code, output = await _run([str(BIN / "ruff"), "check", "--output-format=concise", "."], repo)
    if code == 0:
        return Gate("ruff", True, "clean")
    lines = output.strip().splitlines()
    return Gate("ruff", False, "\n".join([lines[-1], *lines[:-1][:20]]))


async def gate_lane(repo: Path) -> Gate:
    code, output = await _run([str(BIN / "lint-imports"), "--no-cache"], repo)
    kept = output.count(" KEPT")
    reason = f"{kept} contract(s) kept" if code == 0 else _tail(output)
    return Gate("import-linter lane contract", code == 0, reason)


def gate_manifests() -> Gate:
    problems: dict[str, list[str]] = {}
    modules = []
    for path in manifest_paths():
        try:
            manifest = load_manifest(path)
        except msgspec.DecodeError as exc:
            problems[str(path)] = [f"schema: {exc}"]
            continue
        modules.append(manifest.module)
        if found := check_manifest(manifest):
            problems[manifest.module] = found
    reason = f"{len(modules)} manifest(s) match the code" if not problems else "; ".join(
        f"{module}: {' | '.join(found)}" for module, found in problems.items()
    )
    return Gate("manifests", not problems and bool(modules), reason or "no manifests found",
                {"modules": modules, "problems": problems})


def _empty_counts() -> dict[str, int]:
    return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}


def junit_counts(junit: Path) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(totals, per slice module) from a pytest JUnit XML file, counted per test case.

    A slice's tests are those in its own `tests/` package (`<module>.tests.*`).
    """
    totals = _empty_counts()
    per_module: dict[str, dict[str, int]] = {}
    modules = [m.module for m in map(load_manifest, manifest_paths())]
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag == "failure":
                outcome = "failed"
            elif child.tag == "error":
                outcome = "errors"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        totals[outcome] += 1
        classname = case.get("classname", "")
        for module in modules:
            if classname.startswith(f"{module}.tests."):
                per_module.setdefault(module, _empty_counts())[outcome] += 1
    return totals, per_module


def _counts_text(counts: dict[str, int]) -> str:
    return (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped")


def _tests_gate(junit: Path, exit_code: int | None, output: str, source: str) -> Gate:
    if not junit.exists():
        return Gate("tests", False, f"no test results: {junit} is missing ({source})",
                    {**_empty_counts(), "per_slice": {}})
    try:
        counts, per_slice = junit_counts(junit)
    except ET.ParseError as exc:
        return Gate("tests", False, f"{junit} is not JUnit XML: {exc}",
                    {**_empty_counts(), "per_slice": {}})
    # pytest's exit status decides when we ran it (1 failed, 2 interrupted, 5 no tests...);
    # a file from `make test` is judged by its cases.
    clean = counts["failed"] == counts["errors"] == 0
    passed = clean and counts["passed"] > 0 and (exit_code is None or exit_code == 0)
    reason = _counts_text(counts) + f" ({source})"
    if exit_code not in (None, 0):
        reason += f"; pytest exited {exit_code}"
    if not passed and output:
        reason += "\n" + _tail(output)
    return Gate("tests", passed, reason, {**counts, "per_slice": per_slice})


async def gate_tests(repo: Path, artifacts: Path) -> Gate:
    """Run the suite; the gate passes only if pytest exits 0 and some tests passed."""
    junit = artifacts / "junit.xml"
    junit.unlink(missing_ok=True)  # never count an earlier run's results
    code, output = await _run(
        [sys.executable, "-m", "pytest", "-q", f"--junitxml={junit}"], repo
    )
    return _tests_gate(junit, code, output, "pytest run by the gate")


def gate_tests_from(junit: Path) -> Gate:
    """The test gate from the JUnit XML `make test` wrote for this commit (CI runs it once)."""
    return _tests_gate(junit, None, "", f"from {junit.name} of `make test`")


async def gate_sla(rate: float, duration_s: float) -> Gate:
    """Drive each slice open-loop over a real nats-server; p95 must be within its SLA."""
    slas = {m.module: m.slas.p95_ms for m in map(load_manifest, manifest_paths())}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lukhas-verify-") as store:
        async with NatsServer(store_dir=store) as server:
            settings = Settings(
                dry_run=True, nats_url=server.url, pseudonym_key="verify-gate",
                handoff_rate=1e9, handoff_burst=1_000_000_000,
            )
            async with (
                open_nats_bus(server.url) as service_bus,
                open_nats_bus(server.url) as client,
                open_runtime(settings, bus=service_bus, producer="lukhas-verify") as runtime,
                anyio.create_task_group() as tg,
            ):
                service = SliceService(runtime)
                await tg.start(service.run)
                for module, (subject, body) in SLA_REQUESTS.items():
                    data = msgspec.json.encode(body)
                    sample = msgspec.json.decode((await client.request(subject, data,
                                                                       timeout=5)).data)
                    result = await open_loop(
                        _requester(client, subject, data), rate=rate, duration_s=duration_s
                    )
                    latency = result.latency
                    results[module] = {
                        "sla_p95_ms": slas.get(module, float("nan")),
                        "p50_ms": latency.percentile_ms(50),
                        "p95_ms": latency.percentile_ms(95),
                        "p99_ms": latency.percentile_ms(99),
                        "requests": result.sent,
                        "errors": result.errors,
                        "rate": rate,
                        "provider": str(sample.get("provider") or f"mode={sample.get('mode')}"),
                    }
                await service.stop()
    breaches = [
        f"{module}: p95 {r['p95_ms']:.2f} ms > SLA {r['sla_p95_ms']:g} ms"
        for module, r in results.items() if not r["p95_ms"] <= r["sla_p95_ms"] or r["errors"]
    ]
    reason = "; ".join(breaches) or ", ".join(
        f"{module.rsplit('.', 1)[-1]} p95 {r['p95_ms']:.2f}/{r['sla_p95_ms']:g} ms"
        for module, r in results.items()
    )
    return Gate(f"SLA (open loop, {rate:g} req/s for {duration_s:g} s)", not breaches, reason,
                results)


def write_system_status(path: Path, report: dict[str, Any]) -> None:
    """`LUKHAS_SYSTEM_STATUS.md`, as the promotion plan names it: per slice its flag, the
    provider that served the SLA run, its own tests, p95 against the SLA, and the gates,
    bound to the commit."""
    gates = {g["name"]: g for g in report["gates"]}
    tests = gates.get("tests", {}).get("details", {})
    per_slice = tests.get("per_slice", {})
    sla = next((g for g in report["gates"] if g["name"].startswith("SLA")), None)
    sla_details = (sla or {}).get("details", {})
    try:
        env: Settings | None = Settings.from_env()
    except ConfigError:
        env = None  # the flags column then says so; the gates above already ran
    commit = report["commit"] + (" (with uncommitted changes)" if report["dirty"] else "")
    lines = [
        "# LUKHAS system status",
        "",
        f"Written by `make verify` (`lukhas verify`) at {report['finished_at']} on commit "
        f"`{commit}`. Acceptance gate: **{'PASS' if report['passed'] else 'FAIL'}**. "
        f"Artifacts: `artifacts/{report['commit']}/` (CI uploads them as "
        f"`phase1-artifacts-{report['commit']}`).",
        "",
        "| slice | flag | provider (SLA run) | slice tests | p95 / SLA p95 | SLA | commit |",
        "|---|---|---|---|---|---|---|",
    ]
    for manifest in map(load_manifest, manifest_paths()):
        flag = manifest.feature_flag
        value = getattr(env, flag.lower(), None)
        flag_text = f"`{flag}`=" + (
            "(bad environment)" if env is None else "true" if value else "false"
        )
        counts = per_slice.get(manifest.module)
        if tests.get("skipped_gate"):
            tests_text = "not run"
        elif counts is None:
            tests_text = "none found"
        else:
            tests_text = f"{counts['passed']} passed, {counts['failed'] + counts['errors']} failed"
        result = sla_details.get(manifest.module)
        if result is None:
            p95_text, verdict, provider = "-", "not measured", "-"
        else:
            p95_text = f"{result['p95_ms']:.2f} / {result['sla_p95_ms']:g} ms"
            ok = result["p95_ms"] <= result["sla_p95_ms"] and not result["errors"]
            verdict = "within" if ok else "BREACH"
            provider = result.get("provider", "-")
        lines.append(f"| `{manifest.module}` | {flag_text} | {provider} | {tests_text} | "
                     f"{p95_text} | {verdict} | `{report['commit'][:12]}` |")
    lines += ["", "| gate | result | reason |", "|---|---|---|"]
    lines += [f"| {g['name']} | {'PASS' if g['passed'] else 'FAIL'} | "
              f"{g['reason'].splitlines()[0] if g['reason'] else ''} |" for g in report["gates"]]
    lines += [
        "",
        "The SLA run uses the builtin providers (DRY_RUN) over a real nats-server; flags are "
        "as this environment sets them. Regenerate with `make verify`.",
    ]
    path.write_text("\n".join(lines) + "\n")


def _requester(bus: Any, subject: str, data: bytes) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        reply = await bus.request(subject, data, timeout=5)
        if b'"ok":true' not in reply.data:
            raise RuntimeError(f"{subject} answered {reply.data[:120]!r}")

    return call


def git_commit(repo: Path) -> tuple[str, bool]:
    """(sha, dirty) of the checkout, or ("unversioned", False) outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=repo,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unversioned", False
    return sha, dirty


def machine_facts() -> dict[str, Any]:
    version = subprocess.run([find_nats_server(), "--version"], capture_output=True,
                             text=True).stdout.strip()
    memory_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                      .splitlines() if line.startswith("MemTotal")), 0) \
        if Path("/proc/meminfo").exists() else 0
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "nats_server": version,
    }


def write_artifacts(directory: Path, report: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "verify.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# LUKHAS acceptance gate: {'PASS' if report['passed'] else 'FAIL'}",
        "",
        f"Commit `{report['commit']}`{' (with uncommitted changes)' if report['dirty'] else ''}, "
        f"{report['finished_at']}, {report['duration_s']:.1f} s.",
        "",
        "| gate | result | reason |",
        "|---|---|---|",
        *[f"| {g['name']} | {'PASS' if g['passed'] else 'FAIL'} | "
          f"{g['reason'].splitlines()[0] if g['reason'] else ''} |" for g in report["gates"]],
    ]
    sla = next((g for g in report["gates"] if g["name"].startswith("SLA")), None)
    if sla and sla["details"]:
        lines += ["", "| slice | p50 ms | p95 ms | p99 ms | SLA p95 ms | requests |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{r['sla_p95_ms']:g} | {r['requests']} |" for m, r in sla["details"].items()]
    facts = report["machine"]
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items())]
    (directory / "STATUS.md").write_text("\n".join(lines) + "\n")


async def run_verify(
    *, repo: Path, out: Out, rate: float = 200.0, duration_s: float = 5.0,
    skip_tests: bool = False, junit: Path | None = None,
    status_file: Path | None = None,
) -> tuple[bool, Path]:
    """Run every gate; returns (all passed, artifact directory).

    Args:
        junit: take the test gate from this JUnit XML instead of running the suite.
        status_file: where LUKHAS_SYSTEM_STATUS.md goes (default: the repository root).
    """
    started = time.monotonic()
    sha, dirty = git_commit(repo)
    artifacts = repo / "artifacts" / sha
    artifacts.mkdir(parents=True, exist_ok=True)
    gates: list[Gate] = []

    def record(gate: Gate) -> None:
        gates.append(gate)
        out(f"{'PASS' if gate.passed else 'FAIL'}  {gate.name}: {gate.reason.splitlines()[0]}")
        for line in gate.reason.splitlines()[1:]:
            out(f"      {line}")

    record(await gate_ruff(repo))
    record(await gate_lane(repo))
    record(gate_manifests())
    if skip_tests:
        record(Gate("tests", True, "skipped (--skip-tests)", {"skipped_gate": True}))
    elif junit is not None:
        record(gate_tests_from(junit))
    else:
        record(await gate_tests(repo, artifacts))
    record(await gate_sla(rate, duration_s))
    passed = all(g.passed for g in gates)
    report = {
        "passed": passed,
        "commit": sha,
        "dirty": dirty,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": time.monotonic() - started,
        "gates": [dataclasses.asdict(g) for g in gates],
        "machine": machine_facts(),
    }
    write_artifacts(artifacts, report)
    status = status_file or repo / "LUKHAS_SYSTEM_STATUS.md"
    write_system_status(status, report)
    out(f"{'PASS' if passed else 'FAIL'}: artifacts in {artifacts}, summary in {status}")
    return passed, artifacts
