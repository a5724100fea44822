"""Shared pieces of the fault tests: worker processes, a load generator, condition waits.

Every wait here is on a condition with a deadline (a reply counted, a stats snapshot that
matches, a consumer with nothing pending), never a fixed sleep. The only pauses are the
back-off a well-behaved client takes after a failed request, so an outage is not a busy loop.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from nats.js import JetStreamContext

from bus import Bus, BusError, NoResponders, RequestTimeout
from bus.server import NatsServer
from lukhas import subjects
from tests.candidate._support import LEDGER_SIGNING_KEY, LEDGER_WRAPPING_KEY
from tests.integration.processes import LukhasProcess

#: The emit point every consent record reports to MATRIZ.
RECORD_POINT = "CONSENT:governance:record"
RECORD_SUBJECT = "matriz.CONSENT.governance.record"
#: A failed request is retried after this pause (client back-off, not synchronisation).
BACKOFF_S = 0.05

_encode = msgspec.json.encode
logger = logging.getLogger(__name__)


def worker_env(url: str, **extra: str) -> dict[str, str]:
    """Environment of a worker process on `url` with the real consent ledger."""
    return {
        "NATS_URL": url,
        "FEATURE_GOVERNANCE_LEDGER": "true",
        "LUKHAS_LEDGER_SIGNING_KEY": LEDGER_SIGNING_KEY,
        "LUKHAS_LEDGER_WRAPPING_KEY": LEDGER_WRAPPING_KEY,
        "LUKHAS_PSEUDONYM_KEY": "fault-test-pseudonym-key-0123456789abcdef",
        "LUKHAS_METRICS_PORT": "0",
        **extra,
    }


def _reap(proc: LukhasProcess) -> None:
    if proc.proc.poll() is None:
        proc.proc.kill()
    proc.wait(30)


@asynccontextmanager
async def lukhas_worker(
    name: str, env: Mapping[str, str], *, ready_timeout: float = 60.0
) -> AsyncIterator[LukhasProcess]:
    """`lukhas worker <name>` as a child process, ready when entered, killed on exit.

    The blocking waits run in a thread so the test's own connection keeps being served.
    """
    proc = LukhasProcess("worker", name, env=env)
    try:
        await anyio.to_thread.run_sync(proc.wait_for_line, "ready", ready_timeout)
        yield proc
    except BaseException:
        # The worker's own account of what went wrong, in the failing test's captured log.
        logger.error("worker %s stderr (tail):\n%s", name, "\n".join(proc.stderr[-60:]))
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_reap, proc)


async def sigkill(proc: LukhasProcess) -> int:
    """SIGKILL a worker and reap it; returns its exit status (-9)."""
    proc.proc.kill()
    return await anyio.to_thread.run_sync(proc.wait, 30.0)


async def request_json(
    bus: Bus, subject: str, body: Any, *, timeout: float = 10.0
) -> dict[str, Any]:
    reply = await bus.request(subject, _encode(body), timeout=timeout)
    return json.loads(reply.data)


@dataclass(frozen=True, slots=True)
class Acked:
    """A consent the service answered `ok: true`."""

    user_id: str
    key: str
    seq: int
    trace_id: str


@dataclass
class Tally:
    """What a load generator saw: every ok reply, every failure by kind, the slowest call."""

    deadline_s: float
    acked: list[Acked] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    slowest_s: float = 0.0
    #: Failed requests as (started, finished) on the monotonic clock.
    failed_at: list[tuple[float, float]] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def ok(self) -> int:
        return len(self.acked)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def note(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, done: Callable[[Tally], bool], timeout: float, what: str) -> None:
        """Wait until `done(self)` holds; fail with the tally if it does not within `timeout`."""
        with anyio.move_on_after(timeout):
            while not done(self):
                await self._changed.wait()
            return
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}: {self}")

    def __str__(self) -> str:
        return (
            f"sent={self.sent} ok={self.ok} failures={dict(self.failures)} "
            f"slowest={self.slowest_s:.2f}s"
        )


async def record_consents(
    bus: Bus,
    tally: Tally,
    user_id: str,
    stop: anyio.Event,
    *,
    scope: str = "fault.test",
) -> None:
    """Record consents for `user_id` until `stop` is set, each with its own idempotency key.

    A request that fails (timeout, no responders, an error reply) is counted, not retried:
    the next one has a new key, so a failed one may or may not be in the ledger, and an
    acknowledged one must be.
    """
    n = 0
    while not stop.is_set():
        n += 1
        key = f"{user_id}-{n}"
        body = {"user_id": user_id, "scope": scope, "idempotency_key": key}
        started = time.monotonic()
        tally.sent += 1
        kind: str | None = None
        try:
            reply = await request_json(
                bus, subjects.CONSENT_RECORD, body, timeout=tally.deadline_s
            )
        except RequestTimeout:
            kind = "timeout"
        except NoResponders:
            kind = "no_responders"
        except BusError as exc:
            kind = type(exc).__name__
        else:
            if reply.get("ok") is True:
                tally.acked.append(
                    Acked(user_id, key, int(reply["seq"]), str(reply["entry"]["trace_id"]))
                )
            else:
                error = reply.get("error") or {}
                assert set(error) == {"code", "message"}, reply  # a clear error, nothing else
                kind = f"error:{error['code']}"
        finished = time.monotonic()
        tally.slowest_s = max(tally.slowest_s, finished - started)
        if kind is not None:
            tally.failures[kind] += 1
            tally.failed_at.append((started, finished))
        tally.note()
        if kind is not None:
            await anyio.sleep(BACKOFF_S)


@dataclass
class LedgerCheck:
    """What `check_ledger` found: records per user, and reads that had to be retried."""

    records: dict[str, int]
    retried_reads: list[str]

    @property
    def total(self) -> int:
        return sum(self.records.values())


async def _read_until_ok(
    bus: Bus, subject: str, body: Any, retried: list[str], *, timeout: float = 30.0
) -> dict[str, Any]:
    """Ask until the reply is ok, as a client would after a fault; note every failed try."""
    with anyio.fail_after(timeout):
        while True:
            try:
                reply = await request_json(bus, subject, body)
            except BusError as exc:
                retried.append(f"{subject}: {type(exc).__name__}")
            else:
                if reply.get("ok") is True:
                    return reply
                retried.append(f"{subject}: {reply.get('error') or reply.get('reason')}")
            await anyio.sleep(BACKOFF_S)


async def check_ledger(bus: Bus, acked: list[Acked]) -> LedgerCheck:
    """Every acknowledged consent is in its user's history, and every chain verifies."""
    by_user: dict[str, list[Acked]] = {}
    for a in acked:
        by_user.setdefault(a.user_id, []).append(a)
    check = LedgerCheck({}, [])
    for user_id, mine in by_user.items():
        history = await _read_until_ok(
            bus, subjects.CONSENT_HISTORY, {"user_id": user_id}, check.retried_reads
        )
        records = {r["seq"]: r for r in history["records"]}
        missing = [a for a in mine if a.seq not in records]
        assert not missing, f"{len(missing)} acknowledged consent(s) lost: {missing[:5]}"
        for a in mine:
            assert records[a.seq]["trace_id"] == a.trace_id, (a, records[a.seq])
        verify = await _read_until_ok(
            bus, subjects.CONSENT_VERIFY, {"user_id": user_id}, check.retried_reads
        )
        assert verify["valid"] is True, verify
        assert verify["length"] == len(records), (verify, len(records))
        check.records[user_id] = len(records)
    return check


async def stats(bus: Bus, *, timeout: float = 5.0) -> dict[str, Any]:
    return await request_json(bus, subjects.OBSERVABILITY_STATS, {}, timeout=timeout)


def point_count(snapshot: Mapping[str, Any], point: str = RECORD_POINT) -> int:
    return int(snapshot.get("emit_points", {}).get(point, {}).get("count", 0))


async def stream_subject_count(js: JetStreamContext, stream: str, subject: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str
) -> None:
    """Re-run `check` (each run is a round trip to a server) until it holds."""
    with anyio.move_on_after(timeout):
        while not await check():
            await anyio.lowlevel.checkpoint()
        return
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def connection_count(server: NatsServer) -> int:
    """Client connections the server holds now (its /varz monitoring endpoint)."""
    url = f"http://{server.host}:{server.monitor_port}/varz"
    with urllib.request.urlopen(url, timeout=2) as reply:
        return int(json.load(reply)["connections"])
