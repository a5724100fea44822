"""The ledger writer's atomic batches on the wire (candidate/governance/consent_ledger/_pipeline.py
over `bus.nats.queue_hpubs`): the commands laid out in one piece carry the headers
`Client.publish` would write, in the same order, and the batch stays atomic. Against a real
nats-server with JetStream."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig
from nats.js.errors import APIError

from bus.nats import _compat, queue_hpubs
from candidate._jetstream import ensure_stream
from candidate.governance.consent_ledger._pipeline import Pipeline

pytestmark = pytest.mark.nats


@asynccontextmanager
async def _stream(url: str) -> AsyncIterator[tuple[Client, Any, str, str]]:
    """A connection, its JetStream context, a fresh atomic stream and its subject root."""
    nc = Client()
    await nc.connect(url)
    js = nc.jetstream()
    root = f"wire.{uuid.uuid4().hex[:12]}"
    name = f"WIRE_{uuid.uuid4().hex[:12]}"
    await ensure_stream(js, StreamConfig(name=name, subjects=[f"{root}.>"], allow_atomic=True,
                                         allow_direct=True))
    try:
        yield nc, js, name, root
    finally:
        await js.delete_stream(name)
        await nc.close()


class _Frame(NamedTuple):
    subject: str
    reply: str
    headers: bytes
    payload: bytes


def _frames(wire: bytes) -> list[_Frame]:
    """The PUB/HPUB commands in what a client wrote (other commands skipped)."""
    out: list[_Frame] = []
    while wire:
        line, _, wire = wire.partition(b"\r\n")
        op, *args = line.decode().split()
        if op not in ("PUB", "HPUB"):
            continue
        if op == "HPUB":
            subject, *reply_, hlen, total = args
            size, hsize = int(total), int(hlen)
        else:
            subject, *reply_, total = args
            size, hsize = int(total), 0
        body, wire = wire[:size], wire[size + 2:]
        out.append(_Frame(subject, reply_[0] if reply_ else "", body[:hsize], body[hsize:]))
    return out


async def _publish_and_capture(
    url: str, headers: list[dict[str, str]], expected_last: int | None = None
) -> tuple[list[_Frame], list[Any], Any]:
    """Publish three messages as one atomic batch; the commands the client wrote, what the
    stream stored, and the batch's outcome (its ack or error)."""
    async with _stream(url) as (nc, js, name, root):
        written = bytearray()
        transport = nc._transport
        write, writelines = transport.write, transport.writelines

        def spy_write(data: bytes) -> None:
            written.extend(data)
            write(data)

        def spy_writelines(lines: list[bytes]) -> None:
            for line in lines:
                written.extend(line)
            writelines(lines)

        transport.write, transport.writelines = spy_write, spy_writelines
        messages = [(f"{root}.a.{i}", f"payload {i}".encode()) for i in range(3)]
        first = dict(headers[0])
        if expected_last is not None:
            first["Nats-Expected-Last-Sequence"] = str(expected_last)
        future = await Pipeline(nc).publish_atomic(messages, [first, *headers[1:]])
        try:
            outcome: Any = await future
        except APIError as exc:
            outcome = exc
        transport.write, transport.writelines = write, writelines
        wire = [f for f in _frames(bytes(written)) if f.subject.startswith(root)]
        last = (await js.stream_info(name)).state.last_seq
        stored = [await js.get_msg(name, seq=s) for s in range(1, last + 1)]
        return wire, stored, outcome


def _lines(block: bytes) -> list[tuple[str, str]]:
    """A header block's `Name: value` lines, in order, the batch id's value blanked."""
    status, *lines, end, after = block.decode().split("\r\n")
    assert status == "NATS/1.0" and end == "" and after == ""
    out = []
    for line in lines:
        name, _, value = line.partition(": ")
        if name == "Nats-Batch-Id":
            assert len(value) == 32
            value = "*"
        out.append((name, value))
    return out


def _without_batch_id(headers: dict[str, str] | None) -> dict[str, str]:
    out = dict(headers or {})
    out.pop("Nats-Batch-Id", None)
    return out


HEADERS = [{"Nats-Expected-Stream": "IGNORED", "Nats-Msg-Id": "m1"},
           {"Nats-Msg-Id": "m2"}, {}]


