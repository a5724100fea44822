"""The benchmark's human output: a progress bar while it runs, a rich summary table after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text


class Steps:
    """Advance a progress bar step by step; silent when there is no bar."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self._progress = progress
        self._task = progress.add_task("starting", total=total) if progress else None

    def begin(self, description: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=description)

    def done(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)


@contextmanager
def progress_steps(total: int, *, show: bool) -> Iterator[Steps]:
    """A transient progress bar on stderr (so stdout keeps only the results)."""
    if not show:
        yield Steps(None, total)
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description:<44}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        yield Steps(progress, total)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _verdict(passed: bool | None) -> Text:
    if passed is None:
        return Text("n/a", style="dim")
    return Text("PASS", style="bold green") if passed else Text("FAIL", style="bold red")


def _target_map(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in results["targets"]}


def build_table(results: dict[str, Any]) -> Table:
    """Every measurement as a row: LUKHAS, its baseline, the ratio, the target and verdict."""
    machine = results["machine"]
    tp, lat, mz = results["throughput"], results["latency"], results["matriz"]
    table = Table(
        title=f"lukhas bench: {machine['cpus']} CPU(s) {machine['cpu_model']}, "
        f"Python {machine['python']}, nats-server {machine['nats_server']}; "
        f"concurrency {tp['concurrency']}, open loop {_num(lat['rate'])}/s",
        box=box.SIMPLE_HEAVY,
        title_justify="left",
    )
    for column, justify in (
        ("measurement", "left"), ("LUKHAS", "right"), ("baseline", "right"),
        ("ratio", "right"), ("target", "right"), ("", "center"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    targets = _target_map(results)

    def add(label: str, value: str, baseline: str, ratio: str, target: str | None = None) -> None:
        found = targets.get(target or "")
        table.add_row(
            label, value, baseline, ratio,
            "—" if found is None else found["target"],
            _verdict(None if found is None else found["passed"]),
        )

    for name, row in tp["slices"].items():
        add(f"{name} req/s", _num(row["rps"]), f"echo {_num(row['echo_rps'])}",
            _ratio(row["ratio_vs_echo"]), f"throughput.{name}.vs_echo")
    for name, row in tp["slices"].items():
        if row.get("faststream_rps") is not None:
            add(f"{name} req/s vs FastStream", _num(row["rps"]),
                f"FastStream {_num(row['faststream_rps'])}", _ratio(row["ratio_vs_faststream"]),
                f"throughput.{name}.vs_faststream")
    table.add_section()
    for name, row in lat["slices"].items():
        add(f"{name} p50/p95/p99 ms",
            f"{row['p50_ms']:.2f}/{row['p95_ms']:.2f}/{row['p99_ms']:.2f}",
            f"echo {row['echo_p50_ms']:.2f}/{row['echo_p95_ms']:.2f}/{row['echo_p99_ms']:.2f}",
            _ratio(row["ratio_p95_vs_echo"]), f"latency.{name}.p95_vs_echo")
    for name, row in lat["slices"].items():
        add(f"{name} p95 vs manifest SLA", f"{row['p95_ms']:.2f} ms",
            f"SLA {_num(row['sla_p95_ms'])} ms", _ratio(row["p95_vs_sla"]),
            f"latency.{name}.sla")
    table.add_section()
    add("MATRIZ emitter nodes/s, flushed", _num(mz["emitter_nodes_per_s"]),
        f"publish {_num(mz['raw_publish_per_s'])}", _ratio(mz["ratio_vs_raw"]),
        "matriz.emitter.vs_raw")
    paced = mz["paced"]
    add(f"MATRIZ dropped @{_num(paced['rate'])} calls/s, {paced['duration_s']:g} s",
        f"{paced['dropped']} of {paced['emitted']:,}",
        f"peak buffer {paced['peak_buffered']:,}/{paced['buffer']:,}", "",
        "matriz.paced.dropped")
    table.add_section()
    lim = results["handoff_limiter"]
    add(f"handoff limiter accepted, {_num(lim['offered_rate'])}/s offered",
        f"{lim['accepted']:,}", f"rate×t+burst {_num(lim['expected'], 1)}",
        f"{lim['error_pct']:+.2f}%", "handoff.limiter.accuracy")
    add("handoff limiter decide() ns, allow/refuse",
        f"{lim['decide_ns_allowed']:.0f}/{lim['decide_ns_refused']:.0f}", "", "")
    ho = results["handoff"]
    add("handoffs/s confirmed, over NATS", _num(ho["handoffs_per_s"]),
        f"publish {_num(ho['raw_publish_per_s'])}", _ratio(ho["ratio_vs_raw"]))
    led = results["ledger"]
    add("ledger appends/s, JetStream acks", _num(led["appends_per_s"]),
        f"js.publish {_num(led['raw_js_publish_per_s'])}", _ratio(led["ratio_vs_raw"]))
    add("ledger appends/s vs async-acked publishes", _num(led["appends_per_s"]),
        f"publish_async {_num(led['raw_js_publish_async_per_s'])}",
        _ratio(led["ratio_vs_raw_async"]), "ledger.append.vs_async")
    add("  through record_consent (MATRIZ on)", _num(led["api_appends_per_s"]),
        "", _ratio(led["api_ratio_vs_raw_async"]))
    dep = results.get("deployed")
    if dep is not None:
        _deployed_rows(dep, add)
    return table


def _deployed_rows(dep: dict[str, Any], add: Any) -> None:
    """The deployed shape: capacities, CPU per request, workers, overload."""
    echo_cap = dep["capacity"].get("echo")
    for name, cap in dep["capacity"].items():
        if name == "echo":
            continue
        add(f"deployed: {name} capacity req/s (p95 ≤ SLA)", _num(cap),
            f"echo {_num(echo_cap)}",
            _ratio(None if cap is None or not echo_cap else cap / echo_cap))
    for name, cpu in dep["cpu"].items():
        if cpu is None:
            continue
        add(f"deployed: {name} CPU µs/request @{_num(cpu['rate'])}/s",
            _num(cpu["service_us"], 1), f"echo {_num(cpu['echo_us'], 1)}",
            _ratio(cpu["ratio_vs_echo"]),
            "deployed.consent_record.cpu_vs_echo" if name == "consent_record" else None)
    w = dep["workers"]
    add("deployed: consent_record ok/s, 2 workers vs 1", _num(w["two_rps"]),
        f"1 worker {_num(w['one_rps'])}", _ratio(w["ratio"]),
        "deployed.consent_record.two_workers")
    add("deployed: ceiling, raw echo 2 processes vs 1", _num(w["echo_two_rps"]),
        f"1 process {_num(w['echo_one_rps'])}", _ratio(w["echo_ratio"]))
    one, two = w.get("service_per_request") or ({}, {})
    for key, label in (("cpu_us", "worker CPU µs/request"),
                       ("requests_per_preemption", "requests per worker preemption")):
        a, b = one.get(key), two.get(key)
        add(f"deployed: {label}, 2 workers vs 1", _num(b, 1), f"1 worker {_num(a, 1)}",
            _ratio(b / a if a and b is not None else None))
    c = w["cores"][0]
    add("deployed: ceiling, CPU (1 worker): cores",
        f"{_num(c['service'], 2)}+{_num(c['nats_server'], 2)}+{_num(c['generator'], 2)}",
        f"idle {_num(c['idle'], 2)}, other processes {_num(c['other_processes'], 2)}",
        _ratio(w["cpu_ceiling_ratio"]))
    for name, o in dep["overload"].items():
        if o is None:
            continue
        behind = ", generators late" if o["generators_behind"] else ""
        add(f"deployed: {name} 2× cap. {_num(o['rate'])}/s{behind}: timeouts",
            f"{o['timeouts']:,}", f"of {o['sent']:,} sent", "",
            f"deployed.overload.{name}.timeouts")
        add(f"deployed: {name} 2× answered ≤ SLA",
            f"{o['answered_within_sla_pct']}%",
            ", ".join(f"{k} {v:,}" for k, v in o["outcomes"].items()), "",
            f"deployed.overload.{name}.answered_within_sla")
        add(f"deployed: {name} 2× goodput/s (ok ≤ SLA)", _num(o["goodput_rps"]),
            f"capacity {_num(o['capacity'])}", _ratio(o["goodput_vs_capacity"]),
            f"deployed.overload.{name}.goodput")


def render(results: dict[str, Any], *, console: Console | None = None) -> str:
    """The summary table and the notes, as text for the terminal (ANSI when it is one)."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # a file or a pipe: no width to fit, keep rows whole
            console = Console(width=140)
    judged = [t for t in results["targets"] if t["passed"] is not None]
    passed = sum(1 for t in judged if t["passed"])
    unjudged = len(results["targets"]) - len(judged)
    summary = Text(
        f"targets: {passed} of {len(judged)} met"
        + (f" ({unjudged} reported, not judged)" if unjudged else ""), style="bold"
    )
    target_notes = [f"{t['name']}: {t['note']}" for t in results["targets"] if t.get("note")]
    notes = Text("\n".join(f"• {note}" for note in [*results["notes"], *target_notes]),
                 style="dim")
    with console.capture() as capture:
        console.print(Group(build_table(results), summary, notes))
    return capture.get().rstrip("\n")
