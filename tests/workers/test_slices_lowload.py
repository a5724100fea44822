"""The low-load path: a reader serving a lone request itself, and the MATRIZ emitter's wake-ups.

Neither may change what is answered, in what order, or which nodes are published.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import anyio
import msgspec
import pytest

from bus import (
    BusClosed,
    EncodedHeaders,
    InvalidHeader,
    InvalidSubject,
    open_memory_bus,
    open_nats_bus,
)
from bus.nats._compat import use_public_api
from lukhas import subjects
from lukhas.identity.passkey.providers.null_webauthn import NullWebAuthnProvider
from lukhas.observability.matriz_emit import MatrizEmitter, make_node
from lukhas.orchestration.context.endpoints import HandoffDeferral
from lukhas.ratelimit import Grant, MemoryLeaseStore, use_lease_store
from lukhas.testing import dry_run_settings, open_test_runtime
from workers.service.slices import SliceService

GOOD = b'{"user_id":"usr_1","scope":"s"}'
BAD = b'{"scope":"s"}'


async def test_requests_one_at_a_time_and_in_bursts_are_answered_in_order(
    nats_url: str,
) -> None:
    """Alone (served by the reader) or in a burst (queued for the server), every request
    is answered in the order sent, a bad one with its error, each with its MATRIZ node."""
    async with (
        open_nats_bus(nats_url) as service_bus,
        open_nats_bus(nats_url) as client,
        open_test_runtime(dry_run_settings(), bus=service_bus) as (runtime, matriz),
    ):
        service = SliceService(runtime, concurrency=2)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            inbox = client.new_inbox()
            async with client.subscribe(f"{inbox}.*") as replies:
                bodies = [GOOD, BAD, GOOD, GOOD]
                for i, body in enumerate(bodies):  # one at a time
                    await client.publish(subjects.CONSENT_RECORD, body, reply=f"{inbox}.{i}")
                    await client.flush()
                    env = await anext(aiter(replies))
                    assert env.subject == f"{inbox}.{i}"
                lone = service._served_by_readers
                burst = [GOOD if i % 3 else BAD for i in range(40)]
                for i, body in enumerate(burst, start=len(bodies)):
                    await client.publish(subjects.CONSENT_RECORD, body, reply=f"{inbox}.{i}")
                await client.flush()
                got = []
                with anyio.fail_after(10):
                    async for env in replies:
                        got.append(env)
                        if len(got) == len(burst):
                            break
            await service.stop()
        nodes = await matriz.take(len(bodies) + len(burst))
    assert lone == len(bodies)  # each lone request was served by its reader
    assert [e.subject for e in got] == [
        f"{inbox}.{i}" for i in range(len(bodies), len(bodies) + len(burst))]
    for env, body in zip(got, burst, strict=True):
        reply = msgspec.json.decode(env.data)
        if body is BAD:
            assert reply["ok"] is False and reply["error"]["code"] == "invalid_request"
            assert env.headers["Nats-Service-Error-Code"] == "400"
        else:
            assert reply["ok"] is True
    outcomes = sorted(n["state"]["outcome"] for n in nodes)
    errors = 1 + sum(body is BAD for body in burst)
    assert outcomes == ["error"] * errors + ["ok"] * (len(nodes) - errors)


class _SharedStore(MemoryLeaseStore):
    """Stands for a store the workers share (NATS KV): its lease calls may wait."""

    async def lease(self, key: str, rate: float, burst: int, want: int) -> Grant:
        await anyio.lowlevel.checkpoint()
        return await super().lease(key, rate, burst, want)


async def test_a_handoff_is_served_by_its_reader_only_while_admission_cannot_wait(
    nats_url: str,
) -> None:
    """With the store in memory the handoff's `begin` never waits, so a reader may run it;
    with a shared store (a lease refill is a round trip) it is always left to the server."""
    body = msgspec.json.encode({"ctx": {"a": 1}, "target": "planner"})
    for shared in (False, True):
        async with (
            open_nats_bus(nats_url) as service_bus,
            open_nats_bus(nats_url) as client,
            open_test_runtime(dry_run_settings(), bus=service_bus) as (runtime, _),
        ):
            if shared:
                use_lease_store(runtime, _SharedStore())
            service = SliceService(runtime, concurrency=2)
            found = service._deferrals[subjects.CONTEXT_HANDOFF]
            assert isinstance(found, HandoffDeferral)
            assert found.waits_on_io is shared
            async with anyio.create_task_group() as tg:
                await tg.start(service.run)
                for _ in range(3):
                    reply = await client.request(subjects.CONTEXT_HANDOFF, body, timeout=5)
                    assert msgspec.json.decode(reply.data)["ok"] is True
                await service.stop()
            assert service._served_by_readers == (0 if shared else 3)


@pytest.mark.parametrize("backend", ["nats", "memory"])
async def test_the_emitter_publishes_every_node_in_order(nats_url: str, backend: str) -> None:
    """Nodes emitted one by one (the emitter asleep each time) or more than a batch at once
    are all published, in order: on NATS in place (`publish_nowait`), on the memory bus
    through the emitter's task in batches. Closing wakes a sleeping emitter; later nodes
    are drops."""
    async with AsyncExitStack() as stack:
        if backend == "nats":
            bus = await stack.enter_async_context(open_nats_bus(nats_url))
            watcher = await stack.enter_async_context(open_nats_bus(nats_url))
        else:
            bus = watcher = await stack.enter_async_context(open_memory_bus())
        published = await stack.enter_async_context(watcher.subscribe("matriz.>"))
        await watcher.flush()
        emitter = MatrizEmitter(bus, producer="test", batch=4)

        def node(i: int) -> bytes:
            made = make_node("CONSENT", "governance:record", outcome="ok", latency_ms=1.0,
                             trace_id=f"{i:032x}", producer="test", capability="c")
            emitter.emit(made)
            return made.provenance.trace_id.encode()

        async with anyio.create_task_group() as tg:
            await tg.start(emitter.run)
            sent = []
            for i in range(3):  # one by one, the emitter asleep before each
                await anyio.wait_all_tasks_blocked()
                sent.append(node(i))
                await emitter.flush()
            sent += [node(i) for i in range(3, 14)]  # more than a batch at once
            await emitter.flush()
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(5):
                await emitter.aclose()  # the emitter was asleep: closing wakes it
        node(99)
        got = []
        with anyio.fail_after(5):
            async for env in published:
                got.append(env.data)
                if len(got) == len(sent):
                    break
    assert all(trace in data for trace, data in zip(sent, got, strict=True))
    stats = emitter.statistics()
    assert (stats.emitted, stats.published, stats.dropped) == (15, 14, 1)


async def test_publish_nowait_keeps_order_with_publish_and_declines_without_internals(
    nats_url: str,
) -> None:
    """`publish_nowait` queues behind earlier publishes and ahead of later ones; on a closed
    bus it raises; on nats-py's public API only it declines (False), sending nothing."""
    async with open_nats_bus(nats_url) as bus, bus.subscribe("lukhas.lowload.>") as sub:
        await bus.publish("lukhas.lowload.a", b"1")
        assert bus.publish_nowait("lukhas.lowload.b", b"2") is True
        await bus.publish("lukhas.lowload.c", b"3")
        assert bus.publish_nowait("lukhas.lowload.d", b"4") is True
        await bus.flush()
        got = []
        with anyio.fail_after(5):
            async for env in sub:
                got.append((env.subject, env.data))
                if len(got) == 4:
                    break
        assert got == [("lukhas.lowload.a", b"1"), ("lukhas.lowload.b", b"2"),
                       ("lukhas.lowload.c", b"3"), ("lukhas.lowload.d", b"4")]
        with pytest.raises(InvalidSubject):
            bus.publish_nowait("lukhas.lowload.*", b"x")
    with pytest.raises(BusClosed):
        bus.publish_nowait("lukhas.lowload.e", b"5")
    previous = use_public_api(True)
    try:
        async with open_nats_bus(nats_url) as public:
            assert public.publish_nowait("lukhas.lowload.f", b"6") is False
            assert public.statistics().published == 0
    finally:
        use_public_api(previous.name == "public")


