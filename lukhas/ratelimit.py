"""Token buckets shared by the slices: answer at once, a token now or how long until one exists.

A `KeyedLimiter` combines a global bucket with one bucket per key (a tenant, a source), takes
from both or neither, and keeps memory bounded. Slices never import each other, so what they
share lives here.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

Clock = Callable[[], float]


class TokenBucket:
    """`rate` tokens per second up to `burst`; starts full. The clock is injectable for tests."""

    __slots__ = ("rate", "burst", "_tokens", "_updated", "_clock")

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got rate={rate} burst={burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def _refill(self) -> float:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._updated = now
        return self._tokens

    def wait_time(self) -> float:
        """Seconds until one token is available (0.0 if one is available now)."""
        tokens = self._refill()
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self) -> None:
        """Spend one token; call only after `wait_time()` returned 0."""
        self._tokens -= 1.0

    @property
    def full(self) -> bool:
        return self._refill() >= self.burst


class Decision(NamedTuple):
    allowed: bool
    retry_after_s: float


class KeyedLimiter:
    """A global bucket plus one bucket per key (tenant, source); a request needs both.

    Tokens are taken from both or neither, so a refusal by one bucket never spends the
    other's. Idle per-key buckets that have refilled completely are forgotten (a fresh bucket
    behaves the same), which keeps memory bounded by `max_keys`.
    """

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        key_rate: float | None = None,
        key_burst: int | None = None,
        max_keys: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self._clock = clock
        self._global = TokenBucket(rate, burst, clock=clock)
        self._key_rate = key_rate or rate
        self._key_burst = key_burst or burst
        self._max_keys = max_keys
        self._keys: OrderedDict[str, TokenBucket] = OrderedDict()

    def decide(self, key: str) -> Decision:
        """Allow one request for `key` now, or say how long until it would be allowed."""
        bucket = self._keys.get(key)
        if bucket is None:
            self._evict()
            bucket = TokenBucket(self._key_rate, self._key_burst, clock=self._clock)
            self._keys[key] = bucket
        else:
            self._keys.move_to_end(key)
        wait = max(self._global.wait_time(), bucket.wait_time())
        if wait > 0:
            return Decision(False, wait)
        self._global.take()
        bucket.take()
        return Decision(True, 0.0)

    def _evict(self) -> None:
        while len(self._keys) >= self._max_keys:
            oldest_key, oldest = next(iter(self._keys.items()))
            if not oldest.full:
                # Forgetting a bucket that still owes tokens would hand out a free burst;
                # the least recently used one is not full, so no idle bucket is either.
                break
            del self._keys[oldest_key]

    @property
    def tracked_keys(self) -> int:
        return len(self._keys)
