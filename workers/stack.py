"""Process lifecycles: `lukhas up` (the whole stack) and `lukhas worker <name>`.

Each opens the bus and the runtime, wires the real providers when their flags allow, starts
its services with `tg.start` (so "ready" means every subscription is live), then waits for
SIGINT/SIGTERM and shuts down in order: stop taking requests, finish in-flight work, flush
MATRIZ, drain the connection.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import anyio

from bus import Bus, NatsServer, connect
from lukhas.config import Settings
from lukhas.runtime import Runtime, open_runtime
from workers.bootstrap import unwire_providers, wire_providers
from workers.observability import ObservabilityWorker
from workers.slices import SliceService
from workers.streams import ensure_matriz_stream

logger = logging.getLogger(__name__)

Ready = Callable[[str], None]

#: How long shutdown may take to finish in-flight work before it is cut short.
DRAIN_TIMEOUT_S = 10.0


class _Service(Protocol):
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = ...) -> None: ...

    async def stop(self) -> None: ...


@asynccontextmanager
async def embedded_server(
    settings: Settings, *, port: int | None, data_dir: str | None, force: bool = False
) -> AsyncIterator[Settings]:
    """Start a nats-server with JetStream when no NATS_URL is given outside DRY_RUN/OFFLINE
    (or, with `force`, whenever no NATS_URL is given and OFFLINE is off).

    Yields the settings to use (with `nats_url` pointing at the embedded server if started).
    """
    wanted = not settings.offline if force else not settings.uses_memory_bus
    if settings.nats_url is not None or not wanted:
        yield settings
        return
    store = Path(data_dir or settings.data_dir) / "nats"
    store.mkdir(parents=True, exist_ok=True)
    # Port 0 asks for any free port, which the launcher picks when given none.
    async with NatsServer(port=port or None, store_dir=str(store)) as server:
        logger.info("embedded nats-server on %s (JetStream store %s)", server.url, store)
        yield replace(settings, nats_url=server.url)


@asynccontextmanager
async def open_worker_runtime(
    settings: Settings, *, producer: str, serves_slices: bool = True
) -> AsyncIterator[Runtime]:
    """Bus + runtime + the MATRIZ stream (on JetStream) + provider wiring when this process
    serves the slices, torn down in order."""
    async with AsyncExitStack() as stack:
        bus: Bus = await stack.enter_async_context(connect(settings))
        if bus.backend == "nats":
            await ensure_matriz_stream(
                bus.jetstream(), replicas=settings.ledger_replicas  # type: ignore[attr-defined]
            )
        runtime = await stack.enter_async_context(
            open_runtime(settings, bus=bus, producer=producer)
        )
        if serves_slices:
            await wire_providers(
                runtime, passkey_provider=settings.passkey_provider  # type: ignore[arg-type]
            )
            stack.callback(unwire_providers)
        yield runtime


async def serve(services: list[_Service], ready: Ready, describe: Callable[[], str]) -> None:
    """Start `services`, announce `describe()`, wait for a signal, stop them gracefully.

    The signal handlers are installed before anything starts, so a SIGTERM that follows
    the "ready" line at once is a graceful shutdown, never the default (fatal) action.
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            for service in services:
                await tg.start(service.run)
            ready(describe())
            async for signum in signals:
                logger.info("received %s: draining", signal.Signals(signum).name)
                break
            with anyio.move_on_after(DRAIN_TIMEOUT_S, shield=True) as scope:
                for service in services:
                    await service.stop()
            if scope.cancelled_caught:
                logger.warning("shutdown exceeded %.0fs; cancelling the rest", DRAIN_TIMEOUT_S)
                tg.cancel_scope.cancel()


async def run_up(
    settings: Settings,
    *,
    ready: Ready,
    port: int | None = None,
    data_dir: str | None = None,
    metrics_port: int | None = None,
) -> None:
    """The whole stack in one process: embedded server (if needed), slices, observability."""
    async with embedded_server(settings, port=port, data_dir=data_dir) as settings:
        async with open_worker_runtime(settings, producer="lukhas-up") as runtime:
            slices = SliceService(runtime)
            observability = ObservabilityWorker(
                runtime.bus, settings,
                metrics_port=settings.metrics_port if metrics_port is None else metrics_port,
                metrics_addr=settings.metrics_addr,
            )
            where = settings.nats_url or "the in-memory bus"
            await serve(
                [slices, observability],
                ready,
                lambda: f"ready: slices and observability on {where} "
                f"(metrics on http://127.0.0.1:{observability.metrics_port}/metrics)",
            )


async def run_worker(settings: Settings, name: str, *, ready: Ready) -> None:
    """One worker, as a container runs it: `slices` or `observability`."""
    async with open_worker_runtime(
        settings, producer=f"lukhas-{name}", serves_slices=name == "slices"
    ) as runtime:
        service: _Service
        if name == "slices":
            service = SliceService(runtime)
        else:
            service = ObservabilityWorker(
                runtime.bus, settings,
                metrics_port=settings.metrics_port, metrics_addr=settings.metrics_addr,
            )
        await serve([service], ready, lambda: f"ready: {name} worker on {settings.nats_url}")
