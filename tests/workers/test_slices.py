"""The slice service on the memory bus and on a real nats-server: replies, errors, discovery."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest

from bus import Bus, Envelope
from lukhas import subjects
from lukhas.observability.tracing import make_traceparent
from lukhas.runtime import Runtime
from lukhas.testing import MatrizRecorder, dry_run_settings, open_test_runtime
from tests.candidate._support import LEDGER_SIGNING_KEY, LEDGER_WRAPPING_KEY
from tests.conftest import BusFactory
from workers.service.slices import SliceService


@asynccontextmanager
async def serving(
    bus: Bus, **overrides: Any
) -> AsyncIterator[tuple[Runtime, MatrizRecorder, SliceService]]:
    async with open_test_runtime(dry_run_settings(**overrides), bus=bus) as (runtime, matriz):
        service = SliceService(runtime, concurrency=8)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            yield runtime, matriz, service
            await service.stop()


async def call(bus: Bus, subject: str, body: Any, **headers: str) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    reply = await bus.request(subject, data, headers=headers or None, timeout=5)
    return msgspec.json.decode(reply.data)


async def test_every_slice_answers_with_the_documented_shape(open_bus: BusFactory) -> None:
    async with open_bus() as bus, serving(bus) as (_, matriz, _service):
        consent = await call(bus, subjects.CONSENT_RECORD,
                             {"user_id": "usr_1", "scope": "gmail.read"})
        passkey = await call(bus, subjects.PASSKEY_VERIFY, {"challenge": "xyz"})
        handoff = await call(bus, subjects.CONTEXT_HANDOFF,
                             {"ctx": {"a": 1}, "target": "planner"})
        nodes = await matriz.take(3)
    assert consent["ok"] is True and consent["provider"] == "null"
    assert consent["entry"]["user_id"] == "usr_1"
    assert passkey == {"ok": True, "provider": "null", "challenge": "xyz"}
    assert handoff["ok"] is True and handoff["mode"] == "dryrun"
    assert sorted(n["type"] for n in nodes) == ["CONSENT", "CONTEXT", "DECISION"]


async def test_traceparent_header_becomes_the_node_trace_id(open_bus: BusFactory) -> None:
    traceparent = make_traceparent()
    async with open_bus() as bus, serving(bus) as (_, matriz, _service):
        reply = await call(bus, subjects.CONSENT_RECORD,
                           {"user_id": "usr_1", "scope": "s"}, traceparent=traceparent)
        [node] = await matriz.take(1)
    trace_id = traceparent.split("-")[1]
    assert reply["entry"]["trace_id"] == trace_id == node["provenance"]["trace_id"]


BAD_REQUESTS = [
    (subjects.CONSENT_RECORD, b"not json", "invalid_request"),
    (subjects.CONSENT_RECORD, b"[1,2]", "invalid_request"),
    (subjects.CONSENT_RECORD, b'{"scope":"s"}', "invalid_request"),
    (subjects.CONSENT_RECORD, b'{"user_id":1,"scope":"s"}', "invalid_request"),
    (subjects.CONSENT_RECORD, b'{"user_id":"usr_1","scope":"s","metadata":' + b'"x"}',
     "invalid_request"),
    (subjects.CONSENT_RECORD, b'{"user_id":"' + b"a" * 20_000 + b'","scope":"s"}',
     "payload_too_large"),
    (subjects.PASSKEY_VERIFY, b"\xff\xfe", "invalid_request"),
    (subjects.PASSKEY_VERIFY, b'"just a string"', "invalid_request"),
    (subjects.CONTEXT_HANDOFF, b'{"ctx":{},"target":"a.>"}', "invalid_request"),
    (subjects.CONTEXT_HANDOFF, b'{"ctx":[]}', "invalid_request"),
    (subjects.CONTEXT_HANDOFF, b"", "invalid_request"),
]


@pytest.mark.parametrize(("subject", "body", "code"), BAD_REQUESTS)
async def test_bad_input_gets_a_clear_error_and_the_service_keeps_serving(
    open_bus: BusFactory, subject: str, body: bytes, code: str
) -> None:
    async with open_bus() as bus, serving(bus) as (_, _matriz, service):
        reply_env = await bus.request(subject, body, timeout=5)
        reply = msgspec.json.decode(reply_env.data)
        after = await call(bus, subjects.CONSENT_RECORD, {"user_id": "usr_1", "scope": "s"})
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]
    assert "Traceback" not in reply["error"]["message"]
    assert reply_env.headers.get("Nats-Service-Error-Code") in {"400", "413"}
    assert after["ok"] is True
    assert service.statistics().errors == 1


async def test_an_unexpected_exception_is_internal_with_no_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lukhas.governance.consent_ledger.providers.null_provider import NullConsentProvider

    async def explode(self: object, entry: object, *, idempotency_key: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(NullConsentProvider, "record", explode)
    async with open_test_runtime() as (runtime, _), anyio.create_task_group() as tg:
        service = SliceService(runtime)
        await tg.start(service.run)
        reply = await call(runtime.bus, subjects.CONSENT_RECORD, {"user_id": "usr_1", "scope": "s"})
        await service.stop()
    assert reply["ok"] is False and reply["error"]["code"] == "internal"
    assert "secret" not in reply["error"]["message"]
    assert "reference" in reply["error"]["message"]


async def test_discovery_ping_info_stats(open_bus: BusFactory) -> None:
    async with open_bus() as bus, serving(bus) as (_, _matriz, service):
        await call(bus, subjects.CONSENT_RECORD, {"user_id": "usr_1", "scope": "s"})
        await bus.request(subjects.CONSENT_RECORD, b"nope", timeout=5)
        ping = await call(bus, "$SRV.PING", b"")
        info = await call(bus, f"$SRV.INFO.{subjects.SERVICE_NAME}", b"")
        stats = await call(bus, f"$SRV.STATS.{subjects.SERVICE_NAME}.{service.identity.id}", b"")
    assert ping["type"] == "io.nats.micro.v1.ping_response"
    assert ping["name"] == subjects.SERVICE_NAME and ping["id"] == service.identity.id
    assert {e["subject"] for e in info["endpoints"]} >= {
        subjects.CONSENT_RECORD, subjects.PASSKEY_VERIFY, subjects.CONTEXT_HANDOFF
    }
    record = next(e for e in stats["endpoints"] if e["subject"] == subjects.CONSENT_RECORD)
    assert record["num_requests"] == 2 and record["num_errors"] == 1
    assert record["processing_time"] > 0 and record["last_error"]
    assert record["data"]["dropped"] == 0 and record["data"]["max_pending"] > 0


@pytest.mark.nats
async def test_nats_micro_client_types_parse_our_discovery(nats_url: str) -> None:
    from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

    from bus import open_nats_bus

    async with open_nats_bus(nats_url) as bus, serving(bus) as (_, _matriz, service):
        ping = ServicePing.from_dict(await call(bus, "$SRV.PING.lukhas-slices", b""))
        info = ServiceInfo.from_dict(await call(bus, "$SRV.INFO.lukhas-slices", b""))
        stats = ServiceStats.from_dict(await call(bus, "$SRV.STATS.lukhas-slices", b""))
    assert ping.id == info.id == stats.id == service.identity.id
    assert len(info.endpoints) == len(service.endpoints)


async def test_stop_finishes_in_flight_requests() -> None:
    """Requests already taken are answered after stop(); none is lost."""
    from lukhas.governance.consent_ledger import registry

    release = anyio.Event()
    entered = 0

    class SlowLedger:  # a provider that waits on I/O, so requests run concurrently
        name = "slow"

        async def record(self, entry: Any, *, idempotency_key: Any) -> dict[str, Any]:
            nonlocal entered
            entered += 1
            await release.wait()
            return {"ok": True, "provider": self.name, "entry": {"scope": entry.scope}}

        revoke = record

        async def status(self, user_id: str, scope: str) -> dict[str, Any]: ...
        async def history(self, user_id: str) -> dict[str, Any]: ...
        async def verify_chain(self, user_id: str) -> dict[str, Any]: ...

    registry.register(SlowLedger())
    replies: list[Envelope] = []
    settings = dry_run_settings(
        dry_run=False, feature_governance_ledger=True, ledger_signing_key=LEDGER_SIGNING_KEY,
        ledger_wrapping_key=LEDGER_WRAPPING_KEY,
    )
    try:
        async with open_test_runtime(settings) as (runtime, _):
            bus = runtime.bus
            service = SliceService(runtime, concurrency=4)
            async with anyio.create_task_group() as tg:
                await tg.start(service.run)

                async def client(i: int) -> None:
                    body = msgspec.json.encode({"user_id": f"usr_{i}", "scope": "s"})
                    replies.append(await bus.request(subjects.CONSENT_RECORD, body, timeout=10))

                async with anyio.create_task_group() as clients:
                    for i in range(4):
                        clients.start_soon(client, i)
                    await anyio.wait_all_tasks_blocked()
                    assert entered == 4
                    await service.stop()
                    release.set()
    finally:
        registry.reset()
    assert len(replies) == 4
    assert all(msgspec.json.decode(r.data)["ok"] for r in replies)


async def test_null_providers_are_answered_inline_real_ones_by_the_pool() -> None:
    from workers.service.slices import serve_plan

    inline = {ep.name for ep in serve_plan(dry_run_settings()) if not ep.pooled}
    assert "consent_record" in inline and "passkey_verify" in inline
    assert "context_handoff" not in inline  # it waits for its publish to be confirmed


async def test_beyond_concurrency_and_pending_the_overflow_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1 in flight + 1 handed over + 2 pending fit; the rest are dropped and counted."""
    from lukhas.identity.passkey.providers.null_webauthn import NullWebAuthnProvider

    release = anyio.Event()
    original = NullWebAuthnProvider.verify

    async def stuck(self: NullWebAuthnProvider, assertion: Any) -> Any:
        await release.wait()
        return await original(self, assertion)

    monkeypatch.setattr(NullWebAuthnProvider, "verify", stuck)
    async with open_test_runtime() as (runtime, _):
        service = SliceService(runtime, concurrency=1, max_pending=2)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            for _ in range(10):
                await runtime.bus.publish(subjects.PASSKEY_VERIFY, b'{"challenge":"c"}')
            await anyio.wait_all_tasks_blocked()
            stats = await call(runtime.bus, f"$SRV.STATS.{subjects.SERVICE_NAME}", b"")
            release.set()
            await service.stop()
    verify = next(e for e in stats["endpoints"] if e["subject"] == subjects.PASSKEY_VERIFY)
    assert verify["data"]["dropped"] > 0
    assert verify["data"]["pending"] <= 2
    assert service.statistics().dropped == verify["data"]["dropped"]


