"""Overload control for the slice service: queue-time budgets, cheap refusals, reply checks.

Each endpoint has a lane: a FIFO of requests stamped when the reader took them off the
subscription. The reader drains everything nats-py has buffered at once, so the queue the
service can see is where the waiting happens; a request is refused at once (`overloaded`)
when the time it has already waited plus the queue ahead of it (measured in this lane's
recent service interval) would exceed its queue budget, and again when it reaches the front
having waited too long anyway. The README ("Overload") explains why queue time, not a
concurrency limit, is the signal here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from lukhas.errors import InvalidRequest

#: The client's deadline, relative: how many ms from when the service reads the request an
#: answer is still useful. Overrides the endpoint's SLA as the budget (1..600000).
DEADLINE_HEADER = "Lukhas-Deadline-Ms"
MAX_DEADLINE_MS = 600_000
#: Share of the budget a request may spend queued: the rest is left for serving it, for the
#: waiting the service cannot see (socket and server buffers) and for the reply's transit.
QUEUE_SHARE = 0.5
#: Budget of an endpoint whose manifest states no SLA.
DEFAULT_BUDGET_MS = 1000.0
#: Weight of the newest sample in the service-interval estimate.
_EWMA_ALPHA = 0.05
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


@dataclass(slots=True)
class Lane:
    """One endpoint's queue accounting: how many wait, how fast they leave, what was shed."""

    #: The endpoint's budget (ns): its manifest p95 SLA, or DEFAULT_BUDGET_MS.
    budget_ns: int
    queued: int = 0
    #: Estimated wall time between two requests leaving the queue while it is busy (ns).
    interval_ns: float = 0.0
    last_take_ns: int = 0
    #: Whether requests were still waiting when the last one left (so the next gap is service).
    busy: bool = False
    overloaded: int = 0
    #: Refusals not yet shown in MATRIZ, and when the last node for them went out.
    unreported: int = 0
    reported_ns: int = -NODE_EVERY_NS

    def refused(self, now_ns: int) -> int:
        """Count one refusal; the number of refusals a MATRIZ node should stand for now
        (0: not yet, the next node will include this one)."""
        self.overloaded += 1
        self.unreported += 1
        if now_ns - self.reported_ns < NODE_EVERY_NS:
            return 0
        count, self.unreported, self.reported_ns = self.unreported, 0, now_ns
        return count

    def queue_budget(self, budget_ns: int) -> float:
        return budget_ns * QUEUE_SHARE

    def admits(self, stamp_ns: int, budget_ns: int, now_ns: int) -> bool:
        """Whether a request stamped `stamp_ns` can leave the queue within its budget."""
        expected = now_ns - stamp_ns + self.queued * self.interval_ns
        return expected <= self.queue_budget(budget_ns)

    def expired(self, stamp_ns: int, budget_ns: int, now_ns: int) -> bool:
        return now_ns - stamp_ns > self.queue_budget(budget_ns)

    def took(self, now_ns: int) -> None:
        """A request left the queue at `now_ns` (`queued` already counts it out)."""
        gap = now_ns - self.last_take_ns
        if self.busy and 0 <= gap <= _MAX_INTERVAL_NS:
            self.interval_ns += _EWMA_ALPHA * (gap - self.interval_ns)
        self.last_take_ns = now_ns
        self.busy = self.queued > 0

    def retry_after_ms(self) -> int:
        """An honest wait before retrying: the time the queue ahead needs to clear."""
        return max(1, math.ceil(self.queued * self.interval_ns / 1e6))
