"""Prometheus `/metrics` for the observability worker: a collector and its HTTP server.

The collector reads a fresh snapshot at scrape time, so the exposition is never stale and
nothing is copied into prometheus-client's own metric objects. The server is
prometheus-client's (one daemon thread, loopback by default); its calls block, so the worker
runs `start`/`close` in a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers._aggregate import StatsSnapshot

_QUANTILES = (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms"))


class MatrizCollector(Collector):
    """Exposes a `StatsSnapshot` as Prometheus families, read at each scrape."""

    def __init__(self, snapshot: Callable[[], StatsSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        # Nothing to pre-register: families depend on the emit points seen so far.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        nodes = CounterMetricFamily(
            "lukhas_matriz_nodes", "MATRIZ nodes aggregated, by emit point and outcome.",
            labels=["emit_point", "outcome"],
        )
        errors = CounterMetricFamily(
            "lukhas_matriz_errors", "MATRIZ nodes whose call raised (outcome error).",
            labels=["emit_point"],
        )
        latency = GaugeMetricFamily(
            "lukhas_matriz_latency_ms",
            "Call latency percentiles since the worker started (HDR histogram), ms.",
            labels=["emit_point", "quantile"],
        )
        window_p95 = GaugeMetricFamily(
            "lukhas_matriz_window_p95_ms", "p95 latency of the current SLA window, ms.",
            labels=["emit_point"],
        )
        sla = GaugeMetricFamily(
            "lukhas_matriz_sla_p95_ms", "p95 SLA from the module manifest, ms.",
            labels=["emit_point"],
        )
        sla_ok = GaugeMetricFamily(
            "lukhas_matriz_sla_ok", "1 unless the current window breaches the p95 SLA.",
            labels=["emit_point"],
        )
        alerts = CounterMetricFamily(
            "lukhas_matriz_sla_alerts", "SLA breach alerts published.", labels=["emit_point"]
        )
        for name, point in snap.emit_points.items():
            for outcome, count in point.outcomes.items():
                nodes.add_metric([name, outcome], count)
            errors.add_metric([name], point.errors)
            for quantile, field in _QUANTILES:
                latency.add_metric([name, quantile], getattr(point, field))
            window_p95.add_metric([name], point.window_p95_ms)
            alerts.add_metric([name], point.alerts)
            if point.sla_p95_ms is not None:
                sla.add_metric([name], point.sla_p95_ms)
                sla_ok.add_metric([name], 1.0 if point.sla_ok else 0.0)
        yield from (nodes, errors, latency, window_p95, sla, sla_ok, alerts)

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
    def start(
        cls, snapshot: Callable[[], StatsSnapshot], *, port: int, addr: str
    ) -> MetricsServer:
        """Bind `addr:port` (0 picks a free port) and serve `/metrics` (blocking call).

        Raises:
            OSError: the address cannot be bound (e.g. the port is taken).
        """
        registry = CollectorRegistry(auto_describe=False)
        registry.register(MatrizCollector(snapshot))
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
