"""Test-only nats-servers: one the fault tests can kill (like a crash) and restart, and a routed
cluster. `lukhas up` needs neither, so they live here rather than in `bus/server.py`."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import anyio

from bus.server import NatsServer, NatsServerError, free_port

__all__ = ["ClusterConfig", "FaultServer", "NatsCluster", "stop_server"]


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How one server joins a cluster: its route port and the routes it solicits."""

    name: str
    port: int
    routes: tuple[str, ...] = ()


class FaultServer(NatsServer):
    """A `NatsServer` a test can kill and restart, optionally one server of a cluster.

    Args:
        cluster: route settings when the server is part of a cluster.
        server_name: the name it reports (e.g. as a JetStream stream leader).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        cluster: ClusterConfig | None = None,
        server_name: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(port, **options)
        self.cluster = cluster
        self.server_name = server_name

    def kill(self) -> None:
        """Kill at once, like a crash; JetStream data stays so `start()` can recover it."""
        self._reap(graceful=False)

    def restart(self) -> None:
        """Stop gracefully and start again on the same port with the same data.

        Raises:
            NatsServerError: the new process did not come up.
        """
        self._reap(graceful=True)
        self.start()

    def _command(self, binary: str) -> list[str]:
        cmd = super()._command(binary)
        if self.server_name:
            cmd += ["--server_name", self.server_name]
        if self.cluster is not None:
            cmd += [
                "--cluster_name",
                self.cluster.name,
                "--cluster",
                f"nats://{self.host}:{self.cluster.port}",
            ]
            if self.cluster.routes:
                cmd += ["--routes", ",".join(self.cluster.routes)]
        return cmd


class NatsCluster:
    """`size` routed nats-servers on loopback, JetStream clustered; `url` lists them all.

    Args:
        store_root: parent of each server's JetStream directory; temporary if None.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        name: str = "lukhas",
        host: str = "127.0.0.1",
        jetstream: bool = True,
        store_root: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one server, not {size}")
        self.name = name
        self.startup_timeout = startup_timeout
        route_ports = [free_port(host) for _ in range(size)]
        routes = [f"nats://{host}:{p}" for p in route_ports]
        self.servers = [
            FaultServer(
                host=host,
                jetstream=jetstream,
                store_dir=None if store_root is None else Path(store_root) / f"{name}-{i}",
                cluster=ClusterConfig(
                    name, route_ports[i], tuple(r for j, r in enumerate(routes) if j != i)
                ),
                server_name=f"{name}-{i}",
                monitor=True,
                startup_timeout=startup_timeout,
            )
            for i in range(size)
        ]

    def __repr__(self) -> str:
        return f"<NatsCluster {self.name!r} size={len(self.servers)}>"

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """All client URLs, comma-separated, as NATS_URL and `open_nats_bus` take them."""
        return ",".join(self.urls)

    def start(self) -> None:
        """Start every server, then wait until routes are up (and JetStream is healthy).

        Raises:
            NatsServerError: a server did not start, or the cluster did not form in time.
        """
        try:
            for server in self.servers:
                server.start()
            self.wait_formed()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every server."""
        for server in self.servers:
            server.stop()

    def wait_formed(self) -> None:
        """Wait until every running server routes to all the others and reports healthy.

        Raises:
            NatsServerError: not formed within `startup_timeout` seconds.
        """
        deadline = time.monotonic() + self.startup_timeout
        running = [s for s in self.servers if s.is_running]
        while time.monotonic() < deadline:
            if all(self._formed(s, len(running) - 1) for s in running):
                return
            time.sleep(0.05)  # polling the monitoring endpoint, not synchronising a test
        raise NatsServerError(f"{self!r} did not form within {self.startup_timeout:g}s")

    @staticmethod
    def _formed(server: NatsServer, peers: int) -> bool:
        base = f"http://{server.host}:{server.monitor_port}"
        try:
            with urllib.request.urlopen(f"{base}/routez", timeout=1) as reply:
                routes = json.load(reply).get("routes") or []
            # One server may hold several pooled routes to the same peer.
            if len({r.get("remote_name") or r.get("remote_id") for r in routes}) < peers:
                return False
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as reply:
                return bool(reply.status == 200)
        except (OSError, ValueError, urllib.error.URLError):
            return False

    async def __aenter__(self) -> Self:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)


async def stop_server(pid: int) -> None:
    """SIGSTOP a server and return once every thread of it is stopped: the signal is only
    queued when kill() returns, and a server thread still running on the other core could
    answer a PING (or store a publish) sent in that window."""
    os.kill(pid, signal.SIGSTOP)
    with anyio.fail_after(10):
        # A process state has no event to wait on: poll /proc until the stop has landed.
        while not all(_thread_state(pid, tid) in ("T", "t")  # noqa: ASYNC110
                      for tid in os.listdir(f"/proc/{pid}/task")):
            await anyio.sleep(0.001)


def _thread_state(pid: int, tid: str) -> str:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
