"""The load generator's connection: NATS requests spoken on the socket, cheaply.

A generator must cost far less per request than what it measures, or on a small machine
it takes the cores the service would have used (issue 13 measured nats-py generators at
0.47 of 2 cores next to a 0.85-core worker, which capped what a second worker could show).
nats-py spends most of its per-request CPU on what a generator does not need: a `Msg`
object, a subscription queue and a task wake-up per reply, header parsing, and a write
per publish. This speaks the NATS client protocol itself (CONNECT, PUB, SUB, MSG, HMSG,
PING/PONG), on one asyncio protocol object:

* requests go out as `PUB <subject> <inbox>.<token> <size>`, gathered and written once per
  event-loop pass;
* replies (`MSG`, and `HMSG` when they carry headers, such as the nats.micro error headers
  of a refusal or the server's `503` when no one listens) are parsed straight from the
  socket buffer, matched by token, and timed where they are parsed;
* `PING` is answered, `PONG` ends a round trip, `-ERR` ends the connection.

It keeps the accounting of the nats-py wire it replaced (latency from the scheduled send, from the
actual send, by outcome; timeouts swept oldest first). The service and the echo baseline
keep using nats-py: only the measuring side is this lean.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import anyio
import msgspec

from workers.tools.loadgen import LatencyRecorder

__all__ = ["RawWire", "WireClosed"]

_clock = time.perf_counter
_CRLF = b"\r\n"
#: The status line of the server's "no responders" answer to a request.
_NO_RESPONDERS = b"NATS/1.0 503"


class WireClosed(ConnectionError):
    """The server closed the connection or refused something (`-ERR`)."""


class _Reply(msgspec.Struct):
    """What a generator reads of a slice's reply: whether it was ok, and why not."""

    ok: bool | None = None
    reason: str | None = None
    error: dict[str, object] | None = None


_decode_reply = msgspec.json.Decoder(_Reply).decode


def outcome_of(data: bytes, echo: bool) -> str:
    """`ok`, or the refusal's reason / error code (`error` when it names none)."""
    if echo:
        return "ok"
    reply = _decode_reply(data)
    if reply.ok is True:
        return "ok"
    code = (reply.error or {}).get("code")
    return str(reply.reason or code or "error")


class _Protocol(asyncio.Protocol):
    def __init__(self, wire: RawWire) -> None:
        self._wire = wire

    def data_received(self, data: bytes) -> None:
        self._wire._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._wire._lost(exc)