async def test_publish_nowait_with_encoded_headers_reads_as_a_publish_with_them(
    nats_url: str,
) -> None:
    """A refusal goes out through `publish_nowait` with its headers laid out once
    (`EncodedHeaders`): a nats-py subscriber reads the same headers and body as from
    `publish`, in order, and a bad header name is refused when the headers are made."""
    wire = EncodedHeaders({"Nats-Service-Error": " overloaded ", "Nats-Service-Error-Code": "503"})
    assert wire.mapping == {"Nats-Service-Error": "overloaded", "Nats-Service-Error-Code": "503"}
    async with open_nats_bus(nats_url) as bus, bus.subscribe("lukhas.lowload.h.>") as sub:
        assert bus.publish_nowait("lukhas.lowload.h.1", b'{"ok":false}', headers=wire)
        await bus.publish("lukhas.lowload.h.2", b'{"ok":false}', headers=wire.mapping)
        await bus.flush()
        got = []
        with anyio.fail_after(5):
            async for env in sub:
                got.append(env)
                if len(got) == 2:
                    break
    assert [e.subject for e in got] == ["lukhas.lowload.h.1", "lukhas.lowload.h.2"]
    assert got[0].headers == got[1].headers == wire.mapping
    assert got[0].data == got[1].data == b'{"ok":false}'
    with pytest.raises(InvalidHeader):
        EncodedHeaders({"bad name": "x"})


