"""`candidate._jetstream.ensure_kv(atomic=True)` makes the bucket nats-py would, plus atomic
batches: a guard against our copy of nats-py's KV stream layout drifting from it."""

from __future__ import annotations

import dataclasses
import secrets

import pytest
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType

from candidate._jetstream import allows_atomic, ensure_kv


@pytest.mark.parametrize("ttl_s", [None, 30.0, 600.0])
async def test_an_atomic_bucket_is_nats_pys_bucket_plus_atomic_batches(
    nats_url: str, ttl_s: float | None
) -> None:
    nc = Client()
    await nc.connect(nats_url)
    try:
        js = nc.jetstream()
        theirs, ours = f"kv_theirs_{secrets.token_hex(4)}", f"kv_ours_{secrets.token_hex(4)}"
        bounds = {"history": 3, "max_bytes": 1 << 20, "max_value_size": 4096}
        await js.create_key_value(KeyValueConfig(bucket=theirs, ttl=ttl_s, replicas=1,
                                                 storage=StorageType.FILE, **bounds))
        kv = await ensure_kv(js, ours, replicas=1, ttl_s=ttl_s, atomic=True, **bounds)
        a = (await js.stream_info(f"KV_{theirs}")).config
        b = (await js.stream_info(f"KV_{ours}")).config
        assert b.allow_atomic and not a.allow_atomic
        assert await allows_atomic(js, f"KV_{ours}")
        assert not await allows_atomic(js, f"KV_{theirs}")
        # metadata: the server notes the API level a feature needs (atomic batches: 2).
        same = {"name": None, "subjects": None, "allow_atomic": None, "metadata": None}
        assert dataclasses.replace(a, **same) == dataclasses.replace(b, **same)
        await kv.put("k", b"v")  # and it is a working bucket
        assert (await kv.get("k")).value == b"v"
        reopened = await ensure_kv(js, ours, replicas=1, atomic=True)
        assert (await reopened.get("k")).value == b"v"
    finally:
        await nc.close()
