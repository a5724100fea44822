"""Fuzz every request subject of the slice service with malformed and hostile bodies.

Over 10,000 requests in all: seeded raw bytes against the service on the memory bus (with
memory measured), hypothesis-generated bodies (derandomized) against the same kind of
service, and a share against a real nats-server with the real providers wired. Every
request gets a well-formed reply (`{"ok": false, "error": {"code", "message"}}` for bad
input; a legitimate ok or refusal where the input happens to be valid), never silence, a
traceback or an `internal` error; the service keeps serving; no hostile value reaches a
subject; bodies over a slice's limit are refused before they are parsed.
"""

from __future__ import annotations

import json
import logging
import random
import re
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus import Bus, Subscription
from lukhas import subjects
from lukhas.config import Settings
from lukhas.runtime import Runtime, open_runtime
from lukhas.testing import dry_run_settings
from tests.candidate._support import Names, nats_bus, nats_settings
from tests.fuzz._hostile import (
    REQUEST_SUBJECTS,
    classify_reply,
    hostile_body,
    hostile_headers,
    raw_bodies,
)
from workers.service.bootstrap import unwire_providers, wire_providers
from workers.service.slices import SliceService, serve_plan

logger = logging.getLogger(__name__)

SEED = 20_240_607
RAW_PER_SUBJECT = 800
HYPOTHESIS_PER_SUBJECT = 250
REAL_SERVER_PER_SUBJECT = 100
#: Peak memory the in-process barrage may allocate (it sends ~300 MB of bodies in all).
MEMORY_BOUND = 64 * 1024 * 1024

#: Subjects seen while the service runs: requests, replies, MATRIZ, handoffs to one-token
#: targets, and on NATS the JetStream API and the ledger's per-pseudonym subjects.
_ALLOWED_SUBJECT = re.compile(
    r"^(lukhas\.(governance|identity|orchestration)\.[a-z.]+"
    r"|matriz\.[A-Z]+(\.[A-Za-z0-9_-]+)+"
    r"|lukhas\.context\.[A-Za-z0-9_-]+"
    r"|lukhas\.observability\.matriz\.drops"
    r"|_INBOX\.[A-Za-z0-9_.-]+"
    r"|\$(JS|KV)\.[A-Za-z0-9_.=-]+"
    r"|test\.[a-z0-9]+\.ledger\.consent\.psn_[0-9a-f]{32}\.[A-Za-z0-9_-]+)$"  # + scope token
)


def fuzz_settings(**overrides: Any) -> Settings:
    # No rate limit, so hostile handoffs reach the decoder rather than the limiter.
    return dry_run_settings(handoff_rate=1e9, handoff_burst=10**9, **overrides)


def limits(settings: Settings) -> dict[str, int]:
    return {ep.subject: ep.max_bytes for ep in serve_plan(settings)}


@dataclass
class Outcomes:
    """Replies per (subject, outcome), and the subjects seen on the bus."""

    replies: Counter[tuple[str, str]] = field(default_factory=Counter, repr=False)
    bytes_sent: int = 0
    subjects_seen: set[str] = field(default_factory=set, repr=False)

    @property
    def total(self) -> int:
        return sum(self.replies.values())

    def count(self, predicate: Any) -> int:
        return sum(n for (_, outcome), n in self.replies.items() if predicate(outcome))

    @property
    def errors(self) -> int:
        return self.count(lambda o: o in ("invalid_request", "payload_too_large"))

    def summary(self) -> str:
        by_outcome: Counter[str] = Counter()
        for (_, outcome), n in self.replies.items():
            by_outcome[outcome.split(":")[0] if outcome.startswith("refused") else outcome] += n
        return f"{self.total} requests: {dict(by_outcome)}"


async def monitor(sub: Subscription, outcomes: Outcomes) -> None:
    async for env in sub:
        outcomes.subjects_seen.add(env.subject)


