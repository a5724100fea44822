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

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from bus import NatsServer, PermissionDenied, open_nats_bus
from lukhas import subjects
from lukhas.testing import dry_run_settings, open_test_runtime
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


async def test_a_refused_handoff_is_unavailable_never_ok(server: NatsServer) -> None:
    """Denied and allowed handoffs interleaved, 40 at once: no denied one is ever `ok`, and
    the allowed ones reach their target; alone, an allowed handoff is `ok` and a denied one
    `unavailable` with the error headers."""
    async with (
        open_nats_bus(server.url, user="service", password="servicepw") as service_bus,
        open_nats_bus(server.url, user="client", password="clientpw") as client,
        open_test_runtime(dry_run_settings(), bus=service_bus) as (runtime, _),
        client.subscribe("lukhas.context.allowed") as target,
    ):
        service = SliceService(runtime, concurrency=2)
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
