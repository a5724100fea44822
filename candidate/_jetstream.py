"""Small JetStream helpers the candidate providers share: create-if-missing, CAS error codes."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import APIError, BucketNotFoundError
from nats.js.kv import KeyValue

from bus.nats import ensure_stream as bus_ensure_stream
from lukhas.errors import ConfigError
from lukhas.runtime import Runtime

logger = logging.getLogger(__name__)

#: JetStream's "wrong last sequence" error codes (a failed expected-last-sequence check).
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
#: "stream name already in use" (a concurrent creator got there first).
_STREAM_NAME_IN_USE = 10058


def is_wrong_last_sequence(exc: APIError) -> bool:
    """True when a publish failed only because the subject's tail moved (retry after a re-read)."""
    return exc.err_code in WRONG_LAST_SEQUENCE


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream unless it exists; an existing stream is left as it is."""
    _, created = await bus_ensure_stream(js, config)
    if created:
        logger.info("created stream %s (replicas %s)", config.name, config.num_replicas)


async def ensure_kv(
    js: JetStreamContext,
    bucket: str,
    *,
    replicas: int,
    ttl_s: float | None = None,
    history: int = 1,
) -> KeyValue:
    """Open the KV bucket, creating it first if it is missing."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        pass
    config = KeyValueConfig(
        bucket=bucket,
        history=history,
        ttl=ttl_s,
        replicas=replicas,
        storage=StorageType.FILE,
    )
    try:
        kv = await js.create_key_value(config)
        logger.info("created KV bucket %s (replicas %s, ttl %ss)", bucket, replicas, ttl_s)
        return kv
    except APIError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
        return await js.key_value(bucket)


def jetstream_of(runtime: Runtime, flag: str, what: str) -> JetStreamContext:
    """The runtime bus's JetStream context, for the provider that `flag` turned on.

    Raises:
        ConfigError: the bus is not NATS (OFFLINE, or the memory bus).
    """
    jetstream = getattr(runtime.bus, "jetstream", None)
    if runtime.bus.backend != "nats" or jetstream is None:
        raise ConfigError(
            flag,
            "true",
            f"false while the bus is {runtime.bus.backend!r}: {what} needs NATS with "
            "JetStream (unset LUKHAS_OFFLINE and give NATS_URL, or let `lukhas up` start one)",
        )
    js: JetStreamContext = jetstream()
    return js
