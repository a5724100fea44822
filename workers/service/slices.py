"""The slice service: every request subject in one queue group, bounded concurrency.

One reader task per subscription hands envelopes to a fixed pool of handler tasks over a
bounded memory stream, so at most `concurrency` requests are in flight; beyond that the
subscription's own bounded buffer applies and its overflow is counted (slow consumer).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any, NamedTuple

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import lukhas
from bus import BusError, Envelope, Subscription
from lukhas.catalog import ENDPOINTS
from lukhas.config import Settings
from lukhas.endpoint import Endpoint, Reply
from lukhas.errors import LukhasError
from lukhas.observability.matriz_decorators import emit_rejected
from lukhas.observability.tracing import bind_trace, parse_traceparent
from lukhas.runtime import Runtime
from lukhas.subjects import SERVICE_NAME, SLICE_QUEUE_GROUP
from workers.service import discovery
from workers.service.discovery import EndpointCounters, ServiceIdentity

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()

#: nats.micro-style error headers: a numeric code and a description.
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
_HTTP_LIKE_CODES = {"invalid_request": "400", "payload_too_large": "413", "internal": "500"}


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
        self, runtime: Runtime, *, concurrency: int | None = None, max_pending: int | None = None
    ) -> None:
        self._runtime = runtime
        self._bus = runtime.bus
        self._concurrency = concurrency or runtime.settings.worker_concurrency
        self._max_pending = max_pending or runtime.settings.worker_max_pending
        self._endpoints = serve_plan(runtime.settings)
        self._counters = {ep.subject: EndpointCounters() for ep in self._endpoints}
        #: Messages without a reply subject on read-only endpoints: counted, not handled.
        self._unawaited = {ep.subject: 0 for ep in self._endpoints if ep.endpoint.read_only}
        self.identity = ServiceIdentity(
            name=SERVICE_NAME,
            id=os.urandom(11).hex(),
            version=lukhas.__version__,
            description="LUKHAS slices: consent ledger, passkey verify, context handoff",
        )
        self._subscriptions: list[Subscription] = []
        self._by_subject: dict[str, Subscription] = {}
        self._in_flight = 0
        self._handled = 0
        self._errors = 0

    @property
    def endpoints(self) -> tuple[Served, ...]:
        return self._endpoints

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        send, receive = anyio.create_memory_object_stream[tuple[Served, Envelope]](
            self._concurrency
        )
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
            self._subscriptions = [sub for _, sub in requests] + control
            self._by_subject = {ep.subject: sub for ep, sub in requests}
            async with anyio.create_task_group() as tg:
                with receive:
                    for _ in range(self._concurrency):
                        tg.start_soon(self._work, receive.clone())
                async with send:
                    for ep, sub in requests:
                        tg.start_soon(self._read, ep, sub, send.clone())
                for sub in control:
                    tg.start_soon(self._serve_control, sub)
                await self._bus.flush()
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
        return ServiceStatistics(self._in_flight, self._handled, self._errors, dropped)

    async def _read(
        self,
        endpoint: Served,
        sub: Subscription,
        send: MemoryObjectSendStream[tuple[Served, Envelope]],
    ) -> None:
        async with send:
            if endpoint.pooled:
                async for env in sub:
                    await send.send((endpoint, env))
            else:
                async for env in sub:
                    await self._handle(endpoint, env)

    async def _work(self, receive: MemoryObjectReceiveStream[tuple[Served, Envelope]]) -> None:
        async with receive:
            async for endpoint, env in receive:
                await self._handle(endpoint, env)

    async def _handle(self, served: Served, env: Envelope) -> None:
        endpoint = served.endpoint
        if env.reply is None and endpoint.read_only:  # a query nobody awaits (announcements)
            self._unawaited[endpoint.subject] += 1
            return
        self._in_flight += 1
        started = time.perf_counter_ns()
        error_code: str | None = None
        headers: dict[str, str] | None = None
        trace_id = parse_traceparent(env.headers.get("traceparent"))
        with bind_trace(trace_id):
            reached_api = False
            try:
                message = endpoint.decode(env.data, max_bytes=served.max_bytes)
                reached_api = True
                reply = await endpoint.handler(message)
            except Exception as exc:  # the one handler boundary: every failure becomes a reply
                reply, error_code = error_reply(exc)
                headers = {
                    ERROR_HEADER: reply["error"]["message"],
                    ERROR_CODE_HEADER: _HTTP_LIKE_CODES.get(error_code, "400"),
                }
                if not reached_api:  # the API emits its own node; a rejected body has none
                    elapsed_ms = (time.perf_counter_ns() - started) / 1e6
                    emit_rejected(endpoint.emit_point, elapsed_ms, code=error_code)
            finally:
                self._in_flight -= 1
        elapsed = time.perf_counter_ns() - started
        self._counters[endpoint.subject].record(elapsed, error_code)
        self._handled += 1
        if error_code is not None:
            self._errors += 1
        logger.debug(
            "handled subject=%s outcome=%s duration_ms=%.3f",
            endpoint.subject, error_code or "ok", elapsed / 1e6,
        )
        await self._respond(env, reply, headers)

    async def _respond(
        self, env: Envelope, reply: Reply, headers: dict[str, str] | None = None
    ) -> None:
        if env.reply is None:
            return  # a plain publish: nobody is waiting for the answer
        try:
            await self._bus.publish(env.reply, _encoder.encode(reply), headers=headers)
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
        )

    def _buffer_data(self, subject: str) -> dict[str, Any] | None:
        """The endpoint's subscription buffer: pending now, bound, and slow-consumer drops."""
        sub = self._by_subject.get(subject)
        if sub is None:
            return None
        stats = sub.statistics()
        data = {"pending": stats.pending, "max_pending": stats.max_pending,
                "dropped": stats.dropped}
        if subject in self._unawaited:
            data["unawaited"] = self._unawaited[subject]
        return data
