"""Per-emit-point MATRIZ aggregation: counts, outcomes, HDR latency histograms, SLO burn.

Pure, synchronous logic with no I/O, so it is tested without a bus. It is shared between
the worker's event loop (which records) and the Prometheus server's threads (which read at
scrape time), hence the lock around every read and write of the tables.

Mergeable by design. Several observability workers share one durable consumer, so each
sees a part of the nodes. `export_state()` gives a worker's part as an `AggregateState`
(counts, the HDR histogram in its standard compressed encoding, the SLO buckets numbered
from the epoch); `snapshot(peers=...)` and `due_alerts(peers=...)` add the other workers'
states to this one's. HDR histograms add exactly (bucket by bucket), so the merged p50/p95/p99
equal those of one worker that saw every node.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Literal, get_args

import msgspec
from hdrh.histogram import HdrHistogram

from lukhas.observability.matriz_emit import DropReport, Outcome
from workers.service._slo import (
    Buckets,
    BurnAlert,
    BurnState,
    Slo,
    SloSettings,
    budget_remaining,
    evaluate,
)

logger = logging.getLogger(__name__)

OUTCOMES: tuple[str, ...] = get_args(Outcome)

Source = Literal["jetstream", "subscription"]

# Latencies are recorded in microseconds with 3 significant digits; anything over an hour
# is clamped to an hour (it is a breach either way, and the bound keeps each histogram small).
_HIGHEST_US = 3_600_000_000
_SIGNIFICANT_DIGITS = 3

#: Most distinct reasons counted per emit point (a bound against made-up labels).
MAX_REASONS = 64

_LABEL = re.compile(r"label:([A-Za-z0-9_-]+(?:[:.][A-Za-z0-9_-]+)*)")
_TYPE = re.compile(r"[A-Z][A-Z0-9_]{0,31}")


class EmitPointStats(msgspec.Struct, frozen=True):
    """What the worker knows about one emit point (`<TYPE>:<label>`)."""

    count: int
    errors: int
    outcomes: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    #: The p95 SLA from the module's manifest, or None when no manifest lists the emit point.
    sla_p95_ms: float | None
    #: False while an SLO burn-rate alert (page or ticket) fires for this emit point.
    sla_ok: bool
    alerts: int = 0
    #: The manifest's SLO: `slo_objective` of calls must succeed within `slo_latency_ms`.
    slo_objective: float | None = None
    slo_latency_ms: float | None = None
    #: Calls that failed or were slower than `slo_latency_ms` (since the workers started).
    bad_events: int = 0
    #: Share of the SLO period's error budget left (negative once overspent).
    error_budget_remaining: float | None = None
    #: One entry per alert policy: burn rates over its two windows and whether it fires.
    burn: list[BurnState] = []
    #: Sum of all latencies, ms (the Prometheus summary's `_sum`).
    latency_sum_ms: float = 0.0


class StatsSnapshot(msgspec.Struct, frozen=True):
    """The reply to `lukhas.observability.stats`, as `lukhas matriz stats` renders it."""

    ok: bool
    emit_points: dict[str, EmitPointStats]
    #: Nodes that emitters reported dropped (latest report per producer, summed).
    dropped_nodes: int
    dropped_by_producer: dict[str, int]
    #: Messages on `matriz.>` that were not valid nodes; counted and skipped.
    invalid_nodes: int
    #: SLO alerts (firing) published since the worker started.
    alerts: int
    source: Source
    #: This worker, and how many live workers' states the figures merge (itself included).
    worker_id: str = ""
    workers: int = 1
    slo_period_s: float = 0.0


class PointState(msgspec.Struct, frozen=True):
    """One emit point in an `AggregateState`."""

    count: int
    outcomes: dict[str, int]
    bad: int
    sum_us: int
    #: The HDR histogram, V2 compressed and base64 encoded (`HdrHistogram.encode()`).
    histogram: str | None
    #: (bucket number, events, bad events) of the alert windows and of the SLO period.
    windows: list[tuple[int, int, int]] = []
    period: list[tuple[int, int, int]] = []
    #: Refusals and errors by reason (see `Aggregator.reasons`).
    reasons: dict[str, int] = {}


class AggregateState(msgspec.Struct, frozen=True):
    """One worker's part of the aggregate, published for its peers to merge."""

    worker_id: str
    #: Epoch milliseconds when it was taken.
    ts: int
    bucket_s: float
    period_bucket_s: float
    points: dict[str, PointState]
    invalid_nodes: int = 0


