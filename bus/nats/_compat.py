"""The nats-py internals the bus still reaches into, in one place, each with a public fallback.

Three paths are measurably worth it (`tests/bus/test_natspy_compat.py` runs the bus over both;
the README's bus section gives the figures):

- **Reading a subscription.** nats-py's public `Subscription.next_msg()` and `.messages` start
  a task (and `next_msg` a `wait_for` and a uuid4) per message; reading its bounded
  `_pending_queue` directly, with the same bookkeeping, is the hot path of every consumer.
  `take_ready()` takes everything buffered (up to a limit) in one call, for a reader that
  looks at what waits in bulk (the slice service under overload).
- **Stopping interest for `drain()`.** `Subscription.drain()` waits until its queue is
  consumed (a consumer draining its own subscription would hang) and writes its flush PING
  ahead of the UNSUB, so messages the server sends in between are lost. Sending the UNSUB
  alone (`Client._send_unsubscribe`) and keeping the subscription until a round trip has
  passed loses nothing. The fallback unsubscribes after the round trip: messages the server
  sends in the moment between the two are dropped.

- **Confirming publishes.** `Client.flush()` writes its PING straight to the socket, ahead of
  publishes still queued for nats-py's flusher task, so a PONG can come back before they were
  even sent; the public way to be sure is a second PING (two round trips). `ping()` instead
  writes the queue and one PING together, at once (what the flusher would write, in order,
  then the PING: one send, no task hop), and queues a future on `Client._pongs`, which
  nats-py's reader completes at the matching PONG; the caller awaits it directly (one
  wake-up, where `flush()`'s `wait_for` takes two). Every handoff waits on one.

- **Publishing without waiting.** `Client.publish` is a coroutine; `queue_publish()` queues the
  same PUB command for nats-py's flusher task synchronously (and wakes the flusher as
  `publish` does), so a caller that must not wait, the MATRIZ emitter's `emit()`, can publish
  in place instead of handing the node to a task of its own (a task switch per node at low
  load). Only while connected and under the pending-buffer bound: else it declines and the
  caller publishes the ordinary way.

- **Acting on a PONG in place.** `ping_calling()` is `ping()` whose PONG calls a function
  synchronously, from nats-py's reader as it parses the PONG (and from whoever fails the
  wait: a timeout, a lost connection), so a confirmed handoff is answered in the same loop
  pass its PONG is read in, with no task woken; `write_queued()` writes what is queued for
  the flusher task at once (as `ping()` does before its PING), so that answer leaves in that
  pass too instead of one flusher wake-up later; `append_publish()` is `queue_publish()`
  without the flusher's wake-up, for a publish whose flush's PING follows at once and
  carries it (the handoff's), where the wake-up found nothing left to write.

`publish_batch` calls the public `Client.publish` once per message (nats-py coalesces the
writes in its flusher task).

`INTERNALS` is chosen once, at import: `PrivateInternals` when every attribute it uses exists
with the expected shape, else `PublicInternals` (and a warning). pyproject bounds nats-py to
the versions this was tested with.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Callable, Sequence
from typing import Protocol

import nats.errors
from nats.aio.client import PING_PROTO, Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol.command import hpub_cmd, pub_cmd

__all__ = [
    "INTERNALS",
    "NatsPyInternals",
    "PrivateInternals",
    "PublicInternals",
    "missing_internals",
    "queue_hpubs",
    "use_public_api",
]

logger = logging.getLogger(__name__)


class NatsPyInternals(Protocol):
    """What the bus needs from nats-py beyond `Client.publish`/`subscribe`/`request`."""

    name: str

    def take_nowait(self, sub: Subscription) -> Msg | None:
        """The next buffered message, or None when the buffer is empty (never waits)."""
        ...

    def take_ready(self, sub: Subscription, limit: int) -> list[Msg]:
        """Up to `limit` buffered messages, oldest first, in one call (never waits): what a
        reader finds waiting when it looks, without a call per message."""
        ...

    async def take(self, sub: Subscription) -> Msg | None:
        """Wait for the next message; None if the connection closed meanwhile.

        Cancelling the wait loses no message on the private path; on the public one a message
        arriving at that very moment may be lost (the bus cancels only when the subscription
        ends, or after a drain has taken everything buffered).
        """
        ...

    async def stop_interest(self, client: Client, sub: Subscription) -> None:
        """Tell the server to stop sending to `sub` while it still routes what arrives.

        The caller then makes a round trip, takes what is buffered and unsubscribes.
        """
        ...

    async def round_trip(self, client: Client) -> None:
        """A PING/PONG behind everything published on `client` so far."""
        ...

    def queue_publish(
        self, client: Client, subject: str, payload: bytes, header_block: bytes | None = None
    ) -> bool:
        """Queue a publish behind everything published so far, for nats-py's flusher to
        write, without waiting; False (nothing queued) when that cannot be done now: then
        `Client.publish`. `header_block` is the headers as nats-py writes them (`NATS/1.0`
        line, `Name: value` lines, blank line; see `bus.EncodedHeaders`). The caller has
        checked the subject and the size."""
        ...

    def ping(self, client: Client) -> asyncio.Future[bool] | None:
        """Send a PING behind everything published on `client` so far, now, and return
        what its PONG completes; None when it cannot be sent now (then `round_trip`).

        Cancelling a wait on the returned future is safe (nats-py still answers it).
        """
        ...

    def ping_calling(
        self, client: Client, ended: Callable[[BaseException | None], None]
    ) -> asyncio.Future[bool] | None:
        """`ping()`, whose end calls `ended` once, in place: with None from nats-py's reader
        as it parses the matching PONG (before it parses what follows), or with the exception
        the future is failed with (`set_exception`: a timeout, a lost connection). Nobody
        need await the future. None when it cannot be sent now (nothing will be called)."""
        ...

    def write_queued(self, client: Client) -> bool:
        """Write what is queued for nats-py's flusher task to the socket now, in order;
        False (nothing written) when that cannot be done now: the flusher writes it."""
        ...

    def append_publish(
        self, client: Client, subject: str, payload: bytes, header_block: bytes | None = None
    ) -> bool:
        """`queue_publish` without waking nats-py's flusher task, for a caller whose next
        step writes the queue itself (a `ping_calling` PING): the wake-up would find nothing
        left to write. Whatever writes the queue next (a PING, `write_queued`, the flusher
        woken by any other publish) sends it, in order."""
        ...


class _Pong(asyncio.Future[bool]):
    """The PONG a round trip waits for, awaited directly (one wake-up, not `wait_for`'s two).

    A wait that is cancelled (a timeout) cancels this future; nats-py's reader then finds
    it done when the PONG arrives, and `set_result` on a done future must not raise there:
    it would end nats-py's read loop.
    """

    def set_result(self, result: bool) -> None:
        if not self.done():
            super().set_result(result)


class _CallingPong(_Pong):
    """A `_Pong` that calls `ended` in place when it completes (see `ping_calling`).

    nats-py's reader calls `set_result` as it parses the PONG: `ended` runs there, so it
    must be cheap and must not raise (an exception would end nats-py's read loop; it is
    logged and dropped here).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, ended: Callable[[BaseException | None], None]
    ) -> None:
        super().__init__(loop=loop)
        self._ended = ended

    def set_result(self, result: bool) -> None:
        if not self.done():
            super().set_result(result)
            self._call(None)

    def set_exception(self, exception: type | BaseException) -> None:
        if not self.done():
            super().set_exception(exception)
            error = self.exception()  # retrieved: nobody need await this future
            self._call(error if error is not None else RuntimeError("PONG wait failed"))

    def _call(self, error: BaseException | None) -> None:
        # Dropped once called: the callback usually refers back to this future (the bus's
        # flight holds it), a cycle only the garbage collector would otherwise reclaim.
        ended, self._ended = self._ended, _ended_already
        try:
            ended(error)
        except Exception:
            logger.exception("a PONG's callback failed")


