"""Canary runs: judging a canary against its baseline, and stopping it on a rollback.

Observability side (`CanaryJudge`). MATRIZ nodes of a call served while a canary runs carry
`arm:canary` or `arm:baseline` (`lukhas/registry.py`). The judge keeps, per emit point and
arm, the outcomes and latencies of the last `window_s` seconds (bounded), and on each check
compares the arms of every emit point (`compare`): once the canary has `min_samples` calls,
it is worse when its error rate exceeds the baseline's (0 if the baseline has too few calls)
by more than `error_margin`, or when its p95 is over the manifest SLA and over `latency_ratio`
times the baseline's p95 (the SLA alone if the baseline has too few calls). Then it publishes
a `Rollback` on `CANARY_ROLLBACK` and forgets the slice's samples, so a canary that comes back
(a worker restarted with the share still set) is judged afresh. Only `error` outcomes count as
errors: refusals (`ok: false` with a reason) are answers.

Each observability worker judges the nodes it consumes (workers sharing the durable consumer
each see a random part): any of them may publish, and a second rollback is harmless.

Slice side (`follow_rollbacks`): every slice worker subscribes to `CANARY_ROLLBACK` (no queue
group) and stops the named slice's canary in its registry at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import msgspec

from bus import Bus, BusError, Subscription
from lukhas.config import CANARY_VARIABLES, Settings
from lukhas.registry import ProviderRegistry
from lukhas.subjects import CANARY_ROLLBACK
from workers.service._aggregate import node_decoder
from workers.service._manifests import sla_by_emit_point

logger = logging.getLogger(__name__)

Arm = Literal["baseline", "canary"]
_ARM_LABELS: dict[str, Arm] = {"arm:canary": "canary", "arm:baseline": "baseline"}
#: Samples kept per emit point and arm (the window is also bounded in time).
MAX_SAMPLES = 4096


class CanaryPolicy(NamedTuple):
    """When a canary is worse than its baseline (see the module docstring)."""

    min_samples: int = 50
    error_margin: float = 0.05
    latency_ratio: float = 1.5
    window_s: float = 300.0

    @classmethod
    def from_settings(cls, settings: Settings) -> CanaryPolicy:
        return cls(
            settings.canary_min_samples, settings.canary_error_margin,
            settings.canary_latency_ratio, settings.canary_window_s,
        )


class ArmStats(msgspec.Struct, frozen=True):
    """One arm of one emit point over the window."""

    count: int
    errors: int
    error_rate: float
    p95_ms: float


class Rollback(msgspec.Struct, frozen=True):
    """The message on `CANARY_ROLLBACK`."""

    #: The manifest's module, e.g. `lukhas.governance.consent_ledger`.
    slice: str
    #: The feature flag, e.g. `FEATURE_GOVERNANCE_LEDGER`, and the canary's share variable.
    flag: str
    variable: str
    emit_point: str
    #: `error_rate` or `latency`; `message` says it in words.
    reason: Literal["error_rate", "latency"]
    message: str
    sla_p95_ms: float | None
    canary: ArmStats
    baseline: ArmStats
    #: Epoch milliseconds, and the observability worker that decided.
    ts: int
    worker_id: str = ""


_rollback_decoder = msgspec.json.Decoder(Rollback)
_encoder = msgspec.json.Encoder()


def arm_stats(samples: Sequence[tuple[float, bool, float]]) -> ArmStats:
    """Count, errors, error rate and p95 (nearest rank) of (ts, error, latency_ms) samples."""
    count = len(samples)
    if count == 0:
        return ArmStats(0, 0, 0.0, 0.0)
    errors = sum(1 for _, error, _ in samples if error)
    latencies = sorted(latency for _, _, latency in samples)
    p95 = latencies[max(0, math.ceil(0.95 * count) - 1)]
    return ArmStats(count, errors, round(errors / count, 6), round(p95, 3))


def compare(
    canary: ArmStats, baseline: ArmStats, sla_p95_ms: float | None, policy: CanaryPolicy
) -> tuple[Literal["error_rate", "latency"], str] | None:
    """Why the canary is worse than the baseline, or None (too few samples, or not worse)."""
    if canary.count < policy.min_samples:
        return None
    baseline_known = baseline.count >= policy.min_samples
    base_rate = baseline.error_rate if baseline_known else 0.0
    if canary.error_rate > base_rate + policy.error_margin:
        return "error_rate", (
            f"canary error rate {canary.error_rate:.1%} over {canary.count} calls exceeds the "
            f"baseline's {base_rate:.1%} by more than {policy.error_margin:.1%}"
        )
    if sla_p95_ms is not None and canary.p95_ms > sla_p95_ms:
        if not baseline_known:
            return "latency", (
                f"canary p95 {canary.p95_ms:g} ms over {canary.count} calls is over the "
                f"SLA {sla_p95_ms:g} ms (baseline has {baseline.count} calls, too few)"
            )
        if canary.p95_ms > baseline.p95_ms * policy.latency_ratio:
            return "latency", (
                f"canary p95 {canary.p95_ms:g} ms is over the SLA {sla_p95_ms:g} ms and "
                f"{policy.latency_ratio:g}x the baseline's {baseline.p95_ms:g} ms"
            )
    return None


class _Target(NamedTuple):
    slice: str
    flag: str
    variable: str
    sla_p95_ms: float | None


def canary_targets(manifests: Iterable[Mapping[str, Any]]) -> dict[str, _Target]:
    """Emit point → the slice whose canary it judges (manifests with a canary-able flag)."""
    manifests = list(manifests)
    slas = sla_by_emit_point(manifests)
    targets = {}
    for manifest in manifests:
        flag = manifest.get("feature_flag")
        variable = CANARY_VARIABLES.get(flag) if isinstance(flag, str) else None
        if variable is None:
            continue
        for point in manifest.get("matriz_emit_points") or []:
            targets[point] = _Target(str(manifest.get("module")), flag, variable, slas.get(point))
    return targets


class CanaryJudge:
    """Compares canary and baseline arms per emit point; see the module docstring.

    Args:
        manifests: parsed MODULE_MANIFEST.json objects (SLAs, flags, emit points).
        policy: the rollback thresholds.
        clock: wall-clock epoch seconds (tests inject their own).
    """

    def __init__(
        self,
        manifests: Iterable[Mapping[str, Any]],
        policy: CanaryPolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self._targets = canary_targets(manifests)
        self._clock = clock
        self._samples: dict[tuple[str, Arm], deque[tuple[float, bool, float]]] = {}
        self.rollbacks = 0

    def observe(self, data: bytes) -> None:
        """Take one MATRIZ node (raw JSON): kept only if it names its arm."""
        if b'"arm:' not in data:  # almost every node while no canary runs: no decode
            return
        try:
            node = node_decoder.decode(data)
        except msgspec.DecodeError:
            return  # the aggregate counts invalid nodes
        arm = next((_ARM_LABELS[x] for x in node.labels if x in _ARM_LABELS), None)
        if arm is None:
            return
        point = f"{node.type}:{node.labels[0].removeprefix('label:')}"
        now = self._clock()
        self.record(point, arm, node.state.outcome == "error", node.state.latency_ms,
                    min(node.timestamps.created_ts / 1000.0, now))

    def record(self, emit_point: str, arm: Arm, error: bool, latency_ms: float,
               ts: float) -> None:
        """Keep one call's outcome (emit points of no canary-able slice are ignored)."""
        if emit_point not in self._targets:
            return
        window = self._samples.get((emit_point, arm))
        if window is None:
            window = self._samples[(emit_point, arm)] = deque(maxlen=MAX_SAMPLES)
        window.append((ts, error, latency_ms))

    def stats(self, emit_point: str, arm: Arm) -> ArmStats:
        """The arm's stats over the window now."""
        window = self._samples.get((emit_point, arm))
        if window is None:
            return arm_stats(())
        horizon = self._clock() - self.policy.window_s
        while window and window[0][0] < horizon:
            window.popleft()
        return arm_stats(window)

    def verdicts(self, worker_id: str = "") -> list[Rollback]:
        """The rollbacks due now (at most one per slice); their slices' samples are dropped."""
        due: dict[str, Rollback] = {}
        for point in sorted({p for p, arm in self._samples if arm == "canary"}):
            target = self._targets[point]
            if target.slice in due:
                continue
            canary, baseline = self.stats(point, "canary"), self.stats(point, "baseline")
            why = compare(canary, baseline, target.sla_p95_ms, self.policy)
            if why is None:
                continue
            due[target.slice] = Rollback(
                slice=target.slice, flag=target.flag, variable=target.variable,
                emit_point=point, reason=why[0], message=why[1],
                sla_p95_ms=target.sla_p95_ms, canary=canary, baseline=baseline,
                ts=round(self._clock() * 1000), worker_id=worker_id,
            )
        for key in [k for k in self._samples if self._targets[k[0]].slice in due]:
            del self._samples[key]
        self.rollbacks += len(due)
        return list(due.values())

    async def check(self, bus: Bus, worker_id: str = "") -> list[Rollback]:
        """Publish the rollbacks due now on `CANARY_ROLLBACK`; return them."""
        rollbacks = self.verdicts(worker_id)
        for rollback in rollbacks:
            logger.warning(
                "canary %s of %s rolled back at %s: %s", rollback.variable, rollback.slice,
                rollback.emit_point, rollback.message,
            )
            try:
                await bus.publish(CANARY_ROLLBACK, _encoder.encode(rollback))
            except BusError as exc:
                logger.error("could not publish the canary rollback of %s: %s",
                             rollback.slice, exc)
        return rollbacks


