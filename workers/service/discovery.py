"""The NATS service-discovery protocol (`$SRV.PING|INFO|STATS[.<name>[.<id>]]`).

Shapes follow nats-py's `nats.micro` (`io.nats.micro.v1.*_response`), so `nats micro ls`
and any micro client list this service with per-endpoint request/error counts and timings.
nats.micro only reports an average; each endpoint's `data` here also carries `latency_ms`
`{"p50", "p95", "p99"}` from an HDR histogram of its processing times.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hdrh.histogram import HdrHistogram

PREFIX = "$SRV"
VERBS = ("PING", "INFO", "STATS")

PING_TYPE = "io.nats.micro.v1.ping_response"
INFO_TYPE = "io.nats.micro.v1.info_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"


def control_subject(verb: str, name: str | None = None, service_id: str | None = None) -> str:
    """`$SRV.<verb>`, `$SRV.<verb>.<name>` or `$SRV.<verb>.<name>.<id>`."""
    return ".".join(part for part in (PREFIX, verb, name, service_id) if part)


@dataclass(slots=True)
class EndpointCounters:
    """Requests, errors and processing time of one endpoint (nats.micro's EndpointStats)."""

    num_requests: int = 0
    num_errors: int = 0
    processing_time_ns: int = 0
    last_error: str = ""
    #: Requests refused as `overloaded` (counted as requests and errors too, as nats.micro
    #: counts any reply with error headers) and requests not served because their reply
    #: subject is not an inbox (not counted as requests: nobody gets an answer).
    overloaded: int = 0
    refused_replies: int = 0
    #: Processing times in µs (1 µs to 1 h, 3 significant digits), for the quantiles.
    latency: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 3_600_000_000, 3))

    def record(self, elapsed_ns: int, error: str | None) -> None:
        self.num_requests += 1
        self.processing_time_ns += elapsed_ns
        self.latency.record_value(min(max(elapsed_ns // 1000, 1), 3_600_000_000))
        if error is not None:
            self.num_errors += 1
            self.last_error = error

    def refuse(self, reason: str) -> None:
        """A request refused before it was served (its time is not processing time)."""
        self.num_requests += 1
        self.num_errors += 1
        self.last_error = reason
        self.overloaded += 1


@dataclass(slots=True)
class ServiceIdentity:
    name: str
    id: str
    version: str
    description: str
    metadata: dict[str, str] = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_monotonic: float = field(default_factory=time.monotonic)

    def base(self, kind: str) -> dict[str, Any]:
        return {
            "type": kind, "name": self.name, "id": self.id,
            "version": self.version, "metadata": self.metadata,
        }


def ping_response(identity: ServiceIdentity) -> dict[str, Any]:
    return identity.base(PING_TYPE)


def info_response(
    identity: ServiceIdentity, endpoints: list[tuple[str, str, str]]
) -> dict[str, Any]:
    """`endpoints` are (name, subject, queue group)."""
    return {
        **identity.base(INFO_TYPE),
        "description": identity.description,
        "endpoints": [
            {"name": name, "subject": subject, "queue_group": queue, "metadata": {}}
            for name, subject, queue in endpoints
        ],
    }


def stats_response(
    identity: ServiceIdentity,
    endpoints: list[tuple[str, str, str, EndpointCounters, dict[str, Any] | None]],
    *,
    canary: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`endpoints` are (name, subject, queue group, counters, extra `data`); `canary` holds
    each endpoint's canary state by subject (its `data.canary`)."""
    canary = canary or {}
    started = identity.started.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return {
        **identity.base(STATS_TYPE),
        "started": started,
        "endpoints": [
            {
                "name": name,
                "subject": subject,
                "queue_group": queue,
                "num_requests": c.num_requests,
                "num_errors": c.num_errors,
                "last_error": c.last_error,
                "processing_time": c.processing_time_ns,
                "average_processing_time": (
                    c.processing_time_ns // c.num_requests if c.num_requests else 0
                ),
                "data": {
                    **(data or {}), "latency_ms": latency_quantiles(c),
                    "overloaded": c.overloaded, "refused_replies": c.refused_replies,
                    **({"canary": canary[subject]} if subject in canary else {}),
                },
            }
            for name, subject, queue, c, data in endpoints
        ],
    }


def latency_quantiles(counters: EndpointCounters) -> dict[str, float]:
    """p50/p95/p99 processing time of an endpoint, ms (0 before its first request)."""
    if counters.latency.get_total_count() == 0:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    values = counters.latency.get_percentile_to_value_dict([50.0, 95.0, 99.0])
    return {f"p{q:g}": round(values[q] / 1000, 3) for q in (50.0, 95.0, 99.0)}