class FakeClock:
    """The service's clock, moved by hand (ns)."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


@asynccontextmanager
async def held_passkey_verify(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[anyio.Event]:
    """Hold every passkey verify in its handler until the yielded event is set."""
    from lukhas.identity.passkey.providers.null_webauthn import NullWebAuthnProvider

    release = anyio.Event()
    original = NullWebAuthnProvider.verify

    async def held(self: NullWebAuthnProvider, assertion: Any) -> Any:
        await release.wait()
        return await original(self, assertion)

    monkeypatch.setattr(NullWebAuthnProvider, "verify", held)
    try:
        yield release
    finally:
        release.set()


async def verify_with_deadline(bus: Bus, deadline_ms: str | None = None) -> Envelope:
    """A passkey verify request, with a `Lukhas-Deadline-Ms` header when given one."""
    headers = None if deadline_ms is None else {"Lukhas-Deadline-Ms": deadline_ms}
    return await bus.request(
        subjects.PASSKEY_VERIFY, b'{"challenge":"c"}', headers=headers, timeout=10
    )


async def verifies_behind_a_held_one(
    bus: Bus, clock: FakeClock, release: anyio.Event, held: str,
    deadlines: dict[str, str | None], waited_ns: int,
) -> dict[str, Envelope]:
    """Send the verify `held` (its handler waits for `release`), then one verify per
    `deadlines` entry (name: its `Lukhas-Deadline-Ms`) queued behind it; once they have
    waited `waited_ns` on `clock`, release the handler. Their replies, by name."""
    replies: dict[str, Envelope] = {}

    async def client(name: str, deadline_ms: str | None) -> None:
        replies[name] = await verify_with_deadline(bus, deadline_ms)

    async with anyio.create_task_group() as clients:
        clients.start_soon(client, held, None)
        await anyio.wait_all_tasks_blocked()
        for name, deadline_ms in deadlines.items():
            clients.start_soon(client, name, deadline_ms)
        await anyio.wait_all_tasks_blocked()
        clock.now += waited_ns
        release.set()
    return replies


async def test_a_request_past_its_queue_budget_is_refused_overloaded_not_silence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handler is held while a request waits; past its budget it gets `overloaded`."""
    clock = FakeClock()
    async with (
        held_passkey_verify(monkeypatch) as release,
        open_test_runtime() as (runtime, matriz),
    ):
        bus = runtime.bus
        service = SliceService(runtime, concurrency=2, clock=clock)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            # "served" is held in the handler; the others wait 15 ms: past half of 20 ms.
            replies = await verifies_behind_a_held_one(
                bus, clock, release, "served", {"late": "20", "patient": "600000"},
                15_000_000)
            stats = await call(bus, f"$SRV.STATS.{subjects.SERVICE_NAME}", b"")
            await service.stop()
        nodes = await matriz.take(3)
    late = replies["late"]
    assert msgspec.json.decode(late.data) == {
        "ok": False, "reason": "overloaded", "retry_after_ms": 1}
    assert late.headers["Nats-Service-Error-Code"] == "503"
    assert late.headers["Nats-Service-Error"] == "overloaded"
    assert msgspec.json.decode(replies["served"].data)["ok"] is True
    assert msgspec.json.decode(replies["patient"].data)["ok"] is True
    refused = [n for n in nodes if n["state"]["outcome"] == "refused"]
    assert len(refused) == 1
    assert {"reason:overloaded", "overloaded:1"} <= set(refused[0]["labels"])
    assert refused[0]["state"]["latency_ms"] == 15.0
    verify = next(e for e in stats["endpoints"] if e["subject"] == subjects.PASSKEY_VERIFY)
    assert verify["data"]["overloaded"] == 1
    assert verify["last_error"] == "overloaded"
    assert service.statistics().overloaded == 1


