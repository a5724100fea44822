"""JetStream streams the workers share, created if missing so any worker can start first.

`MATRIZ` captures `matriz.>` so the observability worker, a durable consumer, loses no node
across restarts. `HANDOFF` captures `lukhas.context.>` when durable handoffs are on, and
`DurableHandoffPublisher` is the handoff slice's provider for it, so the slice never imports nats.
Creation is idempotent and safe when two workers race to create a stream. An existing
stream whose protective configuration was weakened (another retention policy, a subject no
longer captured, a mirror or sources, for HANDOFF also discard-old or a shorter max age) is
refused with `StreamWeakened` at startup rather than used: nobody's NATS user may update a
stream (deploy/nats-server.conf), so such a change came from outside the service.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, StreamInfo

from bus import BusError, RequestTimeout
from candidate._jetstream import open_stream
from lukhas.subjects import CONTEXT_TARGET_PREFIX, MATRIZ_ALL

logger = logging.getLogger(__name__)

MATRIZ_STREAM = "MATRIZ"
#: Nodes older than this are discarded by the server (a day of history).
MATRIZ_MAX_AGE_S = 24 * 3600.0
#: The stream never holds more than this; the oldest nodes go first.
MATRIZ_MAX_BYTES = 1024 * 1024 * 1024


async def ensure_matriz_stream(
    js: JetStreamContext,
    *,
    max_age_s: float = MATRIZ_MAX_AGE_S,
    max_bytes: int = MATRIZ_MAX_BYTES,
    replicas: int = 1,
) -> StreamInfo:
    """Create the `MATRIZ` stream over `matriz.>` unless it exists; return its info.

    An existing stream is left as it is (its limits are an operator's decision once set);
    a difference from the requested limits is logged.

    Raises:
        ValueError: a limit is not positive.
        StreamWeakened: the existing stream no longer captures every node (subjects,
            retention, mirror or sources changed).
        nats.js.errors.ServiceUnavailableError: the server has JetStream disabled.
        nats.errors.NoRespondersError: likewise, on servers that answer that way.
    """
    if max_age_s <= 0 or max_bytes <= 0:
        raise ValueError(f"MATRIZ stream limits must be positive: {max_age_s=}, {max_bytes=}")
    info, created = await open_stream(js, StreamConfig(
        name=MATRIZ_STREAM,
        description="MATRIZ nodes of every instrumented LUKHAS call",
        subjects=[MATRIZ_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        max_bytes=max_bytes,
        num_replicas=replicas,
    ), protect=True, check_age=False)
    if created:
        logger.info(
            "created JetStream stream %s over %s (max_age=%gs, max_bytes=%d)",
            MATRIZ_STREAM, MATRIZ_ALL, max_age_s, max_bytes,
        )
    else:
        _log_differences(info, max_age_s=max_age_s, max_bytes=max_bytes)
    return info


def _log_differences(info: StreamInfo, *, max_age_s: float, max_bytes: int) -> None:
    config = info.config
    if MATRIZ_ALL not in (config.subjects or []):
        logger.warning(
            "stream %s exists without subject %s (subjects=%s): nodes may not be captured",
            MATRIZ_STREAM, MATRIZ_ALL, config.subjects,
        )
    if config.max_age != max_age_s or config.max_bytes != max_bytes:
        logger.info(
            "stream %s exists with max_age=%ss max_bytes=%s (requested %gs, %d); keeping it",
            MATRIZ_STREAM, config.max_age, config.max_bytes, max_age_s, max_bytes,
        )


HANDOFF_STREAM = "HANDOFF"
#: Handoffs kept for a week unless their consumers' stream limits say otherwise.
HANDOFF_MAX_AGE_S = 7 * 24 * 3600.0
HANDOFF_MAX_BYTES = 1024 * 1024 * 1024


async def ensure_handoff_stream(js: JetStreamContext, *, replicas: int = 1) -> StreamInfo:
    """Create the `HANDOFF` stream over `lukhas.context.>` unless it exists.

    When full it refuses new handoffs (discard new) rather than dropping accepted ones.

    Raises:
        StreamWeakened: the existing stream would lose accepted handoffs (retention,
            subjects, discard-old, a shorter max age, a mirror or sources).
    """
    info, _ = await open_stream(js, StreamConfig(
        name=HANDOFF_STREAM,
        description="Context handoffs, acknowledged before the caller hears ok",
        subjects=[f"{CONTEXT_TARGET_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_age=HANDOFF_MAX_AGE_S,
        max_bytes=HANDOFF_MAX_BYTES,
        num_replicas=replicas,
    ), protect=True)
    return info


class DurableHandoffPublisher:
    """The handoff slice's delivery provider under FEATURE_ORCHESTRATION_HANDOFF: a JetStream
    publish into `HANDOFF`, answered once the stream acknowledges it.

    nats-py errors become bus errors, which the handoff slice reports as `unavailable`.
    """

    name = "jetstream"
    waits_on_io = True

    def __init__(self, js: JetStreamContext, *, timeout_s: float = 5.0) -> None:
        self._js = js
        self._timeout_s = timeout_s

    async def deliver(
        self, subject: str, body: bytes, headers: Mapping[str, str]
    ) -> dict[str, Any]:
        try:
            ack = await self._js.publish(
                subject, body, timeout=self._timeout_s, headers=dict(headers)
            )
        except nats.errors.TimeoutError:
            raise RequestTimeout(subject, self._timeout_s) from None
        except nats.errors.Error as exc:
            raise BusError(f"JetStream publish to {subject} failed: {exc}") from exc
        return {"mode": "feature", "seq": ack.seq}
