"""The server's permission refusals, handed to whoever made the refused operation.

nats-py passes the server's `-ERR 'Permissions Violation for Publish to "x"'` (or `... for
Subscription to "x" using queue "q"`) to `error_cb`, lower-cased and detached from the call
that caused it. `Refusals` matches it back: a refused subscription fails its iteration, a
refused request (or inbox) fails the request at once instead of waiting out its timeout, and
a refused publish is reported by the next `flush()`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

import anyio

from bus.errors import PermissionDenied

__all__ = ["PendingRequest", "Refusals"]

_VIOLATION = re.compile(
    r'permissions violation for (publish|subscription) to "([^"]*)"(?: using queue "([^"]*)")?'
)


class Refusable(Protocol):
    """A subscription as `Refusals` sees it (`NatsSubscription`)."""

    subject: str
    queue: str | None

    def deny(self, refusal: PermissionDenied) -> None: ...


class PendingRequest:
    """A request in flight: cancelled, with `denied` set, when the server refuses it."""

    __slots__ = ("denied", "scope", "subject")

    def __init__(self, subject: str, scope: anyio.CancelScope) -> None:
        self.subject = subject
        self.scope = scope
        self.denied: PermissionDenied | None = None

    def refuse(self, refusal: PermissionDenied) -> None:
        self.denied = refusal
        self.scope.cancel()


class Refusals:
    """What the server refused on one connection, and the requests that may yet be refused.

    Args:
        inbox_prefix: the connection's inbox prefix; a refused subscription under it means
            no request can get a reply.
    """

    def __init__(self, inbox_prefix: str) -> None:
        self._inbox = inbox_prefix.lower() + "."
        #: Requests in flight, by their cancel scope (`NatsBus.close` cancels them too).
        self.requests: dict[anyio.CancelScope, PendingRequest] = {}
        #: Set once the server refused the subscription to this connection's inbox.
        self.inbox_denied: PermissionDenied | None = None
        #: Publishes refused so far, and the last one (what `flush` reports).
        self.publishes = 0
        self.last_publish: PermissionDenied | None = None

    def note(self, text: str, subscriptions: Iterable[Refusable]) -> bool:
        """Hand the violation in an error text to whatever it refused.

        Returns whether it was a permissions violation handed to a subscription or request
        of this connection (a refused publish is counted, and only reported by `flush`).
        """
        found = _VIOLATION.search(text)
        if found is None:
            return False
        kind, subject, queue = found.group(1), found.group(2), found.group(3) or None
        if kind == "subscription":
            return self._subscription_refused(subject, queue, subscriptions)
        self.publishes += 1
        self.last_publish = PermissionDenied("publish", subject)
        handed = False
        for pending in self.requests.values():
            if pending.subject.lower() == subject:
                pending.refuse(PermissionDenied("publish", pending.subject))
                handed = True
        return handed

    def _subscription_refused(
        self, subject: str, queue: str | None, subscriptions: Iterable[Refusable]
    ) -> bool:
        handed = False
        for sub in subscriptions:
            if sub.subject.lower() == subject and (sub.queue or None) == queue:
                sub.deny(PermissionDenied("subscribe", sub.subject, queue=sub.queue))
                handed = True
        if subject.startswith(self._inbox):
            # nats-py's request inbox (`<prefix>.<id>.*`): no request can get a reply.
            self.inbox_denied = PermissionDenied("subscribe", subject)
            for pending in self.requests.values():
                pending.refuse(self.inbox_denied)
                handed = True
        return handed
