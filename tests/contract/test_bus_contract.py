"""One suite, both backends: what every `Bus` promises, run on MemoryBus and on a real NATS."""

from __future__ import annotations

import time

import anyio
import pytest

from bus import (
    Bus,
    BusClosed,
    Envelope,
    InvalidHeader,
    InvalidSubject,
    NoResponders,
    PayloadTooLarge,
    RequestTimeout,
    Subscription,
)
from bus._types import Headers
from tests.conftest import BusFactory

# -- delivery ------------------------------------------------------------------------------


async def test_every_plain_subscriber_gets_a_copy(open_bus: BusFactory, subject_root: str) -> None:
    subject = f"{subject_root}.news"
    async with (
        open_bus() as bus,
        bus.subscribe(subject) as first,
        bus.subscribe(subject) as second,
    ):
        assert isinstance(bus, Bus)
        assert isinstance(first, Subscription)
        await bus.publish(subject, b"hello")
        for sub in (first, second):
            envelope = await sub.next(timeout=5)
            assert envelope == Envelope(subject=subject, data=b"hello", headers={}, reply=None)
        assert bus.statistics().published == 1
        assert bus.statistics().subscriptions == 2
        assert first.statistics().delivered == 1


async def test_order_is_kept_per_publisher(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root) as sub:
        for i in range(50):
            await bus.publish(subject_root, str(i).encode())
        assert [int((await sub.next(timeout=5)).data) for _ in range(50)] == list(range(50))


@pytest.mark.parametrize(
    ("pattern", "subject", "delivered"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("*.b", "a.b", True),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.d", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        ("a.>", "b.c", False),
        ("*.>", "a.b", True),
        ("a.b", "a.b", True),
        ("a.b", "a.bb", False),
    ],
)
async def test_wildcards(
    open_bus: BusFactory, subject_root: str, pattern: str, subject: str, delivered: bool
) -> None:
    # A marker the pattern surely matches, published after the probe: whichever comes
    # first tells whether the probe was delivered, with no waiting for "nothing".
    marker = pattern.replace("*", "m").replace(">", "m")
    async with open_bus() as bus, bus.subscribe(f"{subject_root}.{pattern}") as sub:
        await bus.publish(f"{subject_root}.{subject}", b"probe")
        await bus.publish(f"{subject_root}.{marker}", b"marker")
        first = await sub.next(timeout=5)
        assert (first.data == b"probe") is delivered
        if delivered:
            assert first.subject == f"{subject_root}.{subject}"


async def test_queue_group_delivers_each_message_once(
    open_bus: BusFactory, subject_root: str
) -> None:
    subject, count = f"{subject_root}.jobs", 40
    async with (
        open_bus() as bus,
        bus.subscribe(subject, queue="workers") as worker_a,
        bus.subscribe(subject, queue="workers") as worker_b,
        bus.subscribe(subject, queue="audit") as auditor,
        bus.subscribe(subject) as watcher,
    ):
        for i in range(count):
            await bus.publish(subject, str(i).encode())
        await bus.flush()  # everything published has now been routed into the buffers

        async def take_all(sub: Subscription) -> list[int]:
            return [int((await sub.next(timeout=5)).data) for _ in range(sub.statistics().pending)]

        got_a, got_b = await take_all(worker_a), await take_all(worker_b)
        assert sorted(got_a + got_b) == list(range(count))  # each exactly once
        assert got_a and got_b  # and spread over the members
        assert await take_all(auditor) == list(range(count))  # another group: its own copy
        assert await take_all(watcher) == list(range(count))  # plain subscribers: all


# -- request / reply -----------------------------------------------------------------------


async def test_request_reply_carries_headers_both_ways(
    open_bus: BusFactory, subject_root: str
) -> None:
    subject = f"{subject_root}.echo"
    async with open_bus() as bus, bus.subscribe(subject, queue="svc") as inbox:

        async def respond() -> None:
            request = await inbox.next(timeout=5)
            assert request.reply is not None and request.reply.startswith("_INBOX.")
            await bus.publish(
                request.reply,
                request.data.upper(),
                headers={"echo-id": request.headers["req-id"], "status": "ok"},
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(respond)
            reply = await bus.request(subject, b"ping", headers={"req-id": "42"}, timeout=5)
        assert reply.data == b"PING"
        assert dict(reply.headers) == {"echo-id": "42", "status": "ok"}


async def test_no_responders_is_raised_at_once(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus:
        started = time.monotonic()
        with pytest.raises(NoResponders) as caught:
            await bus.request(f"{subject_root}.nobody", b"x", timeout=10)
        assert time.monotonic() - started < 2
        assert caught.value.subject == f"{subject_root}.nobody"


async def test_request_times_out_when_nobody_answers(
    open_bus: BusFactory, subject_root: str
) -> None:
    subject = f"{subject_root}.silent"
    async with open_bus() as bus, bus.subscribe(subject):
        with pytest.raises(RequestTimeout) as caught:
            await bus.request(subject, b"x", timeout=0.2)
        assert isinstance(caught.value, TimeoutError)
        assert caught.value.subject == subject


async def test_next_times_out_and_loses_nothing(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root) as sub:
        with pytest.raises(RequestTimeout):
            await sub.next(timeout=0.05)
        with anyio.move_on_after(0.01):
            await sub.next()
        await bus.publish(subject_root, b"later")
        assert (await sub.next(timeout=5)).data == b"later"


# -- headers and payloads --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        (None, {}),
        ({}, {}),
        ({"Trace-Id": "abc", "traceparent": "00-1"}, {"Trace-Id": "abc", "traceparent": "00-1"}),
        ({" padded ": "  v  "}, {"padded": "v"}),
        ({"multi": "line\r\nbreak"}, {"multi": "line  break"}),
        ({"utf8": "héllo"}, {"utf8": "héllo"}),
    ],
)
async def test_headers_round_trip(
    open_bus: BusFactory, subject_root: str, sent: Headers | None, received: dict[str, str]
) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root) as sub:
        await bus.publish(subject_root, b"", headers=sent)
        assert dict((await sub.next(timeout=5)).headers) == received


