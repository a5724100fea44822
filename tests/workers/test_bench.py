"""`lukhas bench` in quick mode: every section is there with sane numbers; speed never asserted."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from bus.server import find_nats_server
from lukhas.config import Settings
from workers.tools._bench_report import render
from workers.tools.bench import run_bench

pytestmark = pytest.mark.nats

SECTIONS = (
    "machine", "plan", "faststream", "throughput", "latency", "matriz",
    "handoff_limiter", "handoff", "ledger", "deployed", "targets", "notes",
)
SLICES = ("consent_record", "passkey_verify", "context_handoff")


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and (
        math.isfinite(value) and value > 0
    )


@pytest.fixture(scope="module")
def nats_binary() -> None:
    try:
        find_nats_server()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.usefixtures("unfrozen")  # the bench sets its process up as a worker's
async def test_quick_bench_reports_every_section(nats_binary: None) -> None:
    printed: list[str] = []
    results = await run_bench(
        Settings(), out=printed.append, json_output=True, duration_s=0.2, quick=True
    )

    assert len(printed) == 1, "JSON mode prints the JSON and nothing else"
    assert json.loads(printed[0]) == json.loads(json.dumps(results))
    assert all(section in results for section in SECTIONS)
    assert results["plan"]["quick"] is True

    throughput = results["throughput"]["slices"]
    latency = results["latency"]["slices"]
    assert sorted(throughput) == sorted(latency) == sorted(SLICES)
    for name in SLICES:
        row = throughput[name]
        assert positive(row["rps"]) and positive(row["echo_rps"])
        assert positive(row["ratio_vs_echo"])
        assert row["errors"] == 0 and row["echo_errors"] == 0
        if results["faststream"]["available"]:
            assert positive(row["ratio_vs_faststream"])
        else:
            assert row["ratio_vs_faststream"] is None
        lat = latency[name]
        assert all(positive(lat[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "echo_p95_ms"))
        assert lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
        assert positive(lat["ratio_p95_vs_echo"])
        assert positive(lat["sla_p95_ms"]) and positive(lat["p95_vs_sla"])
        assert lat["errors"] == 0

    matriz = results["matriz"]
    assert positive(matriz["ratio_vs_raw"]) and positive(matriz["emitter_nodes_per_s"])
    paced = matriz["paced"]
    assert "dropped" in paced and isinstance(paced["dropped"], int)
    assert paced["emitted"] == paced["calls"] > 0

    limiter = results["handoff_limiter"]
    assert limiter["accepted"] > 0 and limiter["rate_limited"] > 0
    assert limiter["accepted"] + limiter["rate_limited"] + limiter["other"] == limiter["offered"]
    assert positive(limiter["expected"])
    assert positive(limiter["decide_ns_allowed"]) and positive(limiter["decide_ns_refused"])

    assert positive(results["handoff"]["ratio_vs_raw"])
    assert results["handoff"]["errors"] == 0
    assert positive(results["ledger"]["ratio_vs_raw"])
    assert results["ledger"]["errors"] == 0

    deployed = results["deployed"]
    assert sorted(deployed["curves"]) == sorted(("echo", *SLICES))
    for name, points in deployed["curves"].items():
        assert points and all(p["sent"] > 0 and positive(p["p95_ms"]) for p in points), name
        assert all(sum(p["outcomes"].values()) + p["errors"] + p["incomplete"] == p["sent"]
                   for p in points)
        assert all(isinstance(p["generators_behind"], bool) for p in points)
    for name in SLICES:
        cpu = deployed["cpu"][name]
        assert cpu is None or positive(cpu["service_us"])  # /proc jiffies may read 0 in 0.3 s
    workers = deployed["workers"]
    assert positive(workers["one_rps"]) and positive(workers["two_rps"])
    assert positive(workers["echo_one_rps"]) and positive(workers["echo_two_rps"])
    assert workers["errors"] == 0
    assert workers["rounds"] and all(positive(r["ratio"]) for r in workers["rounds"])
    for per_request in workers["service_per_request"]:  # /proc may read 0 jiffies in 0.3 s
        assert per_request["cpu_us"] is None or per_request["cpu_us"] >= 0
        cut = per_request["requests_per_preemption"]
        assert cut is None or positive(cut)
    assert deployed["generators"] >= 2
    for name in SLICES:
        over = deployed["overload"][name]
        if over is None:  # no rate of the quick sweep was within the SLA: nothing to double
            assert deployed["capacity"][name] is None
            continue
        assert over["rate"] == 2 * deployed["capacity"][name]
        assert over["sent"] > 0 and isinstance(over["generators_behind"], bool)
        # Every request sent has one outcome: a reply, a timeout or another error.
        assert sum(over["outcomes"].values()) + over["errors"] + over["incomplete"] \
            == over["sent"]
        assert over["timeouts"] <= over["errors"]

    table = render(results)
    for label in (*SLICES, "MATRIZ emitter", "MATRIZ dropped", "handoff limiter",
                  "ledger appends", "deployed: consent_record ok/s", "deployed: ceiling",
                  "requests per worker preemption",
                  "targets:"):
        assert label in table

    names = {t["name"] for t in results["targets"]}
    assert "matriz.paced.dropped" in names and "handoff.limiter.accuracy" in names
    assert "deployed.consent_record.two_workers" in names
    # A target is judged (bool), or reported unjudged (None) with a note saying why.
    for t in results["targets"]:
        assert isinstance(t["passed"], bool) or (t["passed"] is None and t.get("note")), t
