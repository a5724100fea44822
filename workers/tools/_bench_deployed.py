"""The benchmark of the deployed shape: every part in a process of its own.

nats-server, the slice service (`lukhas worker slices`, DRY_RUN, as many as asked), a raw
nats-py echo responder (`_bench_echo`) and the load generators (`_bench_client`, K
processes sharing each job, results merged exactly) each run in their own process, as in
production, so no measurement shares an event loop with what it measures. It sweeps the
offered load (open loop, latency from each scheduled send) to find each slice's capacity
(the highest rate whose p95 is within the slice's SLA, with every request answered ok),
takes the service's CPU per request against the echo's at the same rate, offers 2x each
slice's capacity to show what overload does (timeouts, answered within the SLA, goodput),
compares 1 and 2 slice workers on consent.record (closed loop) next to the ceiling (the echo
with 1 and 2 processes, and CPU accounting of every process), and draws the latency-vs-load
curve (with matplotlib, the `bench` extra). Wherever the generators fell behind their
schedule the results say so (`generators_behind`), since their lateness counts in latency.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus import NatsServer
from lukhas import subjects
from workers.tools._bench_client import LoadGenerators

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
    #: Load-generator processes sharing every job (`_bench_client.LoadGenerators`).
    generators: int
    #: Alternating rounds of 1 and 2 slice workers.
    worker_rounds: int


def default_generators() -> int:
    """Load-generator processes: one per CPU, at least 2 and at most 4."""
    return max(2, min(4, os.cpu_count() or 1))


def deployed_plan(*, quick: bool) -> DeployedPlan:
    if quick:
        return DeployedPlan(rates=(200.0,), step_s=0.3, closed_s=0.3, overload_s=0.3,
                            warmup=50, generators=2, worker_rounds=1)
    return DeployedPlan(
        rates=(500.0, 1000.0, 2000.0, 4000.0, 6000.0, 8000.0, 10000.0, 12000.0, 14000.0,
               16000.0),
        step_s=2.0, closed_s=3.0, overload_s=3.0, warmup=500, generators=default_generators(),
        worker_rounds=3,
    )


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
        "errors": r["errors"], "incomplete": r["incomplete"],
        "ok_within_sla": r["ok_within_sla"],
        "answered_within_sla": r["answered_within_sla"],
        "cpu_us_per_request": _cpu_us_per_request(r, who),
        "send_lag_p99_ms": max((g["send_lag_p99_ms"] for g in r["generators"]), default=None),
        "generators_behind": r["generators_behind"],
    }


def _passes(point: dict[str, Any], sla_ms: float) -> bool:
    return bool(point["p95_ms"] <= sla_ms and point["timeouts"] == 0
                and point["outcomes"].get("ok", 0) >= 0.99 * point["sent"])


def _capacity(points: list[dict[str, Any]], sla_ms: float) -> float | None:
    good = [p["rate"] for p in points if _passes(p, sla_ms)]
    return max(good) if good else None


def _capacity_bound(points: list[dict[str, Any]], sla_ms: float) -> str:
    """Why the capacity is what it is: the first failing rate above it failed because of the
    service (`service`), or the generators were behind there (`generator`: the service may
    do more), or no rate failed (`sweep`: the sweep ended first)."""
    cap = _capacity(points, sla_ms) or 0.0
    above = [p for p in points if p["rate"] > cap and not _passes(p, sla_ms)]
    if not above:
        return "sweep"
    return "generator" if min(above, key=lambda p: p["rate"])["generators_behind"] else "service"


@contextmanager
def _running(args: list[str], env: dict[str, str]) -> Iterator[_Child]:
    """A child that serves for the `with` block only (stopped, drained, at its end)."""
    child = _Child(args, env)
    try:
        child.wait_ready()
        yield child
    finally:
        child.stop()


async def measure_deployed(
    plan: DeployedPlan, slas: dict[str, float], *, plot: Path | None
) -> dict[str, Any]:
    """Start the processes, sweep, compare workers, overload; return the section's results."""
    with ExitStack() as stack:
        server = NatsServer()
        await server.__aenter__()
        try:
            async with LoadGenerators(plan.generators) as generators:
                return await _measure(server, stack, generators, plan, slas, plot)
        finally:
            stack.close()
            await server.__aexit__(None, None, None)


