"""The permission model of deploy/nats-server.conf, attacked with its own users.

One nats-server runs the shipped config (random passwords in its environment, as compose
passes them); the slice and observability workers run as their users with every real
provider on (ledger, WebAuthn passkeys, durable handoffs) and DRY_RUN off. Then:

* the workers' whole job runs end to end with nothing refused (the guard for later
  changes: a JetStream call a worker needs but the config denies fails this test, and
  the worker's log names the subject);
* each user reads only its own inbox prefix, yet every reply still arrives;
* the JetStream API refuses what no worker needs: updating, deleting or purging a stream,
  creating a stream over a request subject or sourcing MATRIZ, reading MATRIZ;
* handoff contexts reach only the consumer user of their target;
* a refusal is a `PermissionDenied` at once on the bus (and a non-zero exit from the CLI),
  never a wait. (The in-memory bus has no users, so this is NATS-only.)

A refusal is seen in the server's `-ERR 'Permissions Violation ...'`, which arrives before
the PONG of a flush, and in the state the server reports afterwards (monitoring `/jsz`).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import nats.errors
import pytest
from nats.js.api import StreamConfig, StreamSource
from nats.js.errors import APIError

from bus import Bus, PermissionDenied, connect
from lukhas import subjects
from tests.candidate.authenticator import SoftAuthenticator
from tests.faults._harness import request_json, stats
from tests.integration.processes import REPO, LukhasProcess
from tests.security.test_nats_auth import (
    FULL_FLAGS,
    USERS,
    AuthServer,
    _clean_env,
    round_trip,
    start_deploy_server,
    watched,
)

pytestmark = pytest.mark.nats

LEDGER = "CONSENT_LEDGER"


@dataclass
class Deployed:
    auth: AuthServer
    slices: LukhasProcess
    observability: LukhasProcess

    def streams(self) -> dict[str, dict[str, Any]]:
        """Every stream on the server, by name, as the monitoring endpoint reports it."""
        url = f"http://127.0.0.1:{self.auth.monitor_port}/jsz?streams=true&config=true"
        with urllib.request.urlopen(url, timeout=5) as response:
            jsz = json.load(response)
        return {
            stream["name"]: stream
            for account in jsz.get("account_details", [])
            for stream in account.get("stream_detail", [])
        }


def _start_worker(name: str, env: dict[str, str]) -> LukhasProcess:
    proc = LukhasProcess("worker", name, env=env)
    try:
        proc.wait_for_line("ready", 60)
    except BaseException:
        proc.proc.kill()
        proc.wait(30)
        raise
    return proc


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    auth = start_deploy_server(tmp_path_factory.mktemp("perm-nats"))
    procs: list[LukhasProcess] = []
    try:
        procs.append(_start_worker("slices", auth.env("slices", **FULL_FLAGS)))
        procs.append(_start_worker("observability", auth.env("observability", **FULL_FLAGS)))
        yield Deployed(auth, *procs)
    finally:
        for proc in procs:
            if proc.proc.poll() is None:
                proc.proc.terminate()
            proc.wait(30)
        auth.server.stop()


async def _all_time_out(attempts: Iterable[Awaitable[Any]]) -> None:
    """Await every attempt at once; each must time out (refused: JetStream never hears it)."""
    outcomes: list[BaseException | None] = []

    async def one(attempt: Awaitable[Any]) -> None:
        try:
            await attempt
        except (nats.errors.TimeoutError, APIError) as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)

    async with anyio.create_task_group() as tg:
        for attempt in attempts:
            tg.start_soon(one, attempt)
    assert all(isinstance(o, nats.errors.TimeoutError) for o in outcomes), outcomes


def _refusals(lines: list[str]) -> list[str]:
    return [
        line for line in lines
        if "permissions violation" in line.lower() or "permission denied" in line.lower()
    ]


# -- the guard: the real workers, end to end, with nothing refused --------------------------


async def test_real_providers_run_end_to_end_with_nothing_refused(deployed: Deployed) -> None:
    auth = deployed.auth
    user_id = f"usr_perm_{secrets.token_hex(4)}"
    scope = {"user_id": user_id, "scope": "gmail.read"}
    marker = secrets.token_hex(8)
    async with (
        connect(auth.settings("client")) as client,
        connect(auth.settings("planner")) as planner,
        planner.subscribe("lukhas.context.planner") as contexts,
        client.subscribe(subjects.CONSENT_CHECKPOINT) as checkpoints,
    ):
        replies = {
            "record": await request_json(client, subjects.CONSENT_RECORD, scope),
            "revoke": await request_json(client, subjects.CONSENT_REVOKE, scope),
            "status": await request_json(client, subjects.CONSENT_STATUS, scope),
            "history": await request_json(client, subjects.CONSENT_HISTORY, {"user_id": user_id}),
            "verify": await request_json(client, subjects.CONSENT_VERIFY, {"user_id": user_id}),
        }
        authn = SoftAuthenticator()
        options = await request_json(
            client, subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": user_id}
        )
        replies["register.options"] = options
        replies["register.verify"] = await request_json(
            client, subjects.PASSKEY_REGISTER_VERIFY,
            {"user_id": user_id, "credential": authn.create(options["options"])},
        )
        challenge = await request_json(client, subjects.PASSKEY_CHALLENGE, {"user_id": user_id})
        replies["challenge"] = challenge
        replies["passkey.verify"] = await request_json(
            client, subjects.PASSKEY_VERIFY, authn.get(challenge["options"])
        )
        replies["handoff"] = await request_json(
            client, subjects.CONTEXT_HANDOFF, {"ctx": {"marker": marker}, "target": "planner"}
        )
        # A client watches the ledger's signed checkpoints (announced without a reply
        # subject on the checkpoint request subject, which the slices user may publish on).
        with anyio.fail_after(10):
            while (announced := await checkpoints.next()).reply is not None:
                pass
        assert subjects.CHECKPOINT_HEADER in announced.headers, announced
        # The target's consumer user gets the context live...
        with anyio.fail_after(10):
            delivered = await contexts.next()
        assert marker in delivered.data.decode(), delivered
        # ...and the observability worker counted the calls from its durable consumer.
        with anyio.fail_after(20):
            while (await stats(client)).get("emit_points", {}).get(
                "CONSENT:governance:record", {}
            ).get("count", 0) < 1:
                pass
    refused = {name: r for name, r in replies.items() if r.get("ok") is not True}
    assert refused == {}, refused
    assert replies["record"]["provider"] == "jetstream"
    assert replies["passkey.verify"]["provider"] == "webauthn"
    assert replies["handoff"]["mode"] == "feature"
    assert replies["status"]["status"] == "revoked"
    # Nothing any worker did was refused by the server.
    for proc in (deployed.slices, deployed.observability):
        assert _refusals(proc.stderr) == [], _refusals(proc.stderr)


# -- inboxes ----------------------------------------------------------------------------------


async def test_no_user_reads_another_users_inbox_and_replies_still_arrive(
    deployed: Deployed,
) -> None:
    auth = deployed.auth
    responder = await watched(auth, "slices")
    attackers = {user: await watched(auth, user) for user in USERS}
    try:
        probe = await responder.nc.subscribe("lukhas.governance.consent.probe")
        await round_trip(responder.nc)
        spies = {}
        for user, attacker in attackers.items():
            targets = ["_INBOX.>", *(f"_INBOX_{other}.>" for other in USERS if other != user)]
            spies[user] = [await attacker.nc.subscribe(t) for t in targets]
            await round_trip(attacker.nc)
            refused = attacker.violations()
            for target in targets:
                assert any(f'subscription to "{target.lower()}"' in v for v in refused), (
                    user, target, refused,
                )

        async def answer() -> None:
            msg = await probe.next_msg(timeout=5)
            await responder.nc.publish(msg.reply, b"pong " + msg.data)

        # The victim: the client, through the bus, with its own inbox prefix.
        async with connect(auth.settings("client")) as client, anyio.create_task_group() as tg:
            tg.start_soon(answer)
            reply = await client.request("lukhas.governance.consent.probe", b"secret", timeout=5)
            assert reply.data == b"pong secret"
            assert client.new_inbox().startswith("_INBOX_client.")
        await round_trip(responder.nc)
        for user, attacker in attackers.items():
            await round_trip(attacker.nc)
            for spy in spies[user]:
                with pytest.raises(nats.errors.TimeoutError):
                    await spy.next_msg(timeout=0)
        assert responder.violations() == []  # the reply went out through allow_responses
    finally:
        await responder.nc.close()
        for attacker in attackers.values():
            await attacker.nc.close()


# -- the JetStream API ------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["slices", "observability"])
async def test_jetstream_api_refuses_weakening_and_new_streams(
    deployed: Deployed, user: str
) -> None:
    before = deployed.streams()
    assert {LEDGER, "MATRIZ", "HANDOFF", "KV_consent_state"} <= set(before), sorted(before)
    ledger_config = before[LEDGER]["config"]
    insider = await watched(deployed.auth, user)
    js = insider.nc.jetstream(timeout=0.5)
    attempts: dict[str, Any] = {
        "$js.api.stream.update.consent_ledger": js.update_stream(StreamConfig(
            name=LEDGER, subjects=ledger_config["subjects"], max_age=1.0,
            deny_delete=False, deny_purge=False,
        )),
        "$js.api.stream.create.evil": js.add_stream(StreamConfig(
            name="EVIL", subjects=[subjects.CONSENT_RECORD],
        )),
        "$js.api.stream.create.matriz_copy": js.add_stream(StreamConfig(
            name="MATRIZ_COPY", sources=[StreamSource(name="MATRIZ")],
        )),
        "$js.api.stream.delete.consent_ledger": js.delete_stream(LEDGER),
        "$js.api.stream.purge.consent_ledger": js.purge_stream(LEDGER),
        # (nats-py's delete_msg ignores the context's timeout, hence the raw request.)
        "$js.api.stream.msg.delete.consent_ledger": insider.nc.request(
            f"$JS.API.STREAM.MSG.DELETE.{LEDGER}", b'{"seq":1}', timeout=0.5
        ),
    }
    if user == "slices":
        attempts["$js.api.consumer.info.matriz.spy"] = js.pull_subscribe(
            "matriz.>", durable="spy", stream="MATRIZ"
        )
    else:
        attempts["$js.api.stream.msg.get.consent_ledger"] = js.get_msg(LEDGER, seq=1)
    try:
        await _all_time_out(attempts.values())
        # Squatting a name the worker may create: the stream exists, so nothing changes.
        with pytest.raises((nats.errors.TimeoutError, APIError)):
            await js.add_stream(StreamConfig(name="HANDOFF", subjects=[subjects.CONSENT_RECORD]))
        await round_trip(insider.nc)
    finally:
        await insider.nc.close()
    refused = insider.violations()
    for subject in attempts:
        assert any(subject in v for v in refused), (subject, refused)
    after = deployed.streams()
    assert set(after) == set(before), "a stream was created or deleted"
    assert after[LEDGER]["config"] == ledger_config
    assert after[LEDGER]["state"]["messages"] >= before[LEDGER]["state"]["messages"]
    assert after["HANDOFF"]["config"]["subjects"] == ["lukhas.context.>"]


async def test_client_and_planner_have_no_jetstream_beyond_their_own(deployed: Deployed) -> None:
    for user in ("client", "planner"):
        insider = await watched(deployed.auth, user)
        js = insider.nc.jetstream(timeout=0.5)
        try:
            await _all_time_out([js.stream_info(LEDGER), js.get_msg(LEDGER, seq=1),
                                 js.stream_info("MATRIZ"), js.key_value("consent_state")])
            await round_trip(insider.nc)
        finally:
            await insider.nc.close()
        assert any("$js.api.stream.info.consent_ledger" in v for v in insider.violations())


# -- handoff contexts -------------------------------------------------------------------------


async def test_contexts_reach_only_their_targets_consumer(deployed: Deployed) -> None:
    auth = deployed.auth
    async with connect(auth.settings("client")) as client:
        for pattern in ("lukhas.context.>", "lukhas.context.planner"):
            with anyio.fail_after(5), pytest.raises(PermissionDenied, match="subscribe"):
                async with client.subscribe(pattern):
                    pass
    async with connect(auth.settings("planner")) as planner:
        for pattern in ("lukhas.context.>", "lukhas.context.billing"):
            with anyio.fail_after(5), pytest.raises(PermissionDenied):
                async with planner.subscribe(pattern):
                    pass
    # The planner's durable consumer on HANDOFF, filtered on its own subject only.
    marker = secrets.token_hex(8)
    async with connect(auth.settings("client")) as client:
        reply = await request_json(
            client, subjects.CONTEXT_HANDOFF, {"ctx": {"marker": marker}, "target": "planner"}
        )
        assert reply["ok"] is True, reply
    planner_nc = await watched(auth, "planner")
    try:
        js = planner_nc.nc.jetstream(timeout=2.0)
        pull = await js.pull_subscribe(
            "lukhas.context.planner", durable="planner", stream="HANDOFF"
        )
        seen: list[bytes] = []
        with anyio.fail_after(10):
            while not any(marker.encode() in data for data in seen):
                for msg in await pull.fetch(10, timeout=2):
                    seen.append(msg.data)
                    await msg.ack()
        refused_js = planner_nc.nc.jetstream(timeout=0.5)
        await _all_time_out([  # every context, not only its own; a message by sequence
            refused_js.pull_subscribe("lukhas.context.>", durable="wide", stream="HANDOFF"),
            refused_js.get_msg("HANDOFF", seq=1),
        ])
        await round_trip(planner_nc.nc)
    finally:
        await planner_nc.nc.close()
    refused = planner_nc.violations()
    assert any("$js.api.consumer." in v and ".wide" in v for v in refused), refused
    assert any("$js.api.stream.msg.get.handoff" in v for v in refused), refused


# -- a refusal is a clear error, at once --------------------------------------------------------


async def _assert_denied_at_once(bus: Bus, operation: str, subject: str) -> None:
    with anyio.fail_after(5), pytest.raises(PermissionDenied) as caught:
        if operation == "subscribe":
            async with bus.subscribe(subject):
                pass
        elif operation == "request":
            await bus.request(subject, b"{}", timeout=30)
        else:
            await bus.publish(subject, b"{}")
            await bus.flush()
    assert caught.value.subject.lower() == subject.lower(), caught.value
    assert "permission denied" in str(caught.value) and subject in str(caught.value)


async def test_the_bus_raises_permission_denied_instead_of_waiting(deployed: Deployed) -> None:
    async with connect(deployed.auth.settings("client")) as client:
        await _assert_denied_at_once(client, "subscribe", "matriz.>")
        await _assert_denied_at_once(client, "request", "matriz.CONSENT.governance.record")
        await _assert_denied_at_once(client, "publish", "lukhas.context.planner")
        # The connection is still good for what the user may do.
        reply = await request_json(client, subjects.CONSENT_STATUS,
                                   {"user_id": "usr_perm_x", "scope": "gmail.read"})
        assert reply["ok"] is True, reply


async def test_a_wrong_inbox_prefix_is_a_clear_error_not_a_timeout(deployed: Deployed) -> None:
    settings = deployed.auth.settings("client", nats_inbox_prefix="_INBOX")
    async with connect(settings) as client:
        for _ in range(2):  # the first and every later request, each at once
            with anyio.fail_after(5), pytest.raises(PermissionDenied, match="NATS_INBOX_PREFIX"):
                await client.request(subjects.CONSENT_STATUS, b"{}", timeout=30)


def test_the_cli_exits_non_zero_on_a_refusal(deployed: Deployed) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "matriz", "tail"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**_clean_env(), **deployed.auth.env("client")},
    )
    assert result.returncode != 0, result
    assert "permission denied" in result.stderr and "matriz.>" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


async def test_only_the_observability_worker_may_order_a_canary_rollback(
    deployed: Deployed,
) -> None:
    """A forged rollback (stopping a canary is a lever on where traffic goes) is refused to
    every user but observability; observability's reaches the slice worker."""
    for user in ("client", "gateway", "slices", "planner"):
        async with connect(deployed.auth.settings(user)) as bus:
            await _assert_denied_at_once(bus, "publish", subjects.CANARY_ROLLBACK)
    order = {
        "slice": "lukhas.orchestration.context", "flag": "FEATURE_ORCHESTRATION_HANDOFF",
        "variable": "LUKHAS_CANARY_ORCHESTRATION_HANDOFF",
        "emit_point": "CONTEXT:orchestration:handoff", "reason": "latency",
        "message": "permission test", "sla_p95_ms": 250.0,
        "canary": {"count": 50, "errors": 0, "error_rate": 0.0, "p95_ms": 900.0},
        "baseline": {"count": 50, "errors": 0, "error_rate": 0.0, "p95_ms": 1.0},
        "ts": 1, "worker_id": "perm-test",
    }
    async with connect(deployed.auth.settings("observability")) as observability, \
            connect(deployed.auth.settings("client")) as client:
        await observability.publish(subjects.CANARY_ROLLBACK, json.dumps(order).encode())
        await observability.flush()
        with anyio.fail_after(10):  # each try is a $SRV.STATS round trip
            while True:
                reply = await request_json(client, "$SRV.STATS.lukhas-slices", {})
                [handoff] = [ep for ep in reply["endpoints"]
                             if ep["subject"] == subjects.CONTEXT_HANDOFF]
                if "rollback" in handoff["data"]["canary"]:
                    break
    assert handoff["data"]["canary"]["rollback"]["by"] == "perm-test"