async def test_bad_header_name_is_refused(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus:
        with pytest.raises(InvalidHeader):
            await bus.publish(subject_root, b"", headers={"bad name": "x"})


async def test_oversized_payload_is_refused(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus:
        with pytest.raises(PayloadTooLarge):
            await bus.publish(subject_root, b"x" * (1024 * 1024 + 1))


# -- drain, unsubscribe, close -------------------------------------------------------------


async def test_subscription_drain_yields_buffered_then_ends(
    open_bus: BusFactory, subject_root: str
) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root) as sub:
        for i in range(5):
            await bus.publish(subject_root, str(i).encode())
        await bus.flush()
        await sub.drain()
        await bus.publish(subject_root, b"too late")  # nobody is listening any more
        await bus.flush()
        assert [e.data async for e in sub] == [b"0", b"1", b"2", b"3", b"4"]
        with pytest.raises(BusClosed):
            await sub.next(timeout=1)


async def test_bus_drain_delivers_buffered_messages_then_closes(
    open_bus: BusFactory, subject_root: str
) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root) as sub:
        for i in range(5):
            await bus.publish(subject_root, str(i).encode())
        await bus.flush()
        seen: list[bytes] = []
        acknowledged = 0

        async def consume() -> None:
            nonlocal acknowledged
            async for envelope in sub:
                seen.append(envelope.data)
                # Handlers may still publish (e.g. reply) while the bus drains.
                await bus.publish(f"{subject_root}.ack", envelope.data)
                acknowledged += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await bus.drain()
        assert seen == [b"0", b"1", b"2", b"3", b"4"]
        assert acknowledged == 5
        assert bus.is_closed


async def test_drain_lets_the_message_in_hand_finish(
    open_bus: BusFactory, subject_root: str
) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root) as sub:
        taken, release = anyio.Event(), anyio.Event()
        acknowledged: list[bytes] = []

        async def consume() -> None:
            async for envelope in sub:
                taken.set()
                await release.wait()  # still handling it when the drain starts
                await bus.publish(f"{subject_root}.ack", envelope.data)
                acknowledged.append(envelope.data)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await bus.publish(subject_root, b"job")
            with anyio.fail_after(5):
                await taken.wait()
            tg.start_soon(bus.drain)
            await bus.flush()
            assert not bus.is_closed  # waiting for the handler
            release.set()
        assert acknowledged == [b"job"]
        assert bus.is_closed


async def test_drain_without_consumers_or_messages_is_quick(
    open_bus: BusFactory, subject_root: str
) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root), bus.subscribe(f"{subject_root}.x"):
        with anyio.fail_after(2):
            await bus.drain()
        assert bus.is_closed


async def test_unsubscribe_discards_and_ends_iteration(
    open_bus: BusFactory, subject_root: str
) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root) as sub:
        await bus.publish(subject_root, b"dropped")
        await bus.flush()
        await sub.unsubscribe()
        assert [e async for e in sub] == []
        assert sub.statistics().pending == 0


async def test_waiting_consumer_ends_cleanly_when_bus_closes(
    open_bus: BusFactory, subject_root: str
) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root) as sub:
        ended = anyio.Event()

        async def consume() -> None:
            async for _ in sub:
                pass
            ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await bus.flush()  # let the consumer start waiting
            await bus.close()
            with anyio.fail_after(5):
                await ended.wait()


async def test_waiting_consumer_ends_cleanly_on_unsubscribe(
    open_bus: BusFactory, subject_root: str
) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root) as sub:
        async with anyio.create_task_group() as tg:
            received: list[Envelope] = []

            async def consume() -> None:
                received.extend([e async for e in sub])

            tg.start_soon(consume)
            await bus.flush()
            await sub.unsubscribe()
        assert received == []


