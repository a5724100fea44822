"""The deployed-shape load generator: K processes driven as one, open or closed loop.

One Python process cannot both send on schedule and read replies past a few thousand
requests per second, and its late sends count against the service (latency is taken from
each request's *scheduled* send). So `LoadGenerators` runs K generator processes, each
with its own connection and event loop, and splits every job between them:

- open loop at rate R for d seconds: the schedule `i / R` (i < floor(R·d)) is dealt out
  round robin, generator k sending requests k, k+K, k+2K, ... at R/K per second from a
  common start instant (CLOCK_MONOTONIC, shared by the processes of one machine), so the
  K schedules interleave into the one the job asked for;
- closed loop at concurrency C: each generator keeps its share of C in flight.

Each generator warms up, reports `warm`, and starts only when told the common start; its
result comes back whole (`OpenLoopResult.to_wire`: counts, HDR histograms encoded) and the
parts are merged exactly (`merge_open`/`merge_closed`: counts summed, histograms added).
Each part also says how late its generator sent (`send_lag`), so a generator that fell
behind its schedule is reported as such (`generators_behind`) instead of blamed on the
service. Around each run the CPU seconds of named processes (and of the generators) are
read from /proc.

The child side is `python -m workers.tools._bench_client`: it prints `ready`, then reads one
JSON command per line on stdin (`{"job": ..., "part": k, "parts": K}`, then
`{"start_at": t}`) and answers one JSON line per command; end of input ends it. From a
shell, `python -m workers.tools._bench_client '<json list of jobs>' [K]` runs the jobs on K
generators and prints the merged results as one JSON list.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import IO, Any

import anyio
import msgspec
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from workers.tools._bench_wire import RawWire
from workers.tools.loadgen import (
    ClosedLoopResult,
    LatencyRecorder,
    OpenLoopResult,
    merge_closed,
    merge_open,
)

__all__ = ["LoadGenerators", "cpu_seconds", "preemptions", "summarize_open"]

#: The longest line a generator may answer with (a result with its histograms encoded).
_MAX_LINE = 64 * 1024 * 1024
#: How often a generator times out its oldest requests.
_SWEEP_S = 0.02
_clock = time.perf_counter
#: From the moment every generator is warm to the common start of the measurement.
_START_DELAY_S = 0.05
#: A generator is "behind" when its p99 send lag exceeds this share of the SLA (at least
#: `_BEHIND_FLOOR_MS`), or when all of them together sent under 97% of the offered rate.
#: Why a quarter: the service sheds what it could not answer within half the SLA from when
#: it read the request, so a send less than a quarter of the SLA late cannot by itself push
#: an answer past the SLA; later than that, the generator's lateness decides the verdict.
BEHIND_SHARE_OF_SLA = 0.25
_BEHIND_FLOOR_MS = 2.0


class GeneratorError(RuntimeError):
    """A generator process died or answered something other than what was asked."""


# -- the child: one generator ---------------------------------------------------------------


def _share(total: int, part: int, parts: int) -> int:
    """How many of `total` items fall to `part` when dealt round robin among `parts`."""
    return len(range(part, total, parts))


async def _sleep_until(instant: float) -> None:
    delay = instant - time.perf_counter()
    if delay > 0:
        await anyio.sleep(delay)


async def _sweeping(wire: RawWire, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    task_status.started()
    while True:
        await anyio.sleep(_SWEEP_S)
        wire.expire()


async def _open_run(wire: RawWire, *, rate: float, duration_s: float, total: int,
                    start_at: float, late_after_s: float = 0.001,
                    timer_slack_s: float = 0.001) -> OpenLoopResult:
    """`loadgen.open_loop`'s schedule and accounting, on `RawWire`'s cheap requests."""
    wire.reset()
    lags: list[float] = []
    interval = 1.0 / rate
    late = 0
    max_lag = 0.0
    last_send = start_at
    async with anyio.create_task_group() as tg:
        await tg.start(_sweeping, wire)
        for i in range(total):
            scheduled = start_at + i * interval
            delay = scheduled - timer_slack_s - _clock()
            if delay > 0:
                await anyio.sleep(delay)
            last_send = wire.send_nowait(scheduled)
            lag = last_send - scheduled
            lags.append(lag)
            if lag > late_after_s:
                late += 1
            max_lag = max(max_lag, lag)
        await wire.drain()
        tg.cancel_scope.cancel()
    span = max(duration_s, last_send - start_at)
    errors = sum(wire.errors.values())
    send_lag = LatencyRecorder()
    send_lag.record_all(lags)
    return OpenLoopResult(
        rate=rate, duration_s=duration_s, sent=total, completed=wire.completed, errors=errors,
        incomplete=total - wire.completed - errors, latency=wire.latency,
        achieved_rate=total / span if span > 0 else 0.0, late_starts=late,
        max_start_lag_ms=max_lag * 1000.0,
        elapsed_s=max(wire.last_done, last_send, start_at) - start_at,
        error_types=dict(wire.errors), by_outcome=wire.by_outcome, send_lag=send_lag,
        latency_from_send=wire.from_send, started_at=start_at, last_send_at=last_send,
    )


async def _closed_run(wire: RawWire, *, concurrency: int, duration_s: float | None = None,
                      total: int | None = None) -> ClosedLoopResult:
    """Keep `concurrency` requests in flight until `total` were sent or `duration_s` passed."""
    wire.reset()
    start = _clock()
    deadline = math.inf if duration_s is None else start + duration_s
    limit = math.inf if total is None else total
    sent = 0

    def refill() -> None:
        nonlocal sent
        if sent < limit and _clock() < deadline:
            sent += 1
            wire.send_nowait()

    wire.refill = refill
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(_sweeping, wire)
            for _ in range(concurrency):
                refill()
            while sent < limit and _clock() < deadline:
                with anyio.move_on_after(min(0.05, max(0.0, deadline - _clock()))):
                    await anyio.sleep_forever()
            await wire.drain()
            tg.cancel_scope.cancel()
    finally:
        wire.refill = None
    by_outcome = {k: v.count for k, v in wire.by_outcome.items()}
    return ClosedLoopResult(
        concurrency=concurrency, completed=wire.completed, errors=sum(wire.errors.values()),
        latency=wire.from_send, elapsed_s=max(wire.last_done, start) - start,
        error_types=dict(wire.errors), by_outcome=by_outcome,
    )


async def _read_line() -> dict[str, Any] | None:
    """The next command on stdin (read in a thread: the event loop keeps serving)."""
    line = await anyio.to_thread.run_sync(sys.stdin.buffer.readline)
    return json.loads(line) if line.strip() else None


async def _generate() -> None:
    """Serve commands until stdin ends: warm up for a job, then run it at the start given."""
    print("ready", flush=True)
    while (command := await _read_line()) is not None:
        job, part, parts = command["job"], int(command["part"]), int(command["parts"])
        wire = RawWire(job["url"], job["subject"], msgspec.json.encode(job["body"]),
                       echo=bool(job.get("echo", False)),
                       timeout_s=float(job.get("timeout_s", 2.0)),
                       name=f"lukhas-bench-load-{part}")
        try:
            with anyio.fail_after(float(job.get("connect_timeout_s", 10.0))):
                await wire.open()
            warmup = _share(int(job.get("warmup", 200)), part, parts)
            if warmup:
                await _closed_run(wire, concurrency=16, total=warmup)
            print(json.dumps({"warm": part}), flush=True)
            go = await _read_line()
            if go is None:
                return
            start_at = float(go["start_at"])
            result: OpenLoopResult | ClosedLoopResult
            if job["mode"] == "closed":
                concurrency = _share(int(job.get("concurrency", 256)), part, parts)
                await _sleep_until(start_at)
                result = await _closed_run(wire, concurrency=max(1, concurrency),
                                           duration_s=float(job["duration_s"]))
            else:
                rate, duration = float(job["rate"]), float(job["duration_s"])
                total = math.floor(rate * duration + 1e-9)
                result = await _open_run(
                    wire, rate=rate / parts, duration_s=duration,
                    start_at=start_at + part / rate, total=_share(total, part, parts),
                )
        finally:
            await wire.close()
        print(json.dumps({"result": result.to_wire()}), flush=True)


# -- the parent: K generators as one ---------------------------------------------------------


def cpu_seconds(pids: Sequence[int]) -> float | None:
    """User + system CPU seconds of `pids` so far; None where /proc cannot say."""
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def preemptions(pids: Sequence[int]) -> int | None:
    """Times the kernel has taken the CPU from the main threads of `pids` so far (their
    involuntary context switches); None where /proc cannot say. Past a machine's cores,
    every process is cut short every few requests, and a worker that would batch hundreds
    of requests per wake-up serves a few at a time instead."""
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/status", encoding="ascii") as status:
                total += next(int(line.split()[1]) for line in status
                              if line.startswith("nonvoluntary_ctxt_switches:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return total


def machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU jiffies of the whole machine so far (/proc/stat); None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def _machine_cores(before: tuple[int, int] | None, after: tuple[int, int] | None,
                   wall_s: float) -> dict[str, float] | None:
    """Cores busy and idle over a run, from two `machine_jiffies` samples."""
    if before is None or after is None or wall_s <= 0:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    cpus = os.cpu_count() or 1
    busy = (after[0] - before[0]) / tick / wall_s
    return {"cpus": cpus, "busy_cores": round(busy, 2),
            "idle_cores": round(max(0.0, cpus - busy), 2)}


class _Generator:
    def __init__(self, process: Process, stderr: IO[bytes]) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._lines = BufferedByteReceiveStream(process.stdout)
        self._stderr = stderr

    async def send(self, command: dict[str, Any]) -> None:
        await self._stdin.send(json.dumps(command).encode() + b"\n")

    async def receive(self) -> Any:
        try:
            line = await self._lines.receive_until(b"\n", _MAX_LINE)
        except (anyio.EndOfStream, anyio.IncompleteRead) as exc:
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:].decode(errors="replace")
            raise GeneratorError(
                f"load generator {self.process.pid} exited ({self.process.returncode}): {tail}"
            ) from exc
        return line.decode() if line == b"ready" else json.loads(line)

    async def close(self) -> None:
        await self._stdin.aclose()
        with anyio.move_on_after(10) as scope:
            await self.process.wait()
        if scope.cancelled_caught:
            self.process.kill()
            await self.process.wait()
        self._stderr.close()


class LoadGenerators:
    """`processes` load-generator processes, each job split between them and merged exactly.

    Use as an async context manager; `run(job)` returns the merged result as a dict (see
    `summarize_open` for an open loop's). A job: `url`, `subject`, `body`, `mode` ("open"
    with `rate` and `duration_s`, or "closed" with `concurrency` and `duration_s`),
    optionally `echo` (any reply is ok), `sla_ms`, `timeout_s`, `connect_timeout_s`,
    `warmup` (requests, split too) and `cpu_pids` ({name: [pid, ...]}, whose CPU seconds
    during the run are reported in `cpu_s`, with the generators' own as `generator`).
    `machine` says how many of the machine's cores were busy and idle meanwhile.
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, not {processes}")
        self.processes = processes
        self._generators: list[_Generator] = []

    @property
    def pids(self) -> list[int]:
        return [g.process.pid for g in self._generators]

    async def __aenter__(self) -> LoadGenerators:
        try:
            for _ in range(self.processes):
                stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the generator)
                process = await anyio.open_process(
                    [sys.executable, "-m", "workers.tools._bench_client"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                )
                self._generators.append(_Generator(process, stderr))
            for generator in self._generators:
                with anyio.fail_after(60):
                    if await generator.receive() != "ready":
                        raise GeneratorError("a load generator did not start")
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        with anyio.CancelScope(shield=True):
            for generator in self._generators:
                await generator.close()
        self._generators.clear()

    async def run(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """Run `job` split between the generators; the merged result."""
        parts = len(self._generators)
        for k, generator in enumerate(self._generators):
            await generator.send({"job": dict(job), "part": k, "parts": parts})
        for generator in self._generators:
            warm = await generator.receive()
            if not isinstance(warm, dict) or "warm" not in warm:
                raise GeneratorError(f"expected warm, got {warm!r}")
        pids = {**job.get("cpu_pids", {}), "generator": self.pids}
        before = {name: cpu_seconds(p) for name, p in pids.items()}
        cut_before = {name: preemptions(p) for name, p in pids.items()}
        machine_before = machine_jiffies()
        began = time.perf_counter()
        start_at = began + _START_DELAY_S
        for generator in self._generators:
            await generator.send({"start_at": start_at})
        wires = []
        for generator in self._generators:
            answer = await generator.receive()
            if not isinstance(answer, dict) or "result" not in answer:
                raise GeneratorError(f"expected a result, got {answer!r}")
            wires.append(answer["result"])
        wall = time.perf_counter() - began
        machine = _machine_cores(machine_before, machine_jiffies(), wall)
        after = {name: cpu_seconds(p) for name, p in pids.items()}
        cut_after = {name: preemptions(p) for name, p in pids.items()}
        cpu = {
            name: None if before[name] is None or after[name] is None
            else round(after[name] - before[name], 3)  # type: ignore[operator]
            for name in pids
        }
        preempted = {
            name: None if cut_before[name] is None or cut_after[name] is None
            else cut_after[name] - cut_before[name]  # type: ignore[operator]
            for name in pids
        }
        if job["mode"] == "closed":
            closed = [ClosedLoopResult.from_wire(w) for w in wires]
            merged = merge_closed(closed)
            ok = merged.by_outcome.get("ok", 0)
            return {
                "mode": "closed", "generators": parts, **merged.as_dict(),
                "ok_rps": round(ok / merged.elapsed_s, 1) if merged.elapsed_s > 0 else 0.0,
                "cpu_s": cpu, "preemptions": preempted, "wall_s": round(wall, 3),
                "machine": machine,
            }
        opened = [OpenLoopResult.from_wire(w) for w in wires]
        sla_ms = float(job.get("sla_ms", 1e9))
        return {
            **summarize_open(merge_open(opened), sla_ms=sla_ms, parts=opened),
            "cpu_s": cpu, "preemptions": preempted, "wall_s": round(wall, 3),
            "machine": machine,
        }


def behind_limit_ms(sla_ms: float) -> float:
    """The p99 send lag past which a generator counts as behind its schedule."""
    return max(_BEHIND_FLOOR_MS, BEHIND_SHARE_OF_SLA * sla_ms)


def summarize_open(
    result: OpenLoopResult, *, sla_ms: float, parts: Sequence[OpenLoopResult] = ()
) -> dict[str, Any]:
    """An open loop's merged result as the bench reports it.

    `outcomes` counts replies by outcome (`ok`, `overloaded`, other reasons); `timeouts`
    the requests that got none in time; `answered_within_sla` / `ok_within_sla` count from
    the scheduled send, `answered_within_sla_from_send` from the actual send (what the
    service and network took, without the generators' lateness); `late_by_outcome` counts
    the answers past the SLA by outcome (late `ok` replies were served too late; late
    `overloaded` ones were refused too late). `generators_behind` is
    true when a generator's p99 send lag passed `behind_limit_ms(sla_ms)` or the
    generators together sent under 97% of the offered rate: the latency then measures the
    generators as much as the service.
    """
    sla_s = sla_ms / 1000.0
    ok = result.by_outcome.get("ok")
    limit = behind_limit_ms(sla_ms)
    lags = [
        {"rate": round(p.rate, 1), "sent": p.sent, "achieved_rate": round(p.achieved_rate, 1),
         "send_lag_p50_ms": round(p.send_lag.percentile_ms(50), 3),
         "send_lag_p99_ms": round(p.send_lag.percentile_ms(99), 3),
         "send_lag_max_ms": round(p.send_lag.max_ms, 3)}
        for p in parts
    ]
    behind = result.achieved_rate < 0.97 * result.rate or any(
        lag["send_lag_p99_ms"] > limit for lag in lags
    ) or (not lags and result.send_lag.percentile_ms(99) > limit)
    return {
        "mode": "open",
        **result.as_dict(),
        "outcomes": {k: v.count for k, v in result.by_outcome.items()},
        "timeouts": result.error_types.get("TimeoutError", 0),
        "answered_within_sla": result.latency.count_within(sla_s),
        "answered_within_sla_from_send": result.latency_from_send.count_within(sla_s),
        "ok_within_sla": 0 if ok is None else ok.count_within(sla_s),
        "late_by_outcome": {
            k: v.count - v.count_within(sla_s) for k, v in result.by_outcome.items()
        },
        "generators": lags,
        "generators_behind": behind,
        "behind_limit_ms": limit,
    }


async def _run_jobs(jobs: list[dict[str, Any]], processes: int) -> list[dict[str, Any]]:
    async with LoadGenerators(processes) as generators:
        return [await generators.run(job) for job in jobs]


def main() -> None:
    """No arguments: serve as one generator. `'<json list of jobs>' [K]`: run the jobs on K
    generators (default 1) and print their merged results as one JSON list."""
    if len(sys.argv) > 1:
        processes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
        results = anyio.run(_run_jobs, json.loads(sys.argv[1]), processes, backend="asyncio")
        print(json.dumps(results), flush=True)
        return
    anyio.run(_generate, backend="asyncio")


if __name__ == "__main__":
    main()
