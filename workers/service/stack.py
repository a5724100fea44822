"""Process lifecycles: `lukhas up` (the whole stack) and `lukhas worker <name>`.

Each opens the bus and the runtime, wires the real providers when their flags allow, starts
its services with `tg.start` (so "ready" means every subscription is live), then waits for
SIGINT/SIGTERM and shuts down in order: stop taking requests, finish in-flight work, flush
MATRIZ, drain the connection.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import anyio

from bus import Bus, NatsServer, connect
from lukhas.config import Settings
from lukhas.runtime import Runtime, open_runtime
from workers.service.bootstrap import close_providers, wire_providers
from workers.service.gateway.service import Gateway, check_port
from workers.service.observability import ObservabilityWorker
from workers.service.slices import SliceService
from workers.service.streams import ensure_matriz_stream

logger = logging.getLogger(__name__)

Ready = Callable[[str], None]

#: How long shutdown may take to finish in-flight work before it is cut short.
DRAIN_TIMEOUT_S = 10.0


class _Service(Protocol):
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = ...) -> None: ...

    async def stop(self) -> None: ...


class PortInUse(OSError):
    """A port `lukhas up` needs is taken; the message names it and what to do instead."""


class WorkerProcessFailed(ChildProcessError):
    """A slice worker process of `lukhas up --workers N` failed to start, died, or did not
    exit 0 after draining."""


def default_workers() -> int:
    """The CPUs this process may run on: `lukhas up`'s default number of slice workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: Run by each child before it becomes `python -m workers.cli.main worker slices`: ask Linux
#: to send it SIGTERM when its parent dies (PR_SET_PDEATHSIG survives exec), so a `lukhas
#: up` killed outright (SIGKILL) leaves no slice worker behind; it drains and exits as on
#: any SIGTERM. Elsewhere, or if the parent is already gone, it simply does not start.
_EXIT_WITH_PARENT = """
import ctypes, os, signal, sys
parent, args = int(sys.argv[1]), sys.argv[2:]
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit(1)
os.execv(sys.executable, [sys.executable, *args])
"""