async def test_close_ends_a_waiting_request_with_bus_closed(
    open_bus: BusFactory, subject_root: str
) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root) as sub:
        outcome: list[BaseException] = []

        async def ask() -> None:
            try:
                await bus.request(subject_root, b"x", timeout=30)
            except BusClosed as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await sub.next(timeout=5)  # the request is out; never answer it
            with anyio.fail_after(5):
                await bus.close()
        assert len(outcome) == 1


async def test_closed_bus_raises_bus_closed(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus:
        pass
    assert bus.is_closed
    with pytest.raises(BusClosed):
        await bus.publish(subject_root, b"x")
    with pytest.raises(BusClosed):
        await bus.request(subject_root, b"x", timeout=1)
    with pytest.raises(BusClosed):
        await bus.flush()
    with pytest.raises(BusClosed):
        async with bus.subscribe(subject_root):
            pass
    await bus.close()  # closing twice is fine
    await bus.drain()  # and so is draining a closed bus


async def test_draining_bus_refuses_new_subscriptions_and_requests(
    open_bus: BusFactory, subject_root: str
) -> None:
    async with open_bus() as bus:
        async with bus.subscribe(subject_root) as sub:
            async with anyio.create_task_group() as tg:

                async def consume() -> None:
                    async for _ in sub:
                        pass

                tg.start_soon(consume)
                tg.start_soon(bus.drain)
                await anyio.lowlevel.checkpoint()  # drain has started
                with pytest.raises(BusClosed):
                    async with bus.subscribe(f"{subject_root}.new"):
                        pass
                with pytest.raises(BusClosed):
                    await bus.request(subject_root, b"x", timeout=1)


# -- backpressure --------------------------------------------------------------------------


async def test_overflow_is_dropped_and_counted(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus, bus.subscribe(subject_root, max_pending=4) as sub:
        for i in range(20):
            await bus.publish(subject_root, str(i).encode())  # never blocks the publisher
        await bus.flush()
        stats = sub.statistics()
        assert stats.max_pending == 4
        assert 0 < stats.pending <= 4
        assert stats.dropped == 20 - stats.pending > 0
        assert bus.statistics().dropped >= stats.dropped
        # The oldest messages are kept, the newest dropped, as a NATS client does.
        kept = [int((await sub.next(timeout=5)).data) for _ in range(stats.pending)]
        assert kept == list(range(stats.pending))


async def test_max_pending_must_be_positive(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus:
        with pytest.raises(ValueError, match="max_pending"):
            async with bus.subscribe(subject_root, max_pending=0):
                pass


# -- subject rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject", ["", "a..b", "a.", ".a", "a b", "a\tb", "a.*", "a.>", "*", ">", "a*"]
)
async def test_publish_refuses_bad_subjects(open_bus: BusFactory, subject: str) -> None:
    async with open_bus() as bus:
        with pytest.raises(InvalidSubject):
            await bus.publish(subject, b"x")
        with pytest.raises(InvalidSubject):
            await bus.request(subject, b"x", timeout=1)


@pytest.mark.parametrize("pattern", ["", "a..b", "a.", "a b", "a.>.b", ">.a", "a*", "a.b>", "a.*x"])
async def test_subscribe_refuses_bad_patterns(open_bus: BusFactory, pattern: str) -> None:
    async with open_bus() as bus:
        with pytest.raises(InvalidSubject):
            async with bus.subscribe(pattern):
                pass


async def test_subscribe_refuses_bad_queue_names(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus:
        for queue in ("", "a b"):
            with pytest.raises(InvalidSubject):
                async with bus.subscribe(subject_root, queue=queue):
                    pass


async def test_publish_refuses_bad_reply_subject(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus:
        with pytest.raises(InvalidSubject):
            await bus.publish(subject_root, b"x", reply="_INBOX.*")


async def test_publish_batch_delivers_in_order(open_bus: BusFactory, subject_root: str) -> None:
    async with open_bus() as bus, bus.subscribe(f"{subject_root}.>") as sub:
        await bus.publish_batch(
            [(f"{subject_root}.a", b"1"), (f"{subject_root}.b", b"2"), (f"{subject_root}.a", b"3")]
        )
        await bus.flush()
        got = [await sub.next(5) for _ in range(3)]
    assert [(e.subject.rsplit(".", 1)[1], e.data) for e in got] == [
        ("a", b"1"), ("b", b"2"), ("a", b"3")
    ]


async def test_publish_batch_checks_every_subject_before_sending(
    open_bus: BusFactory, subject_root: str
) -> None:
    async with open_bus() as bus, bus.subscribe(f"{subject_root}.>") as sub:
        with pytest.raises(InvalidSubject):
            await bus.publish_batch([(f"{subject_root}.ok", b"1"), (f"{subject_root}.*", b"2")])
        await bus.publish(f"{subject_root}.marker", b"m")
        await bus.flush()
        first = await sub.next(5)
    assert first.subject.endswith(".marker")
