"""`ok: true` means the server has the handoff, also when the server refuses it.

A nats-server whose `service` user may publish anywhere but `lukhas.context.denied` serves
the slice service (DRY_RUN, so handoffs are deferred and confirmed by pipelined flushes);
a `client` user calls it. A handoff to `denied` is published, refused by the server (its
-ERR comes back before the PONG of the flush that covers it) and must be answered
`unavailable`, never `ok`, however the flushes fall; a handoff to an allowed target is
delivered and `ok`. The bus-level test pins the race the deferral relies on: a refusal
whose -ERR arrives before the flush covering the publish is even called still fails it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from bus import Bus, BusError, NatsServer, PermissionDenied, Subscription, open_nats_bus
from bus.nats import NatsBus
from lukhas import subjects
from lukhas.observability.tracing import make_traceparent, new_trace_id
from lukhas.testing import MatrizRecorder, dry_run_settings, open_test_runtime
from workers.service.slices import SliceService

pytestmark = pytest.mark.nats

CONFIG = """
authorization {
  users = [
    {user: service, password: servicepw, permissions: {
      publish: {allow: [">"], deny: ["lukhas.context.denied"]},
      subscribe: {allow: [">"]}}}
    {user: client, password: clientpw}
  ]
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    directory: Path = tmp_path_factory.mktemp("refusing-nats")
    config = directory / "nats.conf"
    config.write_text(CONFIG)
    server = NatsServer(config_file=config, jetstream=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def handoff(target: str, step: int = 1) -> bytes:
    return msgspec.json.encode({"ctx": {"step": step}, "target": target})


async def test_a_refusal_that_came_in_before_the_flush_still_fails_it(
    server: NatsServer,
) -> None:
    """The -ERR of a refused publish is in before `flush()` is called (a bare round trip
    let it in): the flush covering that publish still raises, and the next one passes."""
    async with open_nats_bus(server.url, user="service", password="servicepw") as bus:
        await bus.publish("lukhas.context.denied", b"{}")
        await bus.round_trip()  # the server's -ERR has arrived; no flush has begun yet
        with pytest.raises(PermissionDenied, match="lukhas.context.denied"):
            await bus.flush()
        await bus.publish("lukhas.context.allowed", b"{}")
        await bus.flush()  # nothing refused since the last flush began


async def test_a_calling_flush_over_a_refused_publish_ends_with_the_refusal(
    server: NatsServer,
) -> None:
    """`flush_calling` as `flush`: the flush covering a refused publish ends with
    `PermissionDenied`, whether the -ERR comes in while it runs or came in before it was
    started; the next one, covering an allowed publish only, ends with None."""
    async with open_nats_bus(server.url, user="service", password="servicepw") as bus:
        assert isinstance(bus, NatsBus)
        ended: list[BusError | None] = []

        async def flushed() -> BusError | None:
            landed = anyio.Event()

            def on_end(error: BusError | None) -> None:
                ended.append(error)
                landed.set()

            assert bus.flush_calling(on_end)
            with anyio.fail_after(10):
                await landed.wait()
            return ended[-1]

        await bus.publish("lukhas.context.denied", b"{}")
        assert isinstance(await flushed(), PermissionDenied)  # -ERR while it runs
        await bus.publish("lukhas.context.denied", b"{}")
        await bus.round_trip()  # the -ERR is in; no flush has begun
        assert isinstance(await flushed(), PermissionDenied)
        await bus.publish("lukhas.context.allowed", b"{}")
        assert await flushed() is None
        assert len(ended) == 3


@asynccontextmanager
async def served_handoffs(
    server: NatsServer,
) -> AsyncIterator[tuple[SliceService, MatrizRecorder, Bus, Subscription]]:
    """A slice service (not started yet) on the `service` user, what it emits to MATRIZ, a
    bus as the `client` user, and the client's subscription to the allowed target."""
    async with (
        open_nats_bus(server.url, user="service", password="servicepw") as service_bus,
        open_nats_bus(server.url, user="client", password="clientpw") as client,
        open_test_runtime(dry_run_settings(), bus=service_bus) as (runtime, matriz),
        client.subscribe("lukhas.context.allowed") as target,
    ):
        yield SliceService(runtime, concurrency=2), matriz, client, target


async def test_a_refused_handoff_is_unavailable_never_ok(server: NatsServer) -> None:
    """Denied and allowed handoffs interleaved, 40 at once: no denied one is ever `ok`, and
    the allowed ones reach their target; alone, an allowed handoff is `ok` and a denied one
    `unavailable` with the error headers."""
    async with served_handoffs(server) as (service, _, client, target):
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            await client.flush()
            replies: dict[int, Any] = {}

            async def hand_off(n: int) -> None:
                where = "denied" if n % 4 == 0 else "allowed"
                reply = await client.request(
                    subjects.CONTEXT_HANDOFF, handoff(where, n), timeout=10
                )
                replies[n] = (where, reply)

            async with anyio.create_task_group() as calls:
                for n in range(40):
                    calls.start_soon(hand_off, n)
            alone = {
                where: await client.request(subjects.CONTEXT_HANDOFF, handoff(where), timeout=10)
                for where in ("allowed", "denied")
            }
            delivered = []
            with anyio.fail_after(10):
                async for env in target:
                    delivered.append(msgspec.json.decode(env.data)["ctx"]["step"])
                    if len(delivered) == 31:  # 30 of the 40, and the one alone
                        break
            await service.stop()
            tg.cancel_scope.cancel()
    bodies = {n: (where, msgspec.json.decode(r.data)) for n, (where, r) in replies.items()}
    denied = [body for where, body in bodies.values() if where == "denied"]
    assert len(denied) == 10
    assert all(body["ok"] is False for body in denied)
    assert all(body["error"]["code"] == "unavailable" for body in denied)
    # An allowed handoff sharing a flush with a refused one may be answered `unavailable`
    # too (never the reverse); every `ok` one was delivered.
    ok_steps = sorted(n for n, (where, body) in bodies.items() if body["ok"])
    assert all(bodies[n][0] == "allowed" for n in ok_steps)
    assert set(ok_steps) <= set(delivered)
    assert msgspec.json.decode(alone["allowed"].data)["ok"] is True
    refused = alone["denied"]
    body = msgspec.json.decode(refused.data)
    assert body["ok"] is False and body["error"]["code"] == "unavailable"
    assert "not confirmed" in body["error"]["message"]
    assert refused.headers["Nats-Service-Error"].startswith("handoff to")


async def test_handoffs_answered_in_place_at_their_pong_keep_ok_and_matriz_honest(
    server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deferral answers a confirmed handoff in place, from nats-py's reader as it reads
    the PONG (`NatsBus.flush_calling`), its MATRIZ node written with the reply. Sent one
    at a time and 24 at once, denied and allowed interleaved: a denied handoff is never
    `ok`; every `ok` one was delivered, and answered in place; and MATRIZ has exactly one
    CONTEXT node per call, `ok` for exactly the calls answered `ok`, `error` for the rest."""
    async with served_handoffs(server) as (service, matriz, client, target):
        in_place: list[bool] = []
        answer_nowait = service._answer_nowait

        def counted(*args: Any) -> bool:
            in_place.append(answer_nowait(*args))
            return in_place[-1]

        monkeypatch.setattr(service, "_answer_nowait", counted)
        traces: dict[int, str] = {}
        replies: dict[int, Any] = {}

        async def hand_off(n: int) -> None:
            traces[n] = new_trace_id()
            replies[n] = await client.request(
                subjects.CONTEXT_HANDOFF, handoff("denied" if n % 3 == 0 else "allowed", n),
                headers={"traceparent": make_traceparent(traces[n])}, timeout=10,
            )

        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            await client.flush()
            for n in range(6):  # alone: each its own flush
                await hand_off(n)
            async with anyio.create_task_group() as calls:
                for n in range(6, 30):
                    calls.start_soon(hand_off, n)
            nodes = await matriz.take(30)
            delivered: set[int] = set()
            ok = {n for n, r in replies.items() if msgspec.json.decode(r.data)["ok"]}
            with anyio.fail_after(10):
                async for env in target:
                    delivered.add(msgspec.json.decode(env.data)["ctx"]["step"])
                    if ok <= delivered:
                        break
            await service.stop()
            tg.cancel_scope.cancel()
    assert ok and all(n % 3 != 0 for n in ok)  # never a denied one
    assert {0, 3} <= set(replies) - ok and {1, 2, 4, 5} <= ok  # alone: as they are
    for n, reply in replies.items():
        if n not in ok:
            body = msgspec.json.decode(reply.data)
            assert body["error"]["code"] == "unavailable"
            assert reply.headers["Nats-Service-Error"].startswith("handoff to")
    assert in_place.count(True) == len(ok)  # every ok answered in place, nothing else
    contexts = [node for node in nodes if node["type"] == "CONTEXT"]
    by_trace = {node["provenance"]["trace_id"]: node["state"]["outcome"] for node in contexts}
    assert len(contexts) == len(by_trace) == 30
    assert by_trace == {traces[n]: "ok" if n in ok else "error" for n in replies}
