"""The benchmark of the deployed shape: every part in a process of its own.

nats-server, the slice service (`lukhas worker slices`, DRY_RUN, as many as asked), a raw
nats-py echo responder (`_bench_echo`) and the load generator (`_bench_client`) each run
in their own process, as in production, so no measurement shares an event loop with what
it measures. It sweeps the offered load (open loop, latency from each scheduled send) to
find each slice's capacity (the highest rate whose p95 is within the slice's SLA), takes the
service's CPU per request against the echo's at the same rate, compares 1 and 2 slice workers
on consent.record (closed loop), offers 2x consent.record's capacity to show what overload
does, and draws the latency-vs-load curve (with matplotlib, the `bench` extra).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from bus import NatsServer
from lukhas import subjects

ECHO_SUBJECT = "bench.echo"
#: What each target is driven with (the slices answer in DRY_RUN with the null providers).
TARGETS: dict[str, tuple[str, dict[str, Any]]] = {
    "echo": (ECHO_SUBJECT, {"user_id": "bench-user", "scope": "gmail.read"}),
    "consent_record": (
        subjects.CONSENT_RECORD, {"user_id": "bench-user", "scope": "gmail.read"},
    ),
    "passkey_verify": (subjects.PASSKEY_VERIFY, {"challenge": "bench-challenge"}),
    "context_handoff": (
        subjects.CONTEXT_HANDOFF, {"ctx": {"task": "bench", "step": 1}, "target": "bench"},
    ),
}
#: The echo has no SLA of its own: it is held to the tightest slice SLA.
ECHO_SLA_MS = 30.0
CLIENT_TIMEOUT_S = 2.0
#: Where `lukhas bench` draws the curve the README shows.
DEFAULT_PLOT = Path("docs/bench-latency.png")


@dataclass(frozen=True, slots=True)
class DeployedPlan:
    rates: tuple[float, ...]
    step_s: float
    closed_s: float
    overload_s: float
    warmup: int


def deployed_plan(*, quick: bool) -> DeployedPlan:
    if quick:
        return DeployedPlan(rates=(200.0,), step_s=0.3, closed_s=0.3, overload_s=0.3,
                            warmup=50)
    return DeployedPlan(rates=(500.0, 1000.0, 2000.0, 3000.0, 4000.0, 6000.0, 8000.0),
                        step_s=2.0, closed_s=3.0, overload_s=3.0, warmup=500)


class _Child:
    """A child process whose first stdout line containing `ready` says it serves."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        assert self.proc.stdout is not None
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                if not sel.select(timeout_s):
                    raise RuntimeError(f"{self.proc.args} not ready in {timeout_s}s")
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"{self.proc.args} exited ({self.proc.poll()})")
                if "ready" in line:
                    return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _service_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUKHAS_", "FEATURE_"))}
    env.update({
        "NATS_URL": url,
        "LUKHAS_DRY_RUN_MODE": "true",
        "LUKHAS_PSEUDONYM_KEY": secrets.token_hex(32),
        "LUKHAS_HANDOFF_RATE": "1000000000",
        "LUKHAS_HANDOFF_BURST": "1000000000",
        "LUKHAS_HANDOFF_MAX_INFLIGHT": "1048576",
        "LUKHAS_METRICS_PORT": "0",
        "LUKHAS_LOG_LEVEL": "WARNING",
    })
    return env


@contextmanager
def _children(stack: ExitStack, args: list[str], env: dict[str, str]) -> Iterator[_Child]:
    child = _Child(args, env)
    stack.callback(child.stop)
    child.wait_ready()
    yield child