class StateView(msgspec.Struct):
    outcome: Outcome
    latency_ms: Annotated[float, msgspec.Meta(ge=0)]


class TimestampsView(msgspec.Struct):
    created_ts: int


class NodeView(msgspec.Struct):
    """The part of a MATRIZ node the aggregation needs; other fields are not checked here.

    `type` and the first label are checked once per distinct pair (`Aggregator._resolve`),
    not by the decoder on every node.
    """

    type: str
    labels: Annotated[list[str], msgspec.Meta(min_length=1)]
    state: StateView
    timestamps: TimestampsView


#: Decodes the view of a MATRIZ node every part of the worker reads (the canary judge too).
node_decoder = msgspec.json.Decoder(NodeView)
_drop_decoder = msgspec.json.Decoder(DropReport)


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, _HIGHEST_US, _SIGNIFICANT_DIGITS)


def _ms(value_us: float) -> float:
    return round(value_us / 1000.0, 3)


class _Point:
    __slots__ = (
        "name", "sla_p95_ms", "slo", "slo_latency_us", "count", "outcomes", "bad", "sum_us",
        "latency", "windows", "period", "firing", "alerts", "reasons",
    )

    def __init__(
        self, name: str, sla_p95_ms: float | None, slo: Slo | None, config: SloSettings
    ) -> None:
        self.name = name
        self.sla_p95_ms = sla_p95_ms
        self.slo = slo
        self.slo_latency_us = None if slo is None else slo.latency_ms * 1000.0
        self.count = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.bad = 0
        self.sum_us = 0
        # Allocated on the first sample: a declared but silent emit point costs nothing.
        self.latency: HdrHistogram | None = None
        self.windows = Buckets(config.bucket_s, config.keep_s)
        self.period = Buckets(config.period_bucket_s, config.period_s)
        self.firing: dict[str, bool] = {}
        self.alerts = 0
        self.reasons: dict[str, int] = {}

    def count_reason(self, reason: str, n: int = 1) -> None:
        reasons = self.reasons
        if reason in reasons:
            reasons[reason] += n
        elif len(reasons) < MAX_REASONS:
            reasons[reason] = n

    def record(self, outcome: str, latency_us: int, ts: float, now: float) -> None:
        if self.latency is None:
            self.latency = _histogram()
        self.count += 1
        self.outcomes[outcome] += 1
        self.sum_us += latency_us
        self.latency.record_value(latency_us)
        if self.slo_latency_us is not None:
            bad = outcome == "error" or latency_us > self.slo_latency_us
            self.bad += bad
            self.windows.add(ts, bad, now)
            self.period.add(ts, bad, now)

    def export(self) -> PointState:
        return PointState(
            count=self.count,
            outcomes=dict(self.outcomes),
            bad=self.bad,
            sum_us=self.sum_us,
            histogram=None if self.latency is None else self.latency.encode().decode("ascii"),
            windows=self.windows.export(),
            period=self.period.export(),
            reasons=dict(self.reasons),
        )

    def merged(self, parts: Sequence[PointState], config: SloSettings) -> _Point:
        """A copy of this point with `parts` (other workers' states of it) added."""
        out = _Point(self.name, self.sla_p95_ms, self.slo, config)
        out.count, out.bad, out.sum_us = self.count, self.bad, self.sum_us
        out.outcomes = dict(self.outcomes)
        out.latency = _histogram()
        if self.latency is not None:
            out.latency.add(self.latency)
        out.windows.merge(self.windows.export())
        out.period.merge(self.period.export())
        out.firing, out.alerts = self.firing, self.alerts
        out.reasons = dict(self.reasons)
        for part in parts:
            for reason, n in part.reasons.items():
                out.count_reason(reason, n)
            out.count += part.count
            out.bad += part.bad
            out.sum_us += part.sum_us
            for outcome, n in part.outcomes.items():
                if outcome in out.outcomes:
                    out.outcomes[outcome] += n
            if part.histogram is not None:
                out.latency.decode_and_add(part.histogram)
            out.windows.merge(part.windows)
            out.period.merge(part.period)
        return out


