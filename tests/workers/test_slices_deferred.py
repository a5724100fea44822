"""Deferred handoffs on a real nats-server: parked on their flush, they starve nothing.

A handoff waits for a flush to confirm its publish (`ok: true` = the server has it). These
tests hold that flush: the handoffs park without holding a task, the other endpoints (one
of them served by the shared pool) keep answering, the in-flight bound answers
`backpressure` rather than queueing, a handoff past its queue budget is told `overloaded`,
and releasing the flush answers every parked handoff with one grouped confirmation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest

from bus import Bus, BusError, RequestTimeout, open_nats_bus
from bus.nats import NatsBus
from lukhas import subjects
from lukhas.orchestration.context.endpoints import HandoffDeferral
from lukhas.ratelimit import Grant, MemoryLeaseStore, TokenLeaseStore, use_lease_store
from lukhas.runtime import Runtime
from lukhas.testing import MatrizRecorder, dry_run_settings, open_test_runtime
from workers.service.slices import SliceService

pytestmark = pytest.mark.nats

TARGET = "lukhas.context.deferred"
HANDOFF = msgspec.json.encode({"ctx": {"step": 1}, "target": "deferred"})


class FlushValve:
    """Wraps a bus's `flush` and `flush_calling`: they pass through until `hold()`; held,
    `flush` waits for `release()`, and `flush_calling` keeps its callback until then."""

    def __init__(self, bus: NatsBus) -> None:
        self._flush = bus.flush
        self._flush_calling = bus.flush_calling
        self._write_queued = bus.write_queued
        self._open: anyio.Event | None = None
        self._calling: list[Callable[[BusError | None], None]] = []
        self.held = 0
        #: Raised by the held flushes once released (a flush that timed out).
        self.fail: BusError | None = None

    def hold(self) -> None:
        self._open = anyio.Event()

    def pass_through(self) -> None:
        self._open = None

    def release(self) -> None:
        if self._open is not None:
            self._open.set()
        calling, self._calling = self._calling, []
        for ended in calling:  # as a flush that starts now ends
            if self.fail is not None:
                ended(self.fail)
            else:
                assert self._flush_calling(ended)

    async def __call__(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        if self._open is not None:
            self.held += 1
            await self._open.wait()
            if self.fail is not None:
                raise self.fail
        await self._flush()

    def calling(self, ended: Callable[[BusError | None], None], timeout: float = 5.0) -> bool:
        if self._open is None:
            return self._flush_calling(ended, timeout)
        self.held += 1
        self._calling.append(ended)
        self._write_queued()  # the PING would have carried the queue: only its PONG is held
        if self._open.is_set():
            self.release()
        return True


@asynccontextmanager
async def serving(
    nats_url: str, monkeypatch: pytest.MonkeyPatch, *, clock: Callable[[], int] | None = None,
    store: TokenLeaseStore | None = None, **overrides: Any,
) -> AsyncIterator[tuple[Runtime, MatrizRecorder, SliceService, FlushValve, Bus]]:
    """The slice service on its own connection, its flush behind a valve; a client bus."""
    async with (
        open_nats_bus(nats_url) as service_bus,
        open_nats_bus(nats_url) as client,
        open_test_runtime(dry_run_settings(**overrides), bus=service_bus) as (runtime, matriz),
    ):
        assert isinstance(service_bus, NatsBus)
        valve = FlushValve(service_bus)
        monkeypatch.setattr(service_bus, "flush", valve)
        monkeypatch.setattr(service_bus, "flush_calling", valve.calling)
        if store is not None:
            use_lease_store(runtime, store)
        service = SliceService(runtime, concurrency=2, **({"clock": clock} if clock else {}))
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            try:
                yield runtime, matriz, service, valve, client
            finally:
                valve.release()
                await service.stop()


def deferral(service: SliceService) -> HandoffDeferral:
    found = service._deferrals[subjects.CONTEXT_HANDOFF]
    assert isinstance(found, HandoffDeferral)
    return found


async def request(client: Bus, subject: str, body: bytes) -> dict[str, Any]:
    reply = await client.request(subject, body, timeout=10)
    return msgspec.json.decode(reply.data)  # type: ignore[no-any-return]


async def test_handoffs_parked_on_a_held_flush_starve_no_other_endpoint(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 handoffs wait on a held flush, 25x the pool's 2 tasks; consent (inline) and a
    pooled passkey verify are answered meanwhile, then every handoff with `ok: true`."""
    from lukhas.identity.passkey.providers.null_webauthn import NullWebAuthnProvider

    # Served by the shared pool of 2 tasks, which 50 parked handoffs would fill if each held one.
    monkeypatch.setattr(NullWebAuthnProvider, "waits_on_io", True)
    count = 50
    handoffs: list[dict[str, Any]] = []
    async with (
        serving(nats_url, monkeypatch) as (_, matriz, service, valve, client),
        client.subscribe(TARGET) as target,
    ):
        assert next(e for e in service.endpoints if e.name == "passkey_verify").pooled
        await client.flush()  # the target subscription is live before anything is handed off
        valve.hold()

        async def hand_off() -> None:
            handoffs.append(await request(client, subjects.CONTEXT_HANDOFF, HANDOFF))

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(hand_off)
            # Every context reached the server (the target has it); none is answered yet.
            for _ in range(count):
                await target.next(timeout=10)
            assert deferral(service).parked == count
            assert handoffs == []
            assert service.statistics().in_flight == count
            # ... and `$SRV.STATS` shows them parked on the handoff endpoint.
            stats = msgspec.json.decode((await client.request(
                f"$SRV.STATS.{subjects.SERVICE_NAME}", b"", timeout=5)).data)
            (handoff,) = [e for e in stats["endpoints"]
                          if e["subject"] == subjects.CONTEXT_HANDOFF]
            assert handoff["data"]["parked"] == count

            consent = await request(client, subjects.CONSENT_RECORD,
                                    b'{"user_id":"usr_1","scope":"gmail.read"}')
            passkey = await request(client, subjects.PASSKEY_VERIFY, b'{"challenge":"c"}')
            assert consent["ok"] is True and passkey["ok"] is True
            assert handoffs == []  # still held: the others did not wait for them
            valve.release()
        nodes = await matriz.take(count + 2)
    assert len(handoffs) == count
    assert all(h["ok"] is True and h["mode"] == "dryrun" for h in handoffs)
    # Grouped: at most 4 flushes run at once (all held here), and one more covered the rest.
    assert deferral(service).flushes <= 5
    contexts = [n for n in nodes if n["type"] == "CONTEXT"]
    assert len(contexts) == count
    assert all(n["state"]["outcome"] == "ok" for n in contexts)


