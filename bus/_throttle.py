"""Rate-limit repetitive log lines (slow consumers, reconnect attempts) per key."""

from __future__ import annotations

import time
from collections.abc import Hashable


class LogThrottle:
    """Say whether a message for `key` may be logged now: at most once per `interval` seconds."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._last: dict[Hashable, float] = {}

    def allow(self, key: Hashable) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        self._last[key] = now
        return True

    def forget(self, key: Hashable) -> None:
        self._last.pop(key, None)
