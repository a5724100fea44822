"""A flush whose connection drops before its PONG fails at once: it never confirms.

`NatsBus.flush` sends its PING when called and waits on the PONG nats-py will match to it.
A lost connection takes the PING with it (nats-py forgets the PINGs of a dead connection),
so the flush must fail then, not wait out its timeout, and not stay in line to be handed
a refusal meant for a flush on the next connection.
"""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from bus import BusError, NatsServer, RequestTimeout, open_nats_bus

pytestmark = pytest.mark.nats


async def test_a_flush_whose_connection_drops_fails_at_once() -> None:
    server = NatsServer(jetstream=False)
    server.start()
    try:
        async with open_nats_bus(
            server.url, max_reconnect_attempts=1, reconnect_wait=0.1
        ) as bus:
            await bus.publish("lukhas.context.lost", b"{}")
            pid = server.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # the server reads nothing more: no PONG
            flushed = bus.flush(timeout=60)  # its PING is on the wire now
            os.kill(pid, signal.SIGKILL)  # and the connection drops with it unanswered
            with anyio.fail_after(20), pytest.raises(BusError) as raised:
                await flushed
            assert not isinstance(raised.value, RequestTimeout)
            assert bus._flights == type(bus._flights)()  # nothing left to hand refusals to
    finally:
        server.stop()
