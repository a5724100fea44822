"""`bus.nats.pull.PullConsumer` against a real nats-server: the JetStream pull protocol.

Each test uses a stream of its own (`PULL_<name>` over `pull.<name>.>`) and a durable
consumer on it, so tests share the session's server without seeing each other's messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, StreamConfig

from bus import BusClosed, open_nats_bus
from bus.nats import NatsBus
from bus.nats.pull import (
    ConsumerGone,
    PullConsumer,
    PullRefused,
    stream_sequence,
)
from tests.nats_servers import FaultServer

pytestmark = pytest.mark.nats


@asynccontextmanager
async def stream_and_consumer(
    bus: NatsBus, *, ack_policy: AckPolicy = AckPolicy.EXPLICIT, ack_wait: float = 30.0,
    max_batch: int | None = None,
) -> AsyncIterator[tuple[JetStreamContext, str, str]]:
    """A fresh stream with one durable pull consumer; yields (js, stream, subject prefix)."""
    name = os.urandom(4).hex()
    stream, prefix = f"PULL_{name}", f"pull.{name}"
    js = bus.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"]))
    config = ConsumerConfig(
        durable_name="reader", ack_policy=ack_policy, ack_wait=ack_wait, max_ack_pending=100_000
    ).as_dict()
    if max_batch is not None:  # `max_batch` is not in nats-py's ConsumerConfig
        config["max_batch"] = max_batch
    reply = await bus.client.request(
        f"$JS.API.CONSUMER.CREATE.{stream}.reader",
        json.dumps({"stream_name": stream, "config": config}).encode(), timeout=5,
    )
    assert "error" not in json.loads(reply.data), reply.data
    try:
        yield js, stream, prefix
    finally:
        if not bus.is_closed:
            try:
                await js.delete_stream(stream)
            except nats.js.errors.NotFoundError:
                pass


async def publish(bus: NatsBus, prefix: str, count: int, start: int = 0) -> None:
    js = bus.jetstream()
    for i in range(start, start + count):
        await js.publish(f"{prefix}.m", str(i).encode())  # acked by the stream: stored


async def read(pull: PullConsumer, count: int, *, ack: bool = True) -> list[tuple[int, bytes]]:
    """Take batches (acking each) until `count` messages have come."""
    got: list[tuple[int, bytes]] = []
    with anyio.fail_after(20):
        while len(got) < count:
            batch = await pull.next_batch(1.0)
            got.extend(batch.messages)
            if ack:
                await pull.ack(batch)
    return got


async def settled(js: JetStreamContext, stream: str) -> ConsumerInfo:
    """Wait until nothing is pending nor awaiting an ack (each try is a round trip)."""
    with anyio.fail_after(10):
        while True:
            info = await js.consumer_info(stream, "reader")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return info


def test_stream_sequence_from_both_ack_subject_forms() -> None:
    assert stream_sequence("$JS.ACK.MATRIZ.observability.1.42.40.1732790000000000000.7") == 42
    # v2: domain and account hash after $JS.ACK, a random token at the end.
    v2 = "$JS.ACK.hub.ACCHASH.MATRIZ.observability.2.43.41.1732790000000000000.6.rnd"
    assert stream_sequence(v2) == 43
    for junk in (None, "", "_INBOX.x", "$JS.ACK.a.b.c", "$JS.ACK.S.C.1.x.1.1.1"):
        assert stream_sequence(junk) is None


async def test_batches_come_in_stream_order_each_once_and_acks_settle(
    nats_url: str, internals: str
) -> None:
    async with open_nats_bus(nats_url) as bus, stream_and_consumer(bus) as (js, stream, prefix):
        assert bus.internals == internals
        await publish(bus, prefix, 1000)
        async with PullConsumer(bus, stream, "reader", batch=64, expires_s=1.0) as pull:
            got = await read(pull, 1000)
            stats = pull.statistics()
        assert [seq for seq, _ in got] == list(range(1, 1001))
        assert [data for _, data in got] == [str(i).encode() for i in range(1000)]
        info = await settled(js, stream)
        assert info.delivered.stream_seq == 1000
        assert stats.delivered == stats.acked == 1000
        # Requests run ahead by at most 1.5 batches, and it took more than one.
        assert 1000 / 64 <= stats.requests <= 1000 / 32 + 2
        assert stats.requested_ahead <= 96
        assert stats.pending == 0  # the last ack subject said nothing was left


async def test_ack_policy_all_acks_a_batch_with_one_message(nats_url: str) -> None:
    async with (
        open_nats_bus(nats_url) as bus,
        stream_and_consumer(bus, ack_policy=AckPolicy.ALL) as (js, stream, prefix),
    ):
        await publish(bus, prefix, 500)
        async with PullConsumer(
            bus, stream, "reader", ack_policy="all", batch=128, max_batch=200
        ) as pull:
            with anyio.fail_after(20):
                while pull.statistics().delivered < 500:
                    batch = await pull.next_batch(1.0)
                    sent_before = bus.client.stats["out_msgs"]
                    await pull.ack(batch)
                    # However many messages the batch holds, its ack is one message.
                    assert bus.client.stats["out_msgs"] - sent_before == bool(batch.messages)
            assert pull.statistics().acked == 500
        await settled(js, stream)


async def test_an_idle_request_expires_and_the_next_message_still_comes(
    nats_url: str,
) -> None:
    async with open_nats_bus(nats_url) as bus, stream_and_consumer(bus) as (js, stream, prefix):
        async with PullConsumer(bus, stream, "reader", batch=16, expires_s=0.1) as pull:
            with anyio.fail_after(10):
                # The server ends each idle request with a 408 after `expires`: an empty
                # batch, and a new request goes out with the next call.
                while pull.statistics().statuses.get("408", 0) < 2:
                    batch = await pull.next_batch(5.0)
                    assert batch.messages == []
            assert pull.statistics().requests >= 2
            await publish(bus, prefix, 3)
            got = await read(pull, 3)
        assert [seq for seq, _ in got] == [1, 2, 3]
        await settled(js, stream)


async def test_a_consumer_deleted_under_a_waiting_request_is_reported(nats_url: str) -> None:
    async with open_nats_bus(nats_url) as bus, stream_and_consumer(bus) as (js, stream, _):
        async with PullConsumer(bus, stream, "reader", batch=16, expires_s=30) as pull:
            async with anyio.create_task_group() as tg:
                # Wait until our request is waiting on the server, then delete the consumer.
                async def delete_when_waiting() -> None:
                    with anyio.fail_after(10):
                        while (await js.consumer_info(stream, "reader")).num_waiting == 0:
                            pass
                    await js.delete_consumer(stream, "reader")

                tg.start_soon(delete_when_waiting)
                with anyio.fail_after(10), pytest.raises(ConsumerGone) as gone:
                    await pull.next_batch(20.0)
        assert "deleted" in str(gone.value).lower()


async def test_a_missing_consumer_is_reported(nats_url: str) -> None:
    async with open_nats_bus(nats_url) as bus, stream_and_consumer(bus) as (_, stream, _):
        async with PullConsumer(bus, stream, "nobody", batch=16, expires_s=5) as pull:
            with anyio.fail_after(10), pytest.raises(ConsumerGone):
                await pull.next_batch(5.0)


async def test_a_batch_over_the_consumers_limit_is_refused(nats_url: str) -> None:
    async with (
        open_nats_bus(nats_url) as bus,
        stream_and_consumer(bus, max_batch=10) as (_, stream, _),
    ):
        async with PullConsumer(bus, stream, "reader", batch=64, expires_s=5) as pull:
            with anyio.fail_after(10), pytest.raises(PullRefused) as refused:
                await pull.next_batch(5.0)
        assert refused.value.status == "409"
        assert "MaxRequestBatch" in refused.value.description


async def test_unacked_messages_of_a_crashed_reader_are_redelivered_once(
    nats_url: str,
) -> None:
    async with (
        open_nats_bus(nats_url) as bus,
        stream_and_consumer(bus, ack_wait=0.5) as (js, stream, prefix),
    ):
        await publish(bus, prefix, 100)
        # The first reader takes everything and dies (its connection closes) before acking.
        async with open_nats_bus(nats_url) as doomed_bus:
            doomed = PullConsumer(doomed_bus, stream, "reader", batch=100, max_batch=100)
            await doomed.__aenter__()
            taken = await read(doomed, 100, ack=False)
        assert len(taken) == 100
        with pytest.raises(BusClosed):
            await doomed.next_batch(0.1)
        # The second reader gets every one of them after the ack wait: nothing is lost, and
        # once it has acked nothing comes again.
        async with PullConsumer(bus, stream, "reader", batch=64, expires_s=0.5) as pull:
            got = await read(pull, 100)
            await settled(js, stream)
            extra = await pull.next_batch(0.7)  # longer than ack_wait: no late redelivery
        assert sorted(seq for seq, _ in got) == list(range(1, 101))
        assert extra.messages == []


async def test_drain_hands_over_what_was_sent_and_leaves_nothing_waiting(
    nats_url: str,
) -> None:
    async with open_nats_bus(nats_url) as bus, stream_and_consumer(bus) as (js, stream, prefix):
        await publish(bus, prefix, 50)
        pull = PullConsumer(bus, stream, "reader", batch=64, max_batch=10, expires_s=30)
        async with pull:
            first: list[tuple[int, bytes]] = []
            while len(first) < 10:  # the first request's 10 (they may come in pieces)
                got = await pull.next_batch(5.0)
                await pull.ack(got)
                first += got.messages
            await bus.flush()
            rest = await pull.drain()  # the other 40 were sent already: handed over here
            await pull.ack(rest)
            with pytest.raises(BusClosed):
                await pull.next_batch(0.1)
        assert [seq for seq, _ in first + rest.messages] == list(range(1, 51))
        await settled(js, stream)
        # The server dropped our waiting request with the inbox: new messages wait for the
        # next reader instead of going to a dead inbox (and waiting out the ack wait).
        await publish(bus, prefix, 5, start=50)
        info = await js.consumer_info(stream, "reader")
        assert (info.num_pending, info.num_ack_pending) == (5, 0)


async def test_messages_on_the_inbox_that_are_not_deliveries_are_skipped(
    nats_url: str,
) -> None:
    async with open_nats_bus(nats_url) as bus, stream_and_consumer(bus) as (_, stream, prefix):
        async with PullConsumer(bus, stream, "reader", batch=16, expires_s=5) as pull:
            await bus.client.publish(pull._inbox, b"forged", reply=bus.new_inbox())
            await bus.client.publish(pull._inbox, b"forged too")
            await publish(bus, prefix, 1)
            got = await read(pull, 1)
            assert got == [(1, b"0")]
            assert pull.statistics().foreign == 2


async def test_a_server_restart_loses_nothing(tmp_path: Path) -> None:
    server = FaultServer(store_dir=tmp_path / "js")
    await anyio.to_thread.run_sync(server.start)
    try:
        async with (
            open_nats_bus(server.url, reconnect_wait=0.05) as bus,
            stream_and_consumer(bus, ack_wait=1.0) as (js, stream, prefix),
        ):
            await publish(bus, prefix, 200)
            async with PullConsumer(bus, stream, "reader", batch=32, expires_s=0.5) as pull:
                got = await read(pull, 100)
                await anyio.to_thread.run_sync(server.kill)
                await anyio.to_thread.run_sync(server.start)
                await bus.wait_reconnected(1)
                await publish(bus, prefix, 50, start=200)
                # Requests the dead server held are forgotten after `expires`; acks it lost
                # mean some messages come again (a reader recognises them by sequence).
                with anyio.fail_after(30):
                    while True:
                        batch = await pull.next_batch(0.2)
                        got.extend(batch.messages)
                        await pull.ack(batch)
                        if {seq for seq, _ in got} != set(range(1, 251)):
                            continue
                        info = await js.consumer_info(stream, "reader")
                        if info.num_pending == info.num_ack_pending == 0:
                            break
    finally:
        await anyio.to_thread.run_sync(server.stop)
    assert {seq for seq, _ in got} == set(range(1, 251))


async def test_sizes_and_durations_are_checked(nats_url: str) -> None:
    async with open_nats_bus(nats_url) as bus:
        for options in ({"batch": 0}, {"expires_s": 0}, {"max_batch": 0},
                        {"linger_s": -1}, {"linger_s": 2.0, "expires_s": 1.0}):
            with pytest.raises(ValueError):
                PullConsumer(bus, "S", "C", **options)  # type: ignore[arg-type]
