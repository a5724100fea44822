"""JetStream helpers the candidate providers and the service's streams share: create-if-missing
(safe when workers race), the checks that an existing stream still has the protective config its
data depends on, CAS error codes, and the typed way to the bus's JetStream context.

Stream creation lives here, not in `bus/` (which knows subjects and bytes, not streams), and
below `workers/` so both the providers and `workers/service/streams.py` can import it.
"""

from __future__ import annotations

import logging
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig, StreamInfo
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

import bus.nats
from bus import BusError, JetStreamUnavailable
from lukhas.errors import ConfigError
from lukhas.runtime import Runtime

logger = logging.getLogger(__name__)

#: JetStream's "wrong last sequence" error codes (a failed expected-last-sequence check).
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
#: "stream name already in use" (a concurrent creator got there first).
_STREAM_NAME_IN_USE = 10058


class StreamWeakened(BusError):
    """An existing JetStream stream lacks a protection its users rely on (e.g. its
    retention, max age or deny_delete/deny_purge were changed), so it is not used."""

    def __init__(self, stream: str, problems: list[str]) -> None:
        super().__init__(
            f"JetStream stream {stream} was weakened and will not be used: "
            + "; ".join(problems)
            + " (restore its configuration, or move it aside so it is created again)"
        )
        self.stream = stream
        self.problems = problems


def is_wrong_last_sequence(exc: APIError) -> bool:
    """True when a publish failed only because the subject's tail moved (retry after a re-read)."""
    return exc.err_code in WRONG_LAST_SEQUENCE


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    """Create the stream unless it exists; an existing stream is left as it is.

    Returns its info, whose `config` is what the server holds (check it with
    `protection_gaps` before trusting an existing stream).
    """
    info, created = await open_stream(js, config)
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
    max_bytes: int | None = None,
    max_value_size: int | None = None,
    atomic: bool = False,
) -> KeyValue:
    """Open the KV bucket, creating it first if it is missing (with these bounds, if any).

    `atomic` creates it accepting JetStream atomic batch publishes (nats-server 2.12+), so a
    writer can store many values with one acknowledgement; a bucket that exists is opened as
    it is (see `allows_atomic`).
    """
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
        max_bytes=max_bytes,
        max_value_size=max_value_size,
    )
    try:
        if atomic:
            await js.add_stream(atomic_kv_stream_config(config))
            kv = await js.key_value(bucket)
        else:
            kv = await js.create_key_value(config)
        logger.info("created KV bucket %s (replicas %s, ttl %ss, max %s bytes%s)",
                    bucket, replicas, ttl_s, max_bytes, ", atomic batches" if atomic else "")
        return kv
    except APIError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
        return await js.key_value(bucket)


def atomic_kv_stream_config(config: KeyValueConfig) -> StreamConfig:
    """The stream nats-py's `create_key_value(config)` makes (nats-py 2.16, ADR-8 layout),
    accepting atomic batch publishes. nats-py cannot set `allow_atomic`, so this repeats its
    layout; tests/candidate/test_jetstream_kv.py fails if the two drift apart."""
    window = 120.0 if not config.ttl or config.ttl >= 120.0 else config.ttl
    return StreamConfig(
        name=f"KV_{config.bucket}",
        description=config.description,
        subjects=[f"$KV.{config.bucket}.>"],
        allow_direct=config.direct,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=window,
        max_age=config.ttl,
        max_bytes=config.max_bytes,
        max_consumers=-1,
        max_msg_size=config.max_value_size,
        max_msgs=-1,
        max_msgs_per_subject=config.history,
        num_replicas=config.replicas,
        storage=config.storage,
        republish=config.republish,
        allow_atomic=True,
    )


def atomic_allowed(config: StreamConfig) -> bool:
    """Whether a stream of this config accepts atomic batch publishes."""
    return bool(getattr(config, "allow_atomic", False))


async def allows_atomic(js: JetStreamContext, stream: str) -> bool:
    """Whether `stream` accepts atomic batch publishes."""
    return atomic_allowed((await js.stream_info(stream)).config)


def jetstream_of(runtime: Runtime, flag: str, what: str) -> JetStreamContext:
    """The runtime bus's JetStream context, for the provider that `flag` turned on.

    Raises:
        ConfigError: the bus is not NATS (OFFLINE, or the memory bus).
    """
    try:
        return bus.nats.jetstream(runtime.bus)
    except JetStreamUnavailable:
        raise ConfigError(
            flag,
            "true",
            f"false while the bus is {runtime.bus.backend!r}: {what} needs NATS with "
            "JetStream (unset LUKHAS_OFFLINE and give NATS_URL, or let `lukhas up` start one)",
        ) from None


async def open_stream(
    js: JetStreamContext, config: StreamConfig, *, protect: bool = False, check_age: bool = True
) -> tuple[StreamInfo, bool]:
    """Create the JetStream stream `config` describes unless it exists (the generic step
    under `ensure_stream`, for callers that need to know whether it was created).

    Safe when several workers race to create it. An existing stream keeps its
    configuration (limits are an operator's decision once set). Returns the stream's
    info and whether this call created it.

    Args:
        protect: refuse an existing stream that is weaker than `config` (see
            `stream_weaknesses`; `check_age` as there).

    Raises:
        StreamWeakened: `protect` is set and the existing stream is weaker.
    """
    if config.name is None:
        raise ValueError("a stream needs a name")
    try:
        info, created = await js.stream_info(config.name), False
    except NotFoundError:
        try:
            info, created = await js.add_stream(config), True
        except APIError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            info, created = await js.stream_info(config.name), False
    if protect and not created:
        problems = stream_weaknesses(info.config, config, check_age=check_age)
        if problems:
            raise StreamWeakened(config.name, problems)
    return info, created


def stream_weaknesses(
    actual: StreamConfig, wanted: StreamConfig, *, check_age: bool = True
) -> list[str]:
    """What the existing stream `actual` gives up of the protections `wanted` asks for.

    Checked: the retention policy; every wanted subject still captured; not turned into a
    mirror or a stream that sources others; deny_delete and deny_purge kept; discard-new
    kept (discard-old drops accepted messages when full); and with `check_age`, a max age
    no shorter than wanted (none when none is wanted). Larger limits are never a weakness.
    """
    problems = []
    if wanted.retention is not None and actual.retention != wanted.retention:
        problems.append(f"retention is {_name(actual.retention)}, not {_name(wanted.retention)}")
    missing = [s for s in wanted.subjects or [] if s not in (actual.subjects or [])]
    if missing:
        problems.append(f"subjects {actual.subjects} no longer capture {missing}")
    if actual.mirror is not None or actual.sources:
        problems.append("it mirrors or sources other streams")
    for flag in ("deny_delete", "deny_purge"):
        if getattr(wanted, flag) and not getattr(actual, flag):
            problems.append(f"{flag} is off")
    if wanted.discard is not None and _name(wanted.discard) == "new" and (
        _name(actual.discard) != "new"
    ):
        problems.append(f"discard is {_name(actual.discard)}, not new")
    if check_age and not _unlimited(actual.max_age) and (
        wanted.max_age is None or actual.max_age < wanted.max_age
    ):
        wanted_age = "none" if _unlimited(wanted.max_age) else f"{wanted.max_age:g}s"
        problems.append(f"max_age is {actual.max_age:g}s, wanted {wanted_age}")
    return problems


def _name(value: object) -> str:
    return str(_value(value)).lower()
