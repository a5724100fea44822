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
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import IO, Any

import anyio
import msgspec
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from nats.aio.client import Client
from nats.aio.msg import Msg

from workers.tools.loadgen import (
    ClosedLoopResult,
    LatencyRecorder,
    OpenLoopResult,
    merge_closed,
    merge_open,
)

__all__ = ["LoadGenerators", "cpu_seconds", "summarize_open"]

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


def _outcome(data: bytes, echo: bool) -> str:
    if echo:
        return "ok"
    reply = msgspec.json.decode(data)
    if reply.get("ok") is True:
        return "ok"
    return str(reply.get("reason") or (reply.get("error") or {}).get("code") or "error")


def _share(total: int, part: int, parts: int) -> int:
    """How many of `total` items fall to `part` when dealt round robin among `parts`."""
    return len(range(part, total, parts))


async def _sleep_until(instant: float) -> None:
    delay = instant - time.perf_counter()
    if delay > 0:
        await anyio.sleep(delay)


_NO_RESPONDERS = b"NATS/1.0 503"
#: nats-py `Client` internals the fast path of `_Wire` uses (checked before it is taken).
_INTERNALS = ("_process_msg", "_pending", "_pending_data_size", "_max_pending_size",
              "_flush_queue", "_flush_pending")


def _fast_path(client: Client) -> bool:
    """Whether `client` has what `_Wire`'s fast path uses (else it uses the public API)."""
    return (all(hasattr(client, name) for name in _INTERNALS)
            and isinstance(getattr(client, "_pending"), list))  # noqa: B009


