"""Prometheus `/metrics` for the observability worker: a collector and its HTTP server.

The collector reads a fresh snapshot at scrape time, so the exposition is never stale and
nothing is copied into prometheus-client's own metric objects. The server is
prometheus-client's (one daemon thread, loopback by default); its calls block, so the worker
runs `start`/`close` in a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from workers.service._aggregate import Aggregator, StatsSnapshot

OwnPoints = Callable[[], list[tuple[str, int, int, dict[str, int], int, list[int]]]]

_BOUNDS_S = [f"{bound / 1e6:g}" for bound in Aggregator.BOUNDS_US]


class MatrizCollector(Collector):
    """Exposes the observability worker as Prometheus families, read at each scrape.

    Counters and the latency histogram are this worker's own, so they only go up (until a
    restart, which `rate()` handles) and Prometheus adds several workers' with `sum by`.
    Gauges (burn rates, remaining budget, alert state, quantiles) are the merged view every
    live worker shares; take `max by (emit_point)` over workers. Latencies are in seconds.
    """

    def __init__(
        self, snapshot: Callable[[], StatsSnapshot], own_points: OwnPoints,
        slo_points: Collection[str],
    ) -> None:
        self._snapshot = snapshot
        self._own_points = own_points
        self._slo_points = frozenset(slo_points)

    def describe(self) -> list[Metric]:
        # Nothing to pre-register: families depend on the emit points seen so far.
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._own()
        yield from self._merged(self._snapshot())

    def _own(self) -> Iterator[Metric]:
        nodes = CounterMetricFamily(
            "lukhas_matriz_nodes", "MATRIZ nodes this worker aggregated, by outcome.",
            labels=["emit_point", "outcome"],
        )
        errors = CounterMetricFamily(
            "lukhas_matriz_errors", "MATRIZ nodes whose call raised (outcome error).",
            labels=["emit_point"],
        )
        events = CounterMetricFamily(
            "lukhas_slo_events", "Calls of emit points with an SLO (this worker's).",
            labels=["emit_point"],
        )
        bad = CounterMetricFamily(
            "lukhas_slo_bad_events",
            "SLO bad events: calls that failed or were slower than the SLO latency.",
            labels=["emit_point"],
        )
        latency = HistogramMetricFamily(
            "lukhas_matriz_latency_seconds", "Call latency (HDR histogram of this worker).",
            labels=["emit_point"],
        )
        for name, count, bad_count, outcomes, sum_us, cumulative in self._own_points():
            for outcome, n in outcomes.items():
                nodes.add_metric([name, outcome], n)
            errors.add_metric([name], outcomes.get("error", 0))
            if name in self._slo_points:
                events.add_metric([name], count)
                bad.add_metric([name], bad_count)
            buckets = [(le, float(c)) for le, c in zip(_BOUNDS_S, cumulative, strict=True)]
            buckets.append(("+Inf", float(count)))
            latency.add_metric([name], buckets, sum_value=sum_us / 1e6)
        yield from (nodes, errors, events, bad, latency)

    def _merged(self, snap: StatsSnapshot) -> Iterator[Metric]:
        summary = "lukhas_matriz_latency_merged_seconds"
        quantiles = Metric(
            summary,
            "Call latency p50/p95/p99 since start, from the HDR histograms merged over the "
            "live workers (exact to 0.1 %).",
            "summary",
        )
        sla = GaugeMetricFamily(
            "lukhas_matriz_sla_p95_seconds", "p95 SLA from the module manifest.",
            labels=["emit_point"],
        )
        objective = GaugeMetricFamily(
            "lukhas_slo_objective", "Share of calls that must succeed within the SLO latency.",
            labels=["emit_point"],
        )
        slo_latency = GaugeMetricFamily(
            "lukhas_slo_latency_seconds", "The SLO latency: a slower call is a bad event.",
            labels=["emit_point"],
        )
        budget = GaugeMetricFamily(
            "lukhas_slo_error_budget_remaining_ratio",
            "Share of the SLO period's error budget left (negative once overspent).",
            labels=["emit_point"],
        )
        burn = GaugeMetricFamily(
            "lukhas_slo_burn_rate", "Error-budget burn rate over a window (1 = sustainable).",
            labels=["emit_point", "window"],
        )
        firing = GaugeMetricFamily(
            "lukhas_slo_alert_firing", "1 while the burn-rate alert fires.",
            labels=["emit_point", "severity"],
        )
        alerts = CounterMetricFamily(
            "lukhas_slo_alerts", "SLO alerts that started firing (this worker's count).",
            labels=["emit_point"],
        )
        for name, point in snap.emit_points.items():
            for q, value in (("0.5", point.p50_ms), ("0.95", point.p95_ms),
                             ("0.99", point.p99_ms)):
                quantiles.add_sample(summary, {"emit_point": name, "quantile": q}, value / 1000)
            quantiles.add_sample(f"{summary}_count", {"emit_point": name}, point.count)
            quantiles.add_sample(f"{summary}_sum", {"emit_point": name},
                                 point.latency_sum_ms / 1000)
            alerts.add_metric([name], point.alerts)
            if point.sla_p95_ms is not None:
                sla.add_metric([name], point.sla_p95_ms / 1000)
            if point.slo_objective is None or point.slo_latency_ms is None:
                continue
            objective.add_metric([name], point.slo_objective)
            slo_latency.add_metric([name], point.slo_latency_ms / 1000)
            if point.error_budget_remaining is not None:
                budget.add_metric([name], point.error_budget_remaining)
            seen = set()
            for state in point.burn:
                for length, rate in ((state.long_window_s, state.long_burn_rate),
                                     (state.short_window_s, state.short_burn_rate)):
                    window = f"{length:g}s"
                    if window not in seen:
                        seen.add(window)
                        burn.add_metric([name, window], rate)
                firing.add_metric([name, state.severity], 1.0 if state.firing else 0.0)
        yield from (quantiles, sla, objective, slo_latency, budget, burn, firing, alerts)

        yield CounterMetricFamily(
            "lukhas_matriz_dropped_nodes",
            "Nodes emitters reported dropped (latest report per producer, summed).",
            value=snap.dropped_nodes,
        )
        by_producer = CounterMetricFamily(
            "lukhas_matriz_producer_dropped_nodes",
            "Nodes each emitter reported dropped (its latest report).",
            labels=["producer"],
        )
        for producer, dropped in sorted(snap.dropped_by_producer.items()):
            by_producer.add_metric([producer], dropped)
        yield by_producer
        yield CounterMetricFamily(
            "lukhas_matriz_invalid_nodes",
            "Messages on matriz.> that were not valid MATRIZ nodes (skipped).",
            value=snap.invalid_nodes,
        )


class MetricsServer:
    """prometheus-client's HTTP server on its own registry; `close()` stops and joins it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(cls, collector: Collector, *, port: int, addr: str) -> MetricsServer:
        """Bind `addr:port` (0 picks a free port) and serve `/metrics` (blocking call).

        Raises:
            OSError: the address cannot be bound (e.g. the port is taken).
        """
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        server, thread = start_http_server(port, addr=addr, registry=registry)
        return cls(server, thread)

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving, close the socket and join the thread (blocking call)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