async def test_an_atomic_batch_carries_the_same_headers_on_both_paths(
    nats_url: str, internals: str
) -> None:
    headers = [{"Nats-Msg-Id": "m1"}, {"Nats-Msg-Id": "m2"}, {}]
    wire, stored, ack = await _publish_and_capture(nats_url, headers, expected_last=0)

    assert not isinstance(ack, BaseException) and ack.seq == 3
    # On the wire: each message's own headers first, then the batch's, in that order; one
    # batch id; only the commit asks for an answer.
    assert [_lines(f.headers) for f in wire] == [
        [("Nats-Msg-Id", "m1"), ("Nats-Expected-Last-Sequence", "0"),
         ("Nats-Batch-Id", "*"), ("Nats-Batch-Sequence", "1")],
        [("Nats-Msg-Id", "m2"), ("Nats-Batch-Id", "*"), ("Nats-Batch-Sequence", "2")],
        [("Nats-Batch-Id", "*"), ("Nats-Batch-Sequence", "3"), ("Nats-Batch-Commit", "1")],
    ]
    assert len({f.headers.split(b"Nats-Batch-Id: ")[1][:32] for f in wire}) == 1
    assert [bool(f.reply) for f in wire] == [False, False, True]
    assert [f.payload for f in wire] == [b"payload 0", b"payload 1", b"payload 2"]
    # Stored in order, with the message ids kept (what deduplication works from).
    assert [m.seq for m in stored] == [1, 2, 3]
    assert [m.data for m in stored] == [b"payload 0", b"payload 1", b"payload 2"]
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in stored] == ["m1", "m2", None]


async def test_both_paths_write_and_store_byte_identical_headers(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = [{"Nats-Msg-Id": "x1"}, {"Nats-Msg-Id": "x2"}, {"Nats-Msg-Id": "x3"}]
    fast = await _publish_and_capture(nats_url, headers, expected_last=0)
    monkeypatch.setattr(_compat, "INTERNALS", _compat.PublicInternals())
    slow = await _publish_and_capture(nats_url, headers, expected_last=0)
    assert [_lines(f.headers) for f in fast[0]] == [_lines(f.headers) for f in slow[0]]
    assert [f.payload for f in fast[0]] == [f.payload for f in slow[0]]
    assert [_without_batch_id(m.headers) for m in fast[1]] == [
        _without_batch_id(m.headers) for m in slow[1]]
    assert [m.data for m in fast[1]] == [m.data for m in slow[1]]


async def test_a_batch_whose_condition_fails_stores_nothing(
    nats_url: str, internals: str
) -> None:
    _, stored, outcome = await _publish_and_capture(nats_url, [{}, {}, {}], expected_last=7)
    assert isinstance(outcome, APIError)
    assert "wrong last sequence" in str(outcome.description).lower()
    assert stored == []


async def test_queue_hpubs_refuses_a_subject_that_would_split_the_command(
    nats_url: str,
) -> None:
    async with _stream(nats_url) as (nc, _js, _name, root):
        block = b"NATS/1.0\r\nA: b\r\n\r\n"
        for subject, reply in ((f"{root}.a b", ""), ("", ""), (f"{root}.a", "in\r\nPUB x 1"),
                               (f"{root}.a\tb", "")):
            with pytest.raises(ValueError):
                queue_hpubs(nc, [(subject, reply, block, b"x")])
        assert nc._pending_data_size == 0


async def test_queue_hpubs_declines_on_the_public_api_and_when_closed(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _stream(nats_url) as (nc, _js, _name, root):
        frame = (f"{root}.a", "", b"NATS/1.0\r\nA: b\r\n\r\n", b"x")
        monkeypatch.setattr(_compat, "INTERNALS", _compat.PublicInternals())
        assert queue_hpubs(nc, [frame]) is False
        monkeypatch.setattr(_compat, "INTERNALS", _compat.PrivateInternals())
        assert queue_hpubs(nc, [frame]) is True
    assert queue_hpubs(nc, [frame]) is False  # closed


async def test_a_batch_sent_in_parts_is_one_batch(
    nats_url: str, internals: str
) -> None:
    async with _stream(nats_url) as (nc, js, name, root):
        messages = [(f"{root}.p.{i}", f"part {i}".encode()) for i in range(5)]
        batch = Pipeline(nc).atomic_batch()
        await batch.send(messages[:2], [{"Nats-Expected-Last-Sequence": "0"}, {}])
        await batch.send(messages[2:4])
        assert (await js.stream_info(name)).state.messages == 0  # staged, not stored
        ack = await (await batch.commit(messages[4:]))
        assert ack.seq == 5 and batch.sent == 5
        stored = [await js.get_msg(name, seq=s) for s in range(1, 6)]
        assert [m.data for m in stored] == [p for _, p in messages]
        with pytest.raises(ValueError):
            await batch.commit([])
        # A batch whose first part's condition fails is refused whole at its commit.
        refused = Pipeline(nc).atomic_batch()
        await refused.send(messages[:2], [{"Nats-Expected-Last-Sequence": "0"}, {}])
        with pytest.raises(APIError):
            await (await refused.commit(messages[2:3]))
        assert (await js.stream_info(name)).state.messages == 5
