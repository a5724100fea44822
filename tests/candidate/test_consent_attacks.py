"""The consent ledger played as an attacker would, against a real nats-server.

Each test makes the move that used to work (issue 10) and asserts it is refused or detected,
and that the legitimate path still works:

* one trace, several writes: a withdrawal was deduplicated away by the trace id;
* an idempotency key reused for another request was silently deduplicated;
* an insider edited the `consent_state` KV (revoked -> granted) and `status` believed it;
* a revoke of a scope never granted was recorded as if it withdrew something;
* an insider weakened the ledger stream (`max_age`, `deny_purge`) and workers served on it;
* a pseudonym key rotation orphaned every consent history.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from bus.server import NatsServer
from candidate.governance.consent_ledger import _state
from candidate.governance.consent_ledger.errors import LedgerStreamWeakened
from candidate.governance.consent_ledger.jetstream_ledger import (
    JetStreamConsentLedger,
    LedgerOptions,
)
from lukhas import subjects
from lukhas.governance.consent_ledger import registry as consent_registry
from lukhas.governance.consent_ledger.api import (
    consent_status,
    record_consent,
    revoke_consent,
    verify_consent_chain,
)
from lukhas.governance.consent_ledger.messages import ConsentEntry
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.runtime import Runtime
from tests.candidate._support import (
    LEDGER_SIGNER,
    LEDGER_SIGNING_KEY,
    LEDGER_WRAPPING_KEY,
    PSEUDONYM_KEY,
    Names,
    Stack,
    nats_bus,
    user,
)
from workers.service.bootstrap import wire_providers
from workers.service.slices import SliceService

pytestmark = pytest.mark.nats

#: The same ledger keys for every provider a test builds (as workers share configuration).
KEYS: dict[str, Any] = {"signer": LEDGER_SIGNER, "wrapping_key": b"w" * 32}

REPO = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def serving(runtime: Runtime) -> AsyncIterator[None]:
    """The slice service on the runtime's bus, so requests go over the wire."""
    service = SliceService(runtime, concurrency=4)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        try:
            yield
        finally:
            await service.stop()


async def ask(runtime: Runtime, subject: str, body: dict[str, Any], **headers: str) -> Any:
    reply = await runtime.bus.request(
        subject, json.dumps(body).encode(), headers=headers or None, timeout=10
    )
    return json.loads(reply.data)


def traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


# -- a withdrawal is never lost ------------------------------------------------------------


async def test_one_trace_grant_revoke_grant_and_revoke_grant_revoke(wired: Stack) -> None:
    """Before: the trace id was the dedupe key, so the third write of a trace answered ok and
    was dropped (status `granted` after the user revoked). After: keyless = a new request."""
    uid = user()
    async with wired(ledger=True) as (runtime, _), serving(runtime):
        trace = traceparent()
        body = {"user_id": uid, "scope": "gmail.read"}
        seqs = []
        for subject in (subjects.CONSENT_RECORD, subjects.CONSENT_REVOKE, subjects.CONSENT_RECORD):
            reply = await ask(runtime, subject, body, traceparent=trace)
            assert reply["ok"] is True and reply["duplicate"] is False, reply
            assert reply["entry"]["trace_id"] == trace.split("-")[1]
            seqs.append(reply["seq"])
        assert seqs == sorted(set(seqs))
        status = await ask(runtime, subjects.CONSENT_STATUS, body)
        assert status["status"] == "granted" and status["seq"] == seqs[-1]

        trace = traceparent()  # the other order, on a scope granted earlier
        other = {"user_id": uid, "scope": "drive.read"}
        assert (await ask(runtime, subjects.CONSENT_RECORD, other))["ok"] is True
        for subject in (subjects.CONSENT_REVOKE, subjects.CONSENT_RECORD, subjects.CONSENT_REVOKE):
            reply = await ask(runtime, subject, other, traceparent=trace)
            assert reply["ok"] is True and reply["duplicate"] is False, reply
        status = await ask(runtime, subjects.CONSENT_STATUS, other)
        assert status["status"] == "revoked"

        history = await ask(runtime, subjects.CONSENT_HISTORY, {"user_id": uid})
        assert [r["action"] for r in history["records"]] == [
            "grant", "revoke", "grant", "grant", "revoke", "grant", "revoke"
        ]
        assert (await ask(runtime, subjects.CONSENT_VERIFY, {"user_id": uid}))["valid"] is True


