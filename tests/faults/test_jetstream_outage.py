"""JetStream goes away under the consent ledger: every ledger request gets `unavailable`.

The server is killed and replaced, on the same port, by one without JetStream: core NATS is
back (the service reconnects and answers), but the ledger's stream cannot be reached. That
is what clients meet during a JetStream leader election or a lost quorum, made
deterministic. The reply must be the clear, retryable `unavailable` within the request's
deadline, not `internal` (which means a bug and logs a traceback).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from bus import NatsServer, open_nats_bus
from bus.server import free_port
from lukhas import subjects
from lukhas.runtime import open_runtime
from tests.candidate._support import nats_settings
from tests.nats_servers import FaultServer
from workers.service.bootstrap import unwire_providers, wire_providers
from workers.service.slices import SliceService

pytestmark = pytest.mark.nats

LEDGER_REQUESTS = [
    (subjects.CONSENT_RECORD, {"user_id": "usr_outage", "scope": "s", "idempotency_key": "k2"}),
    (subjects.CONSENT_REVOKE, {"user_id": "usr_outage", "scope": "s"}),
    (subjects.CONSENT_STATUS, {"user_id": "usr_outage", "scope": "s"}),
    (subjects.CONSENT_HISTORY, {"user_id": "usr_outage"}),
    (subjects.CONSENT_VERIFY, {"user_id": "usr_outage"}),
]


async def test_ledger_requests_without_jetstream_are_unavailable_not_internal(
    tmp_path: Path,
) -> None:
    port = free_port()
    with_js = FaultServer(port, store_dir=tmp_path / "js")
    without_js = NatsServer(port, jetstream=False)
    await anyio.to_thread.run_sync(with_js.start)
    replies: list[tuple[str, dict, float]] = []
    unwire_providers()
    try:
        async with open_nats_bus(with_js.url, reconnect_wait=0.05) as bus:
            settings = nats_settings(with_js.url, feature_governance_ledger=True)
            async with open_runtime(settings, bus=bus) as runtime:
                await wire_providers(runtime, ledger_options={"timeout_s": 1.0})
                service = SliceService(runtime, concurrency=4)
                async with anyio.create_task_group() as tg:
                    await tg.start(service.run)
                    body = {"user_id": "usr_outage", "scope": "s", "idempotency_key": "k1"}
                    first = await bus.request(subjects.CONSENT_RECORD,
                                              json.dumps(body).encode(), timeout=5)
                    assert json.loads(first.data)["ok"] is True

                    await anyio.to_thread.run_sync(with_js.kill)
                    await anyio.to_thread.run_sync(without_js.start)
                    with anyio.fail_after(10):
                        await bus.wait_reconnected(1)
                    for subject, body in LEDGER_REQUESTS:
                        started = time.monotonic()
                        reply = await bus.request(subject, json.dumps(body).encode(), timeout=5)
                        replies.append((subject, json.loads(reply.data),
                                        time.monotonic() - started))
                    await service.stop()
    finally:
        unwire_providers()
        await anyio.to_thread.run_sync(without_js.stop)
        await anyio.to_thread.run_sync(with_js.stop)
    for subject, reply, elapsed in replies:
        assert reply["ok"] is False, (subject, reply)
        assert reply["error"]["code"] == "unavailable", (subject, reply)
        assert elapsed < 5, (subject, elapsed)