async def test_a_full_queue_refuses_at_once_while_the_handler_is_still_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with (
        held_passkey_verify(monkeypatch) as release,
        open_test_runtime() as (runtime, _),
    ):
        bus = runtime.bus
        service = SliceService(runtime, concurrency=2, max_pending=1, clock=FakeClock())
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            async with anyio.create_task_group() as clients:
                for _ in range(2):  # one held in the handler, one queued
                    clients.start_soon(call, bus, subjects.PASSKEY_VERIFY, {"challenge": "c"})
                await anyio.wait_all_tasks_blocked()
                refused = await call(bus, subjects.PASSKEY_VERIFY, {"challenge": "c"})
                assert not release.is_set()  # answered while the handler is still held
                release.set()
            await service.stop()
    assert refused["ok"] is False and refused["reason"] == "overloaded"
    assert refused["retry_after_ms"] >= 1


@pytest.mark.parametrize("value", ["0", "-5", "soon", "600001"])
async def test_a_malformed_deadline_header_is_a_clear_error(value: str) -> None:
    async with open_test_runtime() as (runtime, _):
        async with serving(runtime.bus) as (_, _matriz, _service):
            reply = await call(runtime.bus, subjects.CONSENT_RECORD,
                               {"user_id": "usr_1", "scope": "s"},
                               **{"Lukhas-Deadline-Ms": value})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_request"
    assert "Lukhas-Deadline-Ms" in reply["error"]["message"]


