"""`Subscription.take_ready`: what a reader finds buffered, in one call, on every backend.

The slice service's readers take everything waiting this way (one call per pass, not an
`async for` step per message). On NATS a flush syncs: the server sends this connection's own
messages ahead of the PONG, so once `flush()` returns they are in nats-py's buffer. On the
public nats-py API (the "nats-public" fallback) nothing is taken this way and iteration still
delivers everything, in order.
"""

from __future__ import annotations

import sys

import pytest

from bus import Bus, Envelope, Subscription
from bus._subject import validate_subject
from bus.errors import InvalidSubject
from bus.nats import _compat
from tests.conftest import BusFactory


def _takes_in_bulk(bus: Bus) -> bool:
    return bus.backend == "memory" or isinstance(_compat.INTERNALS, _compat.PrivateInternals)


async def _send(bus: Bus, subject: str, count: int) -> None:
    for i in range(count):
        await bus.publish(subject, str(i).encode(), headers={"N": str(i)}, reply=f"_INBOX.t.{i}")
    await bus.flush()


async def _rest(sub: Subscription, count: int) -> list[Envelope]:
    return [await sub.next(timeout=5) for _ in range(count)]


async def test_take_ready_takes_what_is_buffered_in_order_up_to_the_limit(
    open_bus: BusFactory, subject_root: str
) -> None:
    subject = f"{subject_root}.ready"
    async with open_bus() as bus, bus.subscribe(subject) as sub:
        assert sub.take_ready(8) == []  # nothing buffered: empty, never waits
        await _send(bus, subject, 10)
        first = sub.take_ready(4)
        second = sub.take_ready(100)
        if _takes_in_bulk(bus):
            assert [len(first), len(second)] == [4, 6]
            assert sub.statistics().pending == 0
        got = first + second
        got += await _rest(sub, 10 - len(got))
        assert sub.statistics().delivered == 10
    assert [env.data for env in got] == [str(i).encode() for i in range(10)]
    assert [env.reply for env in got] == [f"_INBOX.t.{i}" for i in range(10)]
    assert [env.headers["N"] for env in got] == [str(i) for i in range(10)]
    assert {env.subject for env in got} == {subject}


async def test_take_ready_zero_takes_nothing(open_bus: BusFactory, subject_root: str) -> None:
    subject = f"{subject_root}.zero"
    async with open_bus() as bus, bus.subscribe(subject) as sub:
        await _send(bus, subject, 2)
        assert sub.take_ready(0) == []
        got = sub.take_ready(5)
        got += await _rest(sub, 2 - len(got))
    assert [env.data for env in got] == [b"0", b"1"]


async def test_after_a_drain_take_ready_hands_out_the_buffer_then_iteration_ends(
    open_bus: BusFactory, subject_root: str
) -> None:
    subject = f"{subject_root}.drain"
    async with open_bus() as bus, bus.subscribe(subject) as sub:
        await _send(bus, subject, 5)
        await sub.drain()
        await bus.publish(subject, b"late")  # after the drain: never delivered
        await bus.flush()
        got = sub.take_ready(100)
        got += await _rest(sub, 5 - len(got))
        assert [env async for env in sub] == []  # ended, nothing after the buffer
    assert [env.data for env in got] == [str(i).encode() for i in range(5)]


async def test_a_closed_subscription_takes_nothing(
    open_bus: BusFactory, subject_root: str
) -> None:
    subject = f"{subject_root}.closed"
    async with open_bus() as bus, bus.subscribe(subject) as sub:
        await _send(bus, subject, 3)
        await sub.unsubscribe()
        assert sub.take_ready(10) == []
        assert [env async for env in sub] == []


@pytest.mark.parametrize("subject", [
    "a", "a.b", "_INBOX.abcdefghijklmnopqrstuv.12345", "lukhas.context.planner", "a-b_c.d$e",
    "x.\u00e9t\u00e9",
])
def test_subjects_the_fast_check_accepts_are_valid(subject: str) -> None:
    validate_subject(subject)


@pytest.mark.parametrize("subject", [
    "", ".", "a.", ".a", "a..b", "a b", "a.*", "a.>", "*", ">", "a.b*", "a\tb", "a\nb",
    "a\u00a0b", "a\u2028b", "a\u3000b",
])
def test_subjects_the_slow_check_refused_are_still_refused(subject: str) -> None:
    with pytest.raises(InvalidSubject):
        validate_subject(subject)


def test_printable_without_a_space_means_no_whitespace() -> None:
    """What the fast check relies on, over every code point."""
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if char.isspace():
            assert char == " " or not char.isprintable(), hex(code)
