"""What live views (the gateway's dashboard) are pushed by the observability worker.

Two subjects, published only by the leading worker (the one that publishes alerts):

* `lukhas.observability.snapshot`: the stats reply (`StatsSnapshot`, merged over live
  workers), every check interval, so a dashboard never has to ask.
* `lukhas.observability.nodes`: `NodesMessage`, summaries of the MATRIZ nodes just seen
  (pseudonyms only, as in the nodes themselves) plus running refusal and error counts by
  reason per emit point. Nodes are batched by what is waiting: a lone node goes out at once,
  a burst in batches of up to `max_batch`, so no timer adds latency.

The feed reads `matriz.>` through a plain subscription of its own, apart from the durable
consumer the aggregation uses: it is a best-effort live view (a full buffer drops and counts,
see `dropped`), and it never slows or changes the exactly-once counting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import msgspec

from bus import Bus, BusClosed, BusError, RequestTimeout, Subscription
from lukhas.subjects import MATRIZ_ALL, OBSERVABILITY_NODES, OBSERVABILITY_SNAPSHOT

logger = logging.getLogger(__name__)

#: Most distinct reasons counted per emit point (a bound against made-up labels).
_MAX_REASONS = 64
#: Most emit points whose reasons are counted.
_MAX_POINTS = 256


class NodeSummary(msgspec.Struct, frozen=True, omit_defaults=True):
    """One MATRIZ node as a live view shows it."""

    id: str
    ts: int
    emit_point: str
    outcome: str
    latency_ms: float
    trace_id: str = ""
    #: The node's `reason:<r>` label as `<r>`, or its `error:<code>` label as is.
    reason: str | None = None
    subject_pseudonym: str | None = None


class NodesMessage(msgspec.Struct, frozen=True):
    """The body of `lukhas.observability.nodes`."""

    worker_id: str
    nodes: list[NodeSummary]
    #: emit point → reason → calls, since this worker started: `<reason>` for refusals,
    #: `error:<code>` (or `error`) for errors.
    reasons: dict[str, dict[str, int]]
    #: Nodes this feed lost to a full buffer since it started.
    dropped: int = 0


class _State(msgspec.Struct):
    outcome: str
    latency_ms: float


class _Timestamps(msgspec.Struct):
    created_ts: int


class _Provenance(msgspec.Struct):
    trace_id: str = ""
    subject_pseudonym: str | None = None


class _Node(msgspec.Struct):
    id: str
    type: str
    labels: list[str]
    state: _State
    timestamps: _Timestamps
    provenance: _Provenance


_decoder = msgspec.json.Decoder(_Node)


def summarize(data: bytes) -> NodeSummary | None:
    """The summary of a MATRIZ node, or None for a message that is not one."""
    try:
        node = _decoder.decode(data)
    except msgspec.DecodeError:
        return None
    if not node.labels or not node.labels[0].startswith("label:"):
        return None
    reason = None
    for label in node.labels[2:]:
        if label.startswith(("reason:", "error:")):
            reason = label.removeprefix("reason:")
            break
    return NodeSummary(
        id=node.id,
        ts=node.timestamps.created_ts,
        emit_point=f"{node.type}:{node.labels[0].removeprefix('label:')}",
        outcome=node.state.outcome,
        latency_ms=node.state.latency_ms,
        trace_id=node.provenance.trace_id,
        reason=reason,
        subject_pseudonym=node.provenance.subject_pseudonym,
    )


class LiveFeed:
    """Publishes the snapshot and node summaries for live views; see the module docstring.

    Args:
        bus: where to read `matriz.>` and publish.
        snapshot: the merged stats snapshot (the worker's `snapshot`).
        is_leader: whether this worker publishes (only one of several does).
        worker_id: this worker's id, named in each message.
        interval_s: how often the snapshot is pushed.
        max_batch: most node summaries per message.
        max_pending: buffer of the `matriz.>` subscription (a full one drops and counts).
    """

    def __init__(
        self,
        bus: Bus,
        *,
        snapshot: Callable[[], msgspec.Struct],
        is_leader: Callable[[], bool],
        worker_id: str,
        interval_s: float = 1.0,
        max_batch: int = 64,
        max_pending: int = 8192,
    ) -> None:
        self._bus = bus
        self._snapshot = snapshot
        self._is_leader = is_leader
        self._worker_id = worker_id
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._encoder = msgspec.json.Encoder()
        self._batch: list[NodeSummary] = []
        self._reasons: dict[str, dict[str, int]] = {}
        self._sub: Subscription | None = None

    def subscribe(self) -> AbstractAsyncContextManager[Subscription]:
        """The feed's own `matriz.>` subscription; pass it to `run`."""
        return self._bus.subscribe(MATRIZ_ALL, max_pending=self._max_pending)

    async def run(self, sub: Subscription) -> None:
        """Relay nodes and push snapshots until `sub` ends (drained or the bus closed)."""
        self._sub = sub
        next_snapshot = time.monotonic() + self._interval_s
        while True:
            try:
                env = await sub.next(timeout=max(0.001, next_snapshot - time.monotonic()))
            except RequestTimeout:
                env = None
            except BusClosed:
                await self._publish_nodes()
                return
            if env is not None:
                self._add(env.data)
                # Publish when nothing more is waiting: one node goes out at once, a burst
                # is batched by what has queued up meanwhile.
                if len(self._batch) >= self._max_batch or sub.statistics().pending == 0:
                    await self._publish_nodes()
            if time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + self._interval_s
                await self._publish_snapshot()

    def _add(self, data: bytes) -> None:
        summary = summarize(data)
        if summary is None:
            return
        self._batch.append(summary)
        key = summary.reason if summary.reason is not None else (
            None if summary.outcome == "ok" else summary.outcome
        )
        if key is None:
            return
        reasons = self._reasons.get(summary.emit_point)
        if reasons is None:
            if len(self._reasons) >= _MAX_POINTS:
                return
            reasons = self._reasons[summary.emit_point] = {}
        if key in reasons or len(reasons) < _MAX_REASONS:
            reasons[key] = reasons.get(key, 0) + 1

    async def _publish_nodes(self) -> None:
        batch, self._batch = self._batch, []
        if not batch or not self._is_leader():
            return
        dropped = 0 if self._sub is None else self._sub.statistics().dropped
        message = NodesMessage(self._worker_id, batch, self._reasons, dropped)
        try:
            await self._bus.publish(OBSERVABILITY_NODES, self._encoder.encode(message))
        except BusError as exc:
            logger.warning("could not publish the live node feed: %s", exc)

    async def _publish_snapshot(self) -> None:
        if not self._is_leader():
            return
        try:
            await self._bus.publish(OBSERVABILITY_SNAPSHOT, self._encoder.encode(self._snapshot()))
        except BusError as exc:
            logger.warning("could not publish the observability snapshot: %s", exc)
