"""The slice service: every request subject in one queue group, bounded concurrency.

One reader task per subscription takes everything nats-py has buffered at once, stamps each
request with the time it was read, and queues it for its endpoint's servers: one task for an
endpoint answered inline, a shared pool of `concurrency` tasks for those that wait on I/O.
An endpoint that defers (`Endpoint.deferral`, the handoff with its builtin publisher) is
answered inline too: its calls park on their I/O confirmation holding no task, and its
own confirming tasks (`Deferral.confirm`) answer every call a confirmation covered, so
parked calls never take the pool's tasks from the endpoints that need them, and their
queue is where the shedding looks.
Past capacity a request that cannot be answered within its budget is refused at once with
`{"ok": false, "reason": "overloaded", "retry_after_ms": N}` (see `_overload.py`), so the
queue never grows beyond what can be served in time; a full queue refuses the same way.
Only replies to a requester's inbox are sent (`_overload.reply_allowed`).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, NamedTuple

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.lowlevel import checkpoint
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import lukhas
from bus import BusError, EncodedHeaders, Envelope, Subscription
from lukhas.catalog import ENDPOINTS
from lukhas.config import Settings
from lukhas.endpoint import Deferral, Endpoint, Reply
from lukhas.errors import LukhasError
from lukhas.observability.matriz_decorators import emit_rejected
from lukhas.observability.matriz_emit import make_node
from lukhas.observability.tracing import bind_trace, new_trace_id, parse_traceparent
from lukhas.runtime import Runtime
from lukhas.subjects import CANARY_ROLLBACK, SERVICE_NAME, SLICE_QUEUE_GROUP
from workers.service import _canary, discovery
from workers.service._manifests import load_manifests, sla_by_emit_point
from workers.service._overload import (
    DEADLINE_HEADER,
    DEFAULT_BUDGET_MS,
    SERVICE_INBOXES,
    Lane,
    deadline_ns,
    overloaded_body,
    reply_allowed,
)
from workers.service.bootstrap import SLICE_REGISTRIES
from workers.service.discovery import EndpointCounters, ServiceIdentity

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()

#: nats.micro-style error headers: a numeric code and a description.
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
_HTTP_LIKE_CODES = {"invalid_request": "400", "payload_too_large": "413", "internal": "500"}
_OVERLOADED_HEADERS = {ERROR_HEADER: "overloaded", ERROR_CODE_HEADER: "503"}
#: The same, validated and laid out once: a refusal is queued on the wire as it is.
_OVERLOADED_WIRE = EncodedHeaders(_OVERLOADED_HEADERS)
#: Most requests one reader pass takes before it lets the other tasks run.
_READ_BATCH = 1024
#: How long a server, or a reader taking in a batch, runs without suspending before it lets
#: the others (and nats-py's socket reader and flusher) run: readers must stay ahead for
#: queue times to be seen, and replies must leave while they are still in time.
_SLICE_NS = 1_000_000
#: A reader looks at the clock once per this many requests it admits or refuses.
_CLOCK_EVERY = 16


def freeze_heap() -> None:
    """Collect once, then leave every object alive now out of all later collections.

    A worker process starts with some 45,000 objects the collector tracks (modules, the
    catalog, compiled schemas) that live as long as it does; under load, requests held in a
    queue across collections are promoted to the oldest generation, and its collection then
    walks all of them: about 30 ms measured in the deployed shape at 2x capacity, a stop of the
    whole loop longer than the passkey's 30 ms SLA. Frozen (`gc.freeze`, what CPython
    recommends for long-lived processes after start-up), the startup objects are no longer
    walked, and an oldest-generation collection only walks what was promoted since.

    The collection thresholds stay CPython's: collecting the youngest generation every
    10,000 allocations instead of 700 cut the consent ledger writer's collection time from
    2.2 s to 0.1 s in a 35 s run, but each young collection then stopped the loop for long
    enough to lift context_handoff's p95 at 2,000/s from 1.2-1.4x the echo's to 2-4x in most runs.
    """
    gc.collect()
    gc.freeze()


class Served(NamedTuple):
    """An endpoint as this worker serves it: its limit and dispatch under the settings."""

    endpoint: Endpoint[Any]
    max_bytes: int
    #: Answered by a handler-pool task (it may wait on I/O) rather than inline by its reader.
    pooled: bool

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def subject(self) -> str:
        return self.endpoint.subject


def serve_plan(settings: Settings) -> tuple[Served, ...]:
    """How this worker serves each declared endpoint under `settings`."""
    return tuple(
        Served(ep, ep.body_limit(settings), ep.waits_on_io(settings)) for ep in ENDPOINTS
    )


class ServiceStatistics(NamedTuple):
    in_flight: int
    handled: int
    errors: int
    dropped: int
    #: Requests refused as `overloaded` (past their queue budget, or the queue was full).
    overloaded: int = 0
    #: Requests not served because their reply subject is not a requester's inbox.
    refused_replies: int = 0


class _ServerState:
    """Whether a server is in the middle of a request (so a reader must not serve one)."""

    __slots__ = ("handling",)

    def __init__(self) -> None:
        self.handling = False

    def idle(self, send: MemoryObjectSendStream[Any]) -> bool:
        """Whether the server behind `send` has nothing queued and no request in hand."""
        return not self.handling and not send.statistics().current_buffer_used


class _Queued(NamedTuple):
    served: Served
    lane: Lane
    #: When the request was read (the service clock, ns) and its budget (ns).
    stamp_ns: int
    budget_ns: int
    env: Envelope


def overloaded_reply(lane: Lane) -> Reply:
    """The `overloaded` refusal, as `_respond` sends it when it cannot be queued in place."""
    return {"ok": False, "reason": "overloaded", "retry_after_ms": lane.retry_after_ms()}


def endpoint_budgets_ms(
    endpoints: tuple[Served, ...], override_ms: float | None = None
) -> dict[str, float]:
    """Each endpoint's budget (ms): `override_ms` (LUKHAS_WORKER_QUEUE_BUDGET_MS) when set,
    else its manifest's p95 SLA, else DEFAULT_BUDGET_MS."""
    if override_ms is not None:
        return {ep.subject: override_ms for ep in endpoints}
    slas = sla_by_emit_point(load_manifests())
    return {
        ep.subject: slas.get(ep.endpoint.emit_point.name, DEFAULT_BUDGET_MS) for ep in endpoints
    }