@asynccontextmanager
async def serving(
    settings: Settings,
    outcomes: Outcomes,
    *,
    bus: Bus | None = None,
    wire: Callable[[Runtime], Awaitable[None]] | None = None,
) -> AsyncIterator[tuple[Bus, SliceService]]:
    """The slice service on `bus` (memory if None), with a `>` monitor feeding `outcomes`."""
    async with open_runtime(settings, bus=bus) as runtime:
        if wire is not None:
            await wire(runtime)
        service = SliceService(runtime, concurrency=32)
        async with (
            runtime.bus.subscribe(">", max_pending=1_000_000) as everything,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(monitor, everything, outcomes)
            await tg.start(service.run)
            yield runtime.bus, service
            await service.stop()
            await runtime.bus.flush()
            tg.cancel_scope.cancel()


async def send(
    bus: Bus, subject: str, body: bytes, headers: dict[str, str] | None, outcomes: Outcomes
) -> None:
    reply = await bus.request(subject, body, headers=headers, timeout=30)
    try:
        outcome = classify_reply(reply.data)
    except (AssertionError, ValueError) as exc:
        raise AssertionError(f"{subject} {body[:300]!r} -> {reply.data[:300]!r}") from exc
    outcomes.replies[(subject, outcome)] += 1
    outcomes.bytes_sent += len(body)


async def barrage(
    bus: Bus, bodies: list[tuple[str, bytes]], outcomes: Outcomes, *, concurrency: int = 64
) -> None:
    rng = random.Random(SEED)
    send_stream, receive_stream = anyio.create_memory_object_stream[
        tuple[str, bytes, dict[str, str] | None]
    ](concurrency)

    async def sender(receive: Any) -> None:
        async with receive:
            async for subject, body, headers in receive:
                await send(bus, subject, body, headers, outcomes)

    async with anyio.create_task_group() as tg:
        with receive_stream:
            for _ in range(concurrency):
                tg.start_soon(sender, receive_stream.clone())
        async with send_stream:
            for subject, body in bodies:
                await send_stream.send((subject, body, hostile_headers(rng)))


async def still_serving(bus: Bus) -> None:
    reply = await bus.request(
        subjects.CONSENT_RECORD,
        msgspec.json.encode({"user_id": "usr_after_fuzz", "scope": "gmail.read"}),
        timeout=5,
    )
    assert json.loads(reply.data)["ok"] is True


def assert_clean(outcomes: Outcomes, service: SliceService) -> None:
    stray = {s for s in outcomes.subjects_seen if not _ALLOWED_SUBJECT.match(s)}
    assert not stray, f"hostile input reached a subject: {sorted(stray)[:10]}"
    handoffs = {s for s in outcomes.subjects_seen if s.startswith("lukhas.context.")}
    assert all(s.count(".") == 2 for s in handoffs), handoffs
    assert {subject for subject, _ in outcomes.replies} == set(REQUEST_SUBJECTS)
    stats = service.statistics()
    assert stats.errors == outcomes.errors, (stats, outcomes.summary())


async def test_raw_hostile_bytes_on_every_subject_get_clear_replies_in_bounded_memory() -> None:
    settings = fuzz_settings()
    bodies = raw_bodies(SEED, RAW_PER_SUBJECT, limits(settings))
    outcomes = Outcomes()
    async with serving(settings, outcomes) as (bus, service):
        await still_serving(bus)  # warm: first-use allocations are not the barrage's
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            with anyio.fail_after(120):
                await barrage(bus, bodies, outcomes)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await still_serving(bus)
    logger.warning(
        "raw fuzz: %s; %.0f MB sent; peak traced allocation %.1f MB",
        outcomes.summary(), outcomes.bytes_sent / 1e6, (peak - base) / 1e6,
    )
    assert outcomes.total == len(bodies) == RAW_PER_SUBJECT * len(REQUEST_SUBJECTS)
    assert peak - base < MEMORY_BOUND
    assert_clean(outcomes, service)


# -- hypothesis: one long-lived service in a thread, examples sent through a portal ----------


@dataclass
class Served:
    portal: BlockingPortal
    bus: Bus
    service: SliceService
    outcomes: Outcomes


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    outcomes = Outcomes()
    with (
        start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(serving(fuzz_settings(), outcomes)) as (bus, service),
    ):
        yield Served(portal, bus, service, outcomes)


@pytest.mark.parametrize("subject", REQUEST_SUBJECTS)
@settings(
    max_examples=HYPOTHESIS_PER_SUBJECT, derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_hypothesis_bodies_get_clear_replies(served: Served, subject: str, data: Any) -> None:
    body = data.draw(hostile_body(subject), label="body")
    served.portal.call(send, served.bus, subject, body, None, served.outcomes)


def test_after_the_hypothesis_barrage_the_service_still_serves(served: Served) -> None:
    served.portal.call(still_serving, served.bus)
    logger.warning("hypothesis fuzz: %s", served.outcomes.summary())
    assert served.outcomes.total >= HYPOTHESIS_PER_SUBJECT * len(REQUEST_SUBJECTS)
    assert_clean(served.outcomes, served.service)


# -- a share on a real nats-server, with the real providers ---------------------------------


@pytest.mark.nats
async def test_hostile_bytes_over_nats_with_the_real_providers(nats_url: str) -> None:
    names = Names(f"fuzz{random.Random(SEED).randrange(10**6)}")
    settings = nats_settings(
        nats_url, feature_governance_ledger=True, feature_identity_passkey=True,
        handoff_rate=1e9, handoff_burst=10**9,
    )
    bodies = raw_bodies(SEED + 1, REAL_SERVER_PER_SUBJECT, limits(settings))
    outcomes = Outcomes()

    async def wire(runtime: Runtime) -> None:
        await wire_providers(
            runtime, ledger_options=names.ledger_options(),
            passkey_options=names.passkey_options(),
        )

    unwire_providers()
    try:
        async with (
            nats_bus(nats_url, names) as bus,
            serving(settings, outcomes, bus=bus, wire=wire) as (_, service),
        ):
            with anyio.fail_after(120):
                await barrage(bus, bodies, outcomes, concurrency=32)
            reply = await bus.request(
                subjects.CONSENT_RECORD,
                msgspec.json.encode({"user_id": "usr_after_fuzz", "scope": "gmail.read"}),
                timeout=5,
            )
            after = json.loads(reply.data)
    finally:
        unwire_providers()
    logger.warning("real-server fuzz: %s", outcomes.summary())
    assert after["ok"] is True and after["provider"] == "jetstream", after
    assert outcomes.total == len(bodies)
    assert_clean(outcomes, service)


# -- size limits come before parsing ---------------------------------------------------------


async def test_oversize_bodies_are_refused_before_they_are_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = fuzz_settings()
    oversize: set[bytes] = set()
    decoded: list[int] = []  # lengths of the oversize bodies that reached the decoder
    calls = 0  # every decode in the process (background tasks of the providers decode too)
    original = msgspec.json.decode

    def spy(data: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if bytes(data) in oversize:
            decoded.append(len(data))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(msgspec.json, "decode", spy)
    outcomes = Outcomes()
    async with serving(settings, outcomes) as (bus, _):
        for subject, limit in limits(settings).items():
            bodies = [
                json.dumps({"pad": "x" * limit}).encode(),  # valid JSON, over the limit
                b"[" * (limit + 1),  # would be expensive to parse, and invalid
                b"\xff" * min(4 * limit, 1_000_000),  # not even UTF-8
            ]
            oversize.update(bodies)
            for body in bodies:
                reply = json.loads((await bus.request(subject, body, timeout=5)).data)
                assert reply["ok"] is False, (subject, reply)
                assert reply["error"]["code"] == "payload_too_large", (subject, reply)
                assert str(limit) in reply["error"]["message"]
        assert decoded == []  # not one oversize body reached the JSON decoder
        before = calls
        await still_serving(bus)  # ...which the spy does see for a body within the limit
    assert calls > before


# -- the two inputs the fuzzers found: both used to be `internal` errors ----------------------

#: A string field of each subject, for a body whose only flaw is a non-UTF-8 string.
_STRING_FIELD = {
    subjects.PASSKEY_VERIFY: "challenge",
    subjects.CONTEXT_HANDOFF: "target",
}
#: The fields typed "any JSON", where nesting is only limited by the parser.
_ANY_FIELD = {
    subjects.CONSENT_RECORD: "metadata",
    subjects.PASSKEY_VERIFY: "clientExtensionResults",
    subjects.PASSKEY_REGISTER_VERIFY: "credential",
    subjects.CONTEXT_HANDOFF: "ctx",
}
_NESTED = '{"a":' * 2000 + "1" + "}" * 2000  # 12 KB, under every slice's limit


def _regressions() -> list[Any]:
    cases = []
    for subject in REQUEST_SUBJECTS:
        field = _STRING_FIELD.get(subject, "user_id")
        for name, raw in (("truncated-utf8", b"\xc3"), ("encoded-surrogate", b"\xed\xa0\x80")):
            body = b'{"' + field.encode() + b'":"' + raw + b'","scope":"s"}'
            cases.append(pytest.param(subject, body, id=f"{subject.split('.', 1)[1]}-{name}"))
    for subject, field in _ANY_FIELD.items():
        body = f'{{"{field}":{_NESTED}}}'.encode()
        cases.append(pytest.param(subject, body, id=f"{subject.split('.', 1)[1]}-deep-nesting"))
    return cases


@pytest.mark.parametrize(("subject", "body"), _regressions())
async def test_invalid_utf8_and_deep_nesting_are_invalid_requests(
    subject: str, body: bytes
) -> None:
    outcomes = Outcomes()
    async with serving(fuzz_settings(), outcomes) as (bus, _):
        reply = json.loads((await bus.request(subject, body, timeout=5)).data)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "invalid_request", reply
