"""The observability worker: consumes MATRIZ nodes, aggregates them, checks SLAs, reports.

Sources. On a NATS bus with JetStream the worker reads the `MATRIZ` stream (created if
missing) through the durable pull consumer `observability`, acking each batch only after it
is aggregated: a restart resumes where the last one stopped, losing nothing and counting
nothing twice in normal operation (a crash between aggregating and acking replays that
batch). It reads with `bus.nats.pull.PullConsumer` (pull requests of its own, deliveries
taken in bulk, acks written together), not nats-py's per-message `fetch`. On the memory
bus, or a server without JetStream, it is a plain subscription to `matriz.>`, which sees
only what is published while it runs.

Outputs. A stats snapshot on request (`lukhas.observability.stats`), Prometheus text on
`/metrics`, and SLO burn-rate alerts on `lukhas.observability.alerts.<emit point tokens>`:
one message when an alert starts firing and one when it resolves (see `workers/service/_slo.py`).
Emitters' dropped-node reports (`MATRIZ_DROPS`) are folded in.

Several workers. Workers sharing the durable consumer each aggregate a part of the nodes.
Every `check_interval_s` each publishes its mergeable state (`AggregateState`, with its HDR
histograms) on `lukhas.observability.state.<worker id>` and keeps its live peers' latest
states; stats replies and alert checks merge them, so any worker answers for all. Only the
worker with the smallest id among the live ones publishes alerts, so an alert goes out once.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from typing import Any, NamedTuple

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus import Bus, BusClosed, BusError, Subscription
from bus.nats.pull import AckPolicy as PullAckPolicy
from bus.nats.pull import PullBatch, PullConsumer
from lukhas.config import Settings
from lukhas.subjects import (
    MATRIZ_ALL,
    MATRIZ_DROPS,
    OBSERVABILITY_STATE_ALL,
    OBSERVABILITY_STATE_PREFIX,
    OBSERVABILITY_STATS,
    alert_subject,
)
from workers.service._aggregate import (
    AggregateState,
    Aggregator,
    EmitPointStats,
    Source,
    StatsSnapshot,
    decode_state,
)
from workers.service._canary import CanaryJudge, CanaryPolicy
from workers.service._livefeed import LiveFeed
from workers.service._manifests import load_manifests, sla_by_emit_point
from workers.service._metrics import MatrizCollector, MetricsServer
from workers.service._overload import SERVICE_INBOXES, reply_allowed
from workers.service._slo import BurnAlert, SloSettings, slo_by_emit_point
from workers.service.streams import (
    MATRIZ_MAX_AGE_S,
    MATRIZ_MAX_BYTES,
    MATRIZ_STREAM,
    ensure_matriz_stream,
)

__all__ = [
    "DURABLE_NAME",
    "AggregateState",
    "BurnAlert",
    "EmitPointStats",
    "ObservabilityStatistics",
    "ObservabilityWorker",
    "SloSettings",
    "StatsSnapshot",
    "load_manifests",
    "sla_by_emit_point",
]

logger = logging.getLogger(__name__)

#: The durable consumer on the MATRIZ stream; a restarted worker resumes from its acks.
DURABLE_NAME = "observability"

_RETRY_MIN_S = 0.1
_RETRY_MAX_S = 5.0
#: A peer whose state is older than this many check intervals is taken as gone.
_PEER_EXPIRY_INTERVALS = 3
#: Most peer states kept (a bound against a flood of forged worker ids).
_MAX_PEERS = 64
#: Gaps kept in the record of aggregated stream sequences before the oldest are forgotten.
_MAX_SEEN_RANGES = 1024


def _ack_policy(policy: AckPolicy | None) -> PullAckPolicy:
    if policy == AckPolicy.ALL:
        return "all"
    if policy == AckPolicy.NONE:
        return "none"
    return "explicit"


class _SeenSequences:
    """Stream sequences this process has aggregated, as sorted, merged (first, last) ranges.

    nats-server persists consumer acks lazily, so after a server crash it redelivers nodes
    that were aggregated and acked; they are recognised here and not counted twice. New
    nodes arrive in stream order, so this stays one range plus one per gap.
    """

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []

    def add(self, seq: int) -> bool:
        """Record `seq`; False if it was recorded before."""
        ranges = self._ranges
        i = bisect.bisect_right(ranges, (seq, math.inf))
        if i and ranges[i - 1][1] >= seq:
            return False
        joins_prev = i > 0 and ranges[i - 1][1] == seq - 1
        joins_next = i < len(ranges) and ranges[i][0] == seq + 1
        if joins_prev and joins_next:
            ranges[i - 1] = (ranges[i - 1][0], ranges.pop(i)[1])
        elif joins_prev:
            ranges[i - 1] = (ranges[i - 1][0], seq)
        elif joins_next:
            ranges[i] = (seq, ranges[i][1])
        else:
            ranges.insert(i, (seq, seq))
            if len(ranges) > _MAX_SEEN_RANGES:
                del ranges[0]
        return True

    def clear(self) -> None:
        self._ranges.clear()


class ObservabilityStatistics(NamedTuple):
    """The worker's own counters (the aggregate itself is in `snapshot()`)."""

    source: Source
    consumed: int
    acked: int
    invalid_nodes: int
    invalid_drop_reports: int
    stats_requests: int
    alerts: int
    #: Other observability workers whose states are merged now.
    peers: int
    #: Nodes the plain subscription lost to a full buffer (0 on JetStream).
    subscription_dropped: int
    #: Stats requests not answered because their reply subject is not a requester's inbox.
    refused_replies: int = 0


