"""SLOs and multi-window, multi-burn-rate alerts (Google SRE workbook, "Alerting on SLOs").

An emit point's SLO (from its manifest's `slas.slo`) says what share of calls must succeed
within a latency. A *bad event* is a call whose MATRIZ outcome is `error` or whose latency is
over the SLO latency; the *error budget* is `1 - objective` of all calls. The *burn rate* over a
window is the window's bad-event ratio divided by the budget: 1 spends the budget exactly over
the SLO period, 14.4 spends 2 % of a 30-day budget in one hour.

Each alert policy needs both its long and its short window over the threshold: the long
window makes a blip too small to page, the short one makes the alert resolve soon after the
burn stops. Defaults are the workbook's: page at 14.4x over 1 h and 5 min, ticket at 6x over
6 h and 30 min; the window lengths are settings, so tests and demos run them in seconds.

Events are counted in fixed-width buckets numbered from the Unix epoch by the node's own
`created_ts`, so a backlog replayed after a restart lands in the minutes it happened in, and
the buckets of two workers add up bucket by bucket.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

Severity = Literal["page", "ticket"]
AlertState = Literal["firing", "resolved"]

#: Buckets per shortest alert window: the windows are exact to a tenth of the shortest one.
BUCKETS_PER_SHORT_WINDOW = 10
#: Buckets over the SLO period (the remaining budget is exact to 1/720 of the period).
PERIOD_BUCKETS = 720


@dataclass(frozen=True, slots=True)
class Slo:
    """`objective` of the calls must succeed within `latency_ms`."""

    objective: float
    latency_ms: float


@dataclass(frozen=True, slots=True)
class BurnPolicy:
    """Alert at `severity` when both windows burn the budget at `burn_rate` or faster."""

    severity: Severity
    burn_rate: float
    long_s: float
    short_s: float


@dataclass(frozen=True, slots=True)
class SloSettings:
    """The alert policies and the SLO period; build from `Settings` with `from_settings`."""

    policies: tuple[BurnPolicy, ...]
    period_s: float
    #: A long window with fewer events never alerts (one failed call of three is no outage).
    min_events: int = 20

    @classmethod
    def workbook(
        cls,
        *,
        page_long_s: float = 3600.0,
        page_short_s: float = 300.0,
        ticket_long_s: float = 21600.0,
        ticket_short_s: float = 1800.0,
        period_s: float = 30 * 86400.0,
        min_events: int = 20,
    ) -> SloSettings:
        """The workbook's two policies (14.4x page, 6x ticket) with these window lengths.

        Raises:
            ValueError: a short window is not shorter than its long one, or a length or
                `min_events` is not positive.
        """
        for short, long in ((page_short_s, page_long_s), (ticket_short_s, ticket_long_s)):
            if not 0 < short < long:
                raise ValueError(f"SLO windows must be 0 < short < long, not {short=}, {long=}")
        if period_s <= 0 or min_events < 1:
            raise ValueError(f"period_s and min_events must be positive: {period_s}, {min_events}")
        return cls(
            policies=(
                BurnPolicy("page", 14.4, page_long_s, page_short_s),
                BurnPolicy("ticket", 6.0, ticket_long_s, ticket_short_s),
            ),
            period_s=period_s,
            min_events=min_events,
        )

    @classmethod
    def from_settings(cls, settings: Any) -> SloSettings:
        return cls.workbook(
            page_long_s=settings.slo_page_long_s,
            page_short_s=settings.slo_page_short_s,
            ticket_long_s=settings.slo_ticket_long_s,
            ticket_short_s=settings.slo_ticket_short_s,
            period_s=settings.slo_period_s,
        )

    @property
    def bucket_s(self) -> float:
        return min(p.short_s for p in self.policies) / BUCKETS_PER_SHORT_WINDOW

    @property
    def keep_s(self) -> float:
        return max(p.long_s for p in self.policies)

    @property
    def period_bucket_s(self) -> float:
        return self.period_s / PERIOD_BUCKETS


class Buckets:
    """(events, bad events) per time bucket, numbered `floor(epoch seconds / width)`.

    Numbering from the epoch, not from a worker's start, is what makes two workers' buckets
    addable. Buckets older than `keep_s` are dropped when a new one opens.
    """

    __slots__ = ("width", "keep_s", "counts")

    def __init__(self, width: float, keep_s: float) -> None:
        self.width = width
        self.keep_s = keep_s
        self.counts: dict[int, list[int]] = {}

    def add(self, ts: float, bad: bool, now: float) -> None:
        index = int(ts // self.width)
        cell = self.counts.get(index)
        if cell is None:
            if ts <= now - self.keep_s:
                return  # older than anything a window looks at
            self.prune(now)
            cell = self.counts[index] = [0, 0]
        cell[0] += 1
        if bad:
            cell[1] += 1

    def window(self, now: float, length: float) -> tuple[int, int]:
        """(events, bad events) in the `length` seconds up to `now`, to one bucket."""
        low, high = int((now - length) // self.width), int(now // self.width)
        total = bad = 0
        for index, (t, b) in self.counts.items():
            if low < index <= high:
                total += t
                bad += b
        return total, bad

    def prune(self, now: float) -> None:
        oldest = int((now - self.keep_s) // self.width)
        for index in [i for i in self.counts if i <= oldest]:
            del self.counts[index]

    def export(self) -> list[tuple[int, int, int]]:
        return sorted((i, t, b) for i, (t, b) in self.counts.items())

    def merge(self, rows: Iterable[Sequence[int]]) -> None:
        for index, total, bad in rows:
            cell = self.counts.setdefault(int(index), [0, 0])
            cell[0] += int(total)
            cell[1] += int(bad)


class BurnState(msgspec.Struct, frozen=True):
    """One policy's view of an emit point, as the stats reply and `/metrics` carry it."""

    severity: Severity
    burn_rate_threshold: float
    long_window_s: float
    short_window_s: float
    long_burn_rate: float
    short_burn_rate: float
    long_window_events: int
    long_window_bad_events: int
    firing: bool