def _ended_already(error: BaseException | None) -> None:
    return None


class PrivateInternals:
    """nats-py's internals, as `missing_internals()` found them."""

    name = "private"

    def take_nowait(self, sub: Subscription) -> Msg | None:
        queue = sub._pending_queue
        try:
            msg = queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        sub._pending_size -= len(msg.data)
        queue.task_done()
        return msg

    def take_ready(self, sub: Subscription, limit: int) -> list[Msg]:
        # `take_nowait` per message, in one loop: `get_nowait`/`task_done` are asyncio's
        # public Queue API; the pending bytes are nats-py's bookkeeping, as `next_msg` does it.
        queue = sub._pending_queue
        count = min(limit, queue.qsize())
        if count <= 0:
            return []
        get, done = queue.get_nowait, queue.task_done
        msgs = [get() for _ in range(count)]
        size = 0
        for msg in msgs:
            size += len(msg.data)
            done()
        sub._pending_size -= size
        return msgs

    async def take(self, sub: Subscription) -> Msg | None:
        # `Queue.get()` hands the item to the waiter only when it wakes, so a cancelled
        # wait leaves the message in the queue.
        queue = sub._pending_queue
        msg = await queue.get()
        sub._pending_size -= len(msg.data)
        queue.task_done()
        return msg

    async def stop_interest(self, client: Client, sub: Subscription) -> None:
        await client._send_unsubscribe(sub._id)

    def queue_publish(
        self, client: Client, subject: str, payload: bytes, header_block: bytes | None = None
    ) -> bool:
        # What `Client.publish` does, minus the await (and, with headers already encoded,
        # minus encoding them again): `append_publish`, then, if the flusher has no wake-up
        # queued, queue one (a future it completes).
        if not self.append_publish(client, subject, payload, header_block):
            return False
        queue = client._flush_queue
        if queue is not None and queue.empty():
            queue.put_nowait(asyncio.get_running_loop().create_future())
        return True

    def ping(self, client: Client) -> asyncio.Future[bool] | None:
        # `Client.flush()` writes its PING straight to the socket, ahead of commands still
        # queued for the flusher task, and waits through `wait_for`. Instead write the queue
        # and the PING together, now (what the flusher would write, in the same order: no
        # task hop, one send), and let the caller wait on the PONG directly. While not
        # connected the queue is kept for the next connection: no PING now.
        return self._send_ping(client, lambda: _Pong(loop=asyncio.get_running_loop()))

    def ping_calling(
        self, client: Client, ended: Callable[[BaseException | None], None]
    ) -> asyncio.Future[bool] | None:
        # `ping()`, with a future that calls `ended` as nats-py's reader completes it.
        return self._send_ping(
            client, lambda: _CallingPong(asyncio.get_running_loop(), ended))

    @staticmethod
    def _send_ping(
        client: Client, make_pong: Callable[[], asyncio.Future[bool]]
    ) -> asyncio.Future[bool] | None:
        transport = client._transport
        if not client.is_connected or transport is None:
            return None
        pong = make_pong()
        pending = client._pending
        if pending:
            client._pending = []
            client._pending_data_size = 0
            pending.append(PING_PROTO)
            transport.writelines(pending)
        else:
            transport.write(PING_PROTO)
        client._pongs.append(pong)  # PONGs come back in order: this one answers our PING
        return pong

    def append_publish(
        self, client: Client, subject: str, payload: bytes, header_block: bytes | None = None
    ) -> bool:
        # Append the PUB or HPUB to `_pending`, leaving the flusher asleep (`queue_publish`
        # wakes it). Declined while not connected (reconnect buffering has its own rules),
        # past the pending bound (`publish` would wait for a flush) or without a flusher.
        queue = client._flush_queue
        flusher = client._flusher_task
        if (not client.is_connected or client.is_draining_pubs or queue is None
                or flusher is None or flusher.done()):
            return False
        command = (pub_cmd(subject, "", payload) if header_block is None
                   else hpub_cmd(subject, "", header_block, payload))
        limit = client._max_pending_size
        if limit > 0 and client._pending_data_size + len(command) > limit:
            return False
        client._pending.append(command)
        client._pending_data_size += len(command)
        client.stats["out_msgs"] += 1
        client.stats["out_bytes"] += len(payload)
        return True

    def write_queued(self, client: Client) -> bool:
        # What the flusher task does when woken, now; it then finds nothing to write.
        transport = client._transport
        if not client.is_connected or transport is None:
            return False
        pending = client._pending
        if pending:
            client._pending = []
            client._pending_data_size = 0
            transport.writelines(pending)
        return True

    async def round_trip(self, client: Client) -> None:
        pong = self.ping(client)
        if pong is not None:
            await pong
            return
        if client._pending_data_size:
            await client._flush_pending(force_flush=True)
        await client.flush()


