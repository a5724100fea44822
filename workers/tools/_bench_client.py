"""The deployed-shape load generator: one process, one connection, open or closed loop.

`python -m workers.tools._bench_client '<json list of jobs>'` runs the jobs one after another
and prints one JSON list: for an open loop the result (latency from each request's scheduled
send), the replies sorted by outcome (`ok`, `overloaded`, other reasons, `timeout`) and how
many came within the SLA; for a closed loop the throughput. Each result also carries the CPU
seconds the processes named in the job's `cpu_pids` spent during it (Linux /proc).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client

from workers.tools.loadgen import closed_loop, open_loop


def _outcome(data: bytes, echo: bool) -> str:
    if echo:
        return "ok"
    reply = msgspec.json.decode(data)
    if reply.get("ok") is True:
        return "ok"
    return str(reply.get("reason") or (reply.get("error") or {}).get("code") or "error")


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one load job against `job["url"]` and return what it measured."""
    client = Client()
    await client.connect(job["url"], name="lukhas-bench-load", max_reconnect_attempts=0)
    payload = msgspec.json.encode(job["body"])
    subject, timeout_s = job["subject"], float(job.get("timeout_s", 2.0))
    echo = bool(job.get("echo", False))

    async def call() -> str:
        msg = await client.request(subject, payload, timeout=timeout_s)
        return _outcome(msg.data, echo)

    try:
        await closed_loop(call, concurrency=16, total=int(job.get("warmup", 200)))
        if job["mode"] == "closed":
            closed = await closed_loop(call, concurrency=int(job.get("concurrency", 256)),
                                       duration_s=float(job["duration_s"]))
            return {"mode": "closed", **closed.as_dict()}
        result = await open_loop(call, rate=float(job["rate"]),
                                 duration_s=float(job["duration_s"]),
                                 drain_timeout_s=timeout_s + 1)
    finally:
        await client.close()
    sla_s = float(job.get("sla_ms", 1e9)) / 1000.0
    ok = result.by_outcome.get("ok")
    return {
        "mode": "open",
        **result.as_dict(),
        "outcomes": {k: v.count for k, v in result.by_outcome.items()},
        "timeouts": result.error_types.get("TimeoutError", 0),
        "answered_within_sla": result.latency.count_within(sla_s),
        "ok_within_sla": 0 if ok is None else ok.count_within(sla_s),
    }


def cpu_seconds(pids: list[int]) -> float | None:
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


async def run_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for job in jobs:
        pids: dict[str, list[int]] = job.get("cpu_pids", {})
        before = {name: cpu_seconds(p) for name, p in pids.items()}
        result = await run_job(job)
        after = {name: cpu_seconds(p) for name, p in pids.items()}
        result["cpu_s"] = {
            name: None if before[name] is None or after[name] is None
            else round(after[name] - before[name], 3)  # type: ignore[operator]
            for name in pids
        }
        results.append(result)
    return results


def main() -> None:
    jobs = json.loads(sys.argv[1])
    print(json.dumps(anyio.run(run_jobs, jobs, backend="asyncio")), flush=True)


if __name__ == "__main__":
    main()