async def _measure(
    server: NatsServer, stack: ExitStack, generators: LoadGenerators, plan: DeployedPlan,
    slas: dict[str, float], plot: Path | None,
) -> dict[str, Any]:
    url = server.url
    env = _service_env(url)
    worker_cmd = [sys.executable, "-m", "workers.cli.main", "worker", "slices"]
    echo_cmd = [sys.executable, "-m", "workers.tools._bench_echo", url, ECHO_SUBJECT]
    sla = {**slas, "echo": ECHO_SLA_MS}
    with _children(stack, echo_cmd, env) as echo, _children(stack, worker_cmd, env) as first:
        pids = {"echo": [echo.proc.pid], "service": [first.proc.pid],
                "nats_server": [server.pid] if server.pid else []}

        def job(target: str, **extra: Any) -> dict[str, Any]:
            return _job(url, target, sla[target], pids, warmup=plan.warmup, **extra)

        curves: dict[str, list[dict[str, Any]]] = {}
        for target in TARGETS:
            who = "echo" if target == "echo" else "service"
            curves[target] = [
                _point(rate, await generators.run(
                    job(target, mode="open", rate=rate, duration_s=plan.step_s)), who)
                for rate in plan.rates
            ]
        capacity = {t: _capacity(curves[t], sla[t]) for t in TARGETS}
        bound = {t: _capacity_bound(curves[t], sla[t]) for t in TARGETS}

        overload: dict[str, Any] = {}
        for target in TARGETS:
            if target == "echo":
                continue
            cap = capacity[target]
            if cap is None:
                overload[target] = None
                continue
            result = await generators.run(
                job(target, mode="open", rate=2 * cap, duration_s=plan.overload_s))
            overload[target] = _overload_row(result, cap, bound[target], plan.overload_s)

        closed = {"mode": "closed", "duration_s": plan.closed_s, "concurrency": 256}
        runs: dict[str, list[dict[str, Any]]] = {"one": [], "two": [], "echo1": [], "echo2": []}
        # Alternating rounds, the second worker (and echo) started and stopped each time, so
        # a change in what else runs on the machine falls on both sides.
        for _ in range(plan.worker_rounds):
            pids["service"], pids["echo"] = [first.proc.pid], [echo.proc.pid]
            runs["one"].append(await generators.run(job("consent_record", **closed)))
            runs["echo1"].append(await generators.run(job("echo", **closed)))
            with _running(worker_cmd, env) as second, _running(echo_cmd, env) as echo2:
                pids["service"] = [first.proc.pid, second.proc.pid]
                pids["echo"] = [echo.proc.pid, echo2.proc.pid]
                runs["two"].append(await generators.run(job("consent_record", **closed)))
                runs["echo2"].append(await generators.run(job("echo", **closed)))
    section = {
        "processes": f"nats-server, slice worker(s), echo responder(s), {plan.generators} "
                     "load-generator processes",
        "generators": plan.generators,
        "step_s": plan.step_s,
        "slas_ms": sla,
        "curves": curves,
        "capacity": capacity,
        "capacity_bound": bound,
        "cpu": _cpu_comparison(curves),
        "workers": _workers_row(runs, plan.closed_s),
        "overload": overload,
    }
    if plot is not None:
        section["plot"] = draw_curves(curves, sla, plot)
    return section