class PublicInternals:
    """The public nats-py API only: slower reads, and a drain that may drop in-flight messages."""

    name = "public"

    def take_nowait(self, sub: Subscription) -> Msg | None:
        # `pending_msgs` is public; nothing buffered means the caller should wait.
        return None

    def take_ready(self, sub: Subscription, limit: int) -> list[Msg]:
        return []  # as `take_nowait`: the caller waits, a message at a time

    async def take(self, sub: Subscription) -> Msg | None:
        try:
            return await sub.next_msg(timeout=None)
        except nats.errors.ConnectionClosedError:
            # Also what `next_msg` turns a cancellation into once the client has closed.
            return None

    def queue_publish(
        self, client: Client, subject: str, payload: bytes, header_block: bytes | None = None
    ) -> bool:
        return False  # nothing public publishes without waiting

    async def stop_interest(self, client: Client, sub: Subscription) -> None:
        # No public call stops interest yet keeps routing; `NatsSubscription.drain` makes a
        # round trip, takes what is buffered and then unsubscribes.
        return None

    def ping(self, client: Client) -> asyncio.Future[bool] | None:
        return None  # nothing public sends a PING without waiting for it

    def ping_calling(
        self, client: Client, ended: Callable[[BaseException | None], None]
    ) -> asyncio.Future[bool] | None:
        return None

    def write_queued(self, client: Client) -> bool:
        return False  # the flusher task writes it

    def append_publish(
        self, client: Client, subject: str, payload: bytes, header_block: bytes | None = None
    ) -> bool:
        return False

    async def round_trip(self, client: Client) -> None:
        # `Client.flush()` writes its PING ahead of commands still queued for the flusher
        # task; the flusher runs before that first PONG can be read, so a second PING
        # follows everything queued before this call. Two network round trips.
        await client.flush()
        await client.flush()


