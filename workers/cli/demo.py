"""`lukhas demo`: exercise every slice like a user would, then show the MATRIZ stats."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from typing import Any

import anyio

from bus import Bus, BusConnectError, connect
from lukhas import subjects
from lukhas.config import Settings
from workers.cli.client import call_json, print_stats_table
from workers.service.observability import ObservabilityWorker
from workers.service.slices import SliceService
from workers.service.stack import embedded_server, open_worker_runtime

Out = Callable[[str], None]


async def _calls(bus: Bus, settings: Settings, out: Out) -> bool:
    """Every slice, a rate-limited burst and an invalid request; True if all went as expected."""
    good = True

    async def call(subject: str, body: Any, expect_ok: bool | None = True) -> dict[str, Any]:
        nonlocal good
        reply = await call_json(bus, subject, body)
        ok = reply.get("ok")
        mark = "ok " if expect_ok is None or ok is expect_ok else "!! "
        good = good and mark == "ok "
        expected = " (as expected)" if ok is not True and mark == "ok " else ""
        out(f"{mark} {subject:<44} -> {_summary(reply)}{expected}")
        return reply

    await call(subjects.CONSENT_RECORD,
               {"user_id": "demo-user", "scope": "gmail.read", "metadata": {"via": "demo"}})
    await call(subjects.CONSENT_STATUS, {"user_id": "demo-user", "scope": "gmail.read"}, None)
    await call(subjects.CONSENT_REVOKE, {"user_id": "demo-user", "scope": "gmail.read"})
    await call(subjects.PASSKEY_VERIFY, {"challenge": "demo-challenge"}, None)
    await call(subjects.CONTEXT_HANDOFF, {"ctx": {"task": "plan"}, "target": "planner"})
    await call(subjects.CONSENT_RECORD, {"user_id": 42}, expect_ok=False)
    limited = 0
    async with anyio.create_task_group() as tg:
        async def one() -> None:
            nonlocal limited
            reply = await call_json(bus, subjects.CONTEXT_HANDOFF, {"ctx": {"n": 1}})
            limited += reply.get("reason") == "rate_limited"
        for _ in range(settings.handoff_burst + 20):
            tg.start_soon(one)
    out(f"{'ok ' if limited else '!! '} {settings.handoff_burst + 20} handoffs at once "
        f"-> {limited} rate_limited")
    return good and limited > 0


def _summary(reply: dict[str, Any]) -> str:
    """`answered ...` for a success, `refused <reason>` or `error <code>` otherwise."""
    if "error" in reply:
        return f"error {reply['error']['code']}: {reply['error']['message'][:60]}"
    keys = ("provider", "mode", "status", "challenge")
    details = "".join(f" {k}={reply[k]}" for k in keys if k in reply)
    if reply.get("ok") is True:
        return "answered" + details
    return f"refused {reply.get('reason', '?')}" + details


async def _show_stats(bus: Bus, *, expect_nodes: int = 0) -> None:
    """Print the snapshot once it counts `expect_nodes` nodes (or after 5 s, whatever it has)."""
    snapshot: dict[str, Any] = {}
    with anyio.move_on_after(5):
        while True:
            snapshot = await call_json(bus, subjects.OBSERVABILITY_STATS, {})
            counted = sum(p.get("count", 0) for p in snapshot.get("emit_points", {}).values())
            if counted >= expect_nodes:
                break
    print_stats_table(snapshot)


async def run_demo(
    settings: Settings, *, nats_url: str | None, default_url: str, out: Out
) -> bool:
    """Run against the stack the user started, and say which one.

    `nats_url` (or NATS_URL) must answer; without either, the stack `lukhas up` / `make run`
    starts at `default_url` is used when it answers, else an embedded stack. Under
    LUKHAS_OFFLINE everything runs in this process on the in-memory bus.

    Raises:
        BusConnectError: an explicitly given `nats_url` / NATS_URL does not answer.
    """
    if settings.offline:
        return await _demo_in_memory(settings, out)
    url = nats_url or settings.nats_url or default_url
    client = dataclasses.replace(settings, nats_url=url, dry_run=False, offline=False)
    try:
        async with connect(client, name="lukhas-demo") as bus:
            out(f"demo against the running stack at {url}")
            good = await _calls(bus, client, out)
            await _show_stats(bus)
            return good
    except BusConnectError:
        if url != default_url or nats_url or settings.nats_url:
            raise
        out(f"no stack answers at {url} (start one with `make run`): "
            "starting an embedded one for this demo")
    return await _demo_embedded(settings, out)


def _demo_settings(settings: Settings, **changes: Any) -> Settings:
    # A small handoff budget so the burst shows rate limiting; DRY_RUN so passkeys accept.
    return dataclasses.replace(
        settings, dry_run=True, handoff_rate=5.0, handoff_burst=5, **changes
    )


async def _demo_in_memory(settings: Settings, out: Out) -> bool:
    """LUKHAS_OFFLINE: slices and observability in this process, on the in-memory bus."""
    local = _demo_settings(settings, nats_url=None)
    out("demo on the in-memory bus in this process (LUKHAS_OFFLINE: no network)")
    async with open_worker_runtime(local, producer="lukhas-demo") as runtime:
        slices = SliceService(runtime)
        observability = ObservabilityWorker(runtime.bus, local, metrics_port=None)
        async with anyio.create_task_group() as tg:
            await tg.start(slices.run)
            await tg.start(observability.run)
            good = await _calls(runtime.bus, local, out)
            await runtime.emitter.flush()
            await _show_stats(runtime.bus, expect_nodes=runtime.emitter.statistics().published)
            await slices.stop()
            await observability.stop()
    return good


async def _demo_embedded(settings: Settings, out: Out) -> bool:
    local = _demo_settings(settings, nats_url=None, offline=False, metrics_port=0)
    with tempfile.TemporaryDirectory(prefix="lukhas-demo-") as data_dir:
        async with embedded_server(local, port=0, data_dir=data_dir, force=True) as served:
            out(f"demo against an embedded stack at {served.nats_url}")
            async with open_worker_runtime(served, producer="lukhas-demo") as runtime:
                slices = SliceService(runtime)
                observability = ObservabilityWorker(runtime.bus, served, metrics_port=0)
                async with anyio.create_task_group() as tg:
                    await tg.start(slices.run)
                    await tg.start(observability.run)
                    async with connect(served) as bus:
                        good = await _calls(bus, served, out)
                        await runtime.emitter.flush()
                        await _show_stats(
                            bus, expect_nodes=runtime.emitter.statistics().published
                        )
                    await slices.stop()
                    await observability.stop()
    return good
