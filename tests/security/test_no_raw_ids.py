"""No raw user id in any subject, MATRIZ node, log line or stored JetStream byte.

A scripted session (consent record/revoke/status/history/verify, passkey registration and
login with a software authenticator, a replay, a handoff, and bad requests carrying the id)
runs with ids like `usr_secret_<hex>` against the real providers, twice: in process (every
log record at DEBUG captured) and as `lukhas worker` child processes (their stderr at
DEBUG). A `>` monitor sees every message on the server: no subject holds a raw id, and neither
does any payload except the caller's own requests (the wire contract takes `user_id`) and
the replies to them (on `_INBOX.` subjects): no MATRIZ node, ledger record, KV write,
handoff or JetStream API call. Last, the server's
JetStream store directory is scanned byte by byte.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from bus import Bus, NatsServer, Subscription, open_nats_bus
from lukhas import subjects
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.runtime import open_runtime
from tests.candidate._support import (
    LEDGER_SIGNING_KEY,
    LEDGER_WRAPPING_KEY,
    Names,
    nats_bus,
    nats_settings,
)
from tests.candidate.authenticator import SoftAuthenticator
from tests.faults._harness import lukhas_worker, request_json
from workers.service.bootstrap import unwire_providers, wire_providers
from workers.service.slices import SliceService

pytestmark = pytest.mark.nats

logger = logging.getLogger(__name__)

PSEUDONYM_KEY = "no-raw-ids-pseudonym-key-0123456789abcdef"


_REQUEST_SUBJECTS = frozenset({
    subjects.CONSENT_RECORD, subjects.CONSENT_REVOKE, subjects.CONSENT_STATUS,
    subjects.CONSENT_HISTORY, subjects.CONSENT_VERIFY, subjects.PASSKEY_VERIFY,
    subjects.PASSKEY_REGISTER_OPTIONS, subjects.PASSKEY_REGISTER_VERIFY,
    subjects.PASSKEY_CHALLENGE, subjects.CONTEXT_HANDOFF,
})


def secret_user() -> str:
    return f"usr_secret_{secrets.token_hex(6)}"


@dataclass
class Seen:
    """Every message on the server while the session runs."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)

    def leaks(self, raw_ids: list[str]) -> list[str]:
        found = []
        for subject, data in self.messages:
            for uid in raw_ids:
                if uid in subject:
                    found.append(f"subject {subject!r}")
                # Requests carry the id by contract and replies go back to the caller who
                # sent it; nothing else may hold it (MATRIZ, ledger, KV, handoffs, the API).
                private = subject in _REQUEST_SUBJECTS or subject.startswith("_INBOX.")
                if not private and uid.encode() in data:
                    found.append(f"payload on {subject!r}: {data[:200]!r}")
        return found

    def matriz_nodes(self) -> list[dict[str, Any]]:
        return [json.loads(d) for s, d in self.messages if s.startswith("matriz.")]


async def _record(sub: Subscription, seen: Seen) -> None:
    async for env in sub:
        seen.messages.append((env.subject, env.data))


@asynccontextmanager
async def watching(url: str) -> AsyncIterator[Seen]:
    """A `>` subscription on its own connection, recording until the block ends."""
    seen = Seen()
    async with (
        open_nats_bus(url) as bus,
        bus.subscribe(">", max_pending=1_000_000) as everything,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_record, everything, seen)
        yield seen
        await bus.flush()
        tg.cancel_scope.cancel()