async def test_past_the_in_flight_bound_handoffs_are_refused_backpressure_at_once(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 3 slots and the flush held, 3 handoffs park and the other 7 are refused now."""
    replies: list[dict[str, Any]] = []
    async with serving(nats_url, monkeypatch, handoff_max_inflight=3) as (
        _, matriz, service, valve, client
    ):
        valve.hold()

        async def hand_off() -> None:
            replies.append(await request(client, subjects.CONTEXT_HANDOFF, HANDOFF))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(hand_off)
            with anyio.fail_after(10):
                while len(replies) < 7:  # answered while the flush is still held
                    await client.flush()
            assert len(replies) == 7 and deferral(service).parked == 3
            valve.release()
        nodes = await matriz.take(10)
    assert sorted(r["ok"] for r in replies) == [False] * 7 + [True] * 3
    outcomes = sorted(n["state"]["outcome"] for n in nodes)
    assert outcomes == ["backpressure"] * 7 + ["ok"] * 3


class HeldLeaseStore(MemoryLeaseStore):
    """A lease store whose first round trip waits (a KV store that stopped answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def lease(self, key: str, rate: float, burst: int, want: int) -> Grant:
        self.entered.set()
        await self.release.wait()
        return await super().lease(key, rate, burst, want)


class FakeClock:
    """The service's clock, moved by hand (ns)."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


async def test_a_handoff_queued_past_its_budget_is_refused_overloaded_not_silence(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handoff server waits on the rate-limit store; those queued behind it past half
    their 20 ms deadline get `overloaded` (with retry_after_ms); the first is still served."""
    clock = FakeClock()
    store = HeldLeaseStore()
    async with serving(nats_url, monkeypatch, clock=clock, store=store) as (
        _, _, service, _valve, client
    ):
        first: dict[str, Any] = {}
        late: list[dict[str, Any]] = []

        async def hand_off_first() -> None:
            first.update(await request(client, subjects.CONTEXT_HANDOFF, HANDOFF))

        async def hand_off_late() -> None:
            reply = await client.request(subjects.CONTEXT_HANDOFF, HANDOFF, timeout=10,
                                         headers={"Lukhas-Deadline-Ms": "20"})
            late.append({**msgspec.json.decode(reply.data), "_headers": reply.headers})

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(hand_off_first)
                with anyio.fail_after(10):
                    await store.entered.wait()  # the handoff server waits on the store
                    for _ in range(5):
                        tg.start_soon(hand_off_late)
                    lane = service._lanes[subjects.CONTEXT_HANDOFF]
                    while lane.queued < 5:  # read and queued behind the first
                        await client.flush()
                clock.now += 15_000_000  # 15 ms queued: past half of the 20 ms budget
                store.release.set()
        finally:
            store.release.set()
    assert first["ok"] is True
    assert len(late) == 5
    assert all(r["ok"] is False and r["reason"] == "overloaded" for r in late)
    assert all(r["retry_after_ms"] >= 1 for r in late)
    # Queued on the wire in place (`publish_nowait`), with the nats.micro error headers.
    assert all(r["_headers"] == {"Nats-Service-Error": "overloaded",
                                 "Nats-Service-Error-Code": "503"} for r in late)


async def test_handoffs_whose_flush_fails_are_answered_unavailable_never_ok(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush that times out answers every handoff it covered with an `unavailable` error
    (and the error headers), frees their in-flight slots, and the next handoff is ok."""
    replies: list[Any] = []
    async with serving(nats_url, monkeypatch, handoff_max_inflight=3) as (
        _, matriz, service, valve, client
    ):
        valve.hold()
        valve.fail = RequestTimeout("flush", 5.0)

        async def hand_off() -> None:
            replies.append(await client.request(subjects.CONTEXT_HANDOFF, HANDOFF, timeout=10))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(hand_off)
            with anyio.fail_after(10):
                while deferral(service).parked < 3:
                    await client.flush()
            valve.release()
        nodes = await matriz.take(3)
        valve.pass_through()
        after = await request(client, subjects.CONTEXT_HANDOFF, HANDOFF)
    bodies = [msgspec.json.decode(r.data) for r in replies]
    assert [b["error"]["code"] for b in bodies] == ["unavailable"] * 3
    assert all(b["ok"] is False and "not confirmed" in b["error"]["message"] for b in bodies)
    assert all(r.headers["Nats-Service-Error"].startswith("handoff to") for r in replies)
    assert [n["state"]["outcome"] for n in nodes] == ["error"] * 3
    assert after["ok"] is True  # the failed handoffs gave their slots back