async def test_a_true_retry_is_a_duplicate_and_a_reused_key_is_a_conflict(wired: Stack) -> None:
    """Before: a key reused for another body (or, scoped by action and scope, silently for a
    different metadata) was deduplicated into the original. After: `idempotency_conflict`."""
    uid = user()
    async with wired(ledger=True) as (runtime, _), serving(runtime):
        grant = {"user_id": uid, "scope": "gmail.read", "metadata": {"purpose": "inbox"},
                 "idempotency_key": "k-1"}
        first = await ask(runtime, subjects.CONSENT_RECORD, grant)
        retry = await ask(runtime, subjects.CONSENT_RECORD, grant, traceparent=traceparent())
        assert first["duplicate"] is False and retry["duplicate"] is True
        assert retry["seq"] == first["seq"] and retry["entry"] == first["entry"]

        reused = [
            (subjects.CONSENT_RECORD, {**grant, "metadata": {"purpose": "ads"}}),
            (subjects.CONSENT_RECORD, {**grant, "metadata": {}}),
            (subjects.CONSENT_RECORD, {**grant, "scope": "drive.read"}),
            (subjects.CONSENT_REVOKE, {"user_id": uid, "scope": "gmail.read",
                                       "idempotency_key": "k-1"}),
        ]
        for subject, body in reused:
            reply = await ask(runtime, subject, body)
            assert reply["ok"] is False, (body, reply)
            assert reply["error"]["code"] == "idempotency_conflict", reply
            assert f"seq {first['seq']}" in reply["error"]["message"]
            assert uid not in reply["error"]["message"]

        # Nothing was recorded by the conflicts; the user's real revoke (a new key) is.
        revoked = await ask(runtime, subjects.CONSENT_REVOKE,
                            {"user_id": uid, "scope": "gmail.read", "idempotency_key": "k-2"})
        assert revoked["ok"] is True and revoked["duplicate"] is False
        history = await ask(runtime, subjects.CONSENT_HISTORY, {"user_id": uid})
        assert [r["seq"] for r in history["records"]] == [first["seq"], revoked["seq"]]
        status = await ask(runtime, subjects.CONSENT_STATUS,
                           {"user_id": uid, "scope": "gmail.read"})
        assert status["status"] == "revoked"
        # Another user's identical key is their own request.
        theirs = await ask(runtime, subjects.CONSENT_RECORD, {**grant, "user_id": user()})
        assert theirs["ok"] is True and theirs["duplicate"] is False


# -- state cannot drift from the ledger ----------------------------------------------------