def queue_hpubs(
    client: Client, messages: Sequence[tuple[str, str, bytes, bytes]], *, write: bool = False
) -> bool:
    """Queue HPUB commands, `(subject, reply, header block, payload)` each (an empty header
    block makes a PUB), as one piece behind everything published so far, for nats-py's
    flusher to write; False (nothing queued) when that cannot be done now (the public API is
    in use, not connected, past the pending bound): then `Client.publish` each. One call lays
    out a whole JetStream atomic batch, where `Client.publish` would validate, encode and
    await per message.

    `reply` may be ""; a header block is as nats-py writes it (see `bus.EncodedHeaders`). The
    caller has checked the sizes and that the header names and values are clean. With
    `write`, everything queued so far and these commands go to the socket now, in order (what
    the flusher would write when it next runs), so the server has them while the caller goes
    on working without yielding.

    Raises:
        ValueError: a subject or reply is empty or holds whitespace.
    """
    if not isinstance(INTERNALS, PrivateInternals):
        return False
    queue = client._flush_queue
    flusher = client._flusher_task
    if (not client.is_connected or client.is_draining_pubs or queue is None
            or flusher is None or flusher.done()):
        return False
    parts: list[bytes] = []
    payload_bytes = 0
    for subject, reply, block, payload in messages:
        if not subject or _UNSAFE_SUBJECT.search(subject) or (
                reply and _UNSAFE_SUBJECT.search(reply)):
            raise ValueError(f"not a subject to publish to: {subject!r} (reply {reply!r})")
        size = len(block)
        if size:
            parts.append(f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode())
            parts.append(block)
        else:
            parts.append(f"PUB {subject} {reply} {len(payload)}\r\n".encode())
        parts.append(payload)
        parts.append(b"\r\n")
        payload_bytes += len(payload)
    command = b"".join(parts)
    limit = client._max_pending_size
    if limit > 0 and client._pending_data_size + len(command) > limit:
        return False
    client.stats["out_msgs"] += len(messages)
    client.stats["out_bytes"] += payload_bytes
    transport = client._transport
    if write and transport is not None:
        pending = client._pending
        client._pending = []
        client._pending_data_size = 0
        pending.append(command)
        transport.writelines(pending)
        return True
    client._pending.append(command)
    client._pending_data_size += len(command)
    if queue.empty():
        queue.put_nowait(asyncio.get_running_loop().create_future())
    return True