def _overload_row(r: dict[str, Any], capacity: float, bound: str, seconds: float
                  ) -> dict[str, Any]:
    """2x a slice's capacity offered: timeouts, answered within the SLA, goodput."""
    sent = r["sent"]
    goodput = r["ok_within_sla"] / seconds
    return {
        "rate": 2 * capacity,
        "capacity": capacity,
        "capacity_bound": bound,
        "seconds": seconds,
        "sent": sent,
        "achieved_rate": r["achieved_rate"],
        "outcomes": r["outcomes"],
        "timeouts": r["timeouts"],
        "errors": r["errors"],
        "incomplete": r["incomplete"],
        "answered_within_sla": r["answered_within_sla"],
        "answered_within_sla_pct": round(100 * r["answered_within_sla"] / sent, 2)
        if sent else None,
        "answered_within_sla_from_send_pct":
            round(100 * r["answered_within_sla_from_send"] / sent, 2) if sent else None,
        "late_by_outcome": r["late_by_outcome"],
        "goodput_rps": round(goodput, 1),
        "goodput_vs_capacity": round(goodput / capacity, 3),
        "p95_ms": r["latency"]["p95_ms"],
        "p99_ms": r["latency"]["p99_ms"],
        "send_lag_p99_ms": max((g["send_lag_p99_ms"] for g in r["generators"]), default=None),
        "behind_limit_ms": r["behind_limit_ms"],
        "generators_behind": r["generators_behind"],
        "cores": _accounting(r, _GROUPS),
    }


_GROUPS = ("service", "nats_server", "generator")


def _accounting(r: dict[str, Any], who: tuple[str, ...]) -> dict[str, float | None]:
    """Cores each named process group used during a run, the cores the rest of the machine
    (processes not part of the bench) used, and the cores left idle."""
    def cores(name: str) -> float | None:
        cpu = r["cpu_s"].get(name)
        return None if cpu is None or not r["wall_s"] else round(cpu / r["wall_s"], 2)

    used = {name: cores(name) for name in who}
    machine = r.get("machine") or {}
    known = [v for v in used.values() if v is not None]
    busy = machine.get("busy_cores")
    other = None if busy is None or len(known) < len(who) else round(
        max(0.0, busy - sum(known)), 2)
    return {**used, "other_processes": other, "idle": machine.get("idle_cores")}


