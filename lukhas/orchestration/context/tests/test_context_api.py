from __future__ import annotations

import msgspec
import pytest

from lukhas.errors import InvalidRequest, PayloadTooLarge
from lukhas.orchestration.context.api import handoff_context
from lukhas.testing import dry_run_settings, open_test_runtime


async def test_handoff_context_dryrun() -> None:
    async with open_test_runtime() as (runtime, matriz):
        async with runtime.bus.subscribe("lukhas.context.default") as target:
            out = await handoff_context({"foo": "bar"})
            delivered = await target.next(timeout=5)
        [node] = await matriz.take(1)
    assert out["ok"] is True
    assert out["mode"] == "dryrun"
    assert out["latency_ms"] >= 0
    assert out["context_size"] == len(str({"foo": "bar"}))  # the plan's measure
    assert out["envelope_bytes"] == len(delivered.data)
    body = msgspec.json.decode(delivered.data)
    assert body["ctx"] == {"foo": "bar"}
    assert body["trace_id"] == node["provenance"]["trace_id"]
    assert delivered.headers["traceparent"].split("-")[1] == body["trace_id"]
    assert node["type"] == "CONTEXT"


async def test_empty_context_has_size_0_as_the_plan_says() -> None:
    async with open_test_runtime() as (runtime, _):
        async with runtime.bus.subscribe("lukhas.context.default") as target:
            out = await handoff_context({})
            delivered = await target.next(timeout=5)
    assert out["context_size"] == 0
    assert out["envelope_bytes"] == len(delivered.data) > 0


async def test_handoff_to_named_target() -> None:
    async with open_test_runtime() as (runtime, _):
        async with runtime.bus.subscribe("lukhas.context.*") as targets:
            out = await handoff_context({"step": 1}, target="planner")
            delivered = await targets.next(timeout=5)
    assert out["target"] == "planner"
    assert delivered.subject == "lukhas.context.planner"


@pytest.mark.parametrize("target", ["", "a.b", "*", ">", "has space", "x" * 65])
async def test_target_must_be_one_subject_token(target: str) -> None:
    async with open_test_runtime():
        with pytest.raises(InvalidRequest):
            await handoff_context({"k": "v"}, target=target)


async def test_context_must_be_an_object() -> None:
    async with open_test_runtime():
        with pytest.raises(InvalidRequest):
            await handoff_context(["not", "a", "dict"])  # type: ignore[arg-type]


async def test_context_over_the_byte_limit_is_refused() -> None:
    async with open_test_runtime(dry_run_settings(handoff_max_bytes=1024)):
        with pytest.raises(PayloadTooLarge):
            await handoff_context({"blob": "x" * 2048})


async def test_over_the_rate_is_refused_at_once_with_retry_after() -> None:
    settings = dry_run_settings(handoff_rate=1.0, handoff_burst=2)
    async with open_test_runtime(settings) as (runtime, matriz):
        async with runtime.bus.subscribe("lukhas.context.default") as target:
            replies = [await handoff_context({"n": i}) for i in range(3)]
            delivered = [await target.next(timeout=5) for _ in range(2)]
        nodes = await matriz.take(3)
    assert [r["ok"] for r in replies] == [True, True, False]
    assert replies[2]["reason"] == "rate_limited"
    assert 900 <= replies[2]["retry_after_ms"] <= 1000
    assert len(delivered) == 2
    assert nodes[2]["state"]["outcome"] == "rate_limited"
    assert "reason:rate_limited" in nodes[2]["labels"]


async def test_sources_have_their_own_buckets() -> None:
    settings = dry_run_settings(
        handoff_rate=100.0, handoff_burst=100, handoff_source_rate=1.0, handoff_source_burst=1
    )
    async with open_test_runtime(settings):
        a = await handoff_context({"n": 1}, source="svc-a")
        a_again = await handoff_context({"n": 2}, source="svc-a")
        b = await handoff_context({"n": 3}, source="svc-b")
    assert a["ok"] is True and a_again["reason"] == "rate_limited" and b["ok"] is True
