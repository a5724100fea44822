"""deploy/: the Prometheus rules pass promtool and the Grafana dashboard uses real series."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.workers._promtool import promtool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "lukhas-slo-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "lukhas-slo-dashboard.json"

#: Every family the observability worker's /metrics serves (tests/workers check the text).
EXPORTED = {
    "lukhas_matriz_nodes_total", "lukhas_matriz_errors_total", "lukhas_slo_events_total",
    "lukhas_slo_bad_events_total", "lukhas_matriz_latency_seconds_bucket",
    "lukhas_matriz_sla_p95_seconds", "lukhas_slo_objective",
    "lukhas_slo_error_budget_remaining_ratio", "lukhas_slo_alert_firing",
}


async def test_rules_pass_promtool() -> None:
    check = await promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 15 rules found" in check.stdout


async def test_fast_burn_rule_fires_and_a_blip_does_not(tmp_path: Path) -> None:
    """promtool's rule unit test: 20 % bad for 1h pages; 100 % bad for 2 min does not."""
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'lukhas_slo_events_total{emit_point="A:x:y",instance="w1"}',
                 "values": "0+100x70"},
                {"series": 'lukhas_slo_bad_events_total{emit_point="A:x:y",instance="w1"}',
                 "values": "0+20x70"},
                {"series": 'lukhas_slo_objective{emit_point="A:x:y",instance="w1"}',
                 "values": "0.99x70"},
                {"series": 'lukhas_slo_events_total{emit_point="B:x:y",instance="w1"}',
                 "values": "0+1000x70"},
                {"series": 'lukhas_slo_bad_events_total{emit_point="B:x:y",instance="w1"}',
                 "values": "0x67 1000 2000 2000"},
                {"series": 'lukhas_slo_objective{emit_point="B:x:y",instance="w1"}',
                 "values": "0.99x70"},
            ],
            "alert_rule_test": [{
                "eval_time": "70m",
                "alertname": "LukhasSloFastBurn",
                "exp_alerts": [{
                    "exp_labels": {"severity": "page", "emit_point": "A:x:y"},
                    "exp_annotations": {
                        "summary": "A:x:y burns its error budget at 20x (1h)",
                        "description": "Over 14.4x for 1h and 5m: 2% of a 30-day budget gone "
                                       "in an hour.",
                    },
                }],
            }],
        }],
    }
    path = tmp_path / "slo_test.yml"
    path.write_text(yaml.safe_dump(test))
    result = await promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_only_exported_or_recorded_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    recorded = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"]
                for r in g["rules"] if "record" in r}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(lukhas[:_][a-z0-9_:]+)", e)}
    assert used <= EXPORTED | recorded, used - EXPORTED - recorded
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for shown in ("Calls", "Errors", "p50 / p95 / p99 vs p95 SLA", "burn rate"):
        assert shown in titles
