"""Per-emit-point MATRIZ aggregation: counts, outcomes, HDR latency histograms, SLA windows.

Pure, synchronous logic with no I/O, so it is tested without a bus. It is shared between
the worker's event loop (which records) and the Prometheus server's threads (which read at
scrape time), hence the lock around every read and write of the tables.

Windows are tumbling, `window_s` long, counted from the aggregator's creation on its
`clock`; a node belongs to the window in which the worker aggregated it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Literal, get_args

import msgspec
from hdrh.histogram import HdrHistogram

from lukhas.observability.matriz_emit import DropReport, Outcome

logger = logging.getLogger(__name__)

OUTCOMES: tuple[str, ...] = get_args(Outcome)

Source = Literal["jetstream", "subscription"]

# Latencies are recorded in microseconds with 3 significant digits; anything over an hour
# is clamped to an hour (it is a breach either way, and the bound keeps each histogram small).
_HIGHEST_US = 3_600_000_000
_SIGNIFICANT_DIGITS = 3

_LABEL = re.compile(r"label:([A-Za-z0-9_-]+(?:[:.][A-Za-z0-9_-]+)*)")


class EmitPointStats(msgspec.Struct, frozen=True):
    """What the worker knows about one emit point (`<TYPE>:<label>`)."""

    count: int
    errors: int
    outcomes: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    #: The SLA from the module's manifest, or None when no manifest lists the emit point.
    sla_p95_ms: float | None
    #: False while the current window holds a breach (enough samples, p95 over the SLA).
    sla_ok: bool
    window_p95_ms: float = 0.0
    window_samples: int = 0
    alerts: int = 0


class StatsSnapshot(msgspec.Struct, frozen=True):
    """The reply to `lukhas.observability.stats`, as `lukhas matriz stats` renders it."""

    ok: bool
    emit_points: dict[str, EmitPointStats]
    #: Nodes that emitters reported dropped (latest report per producer, summed).
    dropped_nodes: int
    dropped_by_producer: dict[str, int]
    #: Messages on `matriz.>` that were not valid nodes; counted and skipped.
    invalid_nodes: int
    #: SLA alerts published since the worker started.
    alerts: int
    source: Source
    window_s: float = 60.0
    min_samples: int = 20


class SlaAlert(msgspec.Struct, frozen=True):
    """Published on `lukhas.observability.alerts.<emit point tokens>` at most once a window."""

    emit_point: str
    p95_ms: float
    sla_p95_ms: float
    samples: int
    window_s: float
    #: Wall-clock time of the check, epoch milliseconds (as MATRIZ `created_ts`).
    ts: int


class _StateView(msgspec.Struct):
    outcome: Outcome
    latency_ms: Annotated[float, msgspec.Meta(ge=0)]


class _NodeView(msgspec.Struct):
    """The part of a MATRIZ node the aggregation needs; other fields are not checked here."""

    type: Annotated[str, msgspec.Meta(pattern=r"^[A-Z][A-Z0-9_]*$", max_length=32)]
    labels: Annotated[list[str], msgspec.Meta(min_length=1)]
    state: _StateView


_node_decoder = msgspec.json.Decoder(_NodeView)
_drop_decoder = msgspec.json.Decoder(DropReport)


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, _HIGHEST_US, _SIGNIFICANT_DIGITS)


def _ms(value_us: int) -> float:
    return round(value_us / 1000.0, 3)


class _Point:
    __slots__ = (
        "name", "sla_p95_ms", "count", "outcomes", "latency", "window", "window_index",
        "alerted_window", "alerts",
    )

    def __init__(self, name: str, sla_p95_ms: float | None) -> None:
        self.name = name
        self.sla_p95_ms = sla_p95_ms
        self.count = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        # Allocated on the first sample: a declared but silent emit point costs nothing.
        self.latency: HdrHistogram | None = None
        self.window: HdrHistogram | None = None
        self.window_index = -1
        self.alerted_window = -1
        self.alerts = 0

    def record(self, outcome: str, latency_us: int, window_index: int) -> None:
        if self.latency is None or self.window is None:
            self.latency, self.window = _histogram(), _histogram()
        if self.window_index != window_index:
            self.window.reset()
            self.window_index = window_index
        self.count += 1
        self.outcomes[outcome] += 1
        self.latency.record_value(latency_us)
        self.window.record_value(latency_us)

    def window_p95_us(self, window_index: int) -> tuple[int, int]:
        """(samples, p95 in µs) of `window_index`, or (0, 0) if that window has none."""
        if self.window is None or self.window_index != window_index:
            return 0, 0
        return self.window.get_total_count(), self.window.get_value_at_percentile(95.0)


class Aggregator:
    """Counts and latency histograms per emit point, and the SLA windows.

    Args:
        slas: emit point name → SLA p95 in ms (from the manifests); these points are
            reported even before their first node.
        window_s: length of an SLA window.
        min_samples: a window with fewer samples never breaches.
        clock: monotonic seconds; injectable so tests can move between windows.
        max_emit_points: bound on distinct emit points (and producers) tracked; nodes for
            further points are counted as invalid, so a misbehaving producer cannot grow
            memory without bound.
    """

    def __init__(
        self,
        slas: Mapping[str, float],
        *,
        window_s: float = 60.0,
        min_samples: int = 20,
        clock: Callable[[], float] = time.monotonic,
        max_emit_points: int = 512,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s!r}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, not {min_samples!r}")
        self.window_s = float(window_s)
        self.min_samples = min_samples
        self._clock = clock
        self._epoch = clock()
        self._max_points = max(max_emit_points, len(slas))
        self._lock = threading.Lock()
        self._points = {name: _Point(name, float(sla)) for name, sla in slas.items()}
        self._dropped_by_producer: dict[str, int] = {}
        self._invalid_nodes = 0
        self._invalid_reports = 0
        self._alerts = 0

    def slas(self) -> dict[str, float]:
        """Emit point → p95 SLA in ms."""
        with self._lock:
            return {
                p.name: p.sla_p95_ms for p in self._points.values() if p.sla_p95_ms is not None
            }

    def window_index(self) -> int:
        """The number of the current SLA window."""
        return int((self._clock() - self._epoch) // self.window_s)

    def ingest(self, data: bytes) -> str | None:
        """Decode and count one node; return its emit point, or None if it was invalid."""
        try:
            node = _node_decoder.decode(data)
        except msgspec.DecodeError as exc:
            logger.debug("invalid MATRIZ node skipped: %s", exc)
            self._count_invalid()
            return None
        match = _LABEL.fullmatch(node.labels[0])
        if match is None:
            logger.debug("invalid MATRIZ node skipped: first label %r", node.labels[0][:80])
            self._count_invalid()
            return None
        emit_point = f"{node.type}:{match.group(1)}"
        latency_us = round(min(node.state.latency_ms * 1000.0, _HIGHEST_US))
        window_index = self.window_index()
        with self._lock:
            point = self._points.get(emit_point)
            if point is None:
                if len(self._points) >= self._max_points:
                    self._invalid_nodes += 1
                    logger.warning("emit point %s not tracked: over %d points", emit_point,
                                   self._max_points)
                    return None
                point = self._points[emit_point] = _Point(emit_point, None)
            point.record(node.state.outcome, latency_us, window_index)
        return emit_point

    def ingest_drop_report(self, data: bytes) -> bool:
        """Keep the latest dropped-node count an emitter reported; False if malformed."""
        try:
            report = _drop_decoder.decode(data)
        except msgspec.DecodeError as exc:
            logger.debug("invalid MATRIZ drop report skipped: %s", exc)
            report = None
        with self._lock:
            if report is None or report.dropped < 0:
                self._invalid_reports += 1
                return False
            known = report.producer in self._dropped_by_producer
            if not known and len(self._dropped_by_producer) >= self._max_points:
                self._invalid_reports += 1
                return False
            self._dropped_by_producer[report.producer] = report.dropped
            return True

    def due_alerts(self) -> list[SlaAlert]:
        """The breaches of the current window not alerted yet; each is marked as alerted."""
        window_index = self.window_index()
        ts = time.time_ns() // 1_000_000
        alerts = []
        with self._lock:
            for point in self._points.values():
                if point.sla_p95_ms is None or point.alerted_window == window_index:
                    continue
                samples, p95_us = point.window_p95_us(window_index)
                p95_ms = _ms(p95_us)
                if samples < self.min_samples or p95_ms <= point.sla_p95_ms:
                    continue
                point.alerted_window = window_index
                point.alerts += 1
                self._alerts += 1
                alerts.append(
                    SlaAlert(point.name, p95_ms, point.sla_p95_ms, samples, self.window_s, ts)
                )
        return alerts

    def snapshot(self, *, source: Source) -> StatsSnapshot:
        """Everything the worker knows, as the stats reply carries it."""
        window_index = self.window_index()
        with self._lock:
            points = {
                name: self._point_stats(point, window_index)
                for name, point in sorted(self._points.items())
            }
            dropped = dict(self._dropped_by_producer)
            invalid, alerts = self._invalid_nodes, self._alerts
        return StatsSnapshot(
            ok=True,
            emit_points=points,
            dropped_nodes=sum(dropped.values()),
            dropped_by_producer=dropped,
            invalid_nodes=invalid,
            alerts=alerts,
            source=source,
            window_s=self.window_s,
            min_samples=self.min_samples,
        )

    def statistics(self) -> tuple[int, int, int]:
        """(invalid nodes, invalid drop reports, alerts) so far."""
        with self._lock:
            return self._invalid_nodes, self._invalid_reports, self._alerts

    def _count_invalid(self) -> None:
        with self._lock:
            self._invalid_nodes += 1

    def _point_stats(self, point: _Point, window_index: int) -> EmitPointStats:
        if point.latency is None:
            p50 = p95 = p99 = 0
        else:
            quantiles = point.latency.get_percentile_to_value_dict([50.0, 95.0, 99.0])
            p50, p95, p99 = quantiles[50.0], quantiles[95.0], quantiles[99.0]
        samples, window_p95_us = point.window_p95_us(window_index)
        window_p95 = _ms(window_p95_us)
        breached = (
            point.sla_p95_ms is not None
            and samples >= self.min_samples
            and window_p95 > point.sla_p95_ms
        )
        return EmitPointStats(
            count=point.count,
            errors=point.outcomes["error"],
            outcomes=dict(point.outcomes),
            p50_ms=_ms(p50),
            p95_ms=_ms(p95),
            p99_ms=_ms(p99),
            sla_p95_ms=point.sla_p95_ms,
            sla_ok=not breached,
            window_p95_ms=window_p95,
            window_samples=samples,
            alerts=point.alerts,
        )
