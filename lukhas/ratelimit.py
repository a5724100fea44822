"""Token buckets shared by the slices: answer at once, a token now or how long until one exists.

A `KeyedLimiter` combines a global bucket with one bucket per key (a tenant, a source), takes
from both or neither, and keeps memory bounded. A `SharedLimiter` does the same with buckets
held in a `TokenLeaseStore`, so one limit holds for every worker of the queue group: the
slices keep the seam (this module), the service wires the NATS KV store at startup. Slices
never import each other, so what they share lives here.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import anyio

if TYPE_CHECKING:
    from lukhas.runtime import Runtime

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

    def take_up_to(self, count: int) -> int:
        """Spend up to `count` whole tokens, as many as there are; return how many."""
        taken = max(0, min(count, int(self._refill())))
        self._tokens -= taken
        return taken

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


# -- one limit for the whole queue group ---------------------------------------------------


class Grant(NamedTuple):
    """What a lease store gave: `tokens` now, or (when 0) the seconds until one exists."""

    tokens: int
    wait_s: float


@runtime_checkable
class TokenLeaseStore(Protocol):
    """Where the buckets every worker of the queue group shares live.

    `lease` takes up to `want` tokens from the bucket `key` (`rate` per second up to
    `burst`, full when new) and returns how many it took; with none available it takes
    nothing and says how long until one exists. The in-memory store serves one process
    (DRY_RUN, the memory bus); `workers/service/leases.py` keeps the buckets in a NATS KV
    bucket so every slice worker draws from the same ones.
    """

    async def lease(self, key: str, rate: float, burst: int, want: int) -> Grant: ...


class MemoryLeaseStore:
    """The buckets in this process's memory: exact, and shared only by this process."""

    def __init__(self, *, max_keys: int = 10_000, clock: Clock = time.monotonic) -> None:
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_keys = max_keys
        self._clock = clock

    async def lease(self, key: str, rate: float, burst: int, want: int) -> Grant:
        return self.lease_nowait(key, rate, burst, want)

    def lease_nowait(self, key: str, rate: float, burst: int, want: int) -> Grant:
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self._max_keys:
                oldest_key, oldest = next(iter(self._buckets.items()))
                if not oldest.full:
                    break  # forgetting a bucket that owes tokens would hand out a free burst
                del self._buckets[oldest_key]
            bucket = self._buckets[key] = TokenBucket(rate, burst, clock=self._clock)
        else:
            self._buckets.move_to_end(key)
        wait = bucket.wait_time()
        if wait > 0:
            return Grant(0, wait)
        return Grant(bucket.take_up_to(want), 0.0)


class _Pool:
    """Tokens of one shared bucket leased to this process, and what the store last said."""

    __slots__ = ("tokens", "refused_until", "leasing", "drained")

    def __init__(self) -> None:
        self.tokens = 0
        #: The last lease got fewer tokens than it asked for: the shared bucket is empty.
        self.drained = False
        self.refused_until = 0.0
        self.leasing: anyio.Event | None = None


class LimiterStatistics(NamedTuple):
    decisions: int
    refused: int
    #: Round trips to the lease store (each brings up to a lease of tokens, or a wait).
    leases: int
    tracked_keys: int