class ObservabilityWorker:
    """Aggregates MATRIZ nodes per emit point and reports them; see the module docstring.

    Start it with `await tg.start(worker.run)`; `run` returns after `stop()`.

    Args:
        bus: the bus to consume from and answer on (JetStream is used when it is NATS).
        settings: the service configuration.
        metrics_port: port for `/metrics` (0 picks a free one), or None for no HTTP server.
        metrics_addr: address the metrics server binds (loopback unless told otherwise).
        manifests: parsed MODULE_MANIFEST.json objects; default: every one in `lukhas`.
        slo_settings: burn-rate alert policies and SLO period; default: from `settings`.
        clock: wall-clock epoch seconds, for the SLO windows (tests inject their own).
        check_interval_s: how often the SLOs are checked and the state is published.
        worker_id: this worker's name among its peers (default: random).
        durable: name of the durable JetStream consumer.
        stream_max_age_s, stream_max_bytes: limits of the MATRIZ stream if it is created here.
        fetch_batch, fetch_timeout_s: JetStream pull size, and how long one pull request
            waits on the server for nodes.
        fetch_linger_s: after a wake-up for only a few nodes, how long to wait for more
            before counting them (fewer wake-ups, acks and sends per node at low rates).
        ack_wait_s: how long JetStream waits for an ack before redelivering.
        ack_policy: the ack policy of the durable consumer if it is created here: `explicit`
            (one ack per node, written together; several workers may share the consumer) or
            `all` (one ack per batch; for a single worker only, as one worker's ack would
            cover nodes handed to another). An existing consumer keeps its own policy.
        max_pending: buffer bound of the plain `matriz.>` subscription.

    Raises:
        ValueError: a manifest SLA or a numeric argument is out of range.
    """

    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        *,
        metrics_port: int | None,
        metrics_addr: str = "127.0.0.1",
        manifests: Iterable[Mapping[str, Any]] | None = None,
        slo_settings: SloSettings | None = None,
        clock: Callable[[], float] = time.time,
        check_interval_s: float = 1.0,
        worker_id: str | None = None,
        durable: str = DURABLE_NAME,
        stream_max_age_s: float = MATRIZ_MAX_AGE_S,
        stream_max_bytes: int = MATRIZ_MAX_BYTES,
        fetch_batch: int = 256,
        fetch_timeout_s: float = 1.0,
        fetch_linger_s: float = 0.005,
        ack_wait_s: float = 30.0,
        ack_policy: PullAckPolicy = "explicit",
        max_pending: int = 65_536,
    ) -> None:
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535 or None, not {metrics_port!r}")
        if check_interval_s <= 0 or fetch_timeout_s <= 0 or ack_wait_s <= 0 or fetch_batch < 1:
            raise ValueError("intervals, timeouts and the fetch batch must be positive")
        self._bus = bus
        self._settings = settings
        self._requested_port = metrics_port
        self._metrics_addr = metrics_addr
        manifests = load_manifests() if manifests is None else list(manifests)
        self._aggregate = Aggregator(
            sla_by_emit_point(manifests),
            slos=slo_by_emit_point(manifests),
            slo_settings=slo_settings or SloSettings.from_settings(settings),
            clock=clock,
        )
        self._clock = clock
        #: Judges canary arms against their baselines (`_canary.py`); checked with the SLOs.
        self.canary = CanaryJudge(manifests, CanaryPolicy.from_settings(settings), clock=clock)
        self.worker_id = worker_id or os.urandom(8).hex()
        self._peers: dict[str, tuple[float, AggregateState]] = {}
        self._check_interval_s = check_interval_s
        self._durable = durable
        self._stream_max_age_s = stream_max_age_s
        self._stream_max_bytes = stream_max_bytes
        self._fetch_batch = fetch_batch
        self._fetch_timeout_s = fetch_timeout_s
        if not 0 <= fetch_linger_s < fetch_timeout_s:
            raise ValueError("fetch_linger_s must be >= 0 and shorter than fetch_timeout_s")
        self._fetch_linger_s = fetch_linger_s
        self._ack_wait_s = ack_wait_s
        if ack_policy not in ("explicit", "all"):
            raise ValueError(f"ack_policy must be 'explicit' or 'all', not {ack_policy!r}")
        self._ack_policy = AckPolicy.ALL if ack_policy == "all" else AckPolicy.EXPLICIT
        self._max_pending = max_pending
        self._encoder = msgspec.json.Encoder()

        self._source: Source = "subscription"
        self._metrics: MetricsServer | None = None
        self._subs: list[Subscription] = []
        #: The live feed for dashboards (`_livefeed.py`), fed with the nodes counted here.
        self._feed = LiveFeed(
            bus, snapshot=self.snapshot, reasons=self._merged_reasons, is_leader=self.is_leader,
            worker_id=self.worker_id, dropped=self._subscription_dropped,
        )
        self._nodes_sub: Subscription | None = None
        # Created up front so a stop that comes before the check task starts still ends it.
        self._check_scope = anyio.CancelScope()
        #: The wait for nodes in progress, cancelled by a stop (nothing is taken yet then).
        self._wait_scope: anyio.CancelScope | None = None
        self._started = False
        self._stopping = anyio.Event()
        self._done = anyio.Event()
        self._consumed = 0
        self._acked = 0
        self._next_stream_seq: int | None = None
        self._seen = _SeenSequences()
        self._stats_requests = 0
        self._refused_replies = 0

    # -- public surface ----------------------------------------------------------------------

    @property
    def metrics_port(self) -> int | None:
        """The port `/metrics` is bound to (after `run` has started), else None."""
        return None if self._metrics is None else self._metrics.port

    @property
    def source(self) -> Source:
        """`jetstream` or `subscription`: where nodes come from (decided when `run` starts)."""
        return self._source

    @property
    def slas(self) -> dict[str, float]:
        """Emit point → p95 SLA in ms, as read from the manifests."""
        return self._aggregate.slas()

    @property
    def aggregate(self) -> Aggregator:
        return self._aggregate

    def snapshot(self) -> StatsSnapshot:
        """What the stats request answers: per emit point counts, percentiles and SLO state,
        merged over this worker and its live peers."""
        return self._aggregate.snapshot(
            source=self._source, worker_id=self.worker_id, peers=self.peer_states()
        )

    def peer_states(self) -> list[AggregateState]:
        """The latest state of every live peer (those heard from recently)."""
        horizon = self._clock() - _PEER_EXPIRY_INTERVALS * self._check_interval_s
        return [state for heard, state in list(self._peers.values()) if heard >= horizon]

    def is_leader(self) -> bool:
        """True when this worker publishes the alerts: the smallest id among live workers."""
        return all(self.worker_id < s.worker_id for s in self.peer_states())

    def statistics(self) -> ObservabilityStatistics:
        invalid_nodes, invalid_reports, alerts = self._aggregate.statistics()
        nodes_sub = self._nodes_sub
        return ObservabilityStatistics(
            source=self._source,
            consumed=self._consumed,
            acked=self._acked,
            invalid_nodes=invalid_nodes,
            invalid_drop_reports=invalid_reports,
            stats_requests=self._stats_requests,
            alerts=alerts,
            peers=len(self.peer_states()),
            subscription_dropped=0 if nodes_sub is None else nodes_sub.statistics().dropped,
            refused_replies=self._refused_replies,
        )

    async def check_slos(self) -> list[BurnAlert]:
        """Publish the SLO alerts that start firing or resolve now; return them.

        Burn rates are over this worker's and its live peers' events. Every worker tracks
        the alert states, only the leader (`is_leader`) publishes. The periodic check in
        `run` calls this every `check_interval_s`; tests may call it directly.
        """
        alerts = self._aggregate.due_alerts(self.peer_states())
        if not self.is_leader():
            return []
        for alert in alerts:
            logger.log(
                logging.WARNING if alert.state == "firing" else logging.INFO,
                "SLO %s %s at %s: burn rate %.2f over %gs and %.2f over %gs (threshold %g), "
                "error budget left %.1f%%",
                alert.severity, alert.state, alert.emit_point, alert.long_burn_rate,
                alert.long_window_s, alert.short_burn_rate, alert.short_window_s,
                alert.burn_rate_threshold, 100 * alert.error_budget_remaining,
            )
            try:
                await self._bus.publish(
                    alert_subject(alert.emit_point), self._encoder.encode(alert)
                )
            except BusError as exc:
                logger.error("could not publish the SLO alert for %s: %s", alert.emit_point, exc)
        return alerts

    async def publish_state(self) -> None:
        """Publish this worker's mergeable state for its peers."""
        state = self._aggregate.export_state(self.worker_id)
        try:
            await self._bus.publish(
                f"{OBSERVABILITY_STATE_PREFIX}.{self.worker_id}", self._encoder.encode(state)
            )
        except BusError as exc:
            logger.warning("could not publish the observability state: %s", exc)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume, aggregate and report until `stop()`; ready once every subscription is live.

        Raises:
            RuntimeError: `run` was already called on this worker.
            OSError: the metrics port cannot be bound.
        """
        if self._started:
            raise RuntimeError("an ObservabilityWorker runs once; create a new one")
        self._started = True
        try:
            async with AsyncExitStack() as stack:
                if self._requested_port is not None:
                    self._metrics = await anyio.to_thread.run_sync(
                        functools.partial(
                            MetricsServer.start,
                            MatrizCollector(
                                self.snapshot, self._aggregate.own_points,
                                self._aggregate.slos(),
                            ),
                            port=self._requested_port, addr=self._metrics_addr,
                        )
                    )
                    stack.push_async_callback(self._close_metrics)
                drops = await stack.enter_async_context(self._bus.subscribe(MATRIZ_DROPS))
                stats = await stack.enter_async_context(self._bus.subscribe(OBSERVABILITY_STATS))
                peers = await stack.enter_async_context(
                    self._bus.subscribe(OBSERVABILITY_STATE_ALL)
                )
                pull = await self._open_pull()
                if pull is None:
                    nodes: Subscription | None = await stack.enter_async_context(
                        self._bus.subscribe(MATRIZ_ALL, max_pending=self._max_pending)
                    )
                    self._nodes_sub = nodes
                    self._subs = [nodes, drops, stats, peers]
                else:
                    nodes = None
                    self._source = "jetstream"
                    self._subs = [drops, stats, peers]
                async with anyio.create_task_group() as tg:
                    if pull is not None:
                        tg.start_soon(self._until_done, self._consume_jetstream, pull)
                    else:
                        assert nodes is not None
                        tg.start_soon(self._until_done, self._consume_subscription, nodes)
                    tg.start_soon(self._until_done, self._consume_drops, drops)
                    tg.start_soon(self._until_done, self._serve_stats, stats)
                    tg.start_soon(self._until_done, self._consume_peers, peers)
                    tg.start_soon(self._check_periodically)
                    tg.start_soon(self._stop_when_asked)
                    logger.info(
                        "observability worker %s ready: source=%s, %d SLOs, metrics=%s",
                        self.worker_id, self._source, len(self._aggregate.slos()),
                        "off" if self._metrics is None
                        else f"http://{self._metrics_addr}:{self._metrics.port}/metrics",
                    )
                    task_status.started()
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Stop gracefully: finish and ack what was taken, drain subscriptions, stop /metrics.

        Returns once `run` has returned (at once if it never started).
        """
        self._stopping.set()
        if self._started:
            await self._done.wait()

    # -- node sources ------------------------------------------------------------------------

    async def _open_pull(self) -> PullConsumer | None:
        """The durable consumer's bulk reader, or None when the bus has no JetStream."""
        if self._bus.backend != "nats":
            return None
        js: JetStreamContext = self._bus.jetstream()  # type: ignore[attr-defined]
        try:
            await ensure_matriz_stream(
                js, max_age_s=self._stream_max_age_s, max_bytes=self._stream_max_bytes
            )
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
            logger.warning(
                "JetStream is not available (%s): consuming %s with a plain subscription, "
                "so nodes published while this worker is down are not counted",
                exc, MATRIZ_ALL,
            )
            return None
        return await self._pull_consumer(js)

    async def _pull_consumer(
        self, js: JetStreamContext, *, start_seq: int | None = None
    ) -> PullConsumer:
        """Bind to the durable consumer, creating it (from `start_seq`, or the stream's first
        node) if it does not exist, and open its bulk reader (not yet entered)."""
        try:
            info = await js.consumer_info(MATRIZ_STREAM, self._durable)
        except nats.js.errors.NotFoundError:
            policy = DeliverPolicy.ALL if start_seq is None else DeliverPolicy.BY_START_SEQUENCE
            info = await js.add_consumer(MATRIZ_STREAM, ConsumerConfig(
                durable_name=self._durable,
                deliver_policy=policy,
                opt_start_seq=start_seq,
                ack_policy=self._ack_policy,
                ack_wait=self._ack_wait_s,
                max_ack_pending=max(1000, 4 * self._fetch_batch),
                description="LUKHAS observability worker",
            ))
        ack_policy = _ack_policy(info.config.ack_policy)
        if info.config.ack_policy != self._ack_policy:
            # The server cannot change a consumer's ack policy; deleting it here would lose
            # its position, so the operator decides (delete it, and a worker recreates it).
            logger.info("the MATRIZ consumer %r exists with ack policy %r (a new one would get "
                        "%r); keeping it", self._durable, ack_policy,
                        _ack_policy(self._ack_policy))
        if ack_policy == "none":
            logger.warning("the MATRIZ consumer %r acks nothing: nodes delivered to a worker "
                           "that stops before counting them are lost", self._durable)
        pull = PullConsumer(
            self._bus,  # type: ignore[arg-type]
            MATRIZ_STREAM, self._durable, ack_policy=ack_policy,
            batch=self._fetch_batch, expires_s=self._fetch_timeout_s,
            linger_s=self._fetch_linger_s,
        )
        return await pull.__aenter__()

    async def _consume_jetstream(self, pull: PullConsumer) -> None:
        retry_s = _RETRY_MIN_S
        try:
            while not self._stopping.is_set():
                try:
                    batch: PullBatch | None = None
                    with anyio.CancelScope() as self._wait_scope:
                        batch = await pull.next_batch(self._fetch_timeout_s)
                    self._wait_scope = None
                    if batch is None:  # stop() while waiting for nodes: nothing was taken
                        break
                except BusClosed:
                    logger.warning("NATS connection closed: the MATRIZ consumer stops")
                    return
                except BusError as exc:
                    # ConsumerGone (deleted stream or consumer), PullRefused, a failed request:
                    # reopen, recreating both where needed.
                    logger.warning("MATRIZ pull failed (%s); retrying in %.1fs", exc, retry_s)
                    await anyio.sleep(retry_s)
                    retry_s = min(retry_s * 2, _RETRY_MAX_S)
                    pull = await self._reopen_pull(pull)
                    continue
                retry_s = _RETRY_MIN_S
                if batch.messages and not await self._take_batch(pull, batch):
                    return
            # Stopping: what the server sent before it heard of the stop is counted and acked.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                await self._take_batch(pull, await pull.drain())
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                await pull.close()

    async def _take_batch(self, pull: PullConsumer, batch: PullBatch) -> bool:
        """Aggregate a batch, then ack all of it in one go; False if the bus closed.

        The hot path, per node: a membership test of its stream sequence, one cheap test by
        the canary judge, one decode by the aggregate (the batch under one lock). Acks go out
        after aggregation, so an unacked node is redelivered and recognised by its sequence
        rather than counted twice.
        """
        seen, canary = self._seen.add, self.canary.observe
        fresh = []
        for seq, data in batch.messages:
            if seen(seq):
                fresh.append(data)
                canary(data)
            else:  # a redelivery of a node counted already: just ack it again
                logger.debug("skipping redelivered MATRIZ node %d", seq)
        self._aggregate.ingest_batch(fresh)
        self._feed.observe(fresh)
        self._consumed += len(fresh)
        if batch.messages:  # redeliveries may come after newer nodes: the highest counts
            highest = max(seq for seq, _ in batch.messages)
            self._next_stream_seq = max(self._next_stream_seq or 0, highest + 1)
        try:
            await pull.ack(batch)
        except BusError as exc:
            logger.warning("could not ack a MATRIZ batch (%s); it will replay", exc)
            return not self._bus.is_closed
        self._acked += len(batch.messages)
        await self._feed.flush()
        return True

    async def _reopen_pull(self, pull: PullConsumer) -> PullConsumer:
        js: JetStreamContext = self._bus.jetstream()  # type: ignore[attr-defined]
        try:
            info = await ensure_matriz_stream(
                js, max_age_s=self._stream_max_age_s, max_bytes=self._stream_max_bytes
            )
            # A consumer deleted under us is recreated after the last node we acked, so
            # nothing is counted twice; a stream recreated (sequences restarted) from its start.
            start = self._next_stream_seq
            if start is not None and info.state.last_seq + 1 < start:
                start = None
                self._seen.clear()  # sequences restarted: the old ones mean other nodes
            fresh = await self._pull_consumer(js, start_seq=start)
        except (nats.js.errors.APIError, nats.errors.Error, BusError) as exc:
            logger.warning("could not recreate the MATRIZ consumer: %s", exc)
            return pull  # the next pull fails again and retries after a longer pause
        await pull.close()
        return fresh

    async def _consume_subscription(self, sub: Subscription) -> None:
        feed = self._feed
        async for env in sub:
            self._aggregate.ingest(env.data)
            self.canary.observe(env.data)
            feed.observe((env.data,))
            self._consumed += 1
            if sub.statistics().pending == 0:  # a lone node at once, a burst together
                await feed.flush()
        await feed.flush()

    def _merged_reasons(self) -> dict[str, dict[str, int]]:
        return self._aggregate.reasons(self.peer_states())

    def _subscription_dropped(self) -> int:
        return 0 if self._nodes_sub is None else self._nodes_sub.statistics().dropped

    # -- the rest ----------------------------------------------------------------------------

    async def _consume_drops(self, sub: Subscription) -> None:
        async for env in sub:
            if not self._aggregate.ingest_drop_report(env.data):
                logger.debug("malformed drop report on %s skipped", env.subject)

    async def _serve_stats(self, sub: Subscription) -> None:
        """Answer stats requests, only on a requester's inbox (as the slice service does):
        NATS does not check reply subjects, so anything else could make this worker publish
        where the requester may not (alerts, another worker's inbox)."""
        own = self._bus.new_inbox().partition(".")[0]
        refused = SERVICE_INBOXES | ({own} if own != "_INBOX" else set())
        async for env in sub:
            if env.reply is None:
                continue
            if not reply_allowed(env.reply, refused):
                self._refused_replies += 1
                if self._refused_replies == 1 or self._refused_replies % 1000 == 0:
                    logger.warning("refused a stats request whose reply subject is not an "
                                   "inbox (%d refused so far)", self._refused_replies)
                continue
            self._stats_requests += 1
            try:
                await self._bus.publish(env.reply, self._encoder.encode(self.snapshot()))
            except BusError as exc:
                logger.warning("could not answer a stats request: %s", exc)

    async def _consume_peers(self, sub: Subscription) -> None:
        async for env in sub:
            peer_id = env.subject.rsplit(".", 1)[-1]
            if peer_id == self.worker_id:
                continue
            try:
                state = decode_state(env.data)
            except msgspec.DecodeError as exc:
                logger.debug("malformed observability state on %s skipped: %s", env.subject, exc)
                continue
            if state.worker_id != peer_id:
                continue
            if peer_id not in self._peers and len(self._peers) >= _MAX_PEERS:
                self._expire_peers()
                if len(self._peers) >= _MAX_PEERS:
                    continue
            self._peers[peer_id] = (self._clock(), state)

    def _expire_peers(self) -> None:
        horizon = self._clock() - _PEER_EXPIRY_INTERVALS * self._check_interval_s
        for peer_id in [p for p, (heard, _) in self._peers.items() if heard < horizon]:
            del self._peers[peer_id]

    async def _until_done(self, loop: Callable[[Any], Awaitable[None]], source: Any) -> None:
        """Run one consuming loop; if it ends without `stop()` (the bus closed under us),
        stop the rest too, so `run` returns instead of serving half a worker."""
        try:
            await loop(source)
        finally:
            if not self._stopping.is_set():
                logger.warning("observability input %s ended: the worker stops", loop.__name__)
                self._stopping.set()

    async def _check_periodically(self) -> None:
        with self._check_scope:
            while True:
                await anyio.sleep(self._check_interval_s)
                await self.publish_state()
                self._expire_peers()
                await self.check_slos()
                await self.canary.check(self._bus, self.worker_id)
                await self._feed.publish_snapshot()

    async def _stop_when_asked(self) -> None:
        await self._stopping.wait()
        self._check_scope.cancel()
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        # Drained subscriptions hand out what they buffered, then their loops end; the
        # JetStream loop sees the flag after the pull in progress and acks that batch.
        for sub in self._subs:
            try:
                await sub.drain()
            except BusError as exc:
                logger.debug("drain %s: %s", sub.subject, exc)

    async def _close_metrics(self) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        # Shielded: a cancelled `run` must still close the socket and join the thread.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(metrics.close)
