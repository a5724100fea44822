"""What an outside user does over NATS: requests, MATRIZ tail, stats, pings (for the CLI)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from rich.console import Console
from rich.table import Table

from bus import Bus, connect
from lukhas.config import Settings
from lukhas.observability.tracing import make_traceparent
from lukhas.subjects import SERVICE_NAME
from workers.service import discovery

_encoder = msgspec.json.Encoder()


async def call_json(bus: Bus, subject: str, body: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Send `body` as JSON on `bus` with a fresh traceparent; return the decoded reply.

    Raises:
        NoResponders: no worker serves `subject`.
        RequestTimeout: no reply within `timeout`.
    """
    reply = await bus.request(
        subject, _encoder.encode(body),
        headers={"traceparent": make_traceparent()}, timeout=timeout,
    )
    return msgspec.json.decode(reply.data)


async def request_json(
    settings: Settings, subject: str, body: Any, timeout: float = 5.0
) -> dict[str, Any]:
    """One request on a connection of its own (the CLI's `request` and `matriz stats`)."""
    async with connect(settings) as bus:
        return await call_json(bus, subject, body, timeout)


@dataclass(frozen=True, slots=True)
class PingAnswer:
    """The first slice service instance that answered a discovery ping."""

    name: str
    id: str
    version: str
    elapsed_ms: float


async def ping_service(settings: Settings, timeout: float = 2.0) -> PingAnswer | None:
    """The first slice service instance to answer `$SRV.PING.<name>`, or None if none does
    within `timeout`. Returns at the first answer: a health check must not wait out its
    timeout (compose gives it 5 s)."""
    started = time.perf_counter()
    async with connect(settings) as bus:
        inbox = bus.new_inbox()  # under NATS_INBOX_PREFIX, which this user may read
        async with bus.subscribe(inbox) as sub:
            await bus.publish(discovery.control_subject("PING", SERVICE_NAME), b"", reply=inbox)
            with anyio.move_on_after(timeout):
                while True:
                    env = await sub.next()
                    if not env.data:
                        # NATS answers a request nobody serves with an empty 503 status.
                        return None
                    try:
                        ping = msgspec.json.decode(env.data)
                    except msgspec.DecodeError:
                        continue
                    if not isinstance(ping, dict) or ping.get("type") != discovery.PING_TYPE:
                        continue
                    return PingAnswer(
                        str(ping.get("name", SERVICE_NAME)), str(ping.get("id", "?")),
                        str(ping.get("version", "?")),
                        (time.perf_counter() - started) * 1000.0,
                    )
            return None


def format_node(subject: str, node: dict[str, Any]) -> str:
    """One readable line per node: time, subject, outcome, latency, trace."""
    state = node.get("state", {})
    created = node.get("timestamps", {}).get("created_ts", 0) / 1000
    millis = int(created * 1000) % 1000
    stamp = time.strftime("%H:%M:%S", time.localtime(created)) + f".{millis:03d}"
    trace = node.get("provenance", {}).get("trace_id", "")[:16]
    extra = " ".join(label for label in node.get("labels", [])[2:])
    return (
        f"{stamp} {subject:<48} {state.get('outcome', '?'):<12} "
        f"{state.get('latency_ms', 0):8.3f} ms  trace={trace} {extra}".rstrip()
    )


async def tail_matriz(
    settings: Settings, subject_filter: str, count: int | None, out: Callable[[str], None]
) -> None:
    """Print live nodes matching `subject_filter` until `count` nodes (or forever)."""
    async with connect(settings) as bus, bus.subscribe(subject_filter) as sub:
        seen = 0
        async for env in sub:
            try:
                out(format_node(env.subject, msgspec.json.decode(env.data)))
            except msgspec.DecodeError:
                out(f"{env.subject} <not a MATRIZ node: {env.data[:80]!r}>")
            seen += 1
            if count is not None and seen >= count:
                return


def stats_table(snapshot: dict[str, Any]) -> Table:
    """The observability snapshot as a table: one row per emit point."""
    table = Table(title="MATRIZ emit points")
    for column in ("emit point", "count", "errors", "refused", "p50 ms", "p95 ms", "p99 ms",
                   "SLA p95 ms", "SLA"):
        table.add_column(column, justify="left" if column == "emit point" else "right")
    for name, point in sorted(snapshot.get("emit_points", {}).items()):
        outcomes = point.get("outcomes", {})
        refused = sum(v for k, v in outcomes.items() if k not in ("ok", "error"))
        sla = point.get("sla_p95_ms")
        table.add_row(
            name, str(point.get("count", 0)), str(point.get("errors", 0)), str(refused),
            f"{point.get('p50_ms', 0):.2f}", f"{point.get('p95_ms', 0):.2f}",
            f"{point.get('p99_ms', 0):.2f}", "-" if sla is None else f"{sla:g}",
            "-" if sla is None else ("ok" if point.get("sla_ok", True) else "BREACH"),
        )
    table.caption = (
        f"dropped nodes: {snapshot.get('dropped_nodes', 0)}  "
        f"invalid nodes: {snapshot.get('invalid_nodes', 0)}  alerts: {snapshot.get('alerts', 0)}"
    )
    return table


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1 itself; the CLI answers a closed pipe the same way everywhere.
        self.quiet = True
        raise BrokenPipeError


def print_stats_table(snapshot: dict[str, Any]) -> None:
    console = _Console()
    if not console.is_terminal:  # piped: no terminal width to fit, keep names whole
        console = _Console(width=160)
    console.print(stats_table(snapshot))

