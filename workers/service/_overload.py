"""Overload control for the slice service: queue-time budgets, cheap refusals, reply checks.

Each endpoint has a lane: a FIFO of requests stamped when the reader took them off the
subscription. The reader drains everything nats-py has buffered at once, so the queue the
service can see is where the waiting happens; a request is refused at once (`overloaded`)
when the time it has already waited plus the time until it would be answered (the queue
ahead of it and its own service, in this lane's measured service interval) would exceed the
service's share of its budget, and again when it reaches the front having waited too long
anyway. The README ("Overload") explains why queue time, not a concurrency limit, is the
signal here, and how the share is chosen.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from lukhas.errors import InvalidRequest

#: The client's deadline, relative: how many ms from when the service reads the request an
#: answer is still useful. Overrides the endpoint's SLA as the budget (1..600000).
DEADLINE_HEADER = "Lukhas-Deadline-Ms"
MAX_DEADLINE_MS = 600_000
#: Share of the budget a request may spend in the service (queued, then served): the rest
#: is left for the waiting the service cannot see (the client's socket, nats-server, this
#: worker's socket before nats-py parses it) and for the reply's way back.
QUEUE_SHARE = 0.5
#: What the service leaves for that unseen waiting (ns) even when half the budget would be
#: less: measured in the deployed shape at 2x capacity on a 2-core machine, request transit
#: to the reader plus reply transit reached 15-25 ms at the 95th percentile while every
#: process competed for the cores, whatever the endpoint's SLA.
UNSEEN_RESERVE_NS = 25_000_000
#: The least share of the budget the service keeps however tight the budget is.
MIN_QUEUE_SHARE = 0.25
#: Budget of an endpoint whose manifest states no SLA.
DEFAULT_BUDGET_MS = 1000.0
#: Busy wall time one service-interval sample spans (ns). It must cover whole cycles of the
#: worker's loop (a server's slice, then the readers' and nats-py's turns): sampled per
#: request, the estimate decays to the in-slice gaps just before every reader pass, the
#: very moment the reader consults it, and queues were predicted to drain several times
#: faster than they did.
_WINDOW_NS = 20_000_000
#: Weight of the newest window in the service-interval estimate.
_EWMA_ALPHA = 0.25
#: Intervals longer than this are idle gaps, not service (ns).
_MAX_INTERVAL_NS = 50_000_000

#: At most one MATRIZ node per endpoint per this many ns stands for its refusals meanwhile:
#: a node per refusal would make shedding cost what serving does (and load the MATRIZ
#: stream most exactly when the service is overloaded). `$SRV.STATS` counts every one.
NODE_EVERY_NS = 100_000_000

#: Inbox prefixes of the service's own NATS users (deploy/nats-server.conf). They never call
#: a slice, so a request naming one as its reply subject is an attempt to inject a message
#: into that worker's own requests (e.g. a forged JetStream acknowledgement).
SERVICE_INBOXES = frozenset({"_INBOX_slices", "_INBOX_observability"})


def reply_allowed(reply: str, refused: frozenset[str]) -> bool:
    """Whether `reply` is a requester's inbox (`_INBOX.<...>` or `_INBOX_<user>.<...>`).

    NATS lets a responder with `allow_responses` publish to whatever reply subject a request
    names, so without this a client could make the service publish on any subject (alerts,
    observability state, another worker's inbox). Prefixes in `refused` are refused too.
    """
    prefix, dot, rest = reply.partition(".")
    if not dot or not rest or prefix in refused:
        return False
    return prefix == "_INBOX" or (prefix.startswith("_INBOX_") and len(prefix) > 7)


def deadline_ns(headers: Mapping[str, str], default_ns: int) -> int:
    """The request's budget in ns: its `Lukhas-Deadline-Ms` header, else `default_ns`.

    Raises:
        InvalidRequest: the header is not a whole number of ms in 1..600000.
    """
    text = headers.get(DEADLINE_HEADER)
    if text is None:
        return default_ns
    try:
        ms = int(text)
    except ValueError:
        ms = 0
    if not 1 <= ms <= MAX_DEADLINE_MS:
        raise InvalidRequest(
            f"header {DEADLINE_HEADER} must be a whole number of ms in 1..{MAX_DEADLINE_MS}"
        )
    return ms * 1_000_000


def service_budget_ns(budget_ns: int) -> float:
    """The part of a request's budget it may spend in the service, read to answered.

    Half the budget, but never so much that less than `UNSEEN_RESERVE_NS` is left for the
    waiting the service cannot see, and never under a quarter of it: 30 ms gives 7.5 ms,
    40 ms gives 15 ms, 50 ms gives 25 ms, 250 ms gives 125 ms, 10 ms gives 2.5 ms.
    """
    share = min(budget_ns * QUEUE_SHARE, budget_ns - UNSEEN_RESERVE_NS)
    return max(budget_ns * MIN_QUEUE_SHARE, share)


@functools.lru_cache(maxsize=4096)
def overloaded_body(retry_after_ms: int) -> bytes:
    """The body of an `overloaded` refusal, encoded once per `retry_after_ms`: under overload
    most refusals of a pass share one, and encoding it again each time cost as much as
    deciding the refusal."""
    return msgspec.json.encode(
        {"ok": False, "reason": "overloaded", "retry_after_ms": retry_after_ms}
    )


@dataclass(slots=True)
class Lane:
    """One endpoint's queue accounting: how many wait, how fast they leave, what was shed."""

    #: The endpoint's budget (ns): its manifest p95 SLA, or DEFAULT_BUDGET_MS.
    budget_ns: int
    queued: int = 0
    #: Estimated wall time between two requests leaving the queue while it is busy (ns),
    #: from windows of `_WINDOW_NS` busy time.
    interval_ns: float = 0.0
    last_take_ns: int = 0
    #: Whether requests were still waiting when the last one left (so the next gap is service).
    busy: bool = False
    #: The window being measured: busy time so far and requests that left in it.
    window_ns: int = 0
    window_takes: int = 0
    overloaded: int = 0
    #: Refusals not yet shown in MATRIZ, and when the last node for them went out.
    unreported: int = 0
    reported_ns: int = -NODE_EVERY_NS
    #: `service_budget_ns(budget_ns)`: the share of a request carrying no deadline of its own.
    share_ns: float = field(init=False)

    def __post_init__(self) -> None:
        self.share_ns = service_budget_ns(self.budget_ns)

    def refused(self, now_ns: int) -> int:
        """Count one refusal; the number of refusals a MATRIZ node should stand for now
        (0: not yet, the next node will include this one)."""
        self.overloaded += 1
        self.unreported += 1
        if now_ns - self.reported_ns < NODE_EVERY_NS:
            return 0
        count, self.unreported, self.reported_ns = self.unreported, 0, now_ns
        return count

    def admits(self, stamp_ns: int, budget_ns: int, now_ns: int) -> bool:
        """Whether a request stamped `stamp_ns`, joining the queue now, can be answered
        within the service's share of its budget: what it waited, the queue ahead of it,
        and its own service."""
        expected = now_ns - stamp_ns + (self.queued + 1) * self.interval()
        return expected <= self.share(budget_ns)

    def expired(self, stamp_ns: int, budget_ns: int, now_ns: int) -> bool:
        """Whether a request at the front can no longer be answered within that share."""
        return now_ns - stamp_ns + self.interval() > self.share(budget_ns)

    def share(self, budget_ns: int) -> float:
        """`service_budget_ns(budget_ns)`, kept for the lane's own budget."""
        return self.share_ns if budget_ns == self.budget_ns else service_budget_ns(budget_ns)

    def interval(self) -> float:
        """The service interval to plan with (ns): the estimate, or before the first whole
        window the mean of the window so far (a worker's first burst is planned too)."""
        if self.interval_ns or not self.window_takes:
            return self.interval_ns
        return self.window_ns / self.window_takes

    def took(self, now_ns: int) -> None:
        """A request left the queue at `now_ns` (`queued` already counts it out)."""
        gap = now_ns - self.last_take_ns
        if self.busy and 0 <= gap <= _MAX_INTERVAL_NS:
            self.window_ns += gap
            self.window_takes += 1
            if self.window_ns >= _WINDOW_NS:
                sample = self.window_ns / self.window_takes
                self.interval_ns = sample if not self.interval_ns else (
                    self.interval_ns + _EWMA_ALPHA * (sample - self.interval_ns))
                self.window_ns = self.window_takes = 0
        self.last_take_ns = now_ns
        self.busy = self.queued > 0

    def retry_after_ms(self) -> int:
        """An honest wait before retrying: the time the queue ahead needs to clear."""
        return max(1, math.ceil(self.queued * self.interval() / 1e6))
