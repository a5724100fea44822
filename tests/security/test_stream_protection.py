"""A weakened MATRIZ or HANDOFF stream is refused at startup, not used.

No NATS user of deploy/nats-server.conf may update a stream (test_nats_permissions.py), so
the change is made here as an admin would, on a server without users. The workers then
refuse the stream with `StreamWeakened` naming what changed; the streams they create pass
their own check on every later start, and a stronger stream (a longer max age) passes too.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig

from bus import NatsServer, open_nats_bus
from candidate._jetstream import StreamWeakened
from tests.integration.processes import REPO
from workers.service.streams import (
    HANDOFF_MAX_AGE_S,
    HANDOFF_STREAM,
    MATRIZ_STREAM,
    ensure_handoff_stream,
    ensure_matriz_stream,
)

pytestmark = pytest.mark.nats


@asynccontextmanager
async def admin() -> AsyncIterator[tuple[str, JetStreamContext]]:
    async with NatsServer() as server, open_nats_bus(server.url) as bus:
        yield server.url, bus.jetstream()


async def test_the_streams_the_workers_create_pass_their_own_check() -> None:
    async with admin() as (_, js):
        await ensure_handoff_stream(js)
        await ensure_matriz_stream(js)
        await ensure_handoff_stream(js)
        await ensure_matriz_stream(js)
        # Stronger is fine: handoffs kept longer than asked.
        info = await js.stream_info(HANDOFF_STREAM)
        info.config.max_age = HANDOFF_MAX_AGE_S * 2
        await js.update_stream(info.config)
        await ensure_handoff_stream(js)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"max_age": 1.0, "duplicate_window": 1.0}, "max_age is 1s"),
        ({"discard": DiscardPolicy.OLD}, "discard is old"),
        ({"subjects": ["lukhas.context.planner"]}, "no longer capture"),
    ],
)
async def test_a_weakened_handoff_stream_is_refused(change: dict[str, object], named: str) -> None:
    async with admin() as (_, js):
        await ensure_handoff_stream(js)
        info = await js.stream_info(HANDOFF_STREAM)
        for key, value in change.items():
            setattr(info.config, key, value)
        await js.update_stream(info.config)
        with pytest.raises(StreamWeakened, match=named) as caught:
            await ensure_handoff_stream(js)
        assert caught.value.stream == HANDOFF_STREAM


async def test_a_matriz_stream_that_misses_nodes_is_refused() -> None:
    async with admin() as (_, js):
        await js.add_stream(StreamConfig(
            name=MATRIZ_STREAM, subjects=["matriz.CONSENT.>"],
            retention=RetentionPolicy.WORK_QUEUE,
        ))
        with pytest.raises(StreamWeakened) as caught:
            await ensure_matriz_stream(js)
        text = str(caught.value)
        assert "retention is workqueue" in text and "no longer capture ['matriz.>']" in text


async def test_a_worker_refuses_to_start_on_a_weakened_stream() -> None:
    async with admin() as (url, js):
        await ensure_handoff_stream(js)
        info = await js.stream_info(HANDOFF_STREAM)
        info.config.max_age = info.config.duplicate_window = 1.0
        await js.update_stream(info.config)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "LUKHAS_"))},
            "NATS_URL": url, "FEATURE_ORCHESTRATION_HANDOFF": "true",
            "LUKHAS_PSEUDONYM_KEY": "stream-test-pseudonym-key-0123456789abcdef",
            "LUKHAS_METRICS_PORT": "0",
        }
        result = await anyio.to_thread.run_sync(functools.partial(
            subprocess.run, [sys.executable, "-m", "workers.cli.main", "worker", "slices"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        ))
    assert result.returncode != 0, result
    assert "HANDOFF was weakened" in result.stderr and "max_age is 1s" in result.stderr, (
        result.stderr[-2000:]
    )
    assert "ready" not in result.stdout