class _Wire:
    """Requests on one connection without a task, future or timer each.

    nats-py's `request()` costs a task-free future, a muxed-inbox lookup and an
    `asyncio.wait_for` timer per request: about 50 µs of CPU here, which is what made one
    generator process fall behind its schedule. A load generator needs less: requests go
    out as plain publishes with a reply subject `<inbox>.<token>` on one subscription, the
    reply's token finds its send times, and one sweep every few milliseconds times out
    the oldest (requests are sent in time order, so the sweep stops at the first that is
    not due). A `503` status reply (no responders) is an error, as `request()` raises.

    Where nats-py's client has the internals it is known to have (`_fast_path`), the wire
    goes further: a request is one pre-encoded `PUB` command added to the client's pending
    buffer (the same buffer and flusher `publish()` uses, without its checks and encoding
    per call), and its reply is taken from the protocol parser (`Client._process_msg`, for
    this subscription's id only) as subject, payload and raw headers, without a `Msg`
    object, a queue and a callback task each. Reply matching, timeouts and latency from the
    scheduled send are the same either way.
    """

    def __init__(self, client: Client, subject: str, payload: bytes, *, echo: bool,
                 timeout_s: float, fast: bool = True) -> None:
        self._client, self._subject, self._payload = client, subject, payload
        self._fast = fast
        self._echo, self._timeout_s = echo, timeout_s
        self._prefix = ""
        self._token = 0
        #: The pre-encoded `PUB <subject> <prefix>` and ` <size>\r\n<payload>\r\n` around
        #: each token, when the fast path is taken.
        self._command: tuple[bytes, bytes] | None = None
        #: token -> (origin for latency, when it left), in sending order.
        self._pending: dict[int, tuple[float, float]] = {}
        self._drained = anyio.Event()
        self.reset()
        #: Called after each answered or timed-out request (a closed loop sends its next).
        self.refill: Callable[[], Awaitable[None]] | None = None

    def reset(self) -> None:
        #: Each answered request's latency from its origin and from when it left, and its
        #: outcome, in arrival order: put into histograms once the run is over
        #: (`recorded`, one HDR record per distinct microsecond value), not per reply,
        #: where three HDR records (~2 µs each) were about a fifth of the generator's CPU
        #: per request; a closed loop keeps one histogram and outcome counts.
        self._from_origin: list[float] = []
        self._from_send: list[float] = []
        self._outcomes: list[str] = []
        self.errors: Counter[str] = Counter()
        self.completed = 0
        self.last_done = 0.0

    async def open(self) -> None:
        self._prefix = self._client.new_inbox() + "."
        sub = await self._client.subscribe(self._prefix + "*", cb=self._reply,
                                           pending_msgs_limit=1 << 20,
                                           pending_bytes_limit=256 * 1024 * 1024)
        if self._fast and _fast_path(self._client):
            self._fast_receive(getattr(sub, "_id"))  # noqa: B009 (nats-py internals)
            self._command = (f"PUB {self._subject} {self._prefix}".encode(),
                             f" {len(self._payload)}\r\n".encode() + self._payload + b"\r\n")
        await self._client.flush()

    def _fast_receive(self, sid: int) -> None:
        """Take this subscription's messages from nats-py's parser as they are parsed."""
        client = self._client
        parsed = client._process_msg
        skip = len(self._prefix)

        async def process(msg_sid: int, subject: bytes, reply: bytes, data: bytes,
                          headers: bytes | None) -> None:
            if msg_sid != sid:
                await parsed(msg_sid, subject, reply, data, headers)
                return
            await self._answered(subject[skip:], data,
                                 headers is not None and headers.startswith(_NO_RESPONDERS))

        client._process_msg = process  # type: ignore[method-assign]

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def recorded(self) -> tuple[LatencyRecorder, LatencyRecorder, dict[str, LatencyRecorder]]:
        """The run's latencies from each origin and from each send, and by outcome."""
        latency, from_send = LatencyRecorder(), LatencyRecorder()
        latency.record_all(self._from_origin)
        from_send.record_all(self._from_send)
        by_outcome: dict[str, list[float]] = {}
        for seconds, outcome in zip(self._from_origin, self._outcomes, strict=True):
            by_outcome.setdefault(outcome, []).append(seconds)
        recorders = {}
        for outcome, values in by_outcome.items():
            recorders[outcome] = LatencyRecorder()
            recorders[outcome].record_all(values)
        return latency, from_send, recorders

    def recorded_closed(self) -> tuple[LatencyRecorder, dict[str, int]]:
        """What a closed loop reports: latencies from each send, and outcome counts."""
        from_send = LatencyRecorder()
        from_send.record_all(self._from_send)
        return from_send, dict(Counter(self._outcomes))

    async def send(self, scheduled: float | None = None) -> float:
        """Publish one request; its latency counts from `scheduled` if that was earlier."""
        left = _clock()
        token = self._token
        self._token += 1
        self._pending[token] = (left if scheduled is None else min(left, scheduled), left)
        if self._command is None:
            await self._client.publish(self._subject, self._payload,
                                       reply=f"{self._prefix}{token}")
            return left
        head, tail = self._command
        command = b"%b%d%b" % (head, token, tail)
        client = self._client
        client._pending.append(command)
        client._pending_data_size += len(command)
        if client._pending_data_size > client._max_pending_size:
            await client._flush_pending(force_flush=True)
        elif client._flush_queue.empty():
            await client._flush_pending()
        return left

    async def _reply(self, msg: Msg) -> None:
        await self._answered(msg.subject[len(self._prefix):], msg.data,
                             bool(msg.headers) and msg.headers.get("Status") == "503")

    async def _answered(self, token: str | bytes, data: bytes, no_responders: bool) -> None:
        try:
            entry = self._pending.pop(int(token))
        except (KeyError, ValueError):
            return  # a reply after its request timed out, or not ours
        now = _clock()
        self.last_done = now
        if no_responders:
            self.errors["NoRespondersError"] += 1
        else:
            origin, left = entry
            try:
                outcome = _outcome(data, self._echo)
            except (msgspec.DecodeError, AttributeError):
                self.errors["UndecodableReply"] += 1
            else:
                self._from_origin.append(now - origin)
                self._from_send.append(now - left)
                self._outcomes.append(outcome)
                self.completed += 1
        if not self._pending:
            self._drained.set()
        if self.refill is not None:
            await self.refill()

    async def expire(self) -> None:
        """Time out every request older than the timeout (oldest first)."""
        cutoff = _clock() - self._timeout_s
        expired = []
        for token, (_origin, left) in self._pending.items():
            if left > cutoff:
                break
            expired.append(token)
        for token in expired:
            del self._pending[token]
            self.errors["TimeoutError"] += 1
        if expired and not self._pending:
            self._drained.set()
        for _ in expired:
            if self.refill is not None:
                await self.refill()

    async def drain(self) -> None:
        """Wait until every request sent was answered or timed out."""
        while self._pending:
            self._drained = anyio.Event()
            with anyio.move_on_after(_SWEEP_S):
                await self._drained.wait()
            await self.expire()