class SharedLimiter:
    """A global bucket plus one per key, held in a `TokenLeaseStore` the workers share.

    The fast path is local: a decision spends a token this process already leased, or
    refuses at once while the store's last answer ("none until t") holds. Only an empty
    pool goes to the store, for a lease of about `lease_s` seconds of the bucket's rate
    (or of two round trips to the store, when those take longer; at least one token, at most
    `max_lease`), so the tokens a process holds unspent, the only error the sharing adds,
    stay under a few milliseconds' worth of the rate. Concurrent
    callers in one process wait for one lease instead of each asking. Tokens are taken from
    both buckets or neither: a token leased from one is kept for the next request when the
    other refuses.
    """

    def __init__(
        self,
        store: TokenLeaseStore,
        *,
        name: str,
        rate: float,
        burst: int,
        scope: str | None = None,
        key_rate: float | None = None,
        key_burst: int | None = None,
        lease_s: float = 0.005,
        max_lease: int = 1000,
        max_keys: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got rate={rate} burst={burst}")
        self._store = store
        # Buckets of one scope (a tenant's deployment) are shared by its workers only.
        self._name = name if scope is None else f"{name}.{_digest(scope)}"
        self._rate, self._burst = rate, burst
        self._key_rate, self._key_burst = key_rate or rate, key_burst or burst
        self._lease_s = lease_s
        self._max_lease = max_lease
        self._max_keys = max_keys
        self._clock = clock
        self._global = _Pool()
        self._keys: OrderedDict[str, _Pool] = OrderedDict()
        self._decisions = self._refused = self._leases = 0
        #: Moving average of a lease's round trip to the store, in seconds.
        self._rtt = 0.0

    async def decide(self, key: str) -> Decision:
        """Allow one request for `key` now, or say how long until it would be allowed."""
        self._decisions += 1
        pool = self._key_pool(key)
        source = f"{self._name}.src.{_digest(key)}"
        while True:
            wait = await self._ready(pool, source, self._key_rate, self._key_burst)
            if wait == 0:
                wait = await self._ready(self._global, f"{self._name}.global",
                                         self._rate, self._burst)
            if wait > 0:
                self._refused += 1
                return Decision(False, wait)
            if pool.tokens >= 1 and self._global.tokens >= 1:
                pool.tokens -= 1
                self._global.tokens -= 1
                return Decision(True, 0.0)
            # Another task spent a token while this one waited on a lease: look again.

    async def _ready(self, pool: _Pool, key: str, rate: float, burst: int) -> float:
        """0 when `pool` holds a token (leasing one if needed), else seconds to wait."""
        while pool.tokens < 1:
            now = self._clock()
            if now < pool.refused_until:
                return pool.refused_until - now
            if pool.leasing is not None:
                await pool.leasing.wait()
                if pool.tokens >= 1 or not pool.drained:
                    continue
                # The lease just made emptied the shared bucket and the callers ahead spent
                # it: refuse rather than queue a round trip per waiter behind each other.
                return max(pool.refused_until - self._clock(), 1.0 / rate)
            done = pool.leasing = anyio.Event()
            try:
                # Enough for `lease_s`, or for two round trips to the store if those are
                # slower: a lease of one token per round trip would cap the rate at 1/RTT.
                span = max(self._lease_s, 2 * self._rtt)
                want = max(1, min(self._max_lease, burst, math.ceil(rate * span)))
                asked = self._clock()
                grant = await self._store.lease(key, rate, burst, want)
                self._rtt += (self._clock() - asked - self._rtt) / 8
                self._leases += 1
                pool.tokens += grant.tokens
                pool.drained = grant.tokens < want
                if not grant.tokens:
                    pool.refused_until = self._clock() + grant.wait_s
                    return max(grant.wait_s, 1e-6)
            finally:
                pool.leasing = None
                done.set()
        return 0.0

    def _key_pool(self, key: str) -> _Pool:
        pool = self._keys.get(key)
        if pool is not None:
            self._keys.move_to_end(key)
            return pool
        while len(self._keys) >= self._max_keys:
            # A forgotten pool's unspent tokens are lost (fewer accepted, never more).
            self._keys.popitem(last=False)
        pool = self._keys[key] = _Pool()
        return pool

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(self._decisions, self._refused, self._leases, len(self._keys))


def _digest(key: str) -> str:
    """A store-safe, fixed-length name for a caller-chosen key (never stored as given)."""
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


_STORE_STATE = "lukhas.ratelimit.lease_store"


def lease_store(runtime: Runtime) -> TokenLeaseStore:
    """The runtime's lease store: the shared one wired at startup, else one in memory."""
    store: TokenLeaseStore | None = runtime.slice_state.get(_STORE_STATE)
    if store is None:
        store = runtime.slice_state[_STORE_STATE] = MemoryLeaseStore()
    return store


def use_lease_store(runtime: Runtime, store: TokenLeaseStore) -> None:
    """Make every limiter this runtime builds from now on draw from `store` (startup wiring)."""
    runtime.slice_state[_STORE_STATE] = store
