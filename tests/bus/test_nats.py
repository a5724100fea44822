"""NatsBus behaviour beyond the shared contract: drain with a live requester, lost
connections, slow-consumer logging, and the raw client for JetStream users."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anyio
import pytest

from bus import BusClosed, BusConnectError, NatsServer, Subscription, open_nats_bus
from bus.nats import NatsBus
from bus.server import find_nats_server

pytestmark = pytest.mark.nats


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server this test may stop; the session one must stay up for the others."""
    try:
        find_nats_server()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    server = NatsServer(jetstream=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_drain_answers_buffered_requests_before_closing(
    nats_url: str, subject_root: str
) -> None:
    subject = f"{subject_root}.svc"
    async with open_nats_bus(nats_url) as client, open_nats_bus(nats_url) as service:
        async with service.subscribe(subject, queue="svc") as inbox:
            replies: list[bytes] = []

            async def ask(i: int) -> None:
                reply = await client.request(subject, str(i).encode(), timeout=5)
                replies.append(reply.data)

            async with anyio.create_task_group() as requests:
                for i in range(3):
                    requests.start_soon(ask, i)
                # Wait until all three requests sit in the service's buffer, unread.
                with anyio.fail_after(5):
                    while inbox.statistics().pending < 3:
                        await service.flush()

                async def serve() -> None:
                    async for request in inbox:
                        assert request.reply is not None
                        await service.publish(request.reply, b"re:" + request.data)

                async with anyio.create_task_group() as worker:
                    worker.start_soon(serve)
                    await service.drain()
            assert sorted(replies) == [b"re:0", b"re:1", b"re:2"]
            assert service.is_closed


@pytest.mark.parametrize("attempts", [0, 1])
async def test_iteration_ends_cleanly_when_the_connection_is_lost_for_good(
    own_server: NatsServer, subject_root: str, attempts: int
) -> None:
    async with (
        open_nats_bus(own_server.url, max_reconnect_attempts=attempts, reconnect_wait=0.01) as bus,
        bus.subscribe(subject_root) as sub,
    ):
        ended = anyio.Event()

        async def consume() -> None:
            async for _ in sub:
                pass
            ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await bus.flush()
            await anyio.to_thread.run_sync(own_server.stop)
            with anyio.fail_after(10):
                await ended.wait()
        assert bus.is_closed
        with pytest.raises(BusClosed):
            await bus.publish(subject_root, b"x")
        with pytest.raises(BusClosed):
            await bus.wait_reconnected(1)


async def test_slow_consumer_is_counted_per_message_but_logged_once(
    nats_url: str, subject_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_nats_bus(nats_url) as bus, bus.subscribe(subject_root, max_pending=1) as sub:
        with caplog.at_level(logging.WARNING, logger="bus.nats"):
            for _ in range(100):
                await bus.publish(subject_root, b"x")
            await bus.flush()
        assert sub.statistics().dropped == 99
        assert bus.statistics().dropped == 99
        slow = [r for r in caplog.records if "slow consumer" in r.getMessage()]
        assert len(slow) == 1


async def test_raw_client_and_jetstream_are_available(nats_url: str) -> None:
    async with open_nats_bus(nats_url, name="raw-access") as bus:
        assert isinstance(bus, NatsBus)
        assert bus.client.is_connected and bus.is_connected
        account = await bus.jetstream().account_info()
        assert account.limits is not None


async def test_credentials_are_passed_and_refusal_is_a_connect_error() -> None:
    try:
        find_nats_server()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    async with NatsServer(jetstream=False, extra_args=("--user", "svc", "--pass", "pw")) as srv:
        with pytest.raises(BusConnectError, match="Authorization Violation"):
            async with open_nats_bus(srv.url, user="svc", password="wrong"):
                pass
        async with open_nats_bus(srv.url, user="svc", password="pw") as bus:
            await bus.flush()


async def test_no_request_is_lost_when_a_queue_member_drains_under_load(
    nats_url: str, subject_root: str
) -> None:
    subject, count = f"{subject_root}.work", 300
    answered: list[int] = []
    busy = anyio.Event()

    async def serve(bus: NatsBus, inbox: Subscription) -> None:
        async for request in inbox:
            assert request.reply is not None
            await bus.publish(request.reply, request.data)
            if inbox.statistics().delivered == 20:
                busy.set()

    async with (
        open_nats_bus(nats_url) as client,
        open_nats_bus(nats_url) as leaving,
        open_nats_bus(nats_url) as staying,
        leaving.subscribe(subject, queue="q") as leaving_inbox,
        staying.subscribe(subject, queue="q") as staying_inbox,
        anyio.create_task_group() as servers,
    ):
        servers.start_soon(serve, leaving, leaving_inbox)
        servers.start_soon(serve, staying, staying_inbox)

        async def ask(i: int) -> None:
            reply = await client.request(subject, str(i).encode(), timeout=10)
            answered.append(int(reply.data))

        async def leave_when_busy() -> None:
            await busy.wait()
            await leaving.drain()  # one member shuts down while requests keep coming

        async with anyio.create_task_group() as requests:
            requests.start_soon(leave_when_busy)
            for i in range(count):
                requests.start_soon(ask, i)
        assert sorted(answered) == list(range(count))
        assert leaving.is_closed
        await staying_inbox.drain()