class RawWire:
    """Requests to one subject on one connection of its own, answered on one inbox."""

    def __init__(self, url: str, subject: str, payload: bytes, *, echo: bool,
                 timeout_s: float, name: str = "lukhas-bench-load") -> None:
        self._url, self._name = url, name
        self._subject, self._payload = subject.encode(), payload
        self._echo, self._timeout_s = echo, timeout_s
        self._prefix = f"_INBOX.{secrets.token_hex(8)}."
        self._pub_head = b"PUB " + self._subject + b" " + self._prefix.encode()
        self._pub_tail = f" {len(payload)}\r\n".encode() + payload + _CRLF
        self._token = 0
        #: token -> (origin for latency, when it left), in sending order.
        self._pending: dict[int, tuple[float, float]] = {}
        self._transport: asyncio.Transport | None = None
        self._out = bytearray()
        self._flush_scheduled = False
        self._buf = bytearray()
        self._pongs: list[asyncio.Future[None]] = []
        self._closed: BaseException | None = None
        self._drained = anyio.Event()
        self.reset()
        #: Called after each answered or timed-out request (a closed loop sends its next).
        self.refill: Callable[[], None] | None = None

    def reset(self) -> None:
        # Latencies are kept as plain floats while requests run and put in histograms when
        # read (after the run): recording into an HDR histogram per reply was the largest
        # cost left on this side.
        self._latency: list[float] = []
        self._from_send: list[float] = []
        self._by_outcome: dict[str, list[float]] = {}
        self.errors: Counter[str] = Counter()
        self.completed = 0
        self.last_done = 0.0

    @property
    def latency(self) -> LatencyRecorder:
        """Latency of every answered request from its scheduled send."""
        return _recorder(self._latency)

    @property
    def from_send(self) -> LatencyRecorder:
        """Latency of every answered request from when it actually left."""
        return _recorder(self._from_send)

    @property
    def by_outcome(self) -> dict[str, LatencyRecorder]:
        """Latency from the scheduled send, per outcome (`ok`, `overloaded`...)."""
        return {outcome: _recorder(values) for outcome, values in self._by_outcome.items()}

    # -- the connection --------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, say CONNECT, subscribe to the inbox and wait for the server's PONG."""
        parts = urlsplit(self._url if "://" in self._url else f"nats://{self._url}")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(
            lambda: _Protocol(self), parts.hostname or "127.0.0.1", parts.port or 4222)
        self._transport = transport  # type: ignore[assignment]
        connect: dict[str, object] = {
            "verbose": False, "pedantic": False, "headers": True, "no_responders": True,
            "protocol": 1, "lang": "python-raw", "version": "0", "name": self._name,
        }
        if parts.username:
            connect["user"] = unquote(parts.username)
            connect["pass"] = unquote(parts.password or "")
        self._write(b"CONNECT " + json.dumps(connect).encode() + _CRLF)
        self._write(b"SUB " + self._prefix.encode() + b"* 1\r\n")
        await self.ping()

    async def ping(self) -> None:
        """One round trip: everything sent before it has reached the server."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        self._write(b"PING\r\n")
        await future

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    # -- requests --------------------------------------------------------------------------

    def send_nowait(self, scheduled: float | None = None) -> float:
        """Queue one request (written at the end of this event-loop pass); its latency
        counts from `scheduled` if that was earlier than now."""
        if self._closed is not None:
            raise WireClosed(str(self._closed))
        left = _clock()
        token = self._token
        self._token += 1
        self._pending[token] = (left if scheduled is None else min(left, scheduled), left)
        self._write(self._pub_head + str(token).encode() + self._pub_tail)
        return left

    def _write(self, data: bytes) -> None:
        self._out += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and self._out:
            self._transport.write(bytes(self._out))
        self._out.clear()

    def expire(self) -> None:
        """Time out every request older than the timeout (oldest first)."""
        cutoff = _clock() - self._timeout_s
        expired = []
        for token, (_origin, left) in self._pending.items():
            if left > cutoff:
                break
            expired.append(token)
        for token in expired:
            del self._pending[token]
            self.errors["TimeoutError"] += 1
        if expired and not self._pending:
            self._drained.set()
        if self.refill is not None:
            for _ in expired:
                self.refill()

    async def drain(self, sweep_s: float = 0.02) -> None:
        """Wait until every request sent was answered or timed out."""
        while self._pending:
            self._drained = anyio.Event()
            with anyio.move_on_after(sweep_s):
                await self._drained.wait()
            self.expire()

    # -- what the server sends -------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        size = len(buf)
        while True:
            end = buf.find(_CRLF, pos)
            if end < 0:
                break
            if buf.startswith(b"MSG ", pos):
                # MSG <subject> <sid> [reply-to] <#bytes>
                head = buf[pos:end].split(b" ")
                start = end + 2
                stop = start + int(head[-1])
                if stop + 2 > size:
                    break  # the payload is not all here yet
                self._answer(head[1], None, bytes(buf[start:stop]))
                pos = stop + 2
            elif buf.startswith(b"HMSG ", pos):
                # HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
                head = buf[pos:end].split(b" ")
                start = end + 2
                split, stop = start + int(head[-2]), start + int(head[-1])
                if stop + 2 > size:
                    break
                self._answer(head[1], bytes(buf[start:split]), bytes(buf[split:stop]))
                pos = stop + 2
            else:
                self._control(bytes(buf[pos:end]))
                pos = end + 2
        del buf[:pos]

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self._write(b"PONG\r\n")
        elif line == b"PONG":
            if self._pongs:
                future = self._pongs.pop(0)
                if not future.done():
                    future.set_result(None)
        elif line.startswith(b"-ERR"):
            self._lost(WireClosed(line.decode(errors="replace")))
            if self._transport is not None:
                self._transport.close()
        # INFO and +OK need nothing.

    def _answer(self, subject: bytes, headers: bytes | None, data: bytes) -> None:
        try:
            token = int(subject[len(self._prefix):])
            entry = self._pending.pop(token)
        except (KeyError, ValueError):
            return  # a reply after its request timed out, or not ours
        now = _clock()
        self.last_done = now
        if headers is not None and headers.startswith(_NO_RESPONDERS):
            self.errors["NoRespondersError"] += 1
        else:
            origin, left = entry
            try:
                outcome = outcome_of(data, self._echo)
            except msgspec.DecodeError:
                self.errors["UndecodableReply"] += 1
            else:
                self._latency.append(now - origin)
                self._from_send.append(now - left)
                values = self._by_outcome.get(outcome)
                if values is None:
                    values = self._by_outcome[outcome] = []
                values.append(now - origin)
                self.completed += 1
        if not self._pending:
            self._drained.set()
        if self.refill is not None:
            self.refill()

    def _lost(self, exc: BaseException | None) -> None:
        if self._closed is None:
            self._closed = exc or WireClosed("the server closed the connection")
        for future in self._pongs:
            if not future.done():
                future.set_exception(WireClosed(str(self._closed)))
        self._pongs.clear()
        self._transport = None


def _recorder(values: list[float]) -> LatencyRecorder:
    recorder = LatencyRecorder()
    recorder.record_all(values)
    return recorder
