"""JetStream streams the workers share, created if missing so any worker can start first.

Only the MATRIZ stream lives here today: it captures `matriz.>` so the observability worker,
a durable consumer, loses no node across restarts. Creation is idempotent and safe when two
workers race to create it.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.errors import BadRequestError, NotFoundError

from lukhas.subjects import MATRIZ_ALL

logger = logging.getLogger(__name__)

MATRIZ_STREAM = "MATRIZ"
#: Nodes older than this are discarded by the server (a day of history).
MATRIZ_MAX_AGE_S = 24 * 3600.0
#: The stream never holds more than this; the oldest nodes go first.
MATRIZ_MAX_BYTES = 1024 * 1024 * 1024

# JetStream's "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


async def ensure_matriz_stream(
    js: JetStreamContext,
    *,
    max_age_s: float = MATRIZ_MAX_AGE_S,
    max_bytes: int = MATRIZ_MAX_BYTES,
) -> StreamInfo:
    """Create the `MATRIZ` stream over `matriz.>` unless it exists; return its info.

    An existing stream is left as it is (its limits are an operator's decision once set);
    a difference from the requested limits is logged.

    Raises:
        ValueError: a limit is not positive.
        nats.js.errors.ServiceUnavailableError: the server has JetStream disabled.
        nats.errors.NoRespondersError: likewise, on servers that answer that way.
    """
    if max_age_s <= 0 or max_bytes <= 0:
        raise ValueError(f"MATRIZ stream limits must be positive: {max_age_s=}, {max_bytes=}")
    try:
        info = await js.stream_info(MATRIZ_STREAM)
    except NotFoundError:
        config = StreamConfig(
            name=MATRIZ_STREAM,
            description="MATRIZ nodes of every instrumented LUKHAS call",
            subjects=[MATRIZ_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=max_age_s,
            max_bytes=max_bytes,
        )
        try:
            info = await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            # Another worker created it between our lookup and our create.
            info = await js.stream_info(MATRIZ_STREAM)
        else:
            logger.info(
                "created JetStream stream %s over %s (max_age=%gs, max_bytes=%d)",
                MATRIZ_STREAM, MATRIZ_ALL, max_age_s, max_bytes,
            )
            return info
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
