"""A canary that breaches its SLA is rolled back end to end, on a real nats-server.

The slice service and the observability worker run in-process on their own connections to
a nats-server with JetStream (MATRIZ reaches the worker through its durable consumer). A
deliberately broken "real" consent provider is registered with the flag off and a 50 %
canary share; the observability worker sees the canary arm fail (or run over the SLA),
publishes the rollback, every slice worker stops the canary, and every later call goes to
the baseline. No sleeps synchronise anything: the test waits on the rollback message and
on `$SRV.STATS` round trips.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import pytest

from bus import NatsServer, open_nats_bus
from bus.nats import NatsBus
from lukhas import subjects
from lukhas.config import Settings
from lukhas.errors import Unavailable
from lukhas.governance.consent_ledger.messages import ConsentEntry
from lukhas.governance.consent_ledger.registry import REGISTRY as CONSENT
from lukhas.runtime import open_runtime
from lukhas.testing import dry_run_settings
from workers.service import discovery
from workers.service._canary import Rollback
from workers.service.observability import ObservabilityWorker
from workers.service.slices import SliceService

pytestmark = pytest.mark.nats

USERS = 60
_rollback_decoder = msgspec.json.Decoder(Rollback)


class BrokenLedger:
    """The 'real' provider under test: every record fails, or takes longer than the SLA."""

    waits_on_io = True

    def __init__(self, mode: str) -> None:
        self.name = f"broken-{mode}"
        self.mode = mode
        self.records = 0

    async def record(self, entry: ConsentEntry, *, idempotency_key: str | None) -> dict[str, Any]:
        self.records += 1
        if self.mode == "failing":
            raise Unavailable("the new ledger is down")
        await anyio.sleep(0.08)  # the defect under test: 80 ms against a 50 ms p95 SLA
        return {"ok": True, "provider": self.name, "entry": {"user_id": entry.user_id}}


@pytest.fixture
def server(tmp_path: Any) -> Iterator[NatsServer]:
    srv = NatsServer(store_dir=tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def settings_for(url: str) -> Settings:
    return dry_run_settings(
        dry_run=False, offline=False, nats_url=url, pseudonym_key="p" * 40,
        canary_governance_ledger=50.0, canary_min_samples=10,
    )


async def record_all(client: NatsBus, prefix: str) -> list[dict[str, Any]]:
    """One consent record per user, all at once."""
    replies: list[dict[str, Any]] = []

    async def one(i: int) -> None:
        body = msgspec.json.encode({"user_id": f"{prefix}{i}", "scope": "email"})
        reply = await client.request(subjects.CONSENT_RECORD, body, timeout=10)
        replies.append(msgspec.json.decode(reply.data))

    async with anyio.create_task_group() as tg:
        for i in range(USERS):
            tg.start_soon(one, i)
    return replies


async def consent_canary_state(client: NatsBus) -> dict[str, Any]:
    reply = await client.request(
        discovery.control_subject("STATS", subjects.SERVICE_NAME), b"", timeout=5
    )
    stats = msgspec.json.decode(reply.data)
    [record] = [ep for ep in stats["endpoints"] if ep["subject"] == subjects.CONSENT_RECORD]
    return record["data"]["canary"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("mode", "reason"), [("failing", "error_rate"), ("slow", "latency")])
async def test_a_canary_breaching_its_sla_is_rolled_back_and_calls_return_to_baseline(
    server: NatsServer, mode: str, reason: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    settings = settings_for(server.url)
    broken = BrokenLedger(mode)
    CONSENT.register(broken)
    try:
        async with (
            open_nats_bus(server.url) as slice_bus,
            open_nats_bus(server.url) as observer_bus,
            open_nats_bus(server.url) as client,
            open_runtime(settings, bus=slice_bus, producer="slices") as runtime,
            client.subscribe(subjects.CANARY_ROLLBACK) as orders,
            anyio.create_task_group() as tg,
        ):
            observer = ObservabilityWorker(
                observer_bus, settings, metrics_port=None, check_interval_s=0.05,
                fetch_timeout_s=0.2,
            )
            service = SliceService(runtime, concurrency=64)
            await tg.start(observer.run)  # creates the MATRIZ stream before any node
            await tg.start(service.run)
            assert observer.source == "jetstream"
            assert (await consent_canary_state(client))["state"] == "running"

            before = await record_all(client, "usr_")
            canaried = sum(r.get("provider") == broken.name or "error" in r for r in before)
            assert 10 <= canaried < USERS  # both arms served, the canary enough to judge

            rollback = _rollback_decoder.decode((await orders.next(timeout=20)).data)
            with anyio.fail_after(10):  # every answer is a real $SRV.STATS round trip
                while (state := await consent_canary_state(client))["state"] != "rolled_back":
                    pass

            records_at_rollback = broken.records
            async with client.subscribe(f"{subjects.MATRIZ_PREFIX}.CONSENT.>") as nodes:
                after = await record_all(client, "usr_")
                labels = [msgspec.json.decode((await nodes.next(timeout=5)).data)["labels"]
                          for _ in range(USERS)]
            await service.stop()
            await observer.stop()
    finally:
        CONSENT.reset()

    assert rollback.slice == "lukhas.governance.consent_ledger"
    assert rollback.flag == "FEATURE_GOVERNANCE_LEDGER"
    assert rollback.variable == "LUKHAS_CANARY_GOVERNANCE_LEDGER"
    assert rollback.emit_point == "CONSENT:governance:record"
    assert rollback.reason == reason and rollback.sla_p95_ms == 50.0
    assert rollback.canary.count >= 10
    if mode == "failing":
        assert rollback.canary.error_rate > rollback.baseline.error_rate + 0.05
    else:
        assert rollback.canary.p95_ms > 50.0 > rollback.baseline.p95_ms
    # The slice service says so in $SRV.STATS...
    assert state["percent"] == 0.0 and state["configured_percent"] == 50.0
    assert state["rollback"]["reason"] == reason
    # ...every call afterwards goes to the baseline, and the nodes say so...
    assert broken.records == records_at_rollback
    assert all(r["ok"] is True and r["provider"] == "null" for r in after)
    assert all("arm:baseline" in x and "canary:rolled_back" in x for x in labels)
    # ...and so do the logs, on both sides.
    logged = [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
    assert any("LUKHAS_CANARY_GOVERNANCE_LEDGER of lukhas.governance" in m for m in logged)
    assert any("every call now goes to the baseline" in m for m in logged)
