"""The load generator's own NATS connection (`RawWire`), against a real nats-server.

It replaces nats-py on the measuring side only, so it must read what nats-py would: plain
replies, replies with headers (a refusal's nats.micro error headers), the server's 503 when
no one listens, frames split anywhere across reads, PING, and -ERR.
"""

from __future__ import annotations

import anyio
import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from workers.tools._bench_wire import RawWire, WireClosed

pytestmark = pytest.mark.nats


async def _responder(url: str) -> Client:
    client = Client()
    await client.connect(url)

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    async def refuse(msg: Msg) -> None:
        await client.publish(msg.reply, b'{"ok": false, "reason": "overloaded"}',
                             headers={"Nats-Service-Error": "overloaded",
                                      "Nats-Service-Error-Code": "503"})

    await client.subscribe("wire.echo", cb=echo)
    await client.subscribe("wire.refuse", cb=refuse)
    await client.flush()
    return client


async def _answered(url: str, subject: str, payload: bytes, requests: int) -> RawWire:
    """Send `requests` requests to `subject` (served by `_responder`) and wait for them all;
    the wire, closed, keeps its counts and latencies."""
    responder = await _responder(url)
    wire = RawWire(url, subject, payload, echo=False, timeout_s=5)
    try:
        await wire.open()
        for _ in range(requests):
            wire.send_nowait()
        with anyio.fail_after(10):
            await wire.drain()
    finally:
        await wire.close()
        await responder.close()
    return wire


async def test_requests_are_matched_to_their_replies_and_timed(nats_url: str) -> None:
    wire = await _answered(nats_url, "wire.echo", b'{"ok": true}', 500)
    assert wire.completed == 500 and not wire.errors
    assert wire.latency.count == wire.from_send.count == 500
    assert set(wire.by_outcome) == {"ok"} and wire.by_outcome["ok"].count == 500


async def test_a_refusal_with_headers_counts_under_its_reason(nats_url: str) -> None:
    wire = await _answered(nats_url, "wire.refuse", b"{}", 20)
    assert wire.by_outcome["overloaded"].count == 20 and wire.completed == 20


async def test_no_responders_is_an_error_and_unanswered_requests_time_out(
    nats_url: str,
) -> None:
    wire = RawWire(nats_url, "wire.nobody", b"{}", echo=False, timeout_s=0.05)
    try:
        await wire.open()
        wire.send_nowait()
        with anyio.fail_after(10):
            await wire.drain()
        assert wire.errors == {"NoRespondersError": 1} and wire.completed == 0
    finally:
        await wire.close()
    # A subscriber that never answers: the request is swept as a timeout.
    silent = Client()
    await silent.connect(nats_url)
    await silent.subscribe("wire.silent")
    await silent.flush()
    wire = RawWire(nats_url, "wire.silent", b"{}", echo=False, timeout_s=0.05)
    try:
        await wire.open()
        wire.send_nowait()
        with anyio.fail_after(10):
            await wire.drain()
        assert wire.errors == {"TimeoutError": 1} and wire.outstanding == 0
    finally:
        await wire.close()
        await silent.close()


async def test_frames_split_anywhere_ping_and_err() -> None:
    """The parser fed byte by byte: every frame kind, split at every position."""
    wire = RawWire("nats://127.0.0.1:1", "s", b"{}", echo=False, timeout_s=5)
    written: list[bytes] = []
    wire._write = written.append  # type: ignore[method-assign]  # see what it answers
    for _ in range(3):
        wire.send_nowait()
    assert wire.outstanding == 3
    inbox = wire._prefix
    ok = msgspec.json.encode({"ok": True})
    headers = b"NATS/1.0\r\nNats-Service-Error-Code: 503\r\n\r\n"
    refused = b'{"ok":false,"reason":"overloaded"}'
    stream = (
        b"INFO {}\r\nPING\r\n"
        + f"MSG {inbox}0 1 {len(ok)}\r\n".encode() + ok + b"\r\n"
        + f"HMSG {inbox}1 1 {len(headers)} {len(headers) + len(refused)}\r\n".encode()
        + headers + refused + b"\r\n"
        + f"HMSG {inbox}2 1 16 16\r\n".encode() + b"NATS/1.0 503\r\n\r\n" + b"\r\n"
    )
    for i in range(len(stream)):
        wire._feed(stream[i:i + 1])
    assert written[-1] == b"PONG\r\n"
    assert wire.completed == 2 and wire.outstanding == 0
    assert {k: v.count for k, v in wire.by_outcome.items()} == {"ok": 1, "overloaded": 1}
    assert wire.errors == {"NoRespondersError": 1}
    wire._feed(b"-ERR 'Authorization Violation'\r\n")
    with pytest.raises(WireClosed, match="Authorization"):
        wire.send_nowait()