def error_reply(exc: Exception) -> tuple[Reply, str]:
    """Map an exception to the wire error reply and its code; never leaks a traceback."""
    if isinstance(exc, LukhasError):
        return {"ok": False, "error": {"code": exc.code, "message": exc.message}}, exc.code
    reference = uuid.uuid4().hex[:12]
    logger.error("internal error (reference %s)", reference, exc_info=exc)
    message = f"internal error (reference {reference})"
    return {"ok": False, "error": {"code": "internal", "message": message}}, "internal"


class SliceService:
    """Serves the slice endpoints on `runtime.bus` until `stop()`.

    Start it with `await tg.start(service.run)`: that returns once every subscription is
    live. `stop()` stops taking requests, lets in-flight ones finish and reply, and makes
    `run()` return.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        concurrency: int | None = None,
        max_pending: int | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
        freeze_heap: bool = False,
    ) -> None:
        self._runtime = runtime
        self._bus = runtime.bus
        #: A bus that queues a publish without waiting (NATS): refusals go out that way.
        self._publish_nowait: Callable[..., bool] | None = getattr(
            runtime.bus, "publish_nowait", None)
        self._concurrency = concurrency or runtime.settings.worker_concurrency
        self._max_pending = max_pending or runtime.settings.worker_max_pending
        self._endpoints = serve_plan(runtime.settings)
        self._deferrals: dict[str, Deferral] = {}
        for ep in self._endpoints:
            deferral = ep.endpoint.deferral(runtime)
            if deferral is not None:
                self._deferrals[ep.subject] = deferral
        self._counters = {ep.subject: EndpointCounters() for ep in self._endpoints}
        #: Messages without a reply subject on read-only endpoints: counted, not handled.
        self._unawaited = {ep.subject: 0 for ep in self._endpoints if ep.endpoint.read_only}
        self._clock = clock
        self._freeze_heap = freeze_heap
        budgets = endpoint_budgets_ms(
            self._endpoints, runtime.settings.worker_queue_budget_ms
        )
        self._lanes = {
            ep.subject: Lane(budget_ns=int(budgets[ep.subject] * 1e6)) for ep in self._endpoints
        }
        own_inbox = self._bus.new_inbox().partition(".")[0]
        # `_INBOX` is nats-py's default prefix, every unauthenticated client's too.
        self._refused_inboxes = SERVICE_INBOXES | (
            {own_inbox} if own_inbox != "_INBOX" else set()
        )
        self._refused_replies = 0
        self._reply_logged_at = -math.inf
        self.identity = ServiceIdentity(
            name=SERVICE_NAME,
            id=os.urandom(11).hex(),
            version=lukhas.__version__,
            description="LUKHAS slices: consent ledger, passkey verify, context handoff",
        )
        self._canary_registries = _canary.registries_by_subject(
            self._endpoints, SLICE_REGISTRIES, load_manifests()
        )
        self._subscriptions: list[Subscription] = []
        self._by_subject: dict[str, Subscription] = {}
        self._in_flight = 0
        self._handled = 0
        #: Requests a reader served itself (its endpoint's server idle, nothing queued).
        self._served_by_readers = 0
        self._errors = 0

    @property
    def endpoints(self) -> tuple[Served, ...]:
        return self._endpoints

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        pool_send, pool_receive = anyio.create_memory_object_stream[_Queued](self._max_pending)
        async with AsyncExitStack() as stack:
            requests = [
                (ep, await stack.enter_async_context(
                    self._bus.subscribe(
                        ep.subject, queue=SLICE_QUEUE_GROUP, max_pending=self._max_pending
                    )
                ))
                for ep in self._endpoints
            ]
            control = [
                await stack.enter_async_context(self._bus.subscribe(subject))
                for subject in self._control_subjects()
            ]
            # Canary rollbacks reach every worker (no queue group): see `_canary.py`.
            rollbacks = await stack.enter_async_context(self._bus.subscribe(CANARY_ROLLBACK))
            self._subscriptions = [sub for _, sub in requests] + control + [rollbacks]
            self._by_subject = {ep.subject: sub for ep, sub in requests}
            async with anyio.create_task_group() as tg:
                with pool_receive:
                    for _ in range(self._concurrency):
                        tg.start_soon(self._serve, pool_receive.clone(), _ServerState())
                async with pool_send:
                    for ep, sub in requests:
                        deferral = self._deferrals.get(ep.subject)
                        server = _ServerState()
                        if ep.pooled and deferral is None:
                            send = pool_send.clone()
                        else:
                            send, receive = anyio.create_memory_object_stream[_Queued](
                                self._max_pending
                            )
                            tg.start_soon(self._serve, receive, server, deferral)
                            if deferral is not None:
                                tg.start_soon(deferral.confirm)
                        tg.start_soon(self._read, ep, sub, send, server)
                for sub in control:
                    tg.start_soon(self._serve_control, sub)
                tg.start_soon(_canary.follow_rollbacks, rollbacks, SLICE_REGISTRIES)
                await self._bus.flush()
                if self._freeze_heap:
                    freeze_heap()
                task_status.started()
                logger.info(
                    "slice service %s serving %d endpoints (concurrency %d)",
                    self.identity.id, len(self._endpoints), self._concurrency,
                )

    async def stop(self) -> None:
        """Stop taking requests; buffered and in-flight ones are still answered."""
        for sub in self._subscriptions:
            try:
                await sub.drain()
            except BusError as exc:
                logger.warning("draining %s failed: %s", sub.subject, exc)

    def statistics(self) -> ServiceStatistics:
        dropped = sum(sub.statistics().dropped for sub in self._subscriptions)
        overloaded = sum(lane.overloaded for lane in self._lanes.values())
        return ServiceStatistics(
            self._in_flight, self._handled, self._errors, dropped, overloaded,
            self._refused_replies,
        )

    async def _read(
        self, served: Served, sub: Subscription, send: MemoryObjectSendStream[_Queued],
        server: _ServerState,
    ) -> None:
        """Take what is buffered in bulk, stamp it, and queue or refuse each request.

        Requests found already waiting arrived while this reader was away: their stamps are
        spread over that time, so waiting the service could not see still counts. Requests
        that arrive while it waits are stamped when it wakes.

        A lone request (none other waiting) for an endpoint that never waits on I/O, found
        while its server has nothing queued and no request in hand, is served here at once
        (`_serve_item`, as the server would serve it next): handing it over cost two task
        switches and a loop iteration on every request at low load, for no change in order
        or outcome.
        """
        lane = self._lanes[served.subject]
        clock = self._clock
        iterator = aiter(sub)
        take_ready = sub.take_ready
        # Only what never waits on I/O is served in a reader (a reader held on I/O would
        # stamp nothing meanwhile): inline endpoints, and deferrals whose `begin` cannot wait.
        deferral = self._deferrals.get(served.subject)
        direct = not served.pooled if deferral is None else not deferral.waits_on_io
        async with send:
            looked = clock()
            away = False
            while True:
                # Everything waiting, in one call; only when nothing is, wait for the next.
                batch = take_ready(_READ_BATCH)
                waited = not batch
                if waited:
                    try:
                        batch = [await anext(iterator)]
                    except StopAsyncIteration:
                        return
                    batch += take_ready(_READ_BATCH - 1)  # what arrived along with it
                now = clock()
                since = now if waited else looked
                step = (now - since) / len(batch)
                if away and not waited:
                    # This reader served the last request itself, and none was waiting when
                    # it began: each found now waited at most that long. (Serving takes
                    # microseconds unless a handler suspended, e.g. held by a test.)
                    step = 0
                away = False
                if (direct and len(batch) == 1 and not sub.statistics().pending
                        and server.idle(send)):
                    item = await self._admit(served, lane, batch[0], int(since + step), now, None)
                    if item is not None:
                        self._served_by_readers += 1
                        await self._serve_item(item, now)
                        away = True
                else:
                    await self._admit_batch(served, lane, batch, since, step, now, send)
                looked = now
                if sub.statistics().pending:
                    # More came in meanwhile: let the servers, and nats-py's reader, run
                    # first. (With nothing pending, waiting for the next request does.)
                    await checkpoint()

    async def _admit_batch(
        self, served: Served, lane: Lane, batch: list[Envelope], since: float, step: float,
        now: int, send: MemoryObjectSendStream[_Queued],
    ) -> None:
        """`_admit` each request of a reader pass, the i-th stamped `since + step * (i + 1)`.

        The common case (a reply subject that is an inbox, no deadline header of its own) is
        decided here without a call per request: `Lane.admits` with the lane's own share, and
        a refusal queued on the wire in place (`_refuse_nowait`). Under overload most of what
        a reader takes is refused, and a refusal has to stay far cheaper than a serve.
        """
        clock = self._clock
        inboxes = self._refused_inboxes
        refuse_nowait = self._refuse_nowait
        share = lane.share_ns
        budget = lane.budget_ns
        interval = lane.interval()
        at = turn = now
        for i, env in enumerate(batch):
            stamp = int(since + step * (i + 1))
            reply = env.reply
            if ((reply is not None and not reply_allowed(reply, inboxes))
                    or DEADLINE_HEADER in env.headers):
                await self._admit(served, lane, env, stamp, at, send)
            elif at - stamp + (lane.queued + 1) * interval <= share:  # `Lane.admits`
                try:
                    send.send_nowait(_Queued(served, lane, stamp, budget, env))
                except anyio.WouldBlock:  # the queue is full: as overloaded as it gets
                    await self._refuse(served, lane, env, stamp, at)
                else:
                    lane.queued += 1
            else:
                retry = max(1, math.ceil(lane.queued * interval / 1e6))  # `retry_after_ms`
                if not refuse_nowait(served, lane, env, stamp, at, retry):
                    await self._respond(env, overloaded_reply(lane), _OVERLOADED_HEADERS)
            if i % _CLOCK_EVERY == _CLOCK_EVERY - 1:
                at = clock()
                if at - turn > _SLICE_NS:
                    # A big batch (after a pause) must not hold the loop: nats-py's flusher
                    # sends the refusals made so far, its reader takes in what arrived
                    # meanwhile, the servers move the queue on.
                    await checkpoint()
                    at = turn = clock()
                    interval = lane.interval()

    async def _admit(
        self,
        served: Served,
        lane: Lane,
        env: Envelope,
        stamp: int,
        now: int,
        send: MemoryObjectSendStream[_Queued] | None,
    ) -> _Queued | None:
        """Refuse `env`, or queue it on `send`; with `send` None, return it to be served
        now instead (None: it was answered or dropped)."""
        if env.reply is not None and not reply_allowed(env.reply, self._refused_inboxes):
            self._refused_replies += 1
            self._counters[served.subject].refused_replies += 1
            if time.monotonic() - self._reply_logged_at >= 5.0:  # at most one line per 5 s
                self._reply_logged_at = time.monotonic()
                logger.warning(
                    "refused a request on %s whose reply subject is not an inbox "
                    "(%d refused so far)", served.subject, self._refused_replies,
                )
            return None
        try:
            budget = deadline_ns(env.headers, lane.budget_ns)
        except LukhasError as exc:
            reply, code = error_reply(exc)
            self._counters[served.subject].record(0, code)
            await self._respond(env, reply, {
                ERROR_HEADER: exc.message, ERROR_CODE_HEADER: _HTTP_LIKE_CODES[code],
            })
            return None
        if not lane.admits(stamp, budget, now):
            await self._refuse(served, lane, env, stamp, now)
            return None
        item = _Queued(served, lane, stamp, budget, env)
        if send is None:
            return item
        try:
            send.send_nowait(item)
        except anyio.WouldBlock:  # the queue is full: as overloaded as it gets
            await self._refuse(served, lane, env, stamp, now)
            return None
        lane.queued += 1
        return None

    async def _serve(
        self, receive: MemoryObjectReceiveStream[_Queued], server: _ServerState,
        deferral: Deferral | None = None,
    ) -> None:
        try:
            await self._serve_queue(receive, server)
        finally:
            if deferral is not None:
                deferral.close()  # its last calls are parked: answer them, then end

    async def _serve_queue(
        self, receive: MemoryObjectReceiveStream[_Queued], server: _ServerState
    ) -> None:
        clock = self._clock
        async with receive:
            awake = clock()
            while True:
                try:
                    item = receive.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        item = await receive.receive()
                    except anyio.EndOfStream:
                        return
                    awake = clock()
                except anyio.EndOfStream:
                    return
                item.lane.queued -= 1
                server.handling = True
                try:
                    await self._serve_item(item, clock())
                finally:
                    server.handling = False
                if clock() - awake > _SLICE_NS:
                    await checkpoint()
                    awake = clock()

    async def _serve_item(self, item: _Queued, now: int) -> None:
        """Serve a request taken at `now`, or refuse it if it can no longer be in time."""
        lane = item.lane
        lane.took(now)
        if lane.expired(item.stamp_ns, item.budget_ns, now):
            await self._refuse(item.served, lane, item.env, item.stamp_ns, now)
        else:
            await self._handle(item.served, item.env)

    async def _refuse(
        self, served: Served, lane: Lane, env: Envelope, stamp: int, now: int
    ) -> None:
        """Answer `overloaded` at once: far cheaper than serving, and never silence."""
        if not self._refuse_nowait(served, lane, env, stamp, now, lane.retry_after_ms()):
            await self._respond(env, overloaded_reply(lane), _OVERLOADED_HEADERS)

    def _refuse_nowait(
        self, served: Served, lane: Lane, env: Envelope, stamp: int, now: int, retry_ms: int
    ) -> bool:
        """Count a refusal of `env` and queue its `overloaded` reply (`retry_after_ms` =
        `retry_ms`, the lane's `retry_after_ms()`) without waiting; False when the reply could
        not be queued so (then `_respond` sends it).

        MATRIZ gets one node per endpoint per `NODE_EVERY_NS` for the refusals meanwhile
        (outcome `refused`, labels `reason:overloaded` and `overloaded:<count>`).
        """
        self._counters[served.subject].refuse("overloaded")
        count = lane.refused(now)
        if count:
            endpoint = served.endpoint
            point = endpoint.emit_point
            runtime = self._runtime
            runtime.emitter.emit(make_node(
                point.node_type, point.label, outcome="refused",
                latency_ms=(now - stamp) / 1e6, trace_id=new_trace_id(),
                producer=f"{runtime.producer}:{point.module}", capability=endpoint.capability,
                tenant=runtime.settings.tenant, labels=("reason:overloaded", f"overloaded:{count}"),
            ))
        if env.reply is None:
            return True  # a plain publish: nobody is waiting for the answer
        if self._publish_nowait is None:
            return False
        try:
            return self._publish_nowait(
                env.reply, overloaded_body(retry_ms), headers=_OVERLOADED_WIRE)
        except BusError:
            return False  # e.g. an inbox the bus refuses: the ordinary path says why

    async def _handle(self, served: Served, env: Envelope) -> None:
        endpoint = served.endpoint
        if env.reply is None and endpoint.read_only:  # a query nobody awaits (announcements)
            self._unawaited[endpoint.subject] += 1
            return
        self._in_flight += 1
        started = time.perf_counter_ns()
        trace_id = parse_traceparent(env.headers.get("traceparent"))
        deferral = self._deferrals.get(endpoint.subject)
        with bind_trace(trace_id):
            reached_api = False
            try:
                message = endpoint.decode(env.data, max_bytes=served.max_bytes)
                reached_api = True
                if deferral is None:
                    reply = await endpoint.handler(message)
                else:
                    answered = await deferral.begin(
                        message, _Answer(self, served, env, started)
                    )
                    if answered is None:
                        return  # parked: `_answer` completes it once confirmed
                    reply = answered
            except Exception as exc:  # the one handler boundary: every failure becomes a reply
                error, code = error_reply(exc)
                if not reached_api:  # the API emits its own node; a rejected body has none
                    elapsed_ms = (time.perf_counter_ns() - started) / 1e6
                    emit_rejected(endpoint.emit_point, elapsed_ms, code=code)
                await self._finish(served, env, started, error, code)
                return
        await self._finish(served, env, started, reply, None)

    async def _answer(
        self, served: Served, env: Envelope, started: int, outcome: Reply | Exception
    ) -> None:
        """Answer a handled request with its reply, or with the error it ended in."""
        if isinstance(outcome, Exception):
            await self._finish(served, env, started, *error_reply(outcome))
        else:
            await self._finish(served, env, started, outcome, None)

    def _answer_nowait(
        self, served: Served, env: Envelope, started: int, outcome: Reply | Exception
    ) -> bool:
        """`_answer` a reply in place, queued with `publish_nowait` (a deferred call
        confirmed from the bus's reader); False, having done nothing, when it cannot be:
        no such bus, the bus declined, or an error to answer (then `_answer`)."""
        publish = self._publish_nowait
        if publish is None or isinstance(outcome, Exception):
            return False
        if env.reply is not None:
            try:
                if not publish(env.reply, _encoder.encode(outcome)):
                    return False
            except BusError:
                return False  # e.g. an inbox the bus refuses: `_answer` says why
        self._account(served, started, None)
        return True

    async def _finish(
        self, served: Served, env: Envelope, started: int, reply: Reply, error_code: str | None
    ) -> None:
        headers = None if error_code is None else {
            ERROR_HEADER: reply["error"]["message"],
            ERROR_CODE_HEADER: _HTTP_LIKE_CODES.get(error_code, "400"),
        }
        self._account(served, started, error_code)
        await self._respond(env, reply, headers)

    def _account(self, served: Served, started: int, error_code: str | None) -> None:
        """Count an answered request (the reply is on its way)."""
        self._in_flight -= 1
        endpoint = served.endpoint
        elapsed = time.perf_counter_ns() - started
        self._counters[endpoint.subject].record(elapsed, error_code)
        self._handled += 1
        if error_code is not None:
            self._errors += 1
        logger.debug(
            "handled subject=%s outcome=%s duration_ms=%.3f",
            endpoint.subject, error_code or "ok", elapsed / 1e6,
        )

    async def _respond(
        self, env: Envelope, reply: Reply, headers: dict[str, str] | None = None
    ) -> None:
        if env.reply is None:
            return  # a plain publish: nobody is waiting for the answer
        data = _encoder.encode(reply)
        if headers is None and self._publish_nowait is not None:
            # Queued for the connection's writer in place, as `publish` would queue it, minus
            # the coroutine; when it declines (disconnected, buffer full) or refuses, `publish`
            # below says why.
            try:
                if self._publish_nowait(env.reply, data):
                    return
            except BusError:
                pass
        try:
            await self._bus.publish(env.reply, data, headers=headers)
        except BusError as exc:
            logger.warning("could not reply on %s: %s", env.subject, exc)

    def _control_subjects(self) -> list[str]:
        name, sid = self.identity.name, self.identity.id
        return [
            discovery.control_subject(verb, *scope)
            for verb in discovery.VERBS
            for scope in ((), (name,), (name, sid))
        ]

    async def _serve_control(self, sub: Subscription) -> None:
        verb = sub.subject.split(".")[1]
        async for env in sub:
            # Any inbox, the workers' own included: `lukhas health` runs as the worker's user
            # (compose's healthcheck), and discovery answers hold nothing but public stats.
            if env.reply is not None and not reply_allowed(env.reply, frozenset()):
                self._refused_replies += 1
                continue
            await self._respond(env, self._control_reply(verb))

    def _control_reply(self, verb: str) -> dict[str, Any]:
        if verb == "PING":
            return discovery.ping_response(self.identity)
        if verb == "INFO":
            return discovery.info_response(
                self.identity,
                [(ep.name, ep.subject, SLICE_QUEUE_GROUP) for ep in self._endpoints],
            )
        return discovery.stats_response(
            self.identity,
            [
                (ep.name, ep.subject, SLICE_QUEUE_GROUP, self._counters[ep.subject],
                 self._buffer_data(ep.subject))
                for ep in self._endpoints
            ],
            canary=self._canary_states(),
        )

    def _canary_states(self) -> dict[str, dict[str, Any]]:
        """Each endpoint's canary state (`$SRV.STATS` data), by subject."""
        settings = self._runtime.settings
        return {
            subject: registry.canary_state(settings)
            for subject, registry in self._canary_registries.items()
        }

    def _buffer_data(self, subject: str) -> dict[str, Any] | None:
        """The endpoint's subscription buffer: pending now, bound, and slow-consumer drops."""
        sub = self._by_subject.get(subject)
        if sub is None:
            return None
        stats = sub.statistics()
        lane = self._lanes[subject]
        data: dict[str, Any] = {
            "pending": stats.pending, "max_pending": stats.max_pending,
            "dropped": stats.dropped, "queued": lane.queued,
            "budget_ms": lane.budget_ns / 1e6,
            "service_interval_us": round(lane.interval() / 1e3, 1),
        }
        if subject in self._unawaited:
            data["unawaited"] = self._unawaited[subject]
        deferral = self._deferrals.get(subject)
        if deferral is not None:
            data["parked"] = deferral.parked
        return data


class _Answer:
    """How a deferred call is answered (`Deferral.begin`'s `answer`): awaited, or in place
    with `nowait(outcome)`, which returns False, having done nothing, when it cannot."""

    __slots__ = ("_env", "_served", "_service", "_started")

    def __init__(self, service: SliceService, served: Served, env: Envelope, started: int
                 ) -> None:
        self._service = service
        self._served = served
        self._env = env
        self._started = started

    def __call__(self, outcome: Reply | Exception) -> Awaitable[None]:
        return self._service._answer(self._served, self._env, self._started, outcome)

    def nowait(self, outcome: Reply | Exception) -> bool:
        return self._service._answer_nowait(self._served, self._env, self._started, outcome)
