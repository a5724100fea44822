"""A flush whose connection drops before its PONG fails at once: it never confirms.

`NatsBus.flush` sends its PING when called and waits on the PONG nats-py will match to it.
A lost connection takes the PING with it (nats-py forgets the PINGs of a dead connection),
so the flush must fail then, not wait out its timeout, and not stay in line to be handed
a refusal meant for a flush on the next connection.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from bus import BusError, NatsServer, RequestTimeout, open_nats_bus
from bus.nats import NatsBus
from tests.nats_servers import stop_server

pytestmark = pytest.mark.nats


@asynccontextmanager
async def bus_on_own_server(**options: Any) -> AsyncIterator[tuple[NatsBus, int]]:
    """A bus (`options` to `open_nats_bus`) on a nats-server of its own, without JetStream,
    for a test to stop or kill: the bus and the server's pid."""
    server = NatsServer(jetstream=False)
    server.start()
    try:
        async with open_nats_bus(server.url, **options) as bus:
            assert isinstance(bus, NatsBus) and server.pid is not None
            yield bus, server.pid
    finally:
        server.stop()


async def test_a_flush_whose_connection_drops_fails_at_once() -> None:
    async with bus_on_own_server(max_reconnect_attempts=1, reconnect_wait=0.1) as (bus, pid):
        await bus.publish("lukhas.context.lost", b"{}")
        await stop_server(pid)  # the server reads nothing more: no PONG
        flushed = bus.flush(timeout=60)  # its PING is on the wire now
        os.kill(pid, signal.SIGKILL)  # and the connection drops with it unanswered
        with anyio.fail_after(20), pytest.raises(BusError) as raised:
            await flushed
        assert not isinstance(raised.value, RequestTimeout)
        assert bus._flights == type(bus._flights)()  # nothing left to hand refusals to


async def test_a_flush_past_its_timeout_fails_and_its_late_pong_harms_nothing() -> None:
    """A flush whose PONG is late raises `RequestTimeout`; the PONG, when it comes, finds
    its future already done, which must not end nats-py's reader: later flushes and
    messages still go through the same connection."""
    async with bus_on_own_server() as (bus, pid), bus.subscribe("lukhas.context.late") as sub:
        await stop_server(pid)
        try:
            with pytest.raises(RequestTimeout):
                await bus.flush(timeout=0.2)
            cancelled = bus.flush(timeout=60)
            with anyio.move_on_after(0.2):  # a wait cancelled from outside, too
                await cancelled
        finally:
            os.kill(pid, signal.SIGCONT)  # both PONGs now come back, late
        await bus.publish("lukhas.context.late", b"after")
        await bus.flush()
        with anyio.fail_after(10):
            env = await anext(aiter(sub))
        assert env.data == b"after"
        await bus.flush()
