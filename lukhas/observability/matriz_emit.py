"""MATRIZ nodes and the emitter that publishes them to `matriz.<TYPE>.<label tokens>`.

Emission never blocks or fails the instrumented call: `emit()` only puts the node in a
bounded buffer (a full buffer counts a drop), and a background task owned by the runtime's
task group encodes and publishes in batches.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Literal, NamedTuple

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.lowlevel import checkpoint

from bus import Bus, BusError
from lukhas.subjects import MATRIZ_DROPS, matriz_subject

logger = logging.getLogger(__name__)

SCHEMA_REF = "lukhas://schemas/matriz_node_v1.json"

Outcome = Literal["ok", "error", "refused", "rate_limited", "backpressure"]


class State(msgspec.Struct, frozen=True, omit_defaults=True):
    confidence: float
    salience: float
    urgency: float
    outcome: Outcome
    latency_ms: float


class Timestamps(msgspec.Struct, frozen=True):
    created_ts: int


class Provenance(msgspec.Struct, frozen=True, omit_defaults=True):
    producer: str
    capabilities: list[str]
    tenant: str
    trace_id: str
    consent_scopes: list[str]
    subject_pseudonym: str | None = None


class MatrizNode(msgspec.Struct, frozen=True, omit_defaults=True):
    """A MATRIZ node (schema v1.1); `lukhas/observability/matriz_node_v1.json` is its contract."""

    version: int
    id: str
    type: str
    labels: list[str]
    state: State
    timestamps: Timestamps
    provenance: Provenance
    schema_ref: str = SCHEMA_REF

    @property
    def subject(self) -> str:
        """Where the node is published: `matriz.<TYPE>.<label tokens>`."""
        return _subject_of(self.type, self.labels[0])


@functools.lru_cache(maxsize=1024)
def _subject_of(node_type: str, first_label: str) -> str:
    # Emit points are few; the subject of each is built once, not once per node.
    return matriz_subject(node_type, first_label.removeprefix("label:"))


class DropReport(msgspec.Struct, frozen=True):
    """What an emitter publishes on `MATRIZ_DROPS` when it has dropped nodes."""

    producer: str
    dropped: int
    emitted: int


_node_ids = itertools.count(1)
_process_tag = os.urandom(4).hex()


def make_node(
    node_type: str,
    label: str,
    *,
    outcome: Outcome,
    latency_ms: float,
    trace_id: str,
    producer: str,
    capability: str,
    tenant: str = "default",
    salience: float = 0.5,
    urgency: float = 0.5,
    confidence: float = 1.0,
    subject_pseudonym: str | None = None,
    consent_scopes: list[str] | None = None,
    labels: tuple[str, ...] = (),
) -> MatrizNode:
    """Build a node for one call at emit point `<node_type>:<label>`.

    The first label is always `label:<label>` (the emit point), then `outcome:<outcome>`,
    then any extra `labels` (at most 12 in all, as the schema allows).
    """
    return MatrizNode(
        version=1,
        id=f"mz-{_process_tag}-{next(_node_ids)}",
        type=node_type,
        labels=[f"label:{label}", f"outcome:{outcome}", *labels][:12],
        state=State(
            confidence=confidence,
            salience=salience,
            urgency=urgency,
            outcome=outcome,
            latency_ms=latency_ms if latency_ms > 0 else 0.0,
        ),
        timestamps=Timestamps(created_ts=time.time_ns() // 1_000_000),
        provenance=Provenance(
            producer=producer,
            capabilities=[capability],
            tenant=tenant,
            trace_id=trace_id,
            consent_scopes=consent_scopes or [],
            subject_pseudonym=subject_pseudonym,
        ),
    )


class EmitterStatistics(NamedTuple):
    emitted: int
    published: int
    dropped: int
    buffered: int
    max_buffer: int


class MatrizEmitter:
    """Buffers nodes and publishes them in batches from its own task (`run`).

    `emit()` is sync and never raises: a full or closed buffer counts a drop. Start `run`
    in a task group with `await tg.start(emitter.run)`; `aclose()` publishes what is
    buffered, flushes the bus, and returns once `run` has finished.
    """

    def __init__(
        self, bus: Bus, *, producer: str, buffer: int = 65_536, batch: int = 512
    ) -> None:
        self._bus = bus
        self._producer = producer
        self._batch = batch
        self._send, self._recv = anyio.create_memory_object_stream[MatrizNode](buffer)
        self._max_buffer = buffer
        self._encoder = msgspec.json.Encoder()
        self._emitted = 0
        self._published = 0
        self._dropped = 0
        self._reported_drops = 0
        self._pending = 0  # accepted into the buffer, not yet published (or failed)
        self._idle = anyio.Event()
        self._finished = anyio.Event()
        #: Set by `emit()` (or closing) when `run` waits for nodes.
        self._waiting: anyio.Event | None = None
        self._publish_nowait: Callable[[str, bytes], bool] | None = getattr(
            bus, "publish_nowait", None)

    def emit(self, node: MatrizNode) -> None:
        """Queue `node` for publishing; never blocks, never raises.

        While the publishing task sleeps with nothing buffered, a bus that can publish
        without waiting (`NatsBus.publish_nowait`) takes the node at once, in order behind
        everything published so far: no task switch per node at low load.
        """
        self._emitted += 1
        if self._waiting is not None and not self._pending and self._publish_nowait is not None:
            try:
                if self._publish_nowait(node.subject, self._encoder.encode(node)):
                    self._published += 1
                    return
            except (BusError, RuntimeError):  # e.g. closed; RuntimeError: no running loop
                pass  # the task publishes it, and counts and reports a failure
        try:
            self._send.send_nowait(node)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._dropped += 1
        else:
            self._pending += 1
            self._wake()

    def _wake(self) -> None:
        waiting = self._waiting
        if waiting is not None:
            self._waiting = None
            waiting.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish buffered nodes until the emitter is closed and the buffer is empty.

        The task sleeps on an event `emit()` sets, not in the stream's `receive()`, which
        yields once more before every wait: at low load that was a second task switch per
        node.
        """
        task_status.started()
        receive = self._recv.receive_nowait
        try:
            async with self._recv:
                while True:
                    batch: list[MatrizNode] = []
                    ended = False
                    while len(batch) < self._batch:
                        try:
                            batch.append(receive())
                        except anyio.WouldBlock:
                            break
                        except anyio.EndOfStream:
                            ended = True
                            break
                    if batch:
                        await self._publish(batch)
                        self._pending -= len(batch)
                        if self._pending == 0:
                            self._idle.set()
                        if len(batch) == self._batch:
                            await checkpoint()  # more may be buffered: let the others run
                        continue
                    if ended:
                        return
                    self._waiting = anyio.Event()
                    await self._waiting.wait()
        finally:
            self._waiting = None
            self._finished.set()

    async def _publish(self, batch: list[MatrizNode]) -> None:
        encode = self._encoder.encode
        messages = [(node.subject, encode(node)) for node in batch]
        try:
            # One write for the batch: a publish() per node cost ~3x the CPU (lukhas bench).
            await self._bus.publish_batch(messages)
        except BusError as exc:
            # Emission must never fail the service; the loss is counted and reported.
            self._dropped += len(batch)
            logger.debug("matriz publish of %d node(s) failed: %s", len(batch), exc)
        else:
            self._published += len(batch)
        if self._dropped != self._reported_drops:
            await self._report_drops()

    async def _report_drops(self) -> None:
        self._reported_drops = self._dropped
        report = DropReport(self._producer, self._dropped, self._emitted)
        try:
            await self._bus.publish(MATRIZ_DROPS, self._encoder.encode(report))
        except BusError:
            pass  # the drop counter itself stays exact in statistics()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every node emitted so far is published and the bus flushed.

        Raises:
            TimeoutError: that took longer than `timeout` seconds.
        """
        with anyio.fail_after(timeout):
            while self._pending and not self._finished.is_set():
                self._idle = anyio.Event()
                await self._idle.wait()
            await self._bus.flush(timeout)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop accepting nodes, publish what is buffered, and flush the bus."""
        self._send.close()
        self._wake()
        with anyio.move_on_after(timeout, shield=True):
            await self._finished.wait()
            if self._dropped != self._reported_drops:
                await self._report_drops()
            if not self._bus.is_closed:
                try:
                    await self._bus.flush(timeout)
                except BusError as exc:
                    logger.warning("matriz flush on close failed: %s", exc)

    def statistics(self) -> EmitterStatistics:
        stats = self._send.statistics()
        return EmitterStatistics(
            emitted=self._emitted,
            published=self._published,
            dropped=self._dropped,
            buffered=stats.current_buffer_used,
            max_buffer=self._max_buffer,
        )
