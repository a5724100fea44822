"""Reply subjects under deploy/nats-server.conf: the slice service answers only inboxes.

NATS does not check the reply subject a requester names, and `allow_responses` lets the
responder publish there, so a client could make a slice worker publish on a subject the
client itself may not (an SLO alert, another worker's inbox). The first test shows the
server really lets a naive responder do that; the second that the slice service refuses.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import pytest

from bus import connect
from lukhas import subjects
from lukhas.runtime import open_runtime
from tests.security.test_nats_auth import AuthServer, round_trip, start_deploy_server, watched
from workers.service.slices import SliceService

pytestmark = pytest.mark.nats

FORGED_REPLIES = (
    "lukhas.observability.alerts.CONSENT.governance.record",
    "_INBOX_observability.forged",
    "_INBOX_slices.forged",
)


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    server = start_deploy_server(tmp_path_factory.mktemp("reply-nats"))
    try:
        yield server
    finally:
        server.server.stop()


class Received(list[list[bytes]]):
    """What each victim received; `both_workers` is set once both workers' inboxes got one."""

    def __init__(self) -> None:
        super().__init__([[], [], []])
        self.both_workers = anyio.Event()


@asynccontextmanager
async def victims(auth: AuthServer) -> AsyncIterator[Received]:
    """Who would receive a forged reply: a client on alerts, the two workers' inboxes."""
    received = Received()
    listeners = [
        (await watched(auth, "client"), "lukhas.observability.alerts.>"),
        (await watched(auth, "observability"), "_INBOX_observability.>"),
        (await watched(auth, "slices"), "_INBOX_slices.>"),
    ]
    try:
        for i, (w, subject) in enumerate(listeners):
            async def keep(msg: object, i: int = i) -> None:
                received[i].append(msg.data)  # type: ignore[attr-defined]
                if received[1] and received[2]:
                    received.both_workers.set()

            await w.nc.subscribe(subject, cb=keep)
            await round_trip(w.nc)
        yield received
        for w, _ in listeners:
            await round_trip(w.nc)
    finally:
        for w, _ in listeners:
            await w.nc.close()


async def test_the_server_lets_a_naive_responder_answer_any_reply_subject(
    auth: AuthServer,
) -> None:
    naive = await watched(auth, "slices")
    client = await watched(auth, "client")
    try:
        async def answer(msg: object) -> None:
            await naive.nc.publish(msg.reply, b'{"forged":true}')  # type: ignore[attr-defined]

        await naive.nc.subscribe("lukhas.governance.consent.naive", cb=answer)
        await round_trip(naive.nc)
        async with victims(auth) as received:
            for reply in FORGED_REPLIES:
                await client.nc.publish("lukhas.governance.consent.naive", b"{}", reply=reply)
            await round_trip(client.nc)
            with anyio.fail_after(10):
                await received.both_workers.wait()
                while not received[0]:  # the client's own connection: poll its round trips
                    await round_trip(naive.nc)
    finally:
        await naive.nc.close()
        await client.nc.close()
    assert list(received) == [[b'{"forged":true}']] * 3


async def test_the_slice_service_answers_only_requester_inboxes(auth: AuthServer) -> None:
    settings = auth.settings("slices", dry_run=True)
    client = await watched(auth, "client")
    try:
        async with (
            connect(settings) as bus,
            open_runtime(settings, bus=bus) as runtime,
            victims(auth) as received,
        ):
            service = SliceService(runtime, concurrency=4)
            async with anyio.create_task_group() as tg:
                await tg.start(service.run)
                body = json.dumps({"user_id": "usr_reply", "scope": "s"}).encode()
                for reply in FORGED_REPLIES:
                    await client.nc.publish(subjects.CONSENT_RECORD, body, reply=reply)
                    # A reply subject of its own: nats-server allows no response at all to a
                    # subject two requests named (seen with nats-server 2.10+).
                    await client.nc.publish(f"$SRV.PING.{subjects.SERVICE_NAME}", b"",
                                            reply=reply + "-ping")
                # Answered after the forged ones (the same lane, in order).
                legit = await client.nc.request(subjects.CONSENT_RECORD, body, timeout=10)
                ping = await client.nc.request(f"$SRV.PING.{subjects.SERVICE_NAME}", b"",
                                               timeout=10)
                # The discovery answers to the workers' inboxes (allowed, see below) arrive
                # through nats-py callbacks; once they are in, every forged reply has had
                # its chance to arrive too.
                with anyio.fail_after(10):
                    await received.both_workers.wait()
                stats = service.statistics()
                await service.stop()
    finally:
        await client.nc.close()
    assert json.loads(legit.data)["ok"] is True
    assert json.loads(ping.data)["id"] == service.identity.id
    # Discovery answers any inbox, the workers' own too: `lukhas health` runs as them.
    assert received[0] == []
    assert [json.loads(m)["type"] for m in received[1] + received[2]] == [
        "io.nats.micro.v1.ping_response"] * 2
    assert stats.refused_replies == len(FORGED_REPLIES) + 1
    assert client.violations() == []


async def test_the_observability_stats_responder_answers_only_requester_inboxes(
    auth: AuthServer,
) -> None:
    from workers.service.observability import ObservabilityWorker

    settings = auth.settings("observability", dry_run=True)
    client = await watched(auth, "client")
    try:
        async with connect(settings) as bus, victims(auth) as received:
            worker = ObservabilityWorker(bus, settings, metrics_port=None)
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                for reply in FORGED_REPLIES:
                    await client.nc.publish(subjects.OBSERVABILITY_STATS, b"", reply=reply)
                # Answered after the forged ones (one subscription, in order).
                legit = await client.nc.request(subjects.OBSERVABILITY_STATS, b"", timeout=10)
                stats = worker.statistics()
                await worker.stop()
    finally:
        await client.nc.close()
    snapshot_keys = set(json.loads(legit.data))
    assert snapshot_keys
    # The worker's own inbox also carries its JetStream API answers: no stats snapshot there.
    assert received[0] == [] and received[2] == []
    assert not [m for m in received[1]
                if m and snapshot_keys <= set(json.loads(m))], "a forged reply was answered"
    assert stats.refused_replies == len(FORGED_REPLIES)
    assert stats.stats_requests == 1
    assert client.violations() == []
