"""The embedded nats-server launcher: free ports, restarts, clean stops, clusters."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import pytest

from bus import NatsServer, open_nats_bus
from bus.server import NatsServerError, find_nats_server, free_port
from tests.nats_servers import FaultServer, NatsCluster

pytestmark = pytest.mark.nats


@pytest.fixture(autouse=True)
def _needs_binary() -> None:
    try:
        find_nats_server()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _process_gone(pid: int) -> bool:
    """True once the process is reaped: a zombie would still answer signal 0."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_find_nats_server_returns_an_executable() -> None:
    path = find_nats_server()
    assert os.access(path, os.X_OK)


def test_starts_on_a_free_loopback_port_and_stops_without_leftovers() -> None:
    server = NatsServer()
    server.start()
    try:
        assert server.is_running
        assert server.url == f"nats://127.0.0.1:{server.port}"
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
            assert sock.recv(4) == b"INFO"
        pid = server.pid
        store = server.store_dir
        assert pid is not None and store is not None and Path(store).is_dir()
    finally:
        server.stop()
    assert not server.is_running
    assert _process_gone(pid)
    assert not Path(store).exists()  # our own temporary store goes with the server


def test_two_servers_get_different_ports() -> None:
    first, second = NatsServer(jetstream=False), NatsServer(jetstream=False)
    first.start()
    try:
        second.start()
        try:
            assert first.port != second.port
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_taken_port_is_a_clear_error_with_the_server_log() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = NatsServer(blocker.getsockname()[1], jetstream=False, startup_timeout=5)
        with pytest.raises(NatsServerError, match="address already in use"):
            server.start()
    assert not server.is_running


async def test_restart_keeps_port_and_jetstream_data_and_clients_reconnect(
    tmp_path: Path, subject_root: str
) -> None:
    async with FaultServer(store_dir=tmp_path / "js") as server:
        port = server.port
        async with (
            open_nats_bus(server.url, reconnect_wait=0.05) as bus,
            bus.subscribe(f"{subject_root}.>") as sub,
        ):
            await bus.jetstream().add_stream(name="RESTART", subjects=["restart.>"])

            await anyio.to_thread.run_sync(server.restart)
            with anyio.fail_after(10):
                await bus.wait_reconnected(1)

            assert server.port == port
            assert bus.statistics().reconnects == 1
            info = await bus.jetstream().stream_info("RESTART")
            assert info.config.name == "RESTART"
            # The subscription was replayed on the new server.
            await bus.publish(f"{subject_root}.after", b"still here")
            assert (await sub.next(timeout=5)).data == b"still here"


async def test_kill_then_start_recovers(tmp_path: Path, subject_root: str) -> None:
    server = FaultServer(store_dir=tmp_path / "js")
    await anyio.to_thread.run_sync(server.start)
    try:
        async with open_nats_bus(server.url, reconnect_wait=0.05) as bus:
            pid = server.pid
            assert pid is not None
            await anyio.to_thread.run_sync(server.kill)
            assert _process_gone(pid)
            await anyio.to_thread.run_sync(server.start)
            with anyio.fail_after(10):
                await bus.wait_reconnected(1)
            async with bus.subscribe(subject_root) as sub:
                await bus.publish(subject_root, b"back")
                assert (await sub.next(timeout=5)).data == b"back"
    finally:
        await anyio.to_thread.run_sync(server.stop)
    assert not server.is_running


async def test_cluster_routes_messages_between_servers(subject_root: str) -> None:
    async with NatsCluster(size=3) as cluster:
        assert len(set(cluster.urls)) == 3
        first, last = cluster.urls[0], cluster.urls[-1]
        async with (
            open_nats_bus(first) as publisher,
            open_nats_bus(last) as receiver,
            receiver.subscribe(subject_root) as sub,
        ):
            # Interest crosses the route asynchronously; a message gets through only once
            # it has, so publish again until one arrives instead of guessing with a sleep.
            with anyio.fail_after(10):
                while True:
                    await publisher.publish(subject_root, b"across")
                    try:
                        envelope = await sub.next(timeout=0.2)
                        break
                    except TimeoutError:
                        continue
            assert envelope.data == b"across"
        pids = [server.pid for server in cluster.servers]
    assert all(pid is not None and _process_gone(pid) for pid in pids)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