async def scripted_session(bus: Bus, uid: str, other: str) -> dict[str, Any]:
    """Everything a user does, plus bad requests that carry the raw id."""

    async def ask(subject: str, body: Any, **headers: str) -> dict[str, Any]:
        reply = await bus.request(
            subject, json.dumps(body).encode(), headers=headers or None, timeout=10
        )
        return json.loads(reply.data)

    out: dict[str, Any] = {}
    out["record"] = await ask(subjects.CONSENT_RECORD, {
        "user_id": uid, "scope": "gmail.read", "idempotency_key": f"{uid}:1",
        "metadata": {"channel": "web"},
    }, traceparent=f"00-{uid}-00-01")
    out["again"] = await ask(subjects.CONSENT_RECORD, {  # a true retry: the same body
        "user_id": uid, "scope": "gmail.read", "idempotency_key": f"{uid}:1",
        "metadata": {"channel": "web"},
    })
    out["revoke"] = await ask(subjects.CONSENT_REVOKE, {"user_id": uid, "scope": "gmail.read"})
    out["status"] = await ask(subjects.CONSENT_STATUS, {"user_id": uid, "scope": "gmail.read"})
    out["history"] = await ask(subjects.CONSENT_HISTORY, {"user_id": uid})
    out["verify"] = await ask(subjects.CONSENT_VERIFY, {"user_id": uid})

    authn = SoftAuthenticator()
    options = await ask(subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": uid})
    out["register"] = await ask(subjects.PASSKEY_REGISTER_VERIFY, {
        "user_id": uid, "credential": authn.create(options["options"]),
    })
    challenge = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": uid})
    assertion = authn.get(challenge["options"])
    out["login"] = await ask(subjects.PASSKEY_VERIFY, assertion)
    out["replay"] = await ask(subjects.PASSKEY_VERIFY, assertion)
    theirs = await ask(subjects.PASSKEY_CHALLENGE, {"user_id": other})
    out["crossed"] = await ask(subjects.PASSKEY_VERIFY, authn.get(theirs["options"]))
    out["handoff"] = await ask(subjects.CONTEXT_HANDOFF, {
        "ctx": {"step": 1}, "target": "planner", "source": "app",
    })

    # Bad input that carries the raw id somewhere.
    out["bad_scope"] = await ask(subjects.CONSENT_RECORD, {"user_id": uid, "scope": f"{uid} *"})
    out["bad_metadata"] = await ask(subjects.CONSENT_RECORD,
                                    {"user_id": uid, "scope": "s", "metadata": uid})
    out["too_long"] = await ask(subjects.CONSENT_STATUS, {"user_id": uid * 30, "scope": "s"})
    out["bad_credential"] = await ask(subjects.PASSKEY_REGISTER_VERIFY,
                                      {"user_id": uid, "credential": {"id": uid}})
    out["bad_assertion"] = await ask(subjects.PASSKEY_VERIFY,
                                     {"id": uid, "rawId": uid, "type": uid})
    out["bad_target"] = await ask(subjects.CONTEXT_HANDOFF, {"ctx": {}, "target": uid + ".>"})
    out["wildcard_user"] = await ask(subjects.CONSENT_HISTORY, {"user_id": uid + ".*.>"})
    return out


def check_session(out: dict[str, Any]) -> None:
    """The session did what it should (so the absence of leaks means something)."""
    assert out["record"]["ok"] is True and out["record"]["provider"] == "jetstream", out["record"]
    assert out["again"]["duplicate"] is True
    assert out["status"]["status"] == "revoked"
    assert len(out["history"]["records"]) == 2
    assert out["verify"]["valid"] is True
    assert out["register"]["ok"] is True, out["register"]
    assert out["login"]["ok"] is True, out["login"]
    assert out["replay"]["reason"] == "challenge_reused"
    assert out["crossed"]["reason"] == "invalid_assertion"
    assert out["handoff"]["ok"] is True, out["handoff"]
    for name in ("bad_scope", "bad_metadata", "too_long", "bad_target"):
        assert out[name]["error"]["code"] == "invalid_request", out[name]
    assert out["bad_credential"]["ok"] is False and out["bad_assertion"]["ok"] is False


def check_nodes(seen: Seen, raw_ids: list[str], pseudonyms: list[str]) -> int:
    nodes = seen.matriz_nodes()
    assert len(nodes) >= 20, len(nodes)
    tagged = {n["provenance"].get("subject_pseudonym") for n in nodes} - {None}
    assert set(pseudonyms) <= tagged  # the nodes are linked to the user, by pseudonym only
    assert all(p.startswith("psn_") for p in tagged)
    return len(nodes)


def scan_store(store: str | None, raw_ids: list[str]) -> int:
    """Bytes of every file under the JetStream store; fail on any raw id."""
    assert store is not None
    scanned = 0
    for path in Path(store).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            scanned += len(data)
            leaked = [uid for uid in raw_ids if uid.encode() in data]
            assert not leaked, f"{path} holds raw id(s) {leaked}"
    return scanned


async def test_no_raw_id_in_process_logs_subjects_nodes_or_store(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    uid, other = secret_user(), secret_user()
    names = Names(secrets.token_hex(5))
    settings = nats_settings(
        nats_server.url, pseudonym_key=PSEUDONYM_KEY, feature_governance_ledger=True,
        feature_identity_passkey=True, feature_orchestration_handoff=True,
    )
    unwire_providers()
    try:
        async with (
            watching(nats_server.url) as seen,
            nats_bus(nats_server.url, names) as bus,
            open_runtime(settings, bus=bus) as runtime,
        ):
            await wire_providers(runtime, ledger_options=names.ledger_options(),
                                 passkey_options=names.passkey_options())
            service = SliceService(runtime, concurrency=8)
            async with anyio.create_task_group() as tg:
                await tg.start(service.run)
                # A second user, so a challenge can be issued to someone else.
                await request_json(bus, subjects.PASSKEY_CHALLENGE, {"user_id": other})
                out = await scripted_session(bus, uid, other)
                await runtime.emitter.flush()
                await service.stop()
            scanned = scan_store(nats_server.store_dir, [uid, other])
    finally:
        unwire_providers()
    check_session(out)
    raw_ids = [uid, other]
    assert not seen.leaks(raw_ids), seen.leaks(raw_ids)[:10]
    nodes = check_nodes(seen, raw_ids, [Pseudonymizer(PSEUDONYM_KEY)(uid)])
    lines = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    leaked = [line for line in lines for u in raw_ids if u in line]
    assert not leaked, leaked[:10]
    assert len(lines) > 20 and scanned > 0
    logger.warning(
        "no raw ids (in process): %d messages (%d subjects), %d MATRIZ nodes, %d log records, "
        "%d store bytes: 0 leaks", len(seen.messages), len({s for s, _ in seen.messages}),
        nodes, len(lines), scanned,
    )


async def test_no_raw_id_in_worker_stderr_subjects_nodes_or_store(tmp_path: Path) -> None:
    uid, other = secret_user(), secret_user()
    server = NatsServer(store_dir=tmp_path / "js")
    await anyio.to_thread.run_sync(server.start)
    try:
        env = {
            "NATS_URL": server.url, "LUKHAS_LOG_LEVEL": "DEBUG",
            "LUKHAS_PSEUDONYM_KEY": PSEUDONYM_KEY, "LUKHAS_METRICS_PORT": "0",
            "FEATURE_GOVERNANCE_LEDGER": "true", "FEATURE_IDENTITY_PASSKEY": "true",
            "LUKHAS_LEDGER_SIGNING_KEY": LEDGER_SIGNING_KEY,
            "LUKHAS_LEDGER_WRAPPING_KEY": LEDGER_WRAPPING_KEY,
            "FEATURE_ORCHESTRATION_HANDOFF": "true",
        }
        async with (
            watching(server.url) as seen,
            lukhas_worker("slices", env) as slices,
            lukhas_worker("observability", env) as observability,
            open_nats_bus(server.url) as bus,
        ):
            await request_json(bus, subjects.PASSKEY_CHALLENGE, {"user_id": other})
            out = await scripted_session(bus, uid, other)
            # Graceful stops flush every log line and MATRIZ node.
            for proc in (slices, observability):
                proc.signal(signal.SIGTERM)
                assert await anyio.to_thread.run_sync(proc.wait, 30.0) == 0
        scanned = scan_store(server.store_dir, [uid, other])
        server_log = server.log_tail(10_000)
    finally:
        await anyio.to_thread.run_sync(server.stop)
    check_session(out)
    raw_ids = [uid, other]
    assert not seen.leaks(raw_ids), seen.leaks(raw_ids)[:10]
    nodes = check_nodes(seen, raw_ids, [Pseudonymizer(PSEUDONYM_KEY)(uid)])
    lines = slices.stderr + observability.stderr + server_log.splitlines()
    assert sum("DEBUG" in line for line in slices.stderr) > 10  # the log really was verbose
    leaked = [line for line in lines for u in raw_ids if u in line]
    assert not leaked, leaked[:10]
    assert scanned > 0
    logger.warning(
        "no raw ids (workers): %d messages (%d subjects), %d MATRIZ nodes, %d log lines, "
        "%d store bytes: 0 leaks", len(seen.messages), len({s for s, _ in seen.messages}),
        nodes, len(lines), scanned,
    )
