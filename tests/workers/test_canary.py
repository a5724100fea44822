"""Canary runs without a server: arm selection, sticky arms, the judge and the rollback order.

The end-to-end rollback on a real nats-server is in tests/integration/test_canary_rollback.py.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from lukhas.config import Settings
from lukhas.errors import ConfigError
from lukhas.governance.consent_ledger import endpoints as consent
from lukhas.governance.consent_ledger.messages import ConsentEntry, RecordConsent
from lukhas.governance.consent_ledger.registry import REGISTRY as CONSENT
from lukhas.observability.matriz_emit import make_node
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.orchestration.context.registry import REGISTRY as HANDOFF
from lukhas.registry import ProviderRegistry, sticky_point
from lukhas.testing import dry_run_settings, open_test_runtime
from workers.service._canary import (
    ArmStats,
    CanaryJudge,
    CanaryPolicy,
    Rollback,
    arm_stats,
    compare,
    stop_canary,
)
from workers.service._manifests import load_manifests

KEY = "k" * 40


class RecordingLedger:
    """A 'real' consent provider that remembers whose records it got."""

    name = "recording"
    waits_on_io = False

    def __init__(self) -> None:
        self.users: list[str] = []

    async def record(self, entry: ConsentEntry, *, idempotency_key: str | None) -> dict[str, Any]:
        self.users.append(entry.user_id)
        return {"ok": True, "provider": self.name, "entry": {"user_id": entry.user_id}}


def live(**overrides: Any) -> Settings:
    """Settings outside DRY_RUN on the memory bus, with a stable pseudonym key."""
    return dry_run_settings(dry_run=False, pseudonym_key=KEY, **overrides)


@pytest.fixture
def ledger() -> Iterator[RecordingLedger]:
    provider = RecordingLedger()
    CONSENT.register(provider)
    try:
        yield provider
    finally:
        CONSENT.reset()


# -- configuration --------------------------------------------------------------------------


def test_canary_variables_are_validated() -> None:
    settings = Settings.from_env({"LUKHAS_CANARY_GOVERNANCE_LEDGER": "5",
                                  "LUKHAS_CANARY_ORCHESTRATION_HANDOFF": "0.5"})
    assert settings.canary_governance_ledger == 5.0
    assert settings.canary_orchestration_handoff == 0.5
    assert settings.canary_identity_passkey == 0.0
    for name, bad in [("LUKHAS_CANARY_IDENTITY_PASSKEY", "101"),
                      ("LUKHAS_CANARY_GOVERNANCE_LEDGER", "-1"),
                      ("LUKHAS_CANARY_GOVERNANCE_LEDGER", "five"),
                      ("LUKHAS_CANARY_MIN_SAMPLES", "0"),
                      ("LUKHAS_CANARY_ERROR_MARGIN", "1.5"),
                      ("LUKHAS_CANARY_LATENCY_RATIO", "0.9"),
                      ("LUKHAS_CANARY_WINDOW_S", "0")]:
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({name: bad})
        assert name in str(caught.value)


# -- arm selection --------------------------------------------------------------------------


def test_stateless_arms_follow_the_injected_draw() -> None:
    draws = itertools.cycle([0.01, 0.30, 0.049, 0.05, 0.99])
    registry: ProviderRegistry[Any] = ProviderRegistry(
        "feature_orchestration_handoff", lambda s: None, draw=lambda: next(draws)
    )
    settings = live(canary_orchestration_handoff=5.0)
    arms = [registry.arm_for(settings, None) for _ in range(5)]
    assert arms == ["canary", "baseline", "canary", "baseline", "baseline"]
    assert [registry.arm_for(live(), None) for _ in range(3)] == ["baseline"] * 3  # share 0


def test_sticky_arms_depend_only_on_the_pseudonym_and_grow_with_the_share() -> None:
    registry: ProviderRegistry[Any] = ProviderRegistry(
        "feature_governance_ledger", lambda s: None, sticky=True,
        draw=lambda: pytest.fail("a sticky registry never draws"),
    )
    pseudonyms = [Pseudonymizer(KEY)(f"usr_{i}") for i in range(2000)]
    at5 = {p for p in pseudonyms
           if registry.arm_for(live(canary_governance_ledger=5.0), p) == "canary"}
    at20 = {p for p in pseudonyms
            if registry.arm_for(live(canary_governance_ledger=20.0), p) == "canary"}
    # The same answer every time, about the share, and nobody leaves the canary as it grows.
    assert at5 == {p for p in pseudonyms
                   if registry.arm_for(live(canary_governance_ledger=5.0), p) == "canary"}
    assert 60 <= len(at5) <= 140 and 320 <= len(at20) <= 480
    assert at5 < at20
    assert all((sticky_point(p) < 0.05) == (p in at5) for p in pseudonyms)
    # A call naming no subject reads state only the real provider has: the canary.
    assert registry.arm_for(live(canary_governance_ledger=5.0), None) == "canary"
    assert registry.arm_for(live(), None) == "baseline"


async def test_one_users_records_all_land_on_one_arm_and_nodes_say_which(
    ledger: RecordingLedger,
) -> None:
    settings = live(canary_governance_ledger=50.0)
    async with open_test_runtime(settings) as (runtime, matriz):
        replies = {}
        for _round in range(3):
            for i in range(20):
                reply = await consent.record(RecordConsent(user_id=f"usr_{i}", scope="s"))
                replies.setdefault(f"usr_{i}", set()).add(reply["provider"])
        nodes = await matriz.take(60)
        arm_of = {
            user: next(iter(providers)) for user, providers in replies.items()
        }
        expected = {
            f"usr_{i}": "recording" if sticky_point(
                runtime.pseudonymize.all_versions(f"usr_{i}")[-1]) < 0.5 else "null"
            for i in range(20)
        }
    assert all(len(providers) == 1 for providers in replies.values())  # sticky
    assert arm_of == expected
    assert set(arm_of.values()) == {"recording", "null"}  # both arms in use at 50 %
    assert sorted(set(ledger.users)) == sorted(u for u, p in arm_of.items() if p == "recording")
    labels = [[x for x in n["labels"] if x.startswith("arm:")] for n in nodes]
    assert all(len(x) == 1 for x in labels)
    by_arm = {x[0] for x in labels}
    assert by_arm == {"arm:canary", "arm:baseline"}
    assert sum(x == ["arm:canary"] for x in labels) == len(ledger.users)
    assert CONSENT.canary_state(settings)["served"] == {
        "canary": len(ledger.users), "baseline": 60 - len(ledger.users),
    }


async def test_key_rotation_moves_nobody(ledger: RecordingLedger) -> None:
    before = live(canary_governance_ledger=50.0)
    after = dataclasses.replace(before, pseudonym_key="n" * 40, pseudonym_previous_keys=(KEY,))
    arms = []
    for settings in (before, after):
        async with open_test_runtime(settings):
            arms.append([
                (await consent.record(RecordConsent(user_id=f"usr_{i}", scope="s")))["provider"]
                for i in range(30)
            ])
    assert arms[0] == arms[1]


async def test_no_canary_in_dry_run_with_the_flag_on_or_without_a_share(
    ledger: RecordingLedger,
) -> None:
    for settings, provider in [
        (dry_run_settings(canary_governance_ledger=100.0), "null"),
        (live(canary_governance_ledger=100.0, feature_governance_ledger=True), "recording"),
        (live(), "null"),
    ]:
        async with open_test_runtime(settings) as (_, matriz):
            reply = await consent.record(RecordConsent(user_id="usr_1", scope="s"))
            [node] = await matriz.take(1)
        assert reply["provider"] == provider
        assert not [x for x in node["labels"] if x.startswith(("arm:", "canary:"))]


async def test_a_stopped_canary_sends_every_call_to_the_baseline(ledger: RecordingLedger) -> None:
    settings = live(canary_governance_ledger=100.0)
    async with open_test_runtime(settings) as (_, matriz):
        first = await consent.record(RecordConsent(user_id="usr_1", scope="s"))
        assert CONSENT.canary_state(settings)["state"] == "running"
        assert CONSENT.stop_canary("error_rate", message="test") is True
        assert CONSENT.stop_canary("again") is False
        after = [await consent.record(RecordConsent(user_id=f"usr_{i}", scope="s"))
                 for i in range(10)]
        nodes = await matriz.take(11)
    assert first["provider"] == "recording"
    assert {r["provider"] for r in after} == {"null"}
    assert all({"arm:baseline", "canary:rolled_back"} <= set(n["labels"]) for n in nodes[1:])
    state = CONSENT.canary_state(settings)
    assert state["state"] == "rolled_back" and state["percent"] == 0.0
    assert state["rollback"]["reason"] == "error_rate"
    assert ledger.users == ["usr_1"]


def test_waits_on_io_counts_both_arms() -> None:
    class Slow:
        name = "slow"
        waits_on_io = True

    HANDOFF.register(Slow())
    try:
        assert HANDOFF.waits_on_io(live(canary_orchestration_handoff=1.0)) is True
    finally:
        HANDOFF.reset()


# -- the comparison -------------------------------------------------------------------------

POLICY = CanaryPolicy(min_samples=20, error_margin=0.05, latency_ratio=1.5, window_s=60.0)


def stats(count: int, errors: int = 0, p95: float = 5.0) -> ArmStats:
    return ArmStats(count, errors, errors / count if count else 0.0, p95)


def test_arm_stats_nearest_rank_p95() -> None:
    samples = [(0.0, i < 3, float(i + 1)) for i in range(100)]
    assert arm_stats(samples) == ArmStats(100, 3, 0.03, 95.0)
    assert arm_stats([]) == ArmStats(0, 0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("canary", "baseline", "expected"),
    [
        (stats(19, errors=19), stats(100), None),  # too few canary samples
        (stats(20, errors=2), stats(100, errors=5), None),  # 10 % vs 5 %: within the margin
        (stats(20, errors=3), stats(100, errors=5), "error_rate"),  # 15 % vs 5 %
        (stats(20, errors=2), stats(5, errors=5), "error_rate"),  # baseline unknown: vs 0 %
        (stats(40, p95=49.0), stats(100, p95=10.0), None),  # under the SLA (50 ms)
        (stats(40, p95=60.0), stats(100, p95=45.0), None),  # over, but baseline also slow
        (stats(40, p95=80.0), stats(100, p95=45.0), "latency"),  # > 1.5 x baseline
        (stats(40, p95=60.0), stats(3, p95=1.0), "latency"),  # baseline unknown: SLA alone
    ],
)
def test_compare(canary: ArmStats, baseline: ArmStats, expected: str | None) -> None:
    verdict = compare(canary, baseline, 50.0, POLICY)
    assert (verdict and verdict[0]) == expected
    if verdict:
        assert verdict[1]  # a message in words


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def node_bytes(arm: str, outcome: str, latency_ms: float, created_ms: int,
               label: str = "governance:record") -> bytes:
    node = make_node(
        "CONSENT", label, outcome=outcome, latency_ms=latency_ms, trace_id="0" * 32,
        producer="tests", capability="record_consent", labels=(f"arm:{arm}",),
    )
    node = msgspec.structs.replace(
        node, timestamps=msgspec.structs.replace(node.timestamps, created_ts=created_ms)
    )
    return msgspec.json.encode(node)


def test_judge_rolls_back_once_with_the_published_shape_and_forgets_old_samples() -> None:
    clock = Clock(1_000.0)
    judge = CanaryJudge(load_manifests(), POLICY, clock=clock)
    now_ms = int(clock.now * 1000)
    for _ in range(100):
        judge.observe(node_bytes("baseline", "ok", 3.0, now_ms))
    # Old failures fall out of the window before they count.
    for _ in range(30):
        judge.observe(node_bytes("canary", "error", 3.0, now_ms - 61_000))
    assert judge.verdicts("w1") == []
    for _ in range(19):
        judge.observe(node_bytes("canary", "error", 3.0, now_ms))
    judge.observe(node_bytes("canary", "ok", 3.0, now_ms))
    judge.observe(b'{"not": "a node", "labels": ["arm:canary"]}')  # ignored, no crash
    judge.observe(node_bytes("canary", "error", 3.0, now_ms, label="unknown:point"))
    [rollback] = judge.verdicts("w1")
    assert (rollback.slice, rollback.flag, rollback.variable) == (
        "lukhas.governance.consent_ledger", "FEATURE_GOVERNANCE_LEDGER",
        "LUKHAS_CANARY_GOVERNANCE_LEDGER",
    )
    assert rollback.emit_point == "CONSENT:governance:record"
    assert rollback.reason == "error_rate" and rollback.sla_p95_ms == 50.0
    assert rollback.canary == ArmStats(20, 19, 0.95, 3.0)
    assert rollback.baseline.count == 100 and rollback.baseline.errors == 0
    assert rollback.ts == now_ms and rollback.worker_id == "w1"
    assert judge.verdicts("w1") == []  # the slice's samples went with the rollback
    # A worker that comes back with the canary on is judged afresh.
    for _ in range(20):
        judge.observe(node_bytes("canary", "error", 3.0, now_ms))
    assert [r.reason for r in judge.verdicts("w1")] == ["error_rate"]


def test_rollback_message_stops_the_named_canary_only() -> None:
    registries: list[ProviderRegistry[Any]] = [
        ProviderRegistry("feature_governance_ledger", lambda s: None, sticky=True),
        ProviderRegistry("feature_orchestration_handoff", lambda s: None),
    ]
    rollback = Rollback(
        slice="lukhas.governance.consent_ledger", flag="FEATURE_GOVERNANCE_LEDGER",
        variable="LUKHAS_CANARY_GOVERNANCE_LEDGER", emit_point="CONSENT:governance:record",
        reason="latency", message="slow", sla_p95_ms=50.0, canary=stats(20), baseline=stats(20),
        ts=1, worker_id="w",
    )
    data = msgspec.json.encode(rollback)
    assert stop_canary(registries, data) is registries[0]
    assert stop_canary(registries, data) is None  # already stopped
    settings = live(canary_governance_ledger=5.0, canary_orchestration_handoff=5.0)
    assert registries[0].canary_percent(settings) == 0.0
    assert registries[1].canary_percent(settings) == 5.0
    for junk in (b"", b"{}", b"[1]", msgspec.json.encode({**msgspec.to_builtins(rollback),
                                                          "flag": "FEATURE_NOPE"})):
        assert stop_canary(registries, junk) is None
    assert registries[1].canary_percent(settings) == 5.0
