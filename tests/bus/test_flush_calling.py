"""`NatsBus.flush_calling`: a flush whose end calls back in place, once.

The deferred handoff answers at its flush's PONG from nats-py's reader, with no task woken,
and writes the reply at once (`write_queued`). These pin what that relies on: the callback
runs once, in nats-py's reader, with None only once the PONG is in; a reply queued and
written there reaches its subscriber; a late PONG after a timeout, or a dropped connection,
ends it once with the error `flush()` would raise; and without nats-py's internals it
declines, starting nothing, so the caller uses `flush()`.
"""

from __future__ import annotations

import asyncio
import os
import signal

import anyio
import pytest

from bus import BusError, RequestTimeout, open_nats_bus
from bus.nats import NatsBus, _compat
from tests.bus.test_flush_lost import bus_on_own_server
from tests.nats_servers import stop_server

pytestmark = pytest.mark.nats


class _Ends:
    """A `flush_calling` callback: the errors it was called with, in order, and an event set
    at its first call."""

    def __init__(self) -> None:
        self.errors: list[BusError | None] = []
        self.called = anyio.Event()

    def __call__(self, error: BusError | None) -> None:
        self.errors.append(error)
        self.called.set()


async def test_the_pong_calls_back_in_nats_pys_reader_and_a_reply_written_there_arrives(
    nats_url: str, subject_root: str
) -> None:
    async with open_nats_bus(nats_url) as bus, open_nats_bus(nats_url) as peer:
        assert isinstance(bus, NatsBus)
        async with peer.subscribe(f"{subject_root}.reply") as replies:
            await peer.flush()
            ended: list[tuple[BusError | None, asyncio.Task[object] | None]] = []
            landed = anyio.Event()

            def on_end(error: BusError | None) -> None:
                ended.append((error, asyncio.current_task()))
                assert bus.publish_nowait(f"{subject_root}.reply", b"confirmed")
                assert bus.write_queued()  # on the socket now, not at the flusher's turn
                landed.set()

            await bus.publish(f"{subject_root}.covered", b"{}")
            assert bus.flush_calling(on_end)
            assert ended == []  # never called from within the call
            with anyio.fail_after(10):
                await landed.wait()
                env = await anext(aiter(replies))
            assert env.data == b"confirmed"
            ((error, task),) = ended
            assert error is None and task is bus.client._reading_task
            await bus.flush()  # the connection serves on
            assert len(ended) == 1 and not bus._flights


async def test_a_timed_out_flush_calls_back_once_and_its_late_pong_harms_nothing() -> None:
    async with bus_on_own_server() as (bus, pid):
        await stop_server(pid)
        ends = _Ends()
        try:
            assert bus.flush_calling(ends, timeout=0.2)
            with anyio.fail_after(10):
                await ends.called.wait()  # timed out
        finally:
            os.kill(pid, signal.SIGCONT)  # the PONG now comes back, late
        await bus.flush()  # behind the late PONG: it has been read
        assert len(ends.errors) == 1 and isinstance(ends.errors[0], RequestTimeout)
        assert not bus._flights


async def test_a_flush_whose_connection_drops_calls_back_at_once() -> None:
    async with bus_on_own_server(max_reconnect_attempts=1, reconnect_wait=0.1) as (bus, pid):
        await stop_server(pid)
        ends = _Ends()
        assert bus.flush_calling(ends, timeout=60)
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(20):
            await ends.called.wait()  # dropped
        ((error,),) = [ends.errors]
        assert isinstance(error, BusError) and not isinstance(error, RequestTimeout)
        assert not bus._flights


async def test_without_the_internals_it_declines_and_starts_nothing(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_compat, "INTERNALS", _compat.PublicInternals())
    async with open_nats_bus(nats_url) as bus:
        assert isinstance(bus, NatsBus)
        assert bus.flush_calling(lambda error: pytest.fail("called")) is False
        assert bus.write_queued() is False
        assert not bus._flights
        await bus.flush()


async def test_a_publish_queued_without_waking_the_flusher_leaves_with_the_next_ping(
    nats_url: str, subject_root: str
) -> None:
    """`publish_nowait(wake=False)` queues the message and leaves nats-py's flusher asleep;
    the PING `flush_calling` sends next carries it, so the flush confirms it and the
    subscriber gets it, in order behind what was queued before."""
    async with open_nats_bus(nats_url) as bus, open_nats_bus(nats_url) as peer:
        assert isinstance(bus, NatsBus)
        async with peer.subscribe(f"{subject_root}.quiet") as sub:
            await peer.flush()
            await bus.publish(f"{subject_root}.quiet", b"first")
            await bus.flush()  # a round trip: the flusher has run and sleeps again
            flush_queue = bus.client._flush_queue
            assert flush_queue is not None and flush_queue.empty()
            assert bus.publish_nowait(f"{subject_root}.quiet", b"second", wake=False)
            assert bus.client._pending and flush_queue.empty()  # queued, nobody woken
            ends = _Ends()
            assert bus.flush_calling(ends)
            assert not bus.client._pending  # written with the PING
            with anyio.fail_after(10):
                await ends.called.wait()  # landed
                got = [(await anext(aiter(sub))).data for _ in range(2)]
            assert ends.errors == [None] and got == [b"first", b"second"]