#: What a subject or reply written on the wire must not hold (it would split the command).
_UNSAFE_SUBJECT = re.compile(r"\s")


def missing_internals() -> list[str]:
    """The internals `PrivateInternals` relies on that this nats-py lacks (empty if none)."""
    missing: list[str] = []
    init = inspect.getsource(Subscription.__init__)
    for attr in ("_pending_queue", "_pending_size", "_id"):
        if f"self.{attr} " not in init and f"self.{attr}:" not in init:
            missing.append(f"Subscription.{attr}")
    if "asyncio.Queue" not in init:
        missing.append("Subscription._pending_queue as an asyncio.Queue")
    # `next_msg` must still do the bookkeeping `take` copies (pending bytes, task_done).
    next_msg = inspect.getsource(Subscription.next_msg)
    for step in ("self._pending_size -= len(msg.data)", "self._pending_queue.task_done()"):
        if step not in next_msg:
            missing.append(f"Subscription.next_msg doing `{step}`")
    # `round_trip` writes what is queued for the flusher, then its PING, and queues the
    # future nats-py's reader answers at the matching PONG.
    client_init = inspect.getsource(Client.__init__)
    for attr in ("_pending", "_pending_data_size", "_pongs", "_transport", "_flush_queue",
                 "_flusher_task", "_max_pending_size", "stats"):
        if f"self.{attr}:" not in client_init and f"self.{attr} " not in client_init:
            missing.append(f"Client.{attr}")
    flusher = inspect.getsource(Client._flusher)
    if "self._transport.writelines(self._pending[:])" not in flusher:
        missing.append("Client._flusher writing `_pending` to `_transport`")
    # `queue_publish` does what `publish` does, minus the await; `bus.EncodedHeaders` lays
    # out a header block as nats-py does.
    send_publish = inspect.getsource(Client._send_publish)
    for step in ("prot_command.pub_cmd(subject, reply, payload)",
                 "prot_command.hpub_cmd(subject, reply, hdr, payload)",
                 "hdr.extend(NATS_HDR_LINE)", 'hdr.extend(b": ")',
                 'self.stats["out_msgs"] += 1',
                 "await self._send_command(pub_cmd)", "self._flush_queue.empty()"):
        if step not in send_publish:
            missing.append(f"Client._send_publish doing `{step}`")
    process_pong = inspect.getsource(Client._process_pong)
    if "self._pongs.pop(0)" not in process_pong or ".set_result(" not in process_pong:
        missing.append("Client._process_pong answering `_pongs` in order")
    flush_pending = getattr(Client, "_flush_pending", None)
    if not inspect.iscoroutinefunction(flush_pending) or "force_flush" not in inspect.signature(
            flush_pending).parameters:
        missing.append("async Client._flush_pending(force_flush=...)")
    send_unsubscribe = getattr(Client, "_send_unsubscribe", None)
    if not inspect.iscoroutinefunction(send_unsubscribe):
        missing.append("async Client._send_unsubscribe")
    else:
        params = list(inspect.signature(send_unsubscribe).parameters)
        if params[:2] != ["self", "sid"]:
            missing.append(f"Client._send_unsubscribe(self, sid, ...), not {params}")
    return missing


def _choose() -> NatsPyInternals:
    try:
        missing = missing_internals()
    except (OSError, TypeError) as exc:  # no source available (e.g. a zipped install)
        missing = [f"nats-py's source ({exc})"]
    if missing:
        logger.warning(
            "nats-py lacks internals the bus uses for speed (%s); using its public API",
            ", ".join(missing),
        )
        return PublicInternals()
    return PrivateInternals()


#: The implementation every `NatsBus` opened from now on uses.
INTERNALS: NatsPyInternals = _choose()


def use_public_api(public: bool = True) -> NatsPyInternals:
    """Make buses opened from now on use only nats-py's public API (or the checked internals
    again, with `public=False`); returns the previous choice. For tests and benchmarks."""
    global INTERNALS
    previous = INTERNALS
    INTERNALS = PublicInternals() if public or missing_internals() else PrivateInternals()
    return previous