class SliceWorkerProcesses:
    """`count` extra slice workers, each `lukhas worker slices` in a child process, joined to
    the same queue group on `nats_url`. A `_Service`: `run` returns to `tg.start` once every
    child printed "ready"; `stop` sends each SIGTERM (they drain, as any worker does) and
    waits for them to exit.

    Raises (from `run` or `stop`):
        WorkerProcessFailed: a child exited before it was asked to, or not with status 0.
    """

    def __init__(self, count: int, nats_url: str) -> None:
        self._count = count
        self._env = {**os.environ, "NATS_URL": nats_url}
        self._procs: list[anyio.abc.Process] = []
        self._stopping = False

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        command = [sys.executable, "-c", _EXIT_WITH_PARENT, str(os.getpid()),
                   "-m", "workers.cli.main", "worker", "slices"]
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self._count):
                    # stderr (the child's log) goes where ours goes; stdout is read for "ready".
                    # A session of its own, as the embedded server's: a terminal's Ctrl-C
                    # reaches only this process, which then stops each child with one SIGTERM.
                    proc = await anyio.open_process(
                        command, env=self._env, stdin=subprocess.DEVNULL, stderr=None,
                        start_new_session=True,
                    )
                    self._procs.append(proc)
                for proc in self._procs:
                    await tg.start(self._watch, proc)
                logger.info("slice worker processes ready: pids %s",
                            ", ".join(str(p.pid) for p in self._procs))
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for proc in self._procs:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()

    async def _watch(
        self, proc: anyio.abc.Process, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """Wait for the child's "ready" line, then for its exit; an exit not asked for, or
        not 0, is a failure."""
        assert proc.stdout is not None
        ready = False
        buffered = b""
        async for chunk in proc.stdout:
            buffered += chunk
            if not ready and b"ready" in buffered:
                ready = True
                task_status.started()
            buffered = buffered[-64:]
        code = await proc.wait()
        if not ready:
            raise WorkerProcessFailed(f"slice worker process {proc.pid} exited {code} "
                                      "before it was ready (its log is above)")
        if not self._stopping:
            raise WorkerProcessFailed(f"slice worker process {proc.pid} died (exit {code})")
        if code != 0:
            raise WorkerProcessFailed(
                f"slice worker process {proc.pid} exited {code} after SIGTERM")
        logger.info("slice worker process %d drained and exited 0", proc.pid)

    async def stop(self) -> None:
        self._stopping = True
        for proc in self._procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            await proc.wait()


def _nats_answers(host: str, port: int) -> bool:
    """Whether a NATS server greets a client on `host:port`."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


def _port_is_free(host: str, port: int) -> bool:
    """Whether `host:port` can be listened on (a socket in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers set it: only a live listener on the port blocks the bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def check_nats_port(host: str, port: int) -> None:
    """Refuse to start an embedded server on a port something already listens on.

    Without this a second `lukhas up` saw the first stack answer on the port, took it for
    its own server, and silently joined the first stack's queue group.

    Raises:
        PortInUse: naming the port, who holds it, and how to join it or move elsewhere.
    """
    if port == 0 or _port_is_free(host, port):
        return
    url = f"nats://{host}:{port}"
    holder = (
        f"a NATS server already answers at {url} (another `lukhas up`?)"
        if _nats_answers(host, port) else "another program listens on it"
    )
    raise PortInUse(
        f"port {port} is in use: {holder}. Stop it, pick another port (`lukhas up --port "
        f"{port + 1}`, `make run PORT={port + 1}`), or add this process's workers to that "
        f"stack on purpose (`lukhas up --join`, or NATS_URL={url})"
    )


def check_metrics_port(addr: str, port: int | None) -> None:
    """Raises `PortInUse` naming the /metrics port when it is taken."""
    if port is None or port == 0 or _port_is_free(addr, port):
        return
    raise PortInUse(
        f"port {port} (Prometheus /metrics on {addr}) is in use: another `lukhas up` or "
        "observability worker? Pick another with `--metrics-port` or LUKHAS_METRICS_PORT "
        "(0 = any free port)"
    )


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
    host = "127.0.0.1"
    if port:
        check_nats_port(host, port)
    store = Path(data_dir or settings.data_dir) / "nats"
    store.mkdir(parents=True, exist_ok=True)
    # Port 0 asks for any free port, which the launcher picks when given none.
    # In a session of its own: a terminal's Ctrl-C goes to its whole foreground process group,
    # and a server in that group would die before the service drained over it. So only
    # `lukhas` gets the SIGINT, drains, and then stops the server itself.
    async with NatsServer(
        port=port or None, host=host, store_dir=str(store), new_session=True
    ) as server:
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
            stack.push_async_callback(close_providers)
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
    observability: bool = True,
    workers: int = 1,
    gateway_port: int | None = None,
) -> None:
    """The whole stack: embedded server (if needed), `workers` slice workers, observability.

    This process runs one slice worker and the observability worker; `workers - 1` more
    slice workers run as child processes (`lukhas worker slices`) in the same queue group,
    each drained on SIGTERM before the server stops. On the in-memory bus (DRY_RUN without
    NATS_URL, OFFLINE) there is one process only. Under LUKHAS_OFFLINE nothing opens a
    socket: the in-memory bus and no /metrics server. Without `observability` (`lukhas up
    --join`) only slice workers run.

    Raises:
        PortInUse: the NATS or /metrics port is taken (the message names it).
        WorkerProcessFailed: a slice worker process failed (the message names it).
        ValueError: `workers` is below 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    # OFFLINE means no socket at all, so no /metrics listener either.
    metrics = None if settings.offline else (
        settings.metrics_port if metrics_port is None else metrics_port
    )
    if observability:
        check_metrics_port(settings.metrics_addr, metrics)
        if not settings.offline:
            check_port(settings.gateway_addr,
                       settings.gateway_port if gateway_port is None else gateway_port)
    async with embedded_server(settings, port=port, data_dir=data_dir) as settings:
        async with open_worker_runtime(settings, producer="lukhas-up") as runtime:
            where = settings.nats_url or "the in-memory bus"
            slices: list[_Service] = [SliceService(runtime)]
            if runtime.bus.backend != "nats":
                if workers > 1:
                    logger.warning("the in-memory bus lives in one process: 1 slice worker, "
                                   "not %d", workers)
                workers = 1
            elif workers > 1:
                assert settings.nats_url is not None
                slices.append(SliceWorkerProcesses(workers - 1, settings.nats_url))
            count = f"{workers} slice worker{'s' if workers > 1 else ''}"
            if not observability:
                logger.warning(
                    "joining the stack at %s: this slice worker shares its queue group, with "
                    "the providers this process's flags wire", where,
                )
                await serve(slices, ready,
                            lambda: f"ready: {count} joined the stack on {where}")
                return
            worker = ObservabilityWorker(
                runtime.bus, settings, metrics_port=metrics, metrics_addr=settings.metrics_addr,
            )
            # The pages (passkeys, dashboard); none under OFFLINE, which opens no socket.
            gateway = None if settings.offline else Gateway(
                runtime.bus, settings, port=gateway_port
            )
            if gateway is not None:
                gateway.listen()

            def describe() -> str:
                served = worker.metrics_port
                return f"ready: {count} and observability on {where} " + (
                    f"(metrics on http://{settings.metrics_addr}:{served}/metrics)"
                    if served is not None else "(no /metrics: LUKHAS_OFFLINE)"
                ) + ("" if gateway is None else (
                    f"; open {gateway.url} (passkeys) and {gateway.url}dashboard"
                ))

            await serve([*slices, worker, *([gateway] if gateway else [])], ready, describe)


async def run_worker(settings: Settings, name: str, *, ready: Ready) -> None:
    """One worker, as a container runs it: `slices`, `observability` or `gateway`."""
    if name == "gateway":
        # The gateway needs no runtime (it emits no MATRIZ and wires no provider).
        async with connect(settings, name="lukhas-gateway") as bus:
            gateway = Gateway(bus, settings)
            gateway.listen()
            await serve([gateway], ready, lambda: f"ready: gateway on {settings.nats_url}, "
                        f"open {gateway.url} (passkeys) and {gateway.url}dashboard")
        return
    async with open_worker_runtime(
        settings, producer=f"lukhas-{name}", serves_slices=name == "slices"
    ) as runtime:
        service: _Service
        if name == "slices":
            service = SliceService(runtime, freeze_heap=True)
        else:
            service = ObservabilityWorker(
                runtime.bus, settings,
                metrics_port=None if settings.offline else settings.metrics_port,
                metrics_addr=settings.metrics_addr,
            )
        await serve([service], ready, lambda: f"ready: {name} worker on {settings.nats_url}")