class Aggregator:
    """Counts, latency histograms and SLO buckets per emit point; see the module docstring.

    Args:
        slas: emit point name → p95 SLA in ms (from the manifests); these points are
            reported even before their first node.
        slos: emit point name → its SLO (from the manifests); points without one never alert.
        slo_settings: the burn-rate alert policies and the SLO period.
        clock: wall-clock seconds since the epoch (nodes are bucketed by their
            `created_ts`, so this must be the same clock); tests inject their own.
        max_emit_points: bound on distinct emit points (and producers) tracked; nodes for
            further points are counted as invalid, so a misbehaving producer cannot grow
            memory without bound.
    """

    def __init__(
        self,
        slas: Mapping[str, float],
        *,
        slos: Mapping[str, Slo] | None = None,
        slo_settings: SloSettings | None = None,
        clock: Callable[[], float] = time.time,
        max_emit_points: int = 512,
    ) -> None:
        self.config = slo_settings or SloSettings.workbook()
        self._slos = dict(slos or {})
        self._clock = clock
        self._max_points = max(max_emit_points, len(slas) + len(self._slos))
        self._lock = threading.Lock()
        self._points = {
            name: self._new_point(name, slas.get(name)) for name in {*slas, *self._slos}
        }
        #: (type, first label) → its point: the emit point of a node without a regex match.
        #: Only valid pairs that name a tracked point enter, so it is bounded with the points.
        self._by_label: dict[tuple[str, str], _Point] = {}
        self._dropped_by_producer: dict[str, int] = {}
        self._invalid_nodes = 0
        self._invalid_reports = 0
        self._alerts = 0

    def _new_point(self, name: str, sla: float | None) -> _Point:
        return _Point(name, None if sla is None else float(sla), self._slos.get(name), self.config)

    def slas(self) -> dict[str, float]:
        """Emit point → p95 SLA in ms."""
        with self._lock:
            return {
                p.name: p.sla_p95_ms for p in self._points.values() if p.sla_p95_ms is not None
            }

    def slos(self) -> dict[str, Slo]:
        """Emit point → SLO."""
        return dict(self._slos)

    def ingest(self, data: bytes) -> str | None:
        """Decode and count one node; return its emit point, or None if it was invalid."""
        with self._lock:
            point = self._ingest(data, self._clock())
        return None if point is None else point.name

    def ingest_batch(self, batch: Iterable[bytes]) -> int:
        """Decode and count several nodes under one lock and one clock reading (the worker's
        hot path); return how many were valid."""
        ingest, valid = self._ingest, 0
        with self._lock:
            now = self._clock()
            for data in batch:
                valid += ingest(data, now) is not None
        return valid

    def _ingest(self, data: bytes, now: float) -> _Point | None:
        """Count one node (call with the lock held); its point, or None if it was invalid."""
        try:
            node = node_decoder.decode(data)
        except msgspec.DecodeError as exc:
            logger.debug("invalid MATRIZ node skipped: %s", exc)
            self._invalid_nodes += 1
            return None
        key = (node.type, node.labels[0])
        point = self._by_label.get(key)
        if point is None:
            point = self._resolve(key)
            if point is None:
                self._invalid_nodes += 1
                return None
        state = node.state
        labels = node.labels
        if state.outcome != "ok" or len(labels) > 2:
            reason = _reason(labels, state.outcome)
            if reason is not None:
                point.count_reason(reason)
        # A producer's clock ahead of ours must not put events in a future window.
        ts = node.timestamps.created_ts / 1000.0
        point.record(
            state.outcome, round(min(state.latency_ms * 1000.0, _HIGHEST_US)),
            ts if ts < now else now, now,
        )
        return point

    def _resolve(self, key: tuple[str, str]) -> _Point | None:
        """The point of a (type, first label) not seen before, or None if it is invalid or
        over the bound (call with the lock held). Valid ones are remembered."""
        node_type, label = key
        match = _LABEL.fullmatch(label)
        if match is None or _TYPE.fullmatch(node_type) is None:
            logger.debug("invalid MATRIZ node skipped: type %r, first label %r",
                         node_type[:40], label[:80])
            return None
        emit_point = f"{node_type}:{match.group(1)}"
        point = self._points.get(emit_point)
        if point is None:
            if len(self._points) >= self._max_points:
                logger.warning("emit point %s not tracked: over %d points", emit_point,
                               self._max_points)
                return None
            point = self._points[emit_point] = self._new_point(emit_point, None)
        self._by_label[key] = point
        return point

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

    def reasons(self, peers: Sequence[AggregateState] = ()) -> dict[str, dict[str, int]]:
        """Emit point → reason → calls, over this worker's and `peers`' nodes: `<reason>`
        for refusals, `error:<code>` (or the outcome, e.g. `error`) for errors."""
        with self._lock:
            out = {name: dict(p.reasons) for name, p in self._points.items() if p.reasons}
        for peer in peers:
            for name, part in peer.points.items():
                if not part.reasons or (name not in out and len(out) >= self._max_points):
                    continue
                mine = out.setdefault(name, {})
                for reason, n in part.reasons.items():
                    if reason in mine:
                        mine[reason] += n
                    elif len(mine) < MAX_REASONS:
                        mine[reason] = n
        return out

    def export_state(self, worker_id: str) -> AggregateState:
        """This worker's part, for its peers to merge."""
        now = self._clock()
        with self._lock:
            for point in self._points.values():
                point.windows.prune(now)
                point.period.prune(now)
            points = {name: p.export() for name, p in self._points.items() if p.count}
            invalid = self._invalid_nodes
        return AggregateState(
            worker_id=worker_id,
            ts=round(now * 1000),
            bucket_s=self.config.bucket_s,
            period_bucket_s=self.config.period_bucket_s,
            points=points,
            invalid_nodes=invalid,
        )

    def due_alerts(self, peers: Sequence[AggregateState] = ()) -> list[BurnAlert]:
        """Alerts that start or stop now, over this worker's and `peers`' events.

        Each (emit point, severity) is published once when its condition starts to hold
        (`firing`) and once when it stops (`resolved`).
        """
        now = self._clock()
        ts = round(now * 1000)
        alerts = []
        with self._lock:
            for point in self._view(peers).values():
                slo = point.slo
                if slo is None:
                    continue
                states = evaluate(point.windows, slo, self.config, now)
                remaining = budget_remaining(
                    *point.period.window(now, self.config.period_s), slo.objective
                )
                own = self._points[point.name]
                for state in states:
                    was = own.firing.get(state.severity, False)
                    if state.firing == was:
                        continue
                    own.firing[state.severity] = state.firing
                    if state.firing:
                        own.alerts += 1
                        self._alerts += 1
                    alerts.append(BurnAlert(
                        emit_point=point.name,
                        state="firing" if state.firing else "resolved",
                        severity=state.severity,
                        objective=slo.objective,
                        latency_ms=slo.latency_ms,
                        burn_rate_threshold=state.burn_rate_threshold,
                        long_window_s=state.long_window_s,
                        short_window_s=state.short_window_s,
                        long_burn_rate=state.long_burn_rate,
                        short_burn_rate=state.short_burn_rate,
                        long_window_events=state.long_window_events,
                        long_window_bad_events=state.long_window_bad_events,
                        error_budget_remaining=remaining,
                        budget_period_s=self.config.period_s,
                        ts=ts,
                    ))
        return alerts

    def snapshot(
        self, *, source: Source, worker_id: str = "", peers: Sequence[AggregateState] = ()
    ) -> StatsSnapshot:
        """Everything the worker knows, merged with `peers`, as the stats reply carries it."""
        now = self._clock()
        with self._lock:
            points = {
                name: self._point_stats(point, now)
                for name, point in sorted(self._view(peers).items())
            }
            dropped = dict(self._dropped_by_producer)
            invalid, alerts = self._invalid_nodes, self._alerts
        return StatsSnapshot(
            ok=True,
            emit_points=points,
            dropped_nodes=sum(dropped.values()),
            dropped_by_producer=dropped,
            invalid_nodes=invalid + sum(p.invalid_nodes for p in peers),
            alerts=alerts,
            source=source,
            worker_id=worker_id,
            workers=1 + len(peers),
            slo_period_s=self.config.period_s,
        )

    def own_points(self) -> list[tuple[str, int, int, dict[str, int], int, list[int]]]:
        """This worker's own monotonic counters per emit point, for Prometheus counters and
        histograms: (name, count, bad, outcomes, sum µs, cumulative counts at `bounds_us`).

        Prometheus adds the workers' counters itself (`sum by`), so /metrics never exports
        merged counters, which could go down when a peer leaves.
        """
        with self._lock:
            return [
                (p.name, p.count, p.bad, dict(p.outcomes), p.sum_us, self._cumulative(p))
                for p in sorted(self._points.values(), key=lambda p: p.name)
            ]

    def statistics(self) -> tuple[int, int, int]:
        """(invalid nodes, invalid drop reports, alerts) so far."""
        with self._lock:
            return self._invalid_nodes, self._invalid_reports, self._alerts

    # Prometheus histogram bounds in µs: the SLO latencies of the manifests fall on bounds.
    BOUNDS_US: tuple[int, ...] = (
        1_000, 2_500, 5_000, 10_000, 20_000, 30_000, 50_000, 100_000, 250_000, 500_000,
        1_000_000, 2_500_000, 5_000_000, 10_000_000,
    )

    def _cumulative(self, point: _Point) -> list[int]:
        counts = [0] * len(self.BOUNDS_US)
        if point.latency is None:
            return counts
        for item in point.latency.get_recorded_iterator():
            # The value a count was recorded at, to HDR's precision (0.1 %).
            value = point.latency.get_highest_equivalent_value(item.value_iterated_to)
            for i, bound in enumerate(self.BOUNDS_US):
                if value <= bound:
                    counts[i] += item.count_at_value_iterated_to
        return counts

    def _view(self, peers: Sequence[AggregateState]) -> dict[str, _Point]:
        """Own points, or merged copies when peers are given (call with the lock held)."""
        if not peers:
            return self._points
        usable = [p for p in peers if self._compatible(p)]
        names = {*self._points, *(n for p in usable for n in p.points)}
        view = {}
        for name in names:
            own = self._points.get(name)
            if own is None:
                if len(self._points) >= self._max_points:
                    continue
                own = self._points[name] = self._new_point(name, None)
            parts = [p.points[name] for p in usable if name in p.points]
            view[name] = own.merged(parts, self.config) if parts else own
        return view

    def _compatible(self, state: AggregateState) -> bool:
        if (state.bucket_s, state.period_bucket_s) != (
            self.config.bucket_s, self.config.period_bucket_s
        ):
            logger.warning("worker %s uses other SLO windows: its state is not merged",
                           state.worker_id[:40])
            return False
        return True

    def _point_stats(self, point: _Point, now: float) -> EmitPointStats:
        if point.latency is None or point.latency.get_total_count() == 0:
            p50 = p95 = p99 = 0
        else:
            quantiles = point.latency.get_percentile_to_value_dict([50.0, 95.0, 99.0])
            p50, p95, p99 = quantiles[50.0], quantiles[95.0], quantiles[99.0]
        slo = point.slo
        burn: list[BurnState] = []
        remaining = None
        if slo is not None:
            burn = evaluate(point.windows, slo, self.config, now)
            remaining = budget_remaining(
                *point.period.window(now, self.config.period_s), slo.objective
            )
        return EmitPointStats(
            count=point.count,
            errors=point.outcomes["error"],
            outcomes=dict(point.outcomes),
            p50_ms=_ms(p50),
            p95_ms=_ms(p95),
            p99_ms=_ms(p99),
            sla_p95_ms=point.sla_p95_ms,
            sla_ok=not any(point.firing.values()),
            alerts=point.alerts,
            slo_objective=None if slo is None else slo.objective,
            slo_latency_ms=None if slo is None else slo.latency_ms,
            bad_events=point.bad,
            error_budget_remaining=remaining,
            burn=burn,
            latency_sum_ms=_ms(point.sum_us),
        )


def _reason(labels: Sequence[str], outcome: str) -> str | None:
    """A node's reason: its first `reason:<r>` label as `<r>` or `error:<code>` label as is
    (after the emit point and outcome labels), else its outcome unless that is `ok`."""
    for label in labels[2:]:
        if label.startswith("reason:"):
            return label[7:]
        if label.startswith("error:"):
            return label
    return None if outcome == "ok" else outcome


def decode_state(data: bytes) -> AggregateState:
    """A peer's published state.

    Raises:
        msgspec.DecodeError: it is not a valid `AggregateState`.
    """
    return _state_decoder.decode(data)


_state_decoder = msgspec.json.Decoder(AggregateState)

