"""The ledger writer's JetStream client: pipelined publishes and batched last-record reads.

One inbox subscription carries every answer, routed by the reply subject's last token:

* `publish` sends a message to a stream subject and returns a future of its `PubAck` (or of
  the JetStream error, e.g. a wrong expected last sequence: nats-py's `publish_async` loses
  the future in that case, which the writer cannot afford);
* `publish_atomic` sends messages as one JetStream atomic batch, answered once;
* `last_per_subject` is one JetStream direct get in *multi-last* form (ADR-31, nats-server
  2.11+, stream `allow_direct`): `{"multi_last": [filters], "batch": n}` answers with the
  last message of every subject matching the filters, in stream order, then a `204 EOB`
  status (or `404` when nothing matches). One request reads the last records of a whole
  batch of data subjects.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import anyio
import msgspec
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

from bus.nats import queue_hpubs

#: Statuses that end a multi-last read: 204 end of batch, 404 nothing matched.
_END = frozenset({"204", "404"})


class StoredMsg(NamedTuple):
    """A stream message read back: its sequence, subject and data."""

    seq: int
    subject: str
    data: bytes


class TooManyResults(Exception):
    """The server would not answer a multi-last read whole (status 408/413...)."""


class _Collect:
    """The messages of one multi-last read, until its end status."""

    __slots__ = ("future", "msgs")

    def __init__(self, future: asyncio.Future[list[StoredMsg]]) -> None:
        self.future = future
        self.msgs: list[StoredMsg] = []


class Pipeline:
    """Pipelined JetStream requests over one connection, answered on one subscription."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._prefix: str | None = None
        self._waiting: dict[str, asyncio.Future[Any] | _Collect] = {}
        self._next = 0

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[PubAck]:
        """Publish to a stream subject; the future ends with its ack or JetStream error."""
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        reply = await self._register(future)
        await self._nc.publish(subject, payload, reply=reply, headers=headers)
        return future

    async def publish_atomic(
        self, messages: Sequence[tuple[str, bytes]],
        headers: Sequence[dict[str, str]] | None = None,
    ) -> asyncio.Future[PubAck]:
        """Publish `(subject, payload)` messages as one JetStream atomic batch (nats-server
        2.12+, stream `allow_atomic`, at most 1,000 messages): the server stores them all, in
        order and with nothing between them, or none. Only the commit (the last message) is
        answered: the future ends with its ack (`seq` = the last message's) or the batch's
        error. (`atomic_batch` sends one in parts.)"""
        return await self.atomic_batch().commit(messages, headers)

    def atomic_batch(self) -> AtomicBatch:
        """A JetStream atomic batch sent in parts: the server stages each part as it
        arrives, the commit stores them all or none."""
        return AtomicBatch(self)

    async def publish_in_order(
        self, messages: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[PubAck]:
        """Publish `(subject, payload)` messages (no headers) to one stream, only the last
        asking for an acknowledgement: the future ends with its ack or error. JetStream
        stores a stream's messages in the order they arrive, so the ack also says the server
        has processed the ones before it; their own failures (none the last would not share:
        no conditions, one subject space, one size) are not reported. About a third of the
        server's work of an atomic batch, without its all-or-none."""
        if not messages:
            raise ValueError("nothing to publish")
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        reply = await self._register(future)
        frames = [(s, "", b"", p) for s, p in messages]
        subject, payload = messages[-1]
        frames[-1] = (subject, reply, b"", payload)
        if not queue_hpubs(self._nc, frames, write=True):
            for s, p in messages[:-1]:
                await self._nc.publish(s, p)
            await self._nc.publish(subject, payload, reply=reply)
        return future

    async def last_per_subject(
        self, stream: str, filters: Sequence[str], *, batch: int
    ) -> asyncio.Future[list[StoredMsg]]:
        """The last message of every subject of `stream` matching `filters` (stream order).

        The future fails with `TooManyResults` when the server refuses to answer whole, and
        with `NoStreamResponseError` when no server answers (no stream, or no direct get).
        """
        future: asyncio.Future[list[StoredMsg]] = asyncio.get_running_loop().create_future()
        reply = await self._register(_Collect(future))
        request = msgspec.json.encode({"multi_last": list(filters), "batch": batch})
        await self._nc.publish(f"$JS.API.DIRECT.GET.{stream}", request, reply=reply)
        return future

    async def settle(self, futures: Sequence[asyncio.Future[Any]], timeout_s: float) -> list[Any]:
        """Each future's result, or its exception, in order; stops waiting for all of them
        (late answers dropped) when they are done or the wait ends.

        Raises:
            TimeoutError: not all answered within `timeout_s` (their outcome is unknown).
        """
        try:
            with anyio.fail_after(timeout_s):
                out: list[Any] = []
                for future in futures:
                    try:
                        out.append(await future)
                    except Exception as exc:
                        out.append(exc)
                return out
        finally:
            self.forget(futures)

    def forget(self, futures: Sequence[asyncio.Future[Any]]) -> None:
        """Stop waiting for these (after a timeout): late answers are dropped."""
        gone = set(futures)
        for token, waiting in list(self._waiting.items()):
            future = waiting.future if isinstance(waiting, _Collect) else waiting
            if future in gone:
                del self._waiting[token]

    async def _register(self, waiting: asyncio.Future[Any] | _Collect) -> str:
        if self._prefix is None:
            prefix = self._nc.new_inbox()
            await self._nc.subscribe(f"{prefix}.*", cb=self._on_reply)
            self._prefix = prefix
        self._next += 1
        token = str(self._next)
        self._waiting[token] = waiting
        return f"{self._prefix}.{token}"

    async def _on_reply(self, msg: Any) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        waiting = self._waiting.get(token)
        if waiting is None:
            return
        if isinstance(waiting, _Collect):
            self._collect(token, waiting, msg)
            return
        del self._waiting[token]
        if not waiting.done():
            _settle_ack(waiting, msg)

    def _collect(self, token: str, into: _Collect, msg: Any) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            into.msgs.append(StoredMsg(int(headers["Nats-Sequence"]), headers["Nats-Subject"],
                                       msg.data))
            return
        del self._waiting[token]
        if into.future.done():
            return
        if status in _END:
            into.future.set_result(into.msgs)
        elif status == "503":
            into.future.set_exception(NoStreamResponseError())
        else:
            into.future.set_exception(TooManyResults(
                f"multi-last read answered {status} {headers.get('Description', '')}".strip()))


class AtomicBatch:
    """One JetStream atomic batch, sent in parts (`send`) and then committed (`commit`).

    Each part's commands are laid out in one piece and written to the socket at once
    (`queue_hpubs`), so the server stages them while the caller makes the next part; with
    nats-py's public API only, `Client.publish` each, the same headers in the same order.
    A batch never committed is dropped by the server (its batch timeout).
    """

    __slots__ = ("_id", "_pipeline", "sent")

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._id = uuid.uuid4().hex
        #: Messages sent so far.
        self.sent = 0

    async def send(
        self, messages: Sequence[tuple[str, bytes]],
        headers: Sequence[dict[str, str]] | None = None,
    ) -> None:
        """Send messages of the batch (not its last one)."""
        await self._write(messages, headers, reply=None)

    async def commit(
        self, messages: Sequence[tuple[str, bytes]],
        headers: Sequence[dict[str, str]] | None = None,
    ) -> asyncio.Future[PubAck]:
        """Send the batch's last messages (at least one), the last committing the batch;
        the future ends with the commit's ack or the batch's error."""
        if not messages:
            raise ValueError("an atomic batch ends with at least one message")
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        await self._write(messages, headers, reply=await self._pipeline._register(future))
        return future

    async def _write(
        self, messages: Sequence[tuple[str, bytes]],
        headers: Sequence[dict[str, str]] | None, reply: str | None,
    ) -> None:
        last = len(messages) - 1 if reply is not None else -1
        first = self.sent
        self.sent += len(messages)
        # The header blocks as nats-py lays them out (`NATS/1.0`, `Name: value` lines, blank
        # line), in the order `Client.publish` would write them: the message's own headers,
        # then the batch's. Every name and value here is ours (constants, numbers, hex).
        batch = b"Nats-Batch-Id: %s\r\nNats-Batch-Sequence: " % self._id.encode()
        plain = b"NATS/1.0\r\n" + batch  # a message without headers of its own
        frames: list[tuple[str, str, bytes, bytes]] = []
        for i, (subject, payload) in enumerate(messages):
            own = headers[i] if headers else None
            start = (b"NATS/1.0\r\n%s%s" % ("".join(f"{k}: {v}\r\n" for k, v in own.items())
                                             .encode(), batch)) if own else plain
            if i == last:
                frames.append((subject, reply or "", b"%s%d\r\nNats-Batch-Commit: 1\r\n\r\n"
                               % (start, first + i + 1), payload))
            else:
                frames.append((subject, "", b"%s%d\r\n\r\n" % (start, first + i + 1), payload))
        nc = self._pipeline._nc
        if queue_hpubs(nc, frames, write=True):
            return
        for i, (subject, payload) in enumerate(messages):
            batch = {**(headers[i] if headers is not None else {}),
                     "Nats-Batch-Id": self._id, "Nats-Batch-Sequence": str(first + i + 1)}
            if i == last:
                batch["Nats-Batch-Commit"] = "1"
            await nc.publish(subject, payload, reply=reply if i == last and reply else "",
                             headers=batch)


def _settle_ack(future: asyncio.Future[PubAck], msg: Any) -> None:
    if msg.headers and msg.headers.get("Status") == "503":
        future.set_exception(NoStreamResponseError())
        return
    try:
        resp = msgspec.json.decode(msg.data)
        if "error" in resp:
            err = resp["error"]
            future.set_exception(APIError(code=err.get("code"), err_code=err.get("err_code"),
                                          description=err.get("description")))
        else:
            future.set_result(PubAck.from_response(resp))
    except (msgspec.DecodeError, TypeError, KeyError) as exc:
        future.set_exception(exc)
