"""Checkpoint announcements share the checkpoint request subject, and nothing mistakes one
for the other.

The JetStream ledger announces each signed checkpoint on `lukhas.governance.consent.
checkpoint` (the note as text, no reply subject, header `Lukhas-Checkpoint: <size>`), the
subject the slice service answers checkpoint requests on. The endpoint is declared
read-only, so the service counts a message nobody awaits (`unawaited` in its stats) and does
not handle it: no failed request, no MATRIZ node, no log line. A watcher tells them apart by
the reply subject and the header, and verifies each note with the ledger's key.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import anyio
import msgspec
import pytest

from bus import Envelope
from lukhas import subjects
from lukhas.catalog import ENDPOINTS
from lukhas.testing import dry_run_settings, open_test_runtime
from lukhas.transparency.checkpoint import open_checkpoint
from lukhas.transparency.note import Verifier
from tests.candidate._support import Names, nats_bus, nats_settings, user
from tests.contract.test_replies import serving
from workers.service import discovery
from workers.service.bootstrap import unwire_providers
from workers.service.slices import SliceService


async def _stats(ask: Any) -> dict[str, dict[str, Any]]:
    reply = await ask(discovery.control_subject("STATS", subjects.SERVICE_NAME), b"")
    return {ep["subject"]: ep for ep in reply["endpoints"]}


def test_the_query_endpoints_are_read_only_and_the_writes_are_not() -> None:
    read_only = {ep.subject for ep in ENDPOINTS if ep.read_only}
    assert subjects.CONSENT_CHECKPOINT in read_only
    assert {subjects.CONSENT_RECORD, subjects.CONSENT_REVOKE, subjects.CONSENT_ERASE,
            subjects.PASSKEY_VERIFY, subjects.CONTEXT_HANDOFF}.isdisjoint(read_only)


async def test_a_message_nobody_awaits_is_counted_not_handled_on_a_read_only_endpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DRY_RUN: an announcement-like publish on the checkpoint and status subjects is not a
    request; a reply-less publish on a write subject is still carried out."""
    caplog.set_level(logging.DEBUG, logger="workers.service.slices")
    async with open_test_runtime(dry_run_settings()) as (runtime, matriz):
        service = SliceService(runtime)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            bus = runtime.bus

            async def ask(subject: str, body: Any) -> dict[str, Any]:
                data = body if isinstance(body, bytes) else msgspec.json.encode(body)
                reply = await bus.request(subject, data, timeout=5)
                return msgspec.json.decode(reply.data)  # type: ignore[no-any-return]

            note = b"origin\n3\nAAAA\n\n\xe2\x80\x94 origin sig\n"
            await bus.publish(subjects.CONSENT_CHECKPOINT, note,
                              headers={subjects.CHECKPOINT_HEADER: "3"})
            await bus.publish(subjects.CONSENT_STATUS, b'{"user_id":"usr_1","scope":"s"}')
            await bus.publish(subjects.CONSENT_RECORD, b'{"user_id":"usr_1","scope":"s"}')
            # Requests after them on the same subjects: answered after them, in order.
            assert (await ask(subjects.CONSENT_CHECKPOINT, {}))["reason"] == "no_ledger"
            assert (await ask(subjects.CONSENT_STATUS, {"user_id": "usr_1", "scope": "s"})
                    )["reason"] == "no_ledger"
            assert (await ask(subjects.CONSENT_RECORD, {"user_id": "usr_1", "scope": "s"})
                    )["ok"] is True
            stats = await _stats(ask)
            await service.stop()
        nodes = await matriz.take(4)
    checkpoint, status, record = (stats[s] for s in (
        subjects.CONSENT_CHECKPOINT, subjects.CONSENT_STATUS, subjects.CONSENT_RECORD))
    assert (checkpoint["num_requests"], checkpoint["num_errors"]) == (1, 0), checkpoint
    assert checkpoint["data"]["unawaited"] == 1 and status["data"]["unawaited"] == 1
    assert (status["num_requests"], status["num_errors"]) == (1, 0), status
    # A write published without a reply subject is still a request (fire and forget).
    assert record["num_requests"] == 2 and "unawaited" not in record["data"], record
    # One node per request handled: checkpoint 1, status 1, record 2; none for the others.
    assert len(nodes) == 4
    assert all(n["state"]["outcome"] != "error" for n in nodes), nodes
    # One log line per handled request (DEBUG), none for what was not handled.
    handled = [r.getMessage() for r in caplog.records if r.name == "workers.service.slices"
               and subjects.CONSENT_CHECKPOINT in r.getMessage()]
    assert len(handled) == 1 and "outcome=ok" in handled[0], handled


@pytest.mark.nats
async def test_the_ledger_announces_signed_checkpoints_on_the_request_subject(
    nats_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    names = Names(uuid.uuid4().hex[:10])
    settings = nats_settings(nats_url, feature_governance_ledger=True)
    uid = user()
    try:
        async with (
            nats_bus(nats_url, names) as bus,
            bus.subscribe(subjects.CONSENT_CHECKPOINT) as watcher,
            serving(settings, bus, names) as client,
        ):
            ask = client.ask
            recorded = await ask(subjects.CONSENT_RECORD, {"user_id": uid, "scope": "gmail"})
            assert recorded["ok"] is True, recorded
            # The writer hands its lease back after the record, with a signed checkpoint.
            announcements: list[Envelope] = []
            with anyio.fail_after(10):
                async for env in watcher:
                    if env.reply is None:
                        announcements.append(env)
                        break
            requested = await ask(subjects.CONSENT_CHECKPOINT, {})
            assert requested["ok"] is True, requested
            # The watcher sees the request too: a reply subject, a JSON body, no header.
            with anyio.fail_after(10):
                async for env in watcher:
                    if env.reply is not None:
                        assert subjects.CHECKPOINT_HEADER not in env.headers
                        assert msgspec.json.decode(env.data) == {}
                        break
                    announcements.append(env)
            with anyio.fail_after(10):
                while (await _stats(ask))[subjects.CONSENT_CHECKPOINT]["data"][
                        "unawaited"] < len(announcements):
                    pass
            stats = (await _stats(ask))[subjects.CONSENT_CHECKPOINT]
    finally:
        unwire_providers()
    verifier = Verifier.parse(requested["vkey"])
    sizes = []
    for env in announcements:
        cp = open_checkpoint(env.data, verifier)  # signed by the ledger key
        assert env.headers[subjects.CHECKPOINT_HEADER] == str(cp.size)
        sizes.append(cp.size)
    assert sizes[0] == 1 and requested["size"] >= 1, (sizes, requested)
    # Announcements are not requests: one request served, no error, no log.
    assert (stats["num_requests"], stats["num_errors"]) == (1, 0), stats
    assert stats["data"]["unawaited"] >= 1, stats
    assert [r for r in caplog.records if r.name.startswith("workers.")] == []