async def _run_client(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = await anyio.run_process(
        [sys.executable, "-m", "workers.tools._bench_client", json.dumps(jobs)],
        check=True, stderr=subprocess.PIPE,
    )
    return json.loads(done.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def _job(url: str, target: str, sla_ms: float, pids: dict[str, list[int]], **extra: Any
         ) -> dict[str, Any]:
    subject, body = TARGETS[target]
    return {"url": url, "subject": subject, "body": body, "echo": target == "echo",
            "sla_ms": sla_ms, "timeout_s": CLIENT_TIMEOUT_S, "cpu_pids": pids, **extra}


def _cpu_us_per_request(result: dict[str, Any], who: str) -> float | None:
    cpu = result["cpu_s"].get(who)
    done = result.get("completed") or 0
    return None if cpu is None or not done else round(cpu / done * 1e6, 1)


def _point(rate: float, r: dict[str, Any], who: str) -> dict[str, Any]:
    lat = r["latency"]
    return {
        "rate": rate, "achieved_rate": r["achieved_rate"], "sent": r["sent"],
        "p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "p99_ms": lat["p99_ms"],
        "timeouts": r["timeouts"], "outcomes": r["outcomes"],
        "ok_within_sla": r["ok_within_sla"],
        "cpu_us_per_request": _cpu_us_per_request(r, who),
    }


def _capacity(points: list[dict[str, Any]], sla_ms: float) -> float | None:
    good = [
        p["rate"] for p in points
        if p["p95_ms"] <= sla_ms and p["timeouts"] == 0
        and p["outcomes"].get("ok", 0) >= 0.99 * p["sent"]
    ]
    return max(good) if good else None


async def measure_deployed(
    plan: DeployedPlan, slas: dict[str, float], *, plot: Path | None
) -> dict[str, Any]:
    """Start the processes, sweep, compare workers, overload; return the section's results."""
    with ExitStack() as stack:
        server = NatsServer()
        await server.__aenter__()
        try:
            return await _measure(server, stack, plan, slas, plot)
        finally:
            stack.close()
            await server.__aexit__(None, None, None)


async def _measure(
    server: NatsServer, stack: ExitStack, plan: DeployedPlan, slas: dict[str, float],
    plot: Path | None,
) -> dict[str, Any]:
    url = server.url
    env = _service_env(url)
    worker_cmd = [sys.executable, "-m", "workers.cli.main", "worker", "slices"]
    echo_cmd = [sys.executable, "-m", "workers.tools._bench_echo", url, ECHO_SUBJECT]
    with _children(stack, echo_cmd, env) as echo, _children(stack, worker_cmd, env) as first:
        pids = {"echo": [echo.proc.pid], "service": [first.proc.pid],
                "nats_server": [server.pid] if server.pid else []}
        sla = {**slas, "echo": ECHO_SLA_MS}
        jobs = []
        for target in TARGETS:
            for rate in plan.rates:
                jobs.append(_job(url, target, sla[target], pids, mode="open", rate=rate,
                                 duration_s=plan.step_s, warmup=plan.warmup))
        jobs.append(_job(url, "consent_record", sla["consent_record"], pids, mode="closed",
                         duration_s=plan.closed_s, warmup=plan.warmup))
        results = await _run_client(jobs)
        curves: dict[str, list[dict[str, Any]]] = {}
        i = 0
        for target in TARGETS:
            who = "echo" if target == "echo" else "service"
            curves[target] = [_point(rate, results[i + k], who)
                              for k, rate in enumerate(plan.rates)]
            i += len(plan.rates)
        one_worker = results[i]
        capacity = {t: _capacity(curves[t], sla[t]) for t in TARGETS}

        base = capacity["consent_record"] or max(plan.rates)
        overload_rate = 2 * base
        [overload] = await _run_client([
            _job(url, "consent_record", sla["consent_record"], pids, mode="open",
                 rate=overload_rate, duration_s=plan.overload_s, warmup=plan.warmup)
        ])
        with _children(stack, worker_cmd, env) as second:
            pids2 = {**pids, "service": [first.proc.pid, second.proc.pid]}
            [two_workers] = await _run_client([
                _job(url, "consent_record", sla["consent_record"], pids2, mode="closed",
                     duration_s=plan.closed_s, warmup=plan.warmup)
            ])
    sla_ok = overload["answered_within_sla"]
    cpu = _cpu_comparison(curves)
    section = {
        "processes": "nats-server, slice worker(s), echo responder, load generator: one each",
        "step_s": plan.step_s,
        "slas_ms": sla,
        "curves": curves,
        "capacity": capacity,
        "cpu": cpu,
        "workers": {
            "one_rps": one_worker["throughput"], "two_rps": two_workers["throughput"],
            "ratio": round(two_workers["throughput"] / one_worker["throughput"], 3)
            if one_worker["throughput"] else None,
            "errors": one_worker["errors"] + two_workers["errors"],
            "service_cpu_s": [one_worker["cpu_s"].get("service"),
                              two_workers["cpu_s"].get("service")],
            "nats_server_cpu_s": [one_worker["cpu_s"].get("nats_server"),
                                  two_workers["cpu_s"].get("nats_server")],
            "seconds": plan.closed_s,
        },
        "overload": {
            "slice": "consent_record",
            "rate": overload_rate,
            "capacity": capacity["consent_record"],
            "sent": overload["sent"],
            "outcomes": overload["outcomes"],
            "timeouts": overload["timeouts"],
            "answered_within_sla": sla_ok,
            "answered_within_sla_pct": round(100 * sla_ok / overload["sent"], 1)
            if overload["sent"] else None,
            "goodput_rps": round(overload["ok_within_sla"] / plan.overload_s, 1),
            "goodput_vs_capacity": round(overload["ok_within_sla"] / plan.overload_s / base, 3),
            "p95_ms": overload["latency"]["p95_ms"],
        },
    }
    if plot is not None:
        section["plot"] = draw_curves(curves, sla, plot)
    return section


def _cpu_comparison(curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Service CPU per request against the echo's, at the highest rate both kept up with
    (sent at 97% of the offered rate or better, no timeouts): past saturation both batch
    more per wakeup, and the comparison would flatter whichever saturated first."""
    out: dict[str, Any] = {}

    def kept_up(p: dict[str, Any]) -> bool:
        return bool(p["timeouts"] == 0 and p["achieved_rate"] >= 0.97 * p["rate"]
                    and p["cpu_us_per_request"])

    echo = {p["rate"]: p for p in curves["echo"] if kept_up(p)}
    for target, points in curves.items():
        if target == "echo":
            continue
        shared = [p for p in points if kept_up(p) and p["rate"] in echo]
        if not shared:
            out[target] = None
            continue
        p = max(shared, key=lambda q: q["rate"])
        e = echo[p["rate"]]["cpu_us_per_request"]
        out[target] = {"rate": p["rate"], "service_us": p["cpu_us_per_request"], "echo_us": e,
                       "ratio_vs_echo": round(p["cpu_us_per_request"] / e, 2)}
    return out


def draw_curves(
    curves: dict[str, list[dict[str, Any]]], slas: dict[str, float], path: Path
) -> str | None:
    """p95 latency against offered load, one line per target; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for target, points in curves.items():
        line = ax.plot([p["rate"] for p in points], [max(p["p95_ms"], 0.01) for p in points],
                       marker="o", label=target)[0]
        if target != "echo":
            ax.axhline(slas[target], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("p95 latency from scheduled send (ms)")
    ax.set_title("LUKHAS deployed shape: p95 vs offered load (dotted: each slice's SLA)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