@pytest.mark.parametrize(("reply_to", "worker_inbox"), [
    ("lukhas.observability.alerts.CONSENT.governance.record", False),
    ("lukhas.observability.state.forged", False),
    ("_INBOX_", False), ("_INBOX_.x", False), ("_INBOXES.x", False),
    ("_INBOX_observability.x", True), ("_INBOX_slices.x", True),
])
async def test_a_reply_subject_that_is_not_a_requester_inbox_gets_no_answer(
    open_bus: BusFactory, reply_to: str, worker_inbox: bool
) -> None:
    """A slice never answers there; discovery answers a worker's inbox (health checks run
    as the workers' own users) but nothing else."""
    async with open_bus() as bus, serving(bus) as (_, _matriz, service):
        async with bus.subscribe(reply_to) as sink:
            body = msgspec.json.encode({"user_id": "usr_1", "scope": "s"})
            await bus.publish(subjects.CONSENT_RECORD, body, reply=reply_to)
            await bus.publish(f"$SRV.PING.{subjects.SERVICE_NAME}", b"", reply=reply_to)
            # The same lanes, after the forged ones: once answered, the forged are past.
            legit = await call(bus, subjects.CONSENT_RECORD, {"user_id": "usr_1", "scope": "s"})
            await call(bus, f"$SRV.PING.{subjects.SERVICE_NAME}", b"")
            await bus.flush()
            arrived = [msgspec.json.decode((await sink.next(5)).data) for _ in range(
                sink.statistics().pending)]
        stats = service.statistics()
    assert legit["ok"] is True
    if worker_inbox:
        assert [m["type"] for m in arrived] == ["io.nats.micro.v1.ping_response"]
        assert stats.refused_replies == 1
    else:
        assert arrived == []
        assert stats.refused_replies == 2
