"""The rate-limit buckets every slice worker shares, in a NATS KV bucket (`rate_limits`).

Each bucket is one key holding GCRA state: the "theoretical arrival time" (TAT, wall-clock
seconds) after which the bucket is full again. A lease of `n` tokens moves the TAT on by
`n / rate` with a compare-and-set on the key's revision, so two workers can never spend the
same tokens: the loser of a race re-reads and tries again. A bucket with no token left is
only read, never written, and answers with the time until one exists.

Workers lease a few milliseconds' worth of tokens at a time (`lukhas.ratelimit.SharedLimiter`),
so the store sees one round trip per lease, not per request. The KV bucket's max age drops
keys idle longer than it (a bucket idle that long is full anyway), which bounds the keys that
per-source buckets leave behind. Workers' clocks must agree to well under `burst / rate`
seconds (NTP does). When the bucket does not answer within 250 ms, each worker limits on
its own for a second (logged) rather than hold requests: the limit degrades to per process,
it never stops the service.
"""

from __future__ import annotations

import logging
import math
import struct
import time

import anyio
import nats.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from lukhas.config import Settings
from lukhas.ratelimit import Grant, MemoryLeaseStore

logger = logging.getLogger(__name__)

#: The KV bucket of the shared rate limits (its stream is `KV_rate_limits`).
BUCKET = "rate_limits"
#: Compare-and-set attempts per lease before the caller is told to come back shortly.
MAX_ATTEMPTS = 16
_STREAM_NAME_IN_USE = 10058
_VALUE = struct.Struct(">d")


def bucket_max_age_s(settings: Settings) -> float:
    """How long an idle key is kept: well past the slowest configured bucket's refill."""
    refills = [
        settings.handoff_burst / settings.handoff_rate,
        (settings.handoff_source_burst or settings.handoff_burst)
        / (settings.handoff_source_rate or settings.handoff_rate),
        settings.passkey_challenge_burst / settings.passkey_challenge_rate,
        settings.passkey_challenge_global_burst / settings.passkey_challenge_global_rate,
    ]
    return max(300.0, 2 * max(refills))


async def open_lease_store(
    js: JetStreamContext, settings: Settings, *, timeout_s: float = 0.25
) -> KvLeaseStore:
    """Open the `rate_limits` bucket (creating it if missing) as a lease store whose leases
    fall back to a per-process limit when the bucket does not answer within `timeout_s`."""
    try:
        kv = await js.key_value(BUCKET)
    except BucketNotFoundError:
        config = KeyValueConfig(
            bucket=BUCKET, history=1, ttl=bucket_max_age_s(settings),
            replicas=settings.ledger_replicas, storage=StorageType.FILE,
        )
        try:
            kv = await js.create_key_value(config)
            logger.info("created KV bucket %s (ttl %.0fs)", BUCKET, config.ttl)
        except APIError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            kv = await js.key_value(BUCKET)  # another worker created it first
    return KvLeaseStore(kv, timeout_s=timeout_s)


class KvLeaseStore:
    """GCRA buckets in NATS KV, leased with compare-and-set (see the module docstring)."""

    def __init__(
        self, kv: KeyValue, *, clock: object = time.time, timeout_s: float = 0.25,
        cooldown_s: float = 1.0,
    ) -> None:
        self._kv = kv
        self._clock = clock
        self._timeout_s = timeout_s
        self._cooldown_s = cooldown_s
        self._local_until = 0.0
        #: Last (revision, TAT) seen per key: a lease tries its write with it before reading.
        self._seen: dict[str, tuple[int, float]] = {}
        self._local = MemoryLeaseStore()
        #: Compare-and-set races lost, and leases served locally because KV failed.
        self.conflicts = 0
        self.fallbacks = 0
        #: Round trips to the server: writes (leases taken) and reads (after a lost race).
        self.writes = 0
        self.reads = 0

    async def lease(self, key: str, rate: float, burst: int, want: int) -> Grant:
        if time.monotonic() >= self._local_until:
            try:
                with anyio.fail_after(self._timeout_s):
                    return await self._lease(key, rate, burst, want)
            except (nats.errors.Error, TimeoutError) as exc:
                # JetStream slow or unreachable: limit this process alone for a while rather
                # than hold (or fail) the requests waiting on the limit.
                self._local_until = time.monotonic() + self._cooldown_s
                self._warn(exc)
        self.fallbacks += 1
        return self._local.lease_nowait(key, rate, burst, want)

    def _warn(self, exc: Exception) -> None:
        logger.warning(
            "shared rate limit unavailable (%s: %s); limiting per process for %.1fs "
            "(%d leases so far)", type(exc).__name__, exc, self._cooldown_s, self.fallbacks,
        )

    async def _lease(self, key: str, rate: float, burst: int, want: int) -> Grant:
        seen = self._seen.get(key)
        revision, tat = seen if seen is not None else await self._read(key)
        for _ in range(MAX_ATTEMPTS):
            now = self._clock()  # type: ignore[operator]
            # A bucket never owes more than its burst: a larger (or unreadable) TAT is
            # clamped, so a bad value in the key cannot lock the limit shut.
            tat = min(max(tat, now), now + burst / rate) if math.isfinite(tat) else now
            available = math.floor(burst - (tat - now) * rate + 1e-9)
            if available < 1:
                # Read-only: the wait is until the bucket holds one token again.
                return Grant(0, max(tat - now - (burst - 1) / rate, 1e-6))
            tokens = min(want, available)
            new_tat = tat + tokens / rate
            self.writes += 1
            try:
                revision = await self._kv.update(key, _VALUE.pack(new_tat), last=revision)
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                revision, tat = await self._read(key)
                continue
            self._seen[key] = (revision, new_tat)
            if len(self._seen) > 10_000:
                self._seen.clear()
            return Grant(tokens, 0.0)
        # Lost every race: others are taking tokens fast; ask again after one token's time.
        return Grant(0, 1.0 / rate)

    async def _read(self, key: str) -> tuple[int, float]:
        self.reads += 1
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError as exc:  # never written, expired or deleted: a full bucket
            entry = exc.entry  # a delete marker's revision is the one to write after
            return (entry.revision or 0) if entry is not None else 0, 0.0
        if entry.value is None or len(entry.value) != _VALUE.size:
            return entry.revision or 0, 0.0
        return entry.revision or 0, _VALUE.unpack(entry.value)[0]
