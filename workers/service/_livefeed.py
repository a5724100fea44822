"""What live views (the gateway's dashboard) are pushed by the observability worker.

Two subjects:

* `lukhas.observability.snapshot`: the stats reply (`StatsSnapshot`, merged over live
  workers), every check interval (`publish_snapshot`), published only by the leading
  worker (the one that publishes alerts), so a dashboard never has to ask.
* `lukhas.observability.nodes`: `NodesMessage`, summaries of the MATRIZ nodes just counted
  (pseudonyms only, as in the nodes themselves) plus the refusal and error counts by reason
  per emit point, merged over the live workers. The worker hands the feed each batch it
  consumed (`observe`) and publishes right after (`flush`): a lone node goes out at once, a
  burst as one message of its latest `max_batch` nodes, so no timer adds latency.

The feed reads no subject of its own: it summarizes the nodes the worker already holds
(before, a second `matriz.>` subscription made the server send every node twice and cost
more per node than the counting itself). With several workers sharing the durable consumer,
each publishes the nodes it counted, so the messages together show every node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import msgspec

from bus import Bus, BusError
from lukhas.subjects import OBSERVABILITY_NODES, OBSERVABILITY_SNAPSHOT

logger = logging.getLogger(__name__)

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
    #: emit point → reason → calls since the workers started, merged over the live workers:
    #: `<reason>` for refusals, `error:<code>` (or `error`) for errors.
    reasons: dict[str, dict[str, int]]
    #: Nodes the worker's plain `matriz.>` subscription lost to a full buffer (0 on JetStream).
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
        bus: where to publish.
        snapshot: the merged stats snapshot (the worker's `snapshot`).
        reasons: emit point → reason → calls, merged over the live workers.
        is_leader: whether this worker publishes the snapshot (only one of several does).
        worker_id: this worker's id, named in each message.
        dropped: nodes the worker's source lost (a full plain subscription), for the message.
        max_batch: most node summaries per message (the latest of a burst).
    """

    def __init__(
        self,
        bus: Bus,
        *,
        snapshot: Callable[[], msgspec.Struct],
        reasons: Callable[[], dict[str, dict[str, int]]],
        is_leader: Callable[[], bool],
        worker_id: str,
        dropped: Callable[[], int] = lambda: 0,
        max_batch: int = 64,
    ) -> None:
        self._bus = bus
        self._snapshot = snapshot
        self._reasons = reasons
        self._is_leader = is_leader
        self._worker_id = worker_id
        self._dropped = dropped
        self._max_batch = max_batch
        self._encoder = msgspec.json.Encoder()
        self._batch: list[NodeSummary] = []

    def observe(self, nodes: Sequence[bytes]) -> None:
        """Take nodes the worker counted; only the latest `max_batch` are summarized."""
        batch = self._batch
        for data in nodes[-self._max_batch:]:
            summary = summarize(data)
            if summary is not None:
                batch.append(summary)
        if len(batch) > self._max_batch:
            del batch[:-self._max_batch]

    async def flush(self) -> None:
        """Publish the nodes observed since the last flush, if any."""
        batch, self._batch = self._batch, []
        if not batch:
            return
        message = NodesMessage(self._worker_id, batch, self._reasons(), self._dropped())
        try:
            await self._bus.publish(OBSERVABILITY_NODES, self._encoder.encode(message))
        except BusError as exc:
            logger.warning("could not publish the live node feed: %s", exc)

    async def publish_snapshot(self) -> None:
        """Push the merged snapshot, if this worker is the leader (the worker calls this
        every check interval)."""
        if not self._is_leader():
            return
        try:
            await self._bus.publish(OBSERVABILITY_SNAPSHOT, self._encoder.encode(self._snapshot()))
        except BusError as exc:
            logger.warning("could not publish the observability snapshot: %s", exc)