class BurnAlert(msgspec.Struct, frozen=True):
    """Published on `lukhas.observability.alerts.<emit point tokens>` when an alert starts
    (`state` firing) and when it stops (`state` resolved)."""

    emit_point: str
    state: AlertState
    severity: Severity
    objective: float
    latency_ms: float
    burn_rate_threshold: float
    long_window_s: float
    short_window_s: float
    long_burn_rate: float
    short_burn_rate: float
    long_window_events: int
    long_window_bad_events: int
    #: Share of the SLO period's error budget not spent yet (negative once overspent).
    error_budget_remaining: float
    budget_period_s: float
    #: Wall-clock time of the evaluation, epoch milliseconds (as MATRIZ `created_ts`).
    ts: int


def burn_rate(total: int, bad: int, objective: float) -> float:
    """How many times faster than sustainable the budget burns (0 with no events)."""
    if total == 0:
        return 0.0
    return round((bad / total) / (1.0 - objective), 6)


def budget_remaining(total: int, bad: int, objective: float) -> float:
    """1 with nothing spent, 0 with the budget spent exactly, negative when overspent."""
    if total == 0:
        return 1.0
    return round(1.0 - bad / ((1.0 - objective) * total), 6)


def evaluate(
    windows: Buckets, slo: Slo, config: SloSettings, now: float
) -> list[BurnState]:
    """Every policy's burn rates and whether its alert condition holds at `now`."""
    states = []
    for policy in config.policies:
        long_total, long_bad = windows.window(now, policy.long_s)
        short_total, short_bad = windows.window(now, policy.short_s)
        long_rate = burn_rate(long_total, long_bad, slo.objective)
        short_rate = burn_rate(short_total, short_bad, slo.objective)
        firing = (
            long_total >= config.min_events
            and long_rate >= policy.burn_rate
            and short_rate >= policy.burn_rate
        )
        states.append(BurnState(
            policy.severity, policy.burn_rate, policy.long_s, policy.short_s,
            long_rate, short_rate, long_total, long_bad, firing,
        ))
    return states


def slo_by_emit_point(manifests: Iterable[Mapping[str, Any]]) -> dict[str, Slo]:
    """Map each emit point to its manifest's `slas.slo` (points without one are left out).

    An emit point listed by two manifests keeps the stricter objective and latency.

    Raises:
        ValueError: `slas.slo` is not `{"objective": 0 < x < 1, "latency_ms": > 0}`.
    """
    slos: dict[str, Slo] = {}
    for manifest in manifests:
        module = manifest.get("module", "<unnamed module>")
        raw = (manifest.get("slas") or {}).get("slo")
        if raw is None:
            continue
        objective = raw.get("objective") if isinstance(raw, dict) else None
        latency = raw.get("latency_ms") if isinstance(raw, dict) else None
        if (
            not _is_number(objective) or not 0 < objective < 1
            or not _is_number(latency) or latency <= 0
        ):
            raise ValueError(
                f"{module}: slas.slo must be {{objective: 0 < x < 1, latency_ms: > 0}}, "
                f"not {raw!r}"
            )
        for point in manifest.get("matriz_emit_points") or []:
            old = slos.get(point)
            slo = Slo(float(objective), float(latency))
            if old is not None:
                slo = Slo(max(old.objective, slo.objective), min(old.latency_ms, slo.latency_ms))
            slos[point] = slo
    return slos


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
