"""Small JetStream helpers the candidate providers share: create-if-missing, CAS error codes,
and the check that an existing stream still has the protective config its data depends on."""

from __future__ import annotations

import logging
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig, StreamInfo
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


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    """Create the stream unless it exists; an existing stream is left as it is.

    Returns its info, whose `config` is what the server holds (check it with
    `protection_gaps` before trusting an existing stream).
    """
    info, created = await bus_ensure_stream(js, config)
    if created:
        logger.info("created stream %s (replicas %s)", config.name, config.num_replicas)
    return info


def _value(value: Any) -> Any:
    """An enum's wire value (configs read back from the server hold plain strings)."""
    return getattr(value, "value", value)


def _unlimited(value: int | float | None) -> bool:
    return value is None or value <= 0


def protection_gaps(actual: StreamConfig, required: StreamConfig) -> list[str]:
    """How `actual` is weaker than `required` for an append-only, never-forgetting stream.

    Checked: subjects, retention, storage, replicas (at least the required number), no age,
    count or size limit that would remove records (`max_age`, `max_msgs`, `max_bytes`,
    `max_msgs_per_subject`), discard new, deny delete and purge, no rollups or per-message
    TTLs (both remove records), no mirror, sources, subject transform or republish (records
    arriving from, stored under or copied to somewhere else). Returns one readable line per
    weakened field; empty when the stream is as protective as required.
    """
    gaps: list[str] = []

    def gap(field: str, value: Any, wanted: str) -> None:
        gaps.append(f"{field}={value!r} (required: {wanted})")

    if sorted(actual.subjects or []) != sorted(required.subjects or []):
        gap("subjects", actual.subjects, f"exactly {required.subjects}")
    if _value(actual.retention) != _value(required.retention):
        gap("retention", _value(actual.retention), str(_value(required.retention)))
    if _value(actual.storage) != _value(required.storage):
        gap("storage", _value(actual.storage), str(_value(required.storage)))
    if (actual.num_replicas or 1) < (required.num_replicas or 1):
        gap("num_replicas", actual.num_replicas, f">= {required.num_replicas}")
    for field in ("max_age", "max_msgs", "max_bytes", "max_msgs_per_subject"):
        if not _unlimited(getattr(actual, field)):
            gap(field, getattr(actual, field), "unlimited: a limit removes records")
    if _value(actual.discard) != _value(required.discard):
        gap("discard", _value(actual.discard), str(_value(required.discard)))
    for field in ("deny_delete", "deny_purge"):
        if getattr(required, field) and not getattr(actual, field):
            gap(field, getattr(actual, field), "true")
    for field in ("allow_rollup_hdrs", "allow_msg_ttl"):
        if getattr(actual, field):
            gap(field, getattr(actual, field), "false: it lets a message remove records")
    for field in ("mirror", "sources", "subject_transform", "republish"):
        if getattr(actual, field):
            gap(field, "set", "none: records must be written here and stay here")
    if _value(actual.persist_mode) not in (None, "default"):
        gap("persist_mode", _value(actual.persist_mode), "default (synchronous)")
    return gaps


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