@pytest.mark.parametrize("edit", ["revoked_to_granted", "seq_ahead", "deleted", "garbage"])
async def test_an_insider_edit_of_the_state_kv_is_not_believed(
    wired: Stack, names: Names, nats_url: str, edit: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: `status` answered from the KV, so a revoked -> granted edit was believed.
    After: status answers from the stream and flags the mismatch; verify reports it."""
    uid = user()
    async with wired(ledger=True) as (runtime, _):
        granted = await record_consent(uid, "gmail.read")
        revoked = await revoke_consent(uid, "gmail.read")
        await record_consent(uid, "drive.read")
        clean = await verify_consent_chain(uid)
        assert clean["valid"] is True and clean["state_mismatches"] == []

        # The insider: a raw nats-py connection with KV write access.
        key = _state.key(runtime.pseudonymize(uid), "gmail.read")
        insider = await nats.connect(nats_url)
        try:
            kv = await insider.jetstream().key_value(names.state_bucket)
            current = msgspec.json.decode((await kv.get(key)).value)
            assert current["status"] == "revoked" and current["seq"] == revoked["seq"]
            if edit == "revoked_to_granted":
                await kv.put(key, json.dumps({**current, "status": "granted"}).encode())
            elif edit == "seq_ahead":  # a forged grant claiming to be newer than anything
                await kv.put(key, json.dumps({**current, "status": "granted", "seq": 10**9,
                                              "hash": granted["hash"]}).encode())
            elif edit == "deleted":
                await kv.delete(key)
            else:
                await kv.put(key, b"granted!")
        finally:
            await insider.close()

        with caplog.at_level("WARNING"):
            status = await consent_status(uid, "gmail.read")
        assert status["ok"] is True and status["status"] == "revoked"
        assert status["seq"] == revoked["seq"] and status["hash"] == revoked["hash"]
        assert status["state_mismatch"] is True
        expected_problem = {"revoked_to_granted": "status_differs", "seq_ahead": "state_ahead",
                            "deleted": "state_missing", "garbage": "state_malformed"}[edit]
        assert status["state_problem"] == expected_problem
        warnings = [r.getMessage() for r in caplog.records if "disagrees" in r.getMessage()]
        assert warnings and runtime.pseudonymize(uid) in warnings[0]
        assert all(uid not in w for w in warnings)
        # The untouched scope is still clean.
        assert "state_mismatch" not in await consent_status(uid, "drive.read")

        verdict = await verify_consent_chain(uid)
        assert verdict["valid"] is False and verdict["problem"] == "state_mismatch"
        assert "broken_at" not in verdict  # the chain itself is intact
        assert len(verdict["state_mismatches"]) == 1
        mismatch = verdict["state_mismatches"][0]
        assert mismatch["scope"] == "gmail.read" and mismatch["problem"] == expected_problem
        assert mismatch["ledger_seq"] == revoked["seq"] and mismatch["ledger_status"] == "revoked"
        assert mismatch["key_version"] == 0

        # The legitimate path repairs it: the single writer sets the state of the scope it
        # writes, over any forged value (reported by status and verify until then).
        regranted = await record_consent(uid, "gmail.read")
        status = await consent_status(uid, "gmail.read")
        assert status["status"] == "granted" and status["seq"] == regranted["seq"]
        assert "state_mismatch" not in status


async def test_a_state_key_forged_for_a_scope_never_recorded_is_reported(
    wired: Stack, names: Names, nats_url: str
) -> None:
    uid = user()
    async with wired(ledger=True) as (runtime, _):
        granted = await record_consent(uid, "gmail.read")
        forged = {"status": "granted", "ts": 1, "seq": granted["seq"], "hash": granted["hash"]}
        insider = await nats.connect(nats_url)
        try:
            kv = await insider.jetstream().key_value(names.state_bucket)
            await kv.put(_state.key(runtime.pseudonymize(uid), "bank.transfer"),
                         json.dumps(forged).encode())
        finally:
            await insider.close()
        status = await consent_status(uid, "bank.transfer")
        assert status["status"] == "none" and status["state_problem"] == "state_without_record"
        verdict = await verify_consent_chain(uid)
        assert verdict["valid"] is False
        assert [(m["scope"], m["problem"]) for m in verdict["state_mismatches"]] == [
            ("bank.transfer", "state_without_record")
        ]


# -- revoking what was never granted -------------------------------------------------------


async def test_revoking_what_was_never_granted_is_refused(wired: Stack) -> None:
    uid = user()
    async with wired(ledger=True) as (runtime, _), serving(runtime):
        body = {"user_id": uid, "scope": "gmail.read"}
        refused = await ask(runtime, subjects.CONSENT_REVOKE, body)
        assert refused == {
            **refused, "ok": False, "reason": "not_granted", "scope": "gmail.read",
        }
        assert (await ask(runtime, subjects.CONSENT_HISTORY, {"user_id": uid}))["records"] == []
        assert (await ask(runtime, subjects.CONSENT_STATUS, body))["status"] == "none"

        # Once granted, a revoke records; revoking again records again (nothing is lost).
        assert (await ask(runtime, subjects.CONSENT_RECORD, body))["ok"] is True
        assert (await ask(runtime, subjects.CONSENT_REVOKE, body))["ok"] is True
        again = await ask(runtime, subjects.CONSENT_REVOKE, body)
        assert again["ok"] is True and again["duplicate"] is False
        assert (await ask(runtime, subjects.CONSENT_STATUS, body))["status"] == "revoked"
        # Another scope of the same user is still never granted.
        other = await ask(runtime, subjects.CONSENT_REVOKE, {**body, "scope": "drive.read"})
        assert other["reason"] == "not_granted"


async def test_a_revoke_after_another_workers_grant_is_never_refused_by_a_stale_read(
    nats_url: str, names: Names
) -> None:
    """A worker that found no grant (and refused a revoke) hands the lease back; another
    worker grants; the first worker's next revoke must see that grant, never its old view."""
    uid = user()
    pseudonymize = Pseudonymizer(PSEUDONYM_KEY)
    options = LedgerOptions(**names.ledger_options())
    async with nats_bus(nats_url, names) as bus_a, nats_bus(nats_url, names) as bus_b:
        rival = JetStreamConsentLedger(bus_b, pseudonymize, options, **KEYS)
        ledger = JetStreamConsentLedger(bus_a, pseudonymize, options, **KEYS)
        await rival.ensure()
        await ledger.ensure()
        refused = await ledger.revoke(_entry(uid, "revoke"), idempotency_key=None)
        assert refused["ok"] is False and refused["reason"] == "not_granted"
        await ledger.aclose()
        granted = await rival.record(_entry(uid, "grant"), idempotency_key=None)
        revoked = await ledger.revoke(_entry(uid, "revoke"), idempotency_key=None)
        assert revoked["ok"] is True
        assert revoked["seq"] > granted["seq"] and revoked["prev_hash"] == granted["hash"]
        assert (await ledger.status(uid, "gmail.read"))["status"] == "revoked"
        # Both wrote into one tree, one after the other.
        assert (granted["index"], revoked["index"]) == (0, 1)


def _entry(uid: str, action: str, scope: str = "gmail.read") -> ConsentEntry:
    return ConsentEntry(
        trace_id=secrets.token_hex(16), ts=0, user_id=uid, scope=scope, metadata={},
        action=action,
    )


# -- a weakened stream is refused ----------------------------------------------------------


def _weak(names: Names, **weakened: Any) -> StreamConfig:
    protective: dict[str, Any] = {
        "retention": RetentionPolicy.LIMITS, "storage": StorageType.FILE,
        "discard": DiscardPolicy.NEW, "deny_delete": True, "deny_purge": True,
    }
    return StreamConfig(
        name=names.stream, subjects=[f"{names.subject_prefix}.*.*"], **(protective | weakened)
    )


async def test_a_stream_weakened_after_creation_is_refused_at_startup(
    wired: Stack, names: Names, nats_url: str
) -> None:
    """Before: an insider's `STREAM.UPDATE max_age=1s` erased the ledger while workers kept
    serving it. After: the next worker start refuses, naming the stream and the field."""
    uid = user()
    async with wired(ledger=True) as (runtime, _):
        await record_consent(uid, "gmail.read")
        insider = await nats.connect(nats_url)
        try:
            js = insider.jetstream()
            config = (await js.stream_info(names.stream)).config
            config.max_age, config.duplicate_window = 1.0, 1.0
            await js.update_stream(config)
        finally:
            await insider.close()
        consent_registry.reset()
        with pytest.raises(LedgerStreamWeakened) as caught:
            await wire_providers(runtime, ledger_options=names.ledger_options())
        assert caught.value.code == "ledger_stream_weakened"
        assert names.stream in str(caught.value) and "max_age=1.0" in str(caught.value)
        # Nothing serves the ledger: the registry answers with the null provider.
        assert consent_registry.get_provider(runtime.settings).name == "null"


@pytest.mark.parametrize(
    ("weakened", "field"),
    [
        ({"deny_purge": False}, "deny_purge=False"),
        ({"deny_delete": False}, "deny_delete=False"),
        ({"max_msgs_per_subject": 1}, "max_msgs_per_subject=1"),
        ({"retention": RetentionPolicy.INTEREST}, "retention='interest'"),
        ({"storage": StorageType.MEMORY}, "storage='memory'"),
        ({"discard": DiscardPolicy.OLD, "max_msgs": 10}, "discard='old'"),
    ],
)
async def test_a_stream_created_weak_by_an_insider_is_refused(
    nats_url: str, names: Names, weakened: dict[str, Any], field: str
) -> None:
    async with nats_bus(nats_url, names) as bus:
        await bus.jetstream().add_stream(_weak(names, **weakened))
        ledger = JetStreamConsentLedger(
            bus, Pseudonymizer(PSEUDONYM_KEY), LedgerOptions(**names.ledger_options())
        )
        with pytest.raises(LedgerStreamWeakened, match=field):
            await ledger.ensure()


async def test_the_protective_stream_passes_and_other_subjects_do_not(
    nats_url: str, names: Names
) -> None:
    async with nats_bus(nats_url, names) as bus:
        ledger = JetStreamConsentLedger(
            bus, Pseudonymizer(PSEUDONYM_KEY), LedgerOptions(**names.ledger_options())
        )
        await ledger.ensure()
        await ledger.ensure()  # an existing protective stream is accepted
        js = bus.jetstream()
        config = (await js.stream_info(names.stream)).config
        config.subjects = [*config.subjects, "lukhas.governance.consent.>"]
        await js.update_stream(config)  # capturing request subjects: clients answered by it
        with pytest.raises(LedgerStreamWeakened, match="subjects="):
            await ledger.ensure()


def test_the_slice_worker_refuses_to_start_on_a_weakened_ledger(tmp_path: Path) -> None:
    """The real `lukhas worker slices` process: a clear one-line error, a non-zero exit."""
    server = NatsServer(store_dir=tmp_path / "js")
    server.start()
    try:
        async def weaken() -> None:
            nc = await nats.connect(server.url)
            try:
                await nc.jetstream().add_stream(StreamConfig(
                    name="CONSENT_LEDGER", subjects=["lukhas.ledger.consent.*.*"],
                    retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                    discard=DiscardPolicy.NEW, deny_delete=True, deny_purge=False,
                    max_age=3600.0,
                ))
            finally:
                await nc.close()

        anyio.run(weaken)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LUKHAS_", "FEATURE_"))}
        env.update(NATS_URL=server.url, FEATURE_GOVERNANCE_LEDGER="true",
                   LUKHAS_PSEUDONYM_KEYS=secrets.token_hex(32), LUKHAS_METRICS_PORT="0",
                   LUKHAS_LEDGER_SIGNING_KEY=LEDGER_SIGNING_KEY,
                   LUKHAS_LEDGER_WRAPPING_KEY=LEDGER_WRAPPING_KEY)
        result = subprocess.run(
            [sys.executable, "-m", "workers.cli.main", "worker", "slices"],
            cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
        )
    finally:
        server.stop()
    assert result.returncode != 0, result.stdout + result.stderr
    assert "CONSENT_LEDGER" in result.stderr and "deny_purge=False" in result.stderr
    assert "max_age=3600.0" in result.stderr
    assert "Traceback" not in result.stderr


# -- pseudonym key rotation ----------------------------------------------------------------


async def test_history_survives_a_pseudonym_key_rotation(nats_url: str, names: Names) -> None:
    """Before: rotating the key orphaned every history. After: reads look under every key
    version, writes use the current one, and the newest record wins across versions."""
    uid = user()
    old_key, new_key = secrets.token_hex(32), secrets.token_hex(32)
    options = LedgerOptions(**names.ledger_options())
    async with nats_bus(nats_url, names) as bus:
        before = JetStreamConsentLedger(bus, Pseudonymizer(old_key), options, **KEYS)
        await before.ensure()
        gmail = await before.record(_entry(uid, "grant"), idempotency_key=None)
        await before.record(_entry(uid, "grant", "drive.read"), idempotency_key=None)
        await before.revoke(_entry(uid, "revoke", "drive.read"), idempotency_key=None)

        rotated = Pseudonymizer(new_key, previous=[old_key])
        after = JetStreamConsentLedger(bus, rotated, options, **KEYS)
        await after.ensure()
        status = await after.status(uid, "gmail.read")
        assert status["status"] == "granted" and status["seq"] == gmail["seq"]
        assert "state_mismatch" not in status
        assert (await after.status(uid, "drive.read"))["status"] == "revoked"

        # A revoke after the rotation (under the new key) withdraws the grant made before it,
        # and a grant after it overrides the revoke made before it.
        revoked = await after.revoke(_entry(uid, "revoke"), idempotency_key=None)
        assert revoked["ok"] is True and revoked["entry"]["action"] == "revoke"
        assert (await after.status(uid, "gmail.read"))["status"] == "revoked"
        regranted = await after.record(_entry(uid, "grant", "drive.read"), idempotency_key=None)
        assert (await after.status(uid, "drive.read"))["status"] == "granted"

        js = bus.jetstream()
        new_subject = f"{names.subject_prefix}.{rotated(uid)}.{_state.scope_token('gmail.read')}"
        assert (await js.get_last_msg(names.stream, new_subject)).seq == revoked["seq"]

        records = (await after.history(uid))["records"]
        assert [(r["action"], r["scope"]) for r in records] == [
            ("grant", "gmail.read"), ("grant", "drive.read"), ("revoke", "drive.read"),
            ("revoke", "gmail.read"), ("grant", "drive.read"),
        ]
        assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
        assert records[-1]["seq"] == regranted["seq"]
        verdict = await after.verify_chain(uid)
        assert verdict["valid"] is True and verdict["length"] == 5
        assert verdict["state_mismatches"] == []

        # Without the old key listed, the pre-rotation records are unreachable: the
        # `previous` keys are what keeps them.
        forgotten = JetStreamConsentLedger(bus, Pseudonymizer(new_key), options, **KEYS)
        await forgotten.ensure()
        assert len((await forgotten.history(uid))["records"]) == 2