async def _sweeping(wire: _Wire, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    task_status.started()
    while True:
        await anyio.sleep(_SWEEP_S)
        await wire.expire()


async def _open_run(wire: _Wire, *, rate: float, duration_s: float, total: int,
                    start_at: float, late_after_s: float = 0.001,
                    timer_slack_s: float = 0.001) -> OpenLoopResult:
    """`loadgen.open_loop`'s schedule and accounting, on `_Wire`'s cheap requests."""
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
            last_send = await wire.send(scheduled)
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
    latency, from_send, by_outcome = wire.recorded()
    return OpenLoopResult(
        rate=rate, duration_s=duration_s, sent=total, completed=wire.completed, errors=errors,
        incomplete=total - wire.completed - errors, latency=latency,
        achieved_rate=total / span if span > 0 else 0.0, late_starts=late,
        max_start_lag_ms=max_lag * 1000.0,
        elapsed_s=max(wire.last_done, last_send, start_at) - start_at,
        error_types=dict(wire.errors), by_outcome=by_outcome, send_lag=send_lag,
        latency_from_send=from_send, started_at=start_at, last_send_at=last_send,
    )


async def _closed_run(wire: _Wire, *, concurrency: int, duration_s: float | None = None,
                      total: int | None = None) -> ClosedLoopResult:
    """Keep `concurrency` requests in flight until `total` were sent or `duration_s` passed."""
    wire.reset()
    start = _clock()
    deadline = math.inf if duration_s is None else start + duration_s
    limit = math.inf if total is None else total
    sent = 0

    async def refill() -> None:
        nonlocal sent
        if sent < limit and _clock() < deadline:
            sent += 1
            await wire.send()

    wire.refill = refill
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(_sweeping, wire)
            for _ in range(concurrency):
                await refill()
            while sent < limit and _clock() < deadline:
                with anyio.move_on_after(min(0.05, max(0.0, deadline - _clock()))):
                    await anyio.sleep_forever()
            await wire.drain()
            tg.cancel_scope.cancel()
    finally:
        wire.refill = None
    from_send, by_outcome = wire.recorded_closed()
    return ClosedLoopResult(
        concurrency=concurrency, completed=wire.completed, errors=sum(wire.errors.values()),
        latency=from_send, elapsed_s=max(wire.last_done, start) - start,
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
        client = Client()
        # nats-py keeps retrying a refused first connect: bound it.
        with anyio.fail_after(float(job.get("connect_timeout_s", 10.0))):
            await client.connect(job["url"], name=f"lukhas-bench-load-{part}",
                                 max_reconnect_attempts=0, allow_reconnect=False,
                                 pending_size=8 * 1024 * 1024)
        timeout_s = float(job.get("timeout_s", 2.0))
        wire = _Wire(client, job["subject"], msgspec.json.encode(job["body"]),
                     echo=bool(job.get("echo", False)), timeout_s=timeout_s)
        try:
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
            await client.close()
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
        cpu = {
            name: None if before[name] is None or after[name] is None
            else round(after[name] - before[name], 3)  # type: ignore[operator]
            for name in pids
        }
        if job["mode"] == "closed":
            closed = [ClosedLoopResult.from_wire(w) for w in wires]
            merged = merge_closed(closed)
            ok = merged.by_outcome.get("ok", 0)
            return {
                "mode": "closed", "generators": parts, **merged.as_dict(),
                "ok_rps": round(ok / merged.elapsed_s, 1) if merged.elapsed_s > 0 else 0.0,
                "cpu_s": cpu, "wall_s": round(wall, 3), "machine": machine,
            }
        opened = [OpenLoopResult.from_wire(w) for w in wires]
        sla_ms = float(job.get("sla_ms", 1e9))
        return {
            **summarize_open(merge_open(opened), sla_ms=sla_ms, parts=opened),
            "cpu_s": cpu, "wall_s": round(wall, 3), "machine": machine,
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
