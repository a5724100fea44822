"""The dashboard's server-sent events: bus subjects in, one bounded stream per browser out.

The gateway subscribes once to the observability worker's pushes (snapshot, node summaries,
alerts) and fans each message out to every connected browser as an SSE frame. Each browser
has a bounded buffer; a browser that cannot keep up loses frames (counted), never the
gateway's memory. A browser that connects gets the latest snapshot, the recent nodes and
the recent alerts first, so the page is complete at once.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import AsyncIterator

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from bus import Subscription

logger = logging.getLogger(__name__)

#: Frames buffered per browser before it starts losing them.
CLIENT_BUFFER = 256
RECENT_NODES = 50
RECENT_ALERTS = 50


def frame(event: str, data: bytes | str) -> bytes:
    """One SSE frame; `data` is one line of JSON (no newlines by construction)."""
    text = data.decode() if isinstance(data, bytes) else data
    return f"event: {event}\ndata: {text}\n\n".encode()


class Feed:
    """Holds the latest dashboard state and fans bus messages out to browsers."""

    def __init__(self) -> None:
        self._clients: set[MemoryObjectSendStream[bytes]] = set()
        self._snapshot: bytes | None = None
        self._reasons: dict[str, dict[str, int]] = {}
        self._nodes: deque[dict[str, object]] = deque(maxlen=RECENT_NODES)
        self._alerts: deque[bytes] = deque(maxlen=RECENT_ALERTS)
        self.dropped = 0
        self._closed = False

    @property
    def clients(self) -> int:
        return len(self._clients)

    def prime(self, snapshot: bytes) -> None:
        """Take a snapshot fetched at start, unless a pushed one came first."""
        if self._snapshot is None:
            self._snapshot = snapshot

    async def consume_snapshots(self, sub: Subscription) -> None:
        async for env in sub:
            self._snapshot = env.data
            self._broadcast(frame("snapshot", env.data))

    async def consume_nodes(self, sub: Subscription) -> None:
        async for env in sub:
            try:
                message = json.loads(env.data)
                nodes = message["nodes"]
                reasons = message["reasons"]
            except (ValueError, KeyError, TypeError):
                logger.debug("malformed node feed message skipped")
                continue
            self._reasons = reasons
            self._nodes.extend(nodes)
            self._broadcast(frame("nodes", json.dumps({"nodes": nodes, "reasons": reasons})))

    async def consume_alerts(self, sub: Subscription) -> None:
        async for env in sub:
            self._alerts.append(env.data)
            self._broadcast(frame("alert", env.data))

    def _broadcast(self, data: bytes) -> None:
        for send in list(self._clients):
            try:
                send.send_nowait(data)
            except anyio.WouldBlock:
                self.dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._clients.discard(send)

    async def stream(self) -> AsyncIterator[bytes]:
        """The frames of one browser: the current state, then everything pushed, until
        `close()` (or the browser goes away and the server cancels this)."""
        send, receive = anyio.create_memory_object_stream[bytes](CLIENT_BUFFER)
        if self._closed:
            send.close()
        else:
            self._clients.add(send)
        try:
            if self._snapshot is not None:
                yield frame("snapshot", self._snapshot)
            yield frame("nodes", json.dumps(
                {"nodes": list(self._nodes), "reasons": self._reasons, "initial": True}
            ))
            for alert in list(self._alerts):
                yield frame("alert", alert)
            async with receive:
                async for data in receive:
                    yield data
        finally:
            self._clients.discard(send)
            send.close()

    def close(self) -> None:
        """End every browser's stream (on shutdown)."""
        self._closed = True
        for send in list(self._clients):
            send.close()
        self._clients.clear()
