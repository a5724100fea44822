"""The gateway worker: serves the pages and maps HTTP routes to bus requests.

It runs uvicorn on a socket it binds itself (so the port, 0 included, is known and the
socket listens before `run` reports ready), inside the caller's task group. The process's
signals stay with `lukhas` (`stack.serve`): uvicorn's own signal capture is turned off and
`stop()` asks it to exit, after ending the dashboard's event streams so no open stream
holds the shutdown up.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Generator
from contextlib import AsyncExitStack, contextmanager

import anyio
import uvicorn
from anyio.abc import TaskStatus

from bus import Bus, BusError
from lukhas.config import Settings
from lukhas.subjects import (
    ALERTS_ALL,
    OBSERVABILITY_NODES,
    OBSERVABILITY_SNAPSHOT,
    OBSERVABILITY_STATS,
)
from workers.service.gateway._feed import Feed
from workers.service.gateway._sessions import SessionStore
from workers.service.gateway.app import Api, build_app

logger = logging.getLogger(__name__)

#: How long uvicorn waits for open requests at shutdown.
_GRACEFUL_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the stack owns SIGINT/SIGTERM."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class GatewayPortInUse(OSError):
    """The gateway's port is taken; the message names it."""


def bind(addr: str, port: int) -> socket.socket:
    """A listening TCP socket on `addr:port` (0 = any free port).

    Raises:
        GatewayPortInUse: the port is taken.
    """
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GatewayPortInUse(
                f"port {port} (the gateway: passkey page and dashboard on {addr}) is in use: "
                "another `lukhas up` or gateway? Pick another with `--gateway-port` or "
                "LUKHAS_GATEWAY_PORT (0 = any free port), and add its origin "
                "(http://localhost:<port>) to LUKHAS_WEBAUTHN_ORIGINS"
            ) from None
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


def check_port(addr: str, port: int) -> None:
    """Refuse early (before the rest of a stack starts) when the gateway's port is taken.

    Raises:
        GatewayPortInUse: the port is taken.
    """
    if port != 0:
        bind(addr, port).close()


class Gateway:
    """Serves the pages and the API; start with `await tg.start(gateway.run)`.

    Args:
        bus: the bus the slices and the observability worker are on.
        settings: read for the bind address and port (unless given) and the origins.
        port, addr: where to listen (default: `settings.gateway_port`/`gateway_addr`).
        request_timeout_s: how long one bus request may take.
    """

    def __init__(
        self, bus: Bus, settings: Settings, *, port: int | None = None, addr: str | None = None,
        request_timeout_s: float = 5.0,
    ) -> None:
        self._bus = bus
        self._settings = settings
        self._port = settings.gateway_port if port is None else port
        self._addr = addr or settings.gateway_addr
        self._timeout_s = request_timeout_s
        self.sessions = SessionStore()
        self.feed = Feed()
        self._server: _Server | None = None
        self._sock: socket.socket | None = None
        self._stopping = anyio.Event()
        self._done = anyio.Event()
        self._started = False

    @property
    def port(self) -> int | None:
        """The bound port once `run` has started."""
        return None if self._sock is None else self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        """Where a person opens the pages (a loopback address is named `localhost`, the
        origin passkeys are registered for by default)."""
        host = self._addr
        if host in ("127.0.0.1", "::1", "0.0.0.0", "::", "localhost"):
            host = "localhost"
        return f"http://{host}:{self.port}/"

    def listen(self) -> None:
        """Bind the port now (`run` does it otherwise), so a taken port fails before the
        rest of the stack starts.

        Raises:
            GatewayPortInUse: the port is taken.
        """
        if self._sock is None:
            self._sock = bind(self._addr, self._port)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe to the dashboard's subjects, listen, serve until `stop()`.

        Raises:
            GatewayPortInUse: the port is taken.
            RuntimeError: `run` was called before on this gateway.
        """
        if self._started:
            raise RuntimeError("a Gateway runs once; create a new one")
        self._started = True
        try:
            async with AsyncExitStack() as stack:
                self.listen()
                assert self._sock is not None
                stack.callback(self._sock.close)
                subs = [
                    await stack.enter_async_context(self._bus.subscribe(subject))
                    for subject in (OBSERVABILITY_SNAPSHOT, OBSERVABILITY_NODES, ALERTS_ALL)
                ]
                api = Api(
                    self._bus, self.sessions, self.feed, request_timeout_s=self._timeout_s,
                    secure_cookies=False,
                )
                config = uvicorn.Config(
                    build_app(api), log_level="warning", access_log=False, lifespan="off",
                    timeout_graceful_shutdown=_GRACEFUL_S,
                )
                self._server = _Server(config)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.feed.consume_snapshots, subs[0])
                    tg.start_soon(self.feed.consume_nodes, subs[1])
                    tg.start_soon(self.feed.consume_alerts, subs[2])
                    tg.start_soon(self._prime)
                    tg.start_soon(self._server.serve, [self._sock])
                    logger.info("gateway ready on %s", self.url)
                    task_status.started()
                    await self._stopping.wait()
                    self.feed.close()
                    self._server.should_exit = True
                    for sub in subs:
                        try:
                            await sub.drain()
                        except BusError as exc:
                            logger.debug("drain %s: %s", sub.subject, exc)
        finally:
            self._done.set()

    async def stop(self) -> None:
        """End the event streams, let open requests finish, stop listening."""
        self._stopping.set()
        if self._started:
            await self._done.wait()

    async def _prime(self) -> None:
        """One stats request at start, so the first dashboard has figures before the next
        pushed snapshot (nobody answering yet is fine: the pushes will come)."""
        try:
            env = await self._bus.request(OBSERVABILITY_STATS, b"{}", timeout=2.0)
        except BusError as exc:
            logger.debug("no stats at gateway start: %s", exc)
            return
        self.feed.prime(env.data)