async def test_a_reader_never_serves_while_its_server_has_a_request_in_hand(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server holds a request (its queue empty): a lone request arriving then is queued
    behind it, not served by the reader beside it, and all are answered in order."""
    holds = {"a": anyio.Event(), "b": anyio.Event()}
    original = NullWebAuthnProvider.verify

    async def held(self: NullWebAuthnProvider, assertion: Any) -> Any:
        hold = holds.get(assertion["challenge"])
        if hold is not None:
            await hold.wait()
        return await original(self, assertion)

    monkeypatch.setattr(NullWebAuthnProvider, "verify", held)
    order: list[str] = []
    async with open_test_runtime() as (runtime, _):
        bus = runtime.bus
        service = SliceService(runtime, concurrency=2)
        lane = service._lanes[subjects.PASSKEY_VERIFY]
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)

            async def client(challenge: str, deadline: str | None = None) -> None:
                headers = None if deadline is None else {"Lukhas-Deadline-Ms": deadline}
                body = msgspec.json.encode({"challenge": challenge})
                reply = await bus.request(subjects.PASSKEY_VERIFY, body, headers=headers,
                                          timeout=10)
                order.append(f"{challenge}:{msgspec.json.decode(reply.data)['ok']}")

            async with anyio.create_task_group() as clients:
                clients.start_soon(client, "a")  # alone: the reader serves it, held
                await anyio.wait_all_tasks_blocked()
                assert service._served_by_readers == 1
                clients.start_soon(client, "bad", "soon")
                clients.start_soon(client, "b")
                await anyio.wait_all_tasks_blocked()
                holds["a"].set()  # the reader takes both: answers "bad", queues "b"
                await anyio.wait_all_tasks_blocked()  # the server holds "b"; none queued
                assert order == ["a:True", "bad:False"] and lane.queued == 0
                clients.start_soon(client, "c")
                await anyio.wait_all_tasks_blocked()
                assert lane.queued == 1  # "c" waits behind "b" instead of passing it
                holds["b"].set()
            await service.stop()
    assert order == ["a:True", "bad:False", "b:True", "c:True"]
    assert service._served_by_readers == 1