def registries_by_subject(
    endpoints: Iterable[Any], registries: Iterable[ProviderRegistry[Any]],
    manifests: Iterable[Mapping[str, Any]],
) -> dict[str, ProviderRegistry[Any]]:
    """Endpoint subject → the registry of its slice: through its emit point's manifest flag.

    `endpoints` are the served ones (`.subject`, `.endpoint.emit_point.name`).
    """
    by_flag = {r.flag_variable: r for r in registries}
    flags = {
        point: manifest.get("feature_flag")
        for manifest in manifests for point in manifest.get("matriz_emit_points") or []
    }
    found = {}
    for served in endpoints:
        registry = by_flag.get(flags.get(served.endpoint.emit_point.name))  # type: ignore[arg-type]
        if registry is not None:
            found[served.subject] = registry
    return found


def stop_canary(
    registries: Iterable[ProviderRegistry[Any]], data: bytes
) -> ProviderRegistry[Any] | None:
    """Apply one rollback message; the registry it stopped, or None (malformed, unknown
    flag, or stopped already)."""
    try:
        rollback = _rollback_decoder.decode(data)
    except msgspec.DecodeError as exc:
        logger.warning("malformed canary rollback on %s ignored: %s", CANARY_ROLLBACK, exc)
        return None
    for registry in registries:
        if registry.flag_variable == rollback.flag:
            stopped = registry.stop_canary(
                rollback.reason, message=rollback.message, emit_point=rollback.emit_point,
                by=rollback.worker_id,
            )
            return registry if stopped else None
    logger.warning("canary rollback for unknown flag %r ignored", rollback.flag[:64])
    return None


async def follow_rollbacks(
    sub: Subscription, registries: Sequence[ProviderRegistry[Any]],
    on_stop: Callable[[ProviderRegistry[Any]], None] | None = None,
) -> None:
    """Stop a canary for each rollback on `sub` until it is drained."""
    async for env in sub:
        registry = stop_canary(registries, env.data)
        if registry is not None and on_stop is not None:
            on_stop(registry)
