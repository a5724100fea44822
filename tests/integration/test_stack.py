"""Process-level tests: `lukhas up` and the workers as child processes, a plain nats-py client.

Each test module gets its own nats-server, so stream state from other tests never mixes in.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import nats
import pytest

from bus import NatsServer
from bus.server import free_port
from lukhas import subjects
from lukhas.observability.matriz_emit import make_node
from tests.integration.processes import BASE_ENV, REPO, running

pytestmark = pytest.mark.nats


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    srv = NatsServer(store_dir=tmp_path_factory.mktemp("stack-nats"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def request(nc: nats.NATS, subject: str, body: object) -> dict:
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=10)
    return json.loads(msg.data)


async def test_up_with_embedded_server_serves_then_exits_0_on_sigint(tmp_path: Path) -> None:
    with running("up", "--port", "0", "--data-dir", str(tmp_path)) as up:
        ready = up.stdout[-1]
        url = re.search(r"nats://[\d.]+:\d+", ready).group(0)  # type: ignore[union-attr]
        nc = await nats.connect(url)
        try:
            consent = await request(nc, subjects.CONSENT_RECORD,
                                    {"user_id": "usr_up", "scope": "gmail.read"})
            passkey = await request(nc, subjects.PASSKEY_VERIFY, {"challenge": "c"})
            handoff = await request(nc, subjects.CONTEXT_HANDOFF, {"ctx": {"k": "v"}})
        finally:
            await nc.close()
        up.signal(signal.SIGINT)
        assert up.wait(30) == 0
    assert consent["ok"] is True and consent["provider"] == "null"
    assert passkey == {"ok": False, "provider": "null", "reason": "no_verifier",
                       "message": passkey["message"]}  # fail closed outside DRY_RUN
    assert handoff["ok"] is True
    assert (tmp_path / "nats" / "jetstream").is_dir()
    assert not any("Traceback" in line for line in up.stderr)


async def test_workers_discovery_stats_and_sla_alert(server: NatsServer) -> None:
    env = {"NATS_URL": server.url}
    with (
        running("worker", "slices", env=env),
        running("worker", "slices", env=env),
        running("worker", "observability", env=env),
    ):
        nc = await nats.connect(server.url)
        try:
            pings: list[dict] = []
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish("$SRV.PING.lukhas-slices", b"", reply=inbox)
            for _ in range(2):
                pings.append(json.loads((await sub.next_msg(timeout=10)).data))
            await sub.unsubscribe()

            for i in range(10):
                await request(nc, subjects.CONSENT_RECORD, {"user_id": f"usr_{i}", "scope": "s"})
            bad = await nc.request(subjects.CONSENT_RECORD, b"{", timeout=10)

            alerts = await nc.subscribe("lukhas.observability.alerts.>")
            slow = [
                make_node("CONSENT", "governance:record", outcome="ok", latency_ms=500.0,
                          trace_id="0" * 31 + "1", producer="test", capability="record_consent")
                for _ in range(40)
            ]
            for node in slow:
                await nc.publish(node.subject, msgspec.json.encode(node))
            await nc.flush()
            alert = json.loads((await alerts.next_msg(timeout=20)).data)

            snapshot: dict = {}
            with anyio.fail_after(20):
                while snapshot.get("emit_points", {}).get(
                    "CONSENT:governance:record", {}).get("count", 0) < 51:
                    snapshot = await request(nc, subjects.OBSERVABILITY_STATS, {})
        finally:
            await nc.close()
    assert {p["type"] for p in pings} == {"io.nats.micro.v1.ping_response"}
    assert len({p["id"] for p in pings}) == 2
    assert json.loads(bad.data)["error"]["code"] == "invalid_request"
    assert alert["emit_point"] == "CONSENT:governance:record"
    assert (alert["state"], alert["latency_ms"]) == ("firing", 50)  # an SLO burn-rate alert
    assert alert["long_burn_rate"] >= alert["burn_rate_threshold"]
    record = snapshot["emit_points"]["CONSENT:governance:record"]
    assert record["count"] == 51 and record["errors"] == 1
    assert snapshot["source"] == "jetstream"


async def test_sigterm_drains_in_flight_requests_and_loses_none(server: NatsServer) -> None:
    env = {"NATS_URL": server.url, "LUKHAS_WORKER_CONCURRENCY": "64"}
    with running("worker", "slices", env=env), running("worker", "slices", env=env) as victim:
        nc = await nats.connect(server.url)
        replies: list[dict] = []
        failures: list[BaseException] = []
        sent = 0
        try:
            async def client(n: int) -> None:
                nonlocal sent
                for i in range(n):
                    sent += 1
                    try:
                        replies.append(await request(
                            nc, subjects.CONSENT_RECORD, {"user_id": f"usr_{i}", "scope": "s"}
                        ))
                    except Exception as exc:  # noqa: BLE001 - every failure is what we count
                        failures.append(exc)

            async with anyio.create_task_group() as tg:
                for _ in range(32):
                    tg.start_soon(client, 30)
                with anyio.fail_after(30):
                    while len(replies) < 200:
                        await anyio.lowlevel.checkpoint_if_cancelled()
                        await nc.flush()
                victim.signal(signal.SIGTERM)
            code = victim.wait(30)
        finally:
            await nc.close()
    assert code == 0
    assert failures == []
    assert len(replies) == sent == 32 * 30
    assert all(r["ok"] for r in replies)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *args], cwd=REPO, capture_output=True, text=True,
        timeout=60, env={**os.environ, **env},
    )


def test_client_commands_request_health_and_stats(server: NatsServer) -> None:
    env = {
        "NATS_URL": server.url,
        "LUKHAS_PSEUDONYM_KEY": "integration-stack-pseudonym-key-0123456789",
        "LUKHAS_METRICS_PORT": "0",
    }
    with running("worker", "slices", env=env), running("worker", "observability", env=env):
        ok = _cli("request", subjects.CONSENT_RECORD, '{"user_id":"usr_cli","scope":"s"}', env=env)
        bad = _cli("request", subjects.CONSENT_RECORD, '{"user_id":1}', env=env)
        started = time.monotonic()
        health = _cli("health", "--timeout", "30", env=env)
        health_s = time.monotonic() - started
        stats = _cli("matriz", "stats", env=env)
        read_end, write_end = os.pipe()
        os.close(read_end)  # `lukhas matriz stats | head` once head has exited
        try:
            piped = subprocess.run(
                [sys.executable, "-m", "workers.cli.main", "matriz", "stats"], cwd=REPO,
                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
                env={**os.environ, **env},
            )
        finally:
            os.close(write_end)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["code"] == "invalid_request"
    assert health.returncode == 0, health.stderr
    assert health.stdout.startswith("slice service lukhas-slices")
    # Returns on the first answer, not after its timeout (compose's check allows 5 s).
    assert health_s < 15, health_s
    assert stats.returncode == 0 and "CONSENT:governance:record" in stats.stdout
    assert piped.returncode == 141 and piped.stderr == "", piped.stderr


def test_health_fails_at_once_when_no_service_answers(server: NatsServer) -> None:
    started = time.monotonic()
    result = _cli("health", "--timeout", "30", env={"NATS_URL": server.url})
    assert result.returncode == 1
    assert result.stderr.startswith("lukhas: no slice service answered")
    assert time.monotonic() - started < 15  # NATS's no-responders status, not the timeout


def _up_url(ready_line: str) -> str:
    return re.search(r"nats://[\d.]+:\d+", ready_line).group(0)  # type: ignore[union-attr]


async def test_second_up_refuses_the_port_in_use_unless_told_to_join(tmp_path: Path) -> None:
    port = free_port()
    with running("up", "--port", str(port), "--data-dir", str(tmp_path / "a")) as first:
        second = _cli("up", "--port", str(port), "--data-dir", str(tmp_path / "b"), env=BASE_ENV)
        with running("up", "--port", str(port), "--join", env={}) as joiner:
            joined = joiner.stdout[-1]
            nc = await nats.connect(_up_url(first.stdout[-1]))
            try:
                inbox = nc.new_inbox()
                sub = await nc.subscribe(inbox)
                await nc.publish("$SRV.PING.lukhas-slices", b"", reply=inbox)
                ids = {json.loads((await sub.next_msg(timeout=10)).data)["id"] for _ in range(2)}
                consent = await request(nc, subjects.CONSENT_RECORD,
                                        {"user_id": "usr_join", "scope": "s"})
            finally:
                await nc.close()
            joiner.signal(signal.SIGTERM)
            assert joiner.wait(30) == 0
        assert first.proc.poll() is None  # the first stack was never disturbed
    assert second.returncode == 2
    assert second.stderr.startswith(
        f"lukhas: port {port} is in use: a NATS server already answers at "
        f"nats://127.0.0.1:{port}"
    )
    assert "--join" in second.stderr and "Traceback" not in second.stderr
    assert second.stdout == ""  # no "ready", no server of its own
    assert "joined the stack" in joined
    assert len(ids) == 2 and consent["ok"] is True


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _session(pid: int) -> tuple[int, int]:
    return os.getpgid(pid), os.getsid(pid)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_ctrl_c_in_a_terminal_reaches_only_lukhas_which_drains_then_stops_the_server(
    tmp_path: Path,
) -> None:
    """A terminal's Ctrl-C is SIGINT to the whole foreground process group."""
    env = {**os.environ, **BASE_ENV}
    env.pop("NATS_URL", None)
    # Its own session stands for the terminal's foreground group.
    up = subprocess.Popen(
        [sys.executable, "-m", "workers.cli.main", "up", "--port", "0",
         "--data-dir", str(tmp_path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        assert up.stdout is not None
        ready = up.stdout.readline()
        assert "ready" in ready, up.stderr.read() if up.stderr else ""
        children = _children(up.pid)
        [server] = [c for c in children
                    if b"nats-server" in Path(f"/proc/{c}/cmdline").read_bytes()]
        workers = [c for c in children if c != server]  # `--workers` default: one per CPU
        assert _session(server) != _session(up.pid)  # the server is outside the group
        # Outside the group too: lukhas stops each with one SIGTERM, after which it drains.
        assert all(_session(w) != _session(up.pid) for w in workers)
        os.killpg(up.pid, signal.SIGINT)
        code = up.wait(30)
        _, stderr = up.communicate(timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert code == 0, stderr
    assert "received SIGINT: draining" in stderr
    for pid in [server, *workers]:  # lukhas waited for the workers, then stopped the server
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text()
    assert "Traceback" not in stderr and "disconnected" not in stderr.lower()


async def test_demo_uses_the_running_stack_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lukhas.config import Settings
    from workers.cli.demo import run_demo

    # A small handoff budget on both sides, so the demo's burst is rate limited however
    # slowly a loaded machine sends it.
    budget = {"LUKHAS_HANDOFF_RATE": "1", "LUKHAS_HANDOFF_BURST": "5"}
    with running("up", "--port", "0", "--data-dir", str(tmp_path), env=budget) as up:
        url = _up_url(up.stdout[-1])
        lines: list[str] = []
        ok = await run_demo(
            Settings(pseudonym_key="demo-test", handoff_rate=1.0, handoff_burst=5),
            nats_url=None, default_url=url, out=lines.append,
        )
        table = capsys.readouterr().out
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0
    assert ok, lines
    assert lines[0] == f"demo against the running stack at {url}"
    assert "ok=False" not in "\n".join(lines)
    assert not any(line.startswith("!!") for line in lines)
    # The running stack is not DRY_RUN: its null passkey provider refuses, as expected.
    assert any("passkey.verify" in li and "refused no_verifier" in li
               and li.endswith("(as expected)") for li in lines), lines
    assert "CONSENT:governance:record" in table


def test_worker_without_nats_url_is_a_clear_configuration_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "worker", "slices"], cwd=REPO,
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode != 0
    assert "NATS_URL" in result.stderr and "Traceback" not in result.stderr


def test_bad_environment_value_names_the_variable() -> None:
    result = _cli("health", env={"LUKHAS_HANDOFF_RATE": "fast"})
    assert result.returncode == 2
    assert "LUKHAS_HANDOFF_RATE" in result.stderr



async def test_up_with_two_workers_serves_from_two_processes_and_drains_both(
    tmp_path: Path,
) -> None:
    with running("up", "--workers", "2", "--port", "0", "--data-dir", str(tmp_path)) as up:
        ready = up.stdout[-1]
        assert "2 slice workers" in ready
        url = re.search(r"nats://[\d.]+:\d+", ready).group(0)  # type: ignore[union-attr]
        nc = await nats.connect(url)
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish("$SRV.PING.lukhas-slices", b"", reply=inbox)
            pings = [json.loads((await sub.next_msg(timeout=10)).data) for _ in range(2)]
            await sub.unsubscribe()
            replies = [
                await request(nc, subjects.CONSENT_RECORD, {"user_id": f"usr_{i}", "scope": "s"})
                for i in range(20)
            ]
            stats_inbox = nc.new_inbox()
            stats_sub = await nc.subscribe(stats_inbox)
            await nc.publish("$SRV.STATS.lukhas-slices", b"", reply=stats_inbox)
            stats = [json.loads((await stats_sub.next_msg(timeout=10)).data) for _ in range(2)]
        finally:
            await nc.close()
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0
    assert len({p["id"] for p in pings}) == 2  # two processes answer
    assert all(r["ok"] for r in replies)
    served = [
        next(e for e in s["endpoints"] if e["subject"] == subjects.CONSENT_RECORD)["num_requests"]
        for s in stats
    ]
    assert sum(served) == 20
    drained = [line for line in up.stderr if "drained and exited 0" in line]
    assert len(drained) == 1  # the child; the parent's own exit status is the other
    pid = int(re.search(r"process (\d+) drained", drained[0]).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not any("Traceback" in line for line in up.stderr)