def _combined_closed(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one closed-loop measurement as one: counts, CPU seconds and wall time
    summed, the machine's busy and idle cores weighted by each round's wall time."""
    wall = sum(r["wall_s"] for r in runs)
    elapsed = sum(r["elapsed_s"] for r in runs)
    outcomes: dict[str, int] = {}
    for r in runs:
        for name, count in r["by_outcome"].items():
            outcomes[name] = outcomes.get(name, 0) + count
    machine: dict[str, float] | None = None
    if wall and all(r.get("machine") for r in runs):
        machine = {
            key: round(sum(r["machine"][key] * r["wall_s"] for r in runs) / wall, 2)
            for key in ("busy_cores", "idle_cores")
        }
    completed = sum(r["completed"] for r in runs)
    return {
        "completed": completed, "errors": sum(r["errors"] for r in runs),
        "by_outcome": outcomes, "elapsed_s": elapsed,
        "throughput": round(completed / elapsed, 1) if elapsed else 0.0,
        "ok_rps": round(outcomes.get("ok", 0) / elapsed, 1) if elapsed else 0.0,
        "cpu_s": _summed(runs, "cpu_s"), "preemptions": _summed(runs, "preemptions"),
        "wall_s": wall, "machine": machine,
    }


def _summed(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per process group, the sum over `runs` of `run[key][group]` (None if any is None)."""
    out: dict[str, Any] = {}
    for name in runs[0][key]:
        values = [r[key].get(name) for r in runs]
        out[name] = None if None in values else round(sum(values), 3)
    return out


def _per_request(run: dict[str, Any], who: str) -> dict[str, float | None]:
    """`who`'s CPU µs per completed request and completed requests per preemption of its
    processes (see `_bench_client.preemptions`) over a combined run."""
    done = run["completed"]
    cpu, cut = run["cpu_s"].get(who), run["preemptions"].get(who)
    return {
        "cpu_us": None if cpu is None or not done else round(cpu / done * 1e6, 1),
        "requests_per_preemption": None if cut is None or not cut else round(done / cut, 1),
    }


def _workers_row(runs: dict[str, list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
    """1 vs 2 slice workers on consent.record (ok replies/s, closed loop), and the ceiling.

    `runs` holds alternating rounds of each (`one`, `two`, `echo1`, `echo2`); the figures
    are over all rounds together, `rounds` lists each round's ratios.

    The ceiling, two ways. The raw echo responder with 1 vs 2 processes under the same
    generators: what a second process can add at all here. And CPU accounting of the
    1-worker runs: every request costs the worker, nats-server and the generators CPU, so a
    higher rate needs more of all three; with the idle cores spent in the same proportions
    the rate could grow by (their cores + idle) / their cores (`cpu_ceiling_ratio`), the
    most a second worker could add if nothing got dearer per request.
    `cpu_ceiling_ratio_without_others` counts what other processes on the machine (not
    part of the bench) took as free too.
    """
    one, two = _combined_closed(runs["one"]), _combined_closed(runs["two"])
    echo1, echo2 = _combined_closed(runs["echo1"]), _combined_closed(runs["echo2"])

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    one_cores = _accounting(one, _GROUPS)
    used = [one_cores[k] for k in _GROUPS]
    idle, other = one_cores["idle"], one_cores["other_processes"]
    bench = None if None in used else sum(used)  # type: ignore[arg-type]
    ceiling = round((bench + idle) / bench, 3) if bench and idle is not None else None
    alone = (round((bench + idle + other) / bench, 3)
             if bench and idle is not None and other is not None else None)
    return {
        "seconds": seconds,
        "rounds": [
            {"one_rps": a["ok_rps"], "two_rps": b["ok_rps"],
             "ratio": ratio(b["ok_rps"], a["ok_rps"]),
             "echo_ratio": ratio(d["ok_rps"], c["ok_rps"])}
            for a, b, c, d in zip(runs["one"], runs["two"], runs["echo1"], runs["echo2"],
                                  strict=True)
        ],
        "one_rps": one["ok_rps"], "two_rps": two["ok_rps"],
        "ratio": ratio(two["ok_rps"], one["ok_rps"]),
        "outcomes": [one["by_outcome"], two["by_outcome"]],
        "errors": one["errors"] + two["errors"],
        "cores": [one_cores, _accounting(two, _GROUPS)],
        "service_per_request": [_per_request(one, "service"), _per_request(two, "service")],
        "cpu_ceiling_ratio": ceiling,
        "cpu_ceiling_ratio_without_others": alone,
        "echo_one_rps": echo1["ok_rps"], "echo_two_rps": echo2["ok_rps"],
        "echo_ratio": ratio(echo2["ok_rps"], echo1["ok_rps"]),
        "echo_cores": [_accounting(echo1, ("echo", "nats_server", "generator")),
                       _accounting(echo2, ("echo", "nats_server", "generator"))],
    }


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
    behind_label = "load generators behind schedule"
    for target, points in curves.items():
        line = ax.plot([p["rate"] for p in points], [max(p["p95_ms"], 0.01) for p in points],
                       marker="o", label=target)[0]
        if target != "echo":
            ax.axhline(slas[target], color=line.get_color(), linestyle=":", linewidth=1)
        behind = [p for p in points if p.get("generators_behind")]
        if behind:
            ax.scatter([p["rate"] for p in behind], [max(p["p95_ms"], 0.01) for p in behind],
                       s=140, facecolors="none", edgecolors="red", linewidths=1.2,
                       label=behind_label, zorder=3)
            behind_label = "_nolegend_"
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("p95 latency from scheduled send (ms)")
    ax.set_title("LUKHAS deployed shape: p95 vs offered load (dotted: each slice's SLA)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
