"""The benchmark's comparison point: the same slice handlers written with FastStream's NATS broker.

Each handler is what a FastStream user would write: typed parameters decoded and validated
by FastStream (pydantic), the same public API called inside, the returned dict sent back
as the reply. The handlers run with the same concurrency as the slice service and call the
APIs in the same runtime, so MATRIZ nodes are emitted exactly as in the slice service.
FastStream is an optional extra (`pip install lukhas-slices[bench]`); nothing else imports
this module.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from lukhas.governance.consent_ledger import api as consent
from lukhas.identity.passkey import api as passkey
from lukhas.orchestration.context import api as context

#: The subjects the FastStream handlers serve, under a prefix of their own.
SUBJECTS = {
    "consent_record": "bench.faststream.consent.record",
    "passkey_verify": "bench.faststream.passkey.verify",
    "context_handoff": "bench.faststream.context.handoff",
}
QUEUE = "lukhas-bench-faststream"


def faststream_version() -> str | None:
    """FastStream's version, or None when the `bench` extra is not installed."""
    if importlib.util.find_spec("faststream") is None:
        return None
    try:
        return metadata.version("faststream")
    except metadata.PackageNotFoundError:
        return None


@asynccontextmanager
async def serve_faststream(url: str, *, concurrency: int) -> AsyncIterator[dict[str, str]]:
    """Serve the three slice handlers with FastStream on `url`; yields their subjects.

    Enter it inside the runtime the handlers should use: FastStream's handler tasks are
    created when the broker starts and inherit the runtime bound to the current task.

    Raises:
        ModuleNotFoundError: FastStream is not installed.
    """
    from faststream.nats import NatsBroker

    # Access logging off: the slice service logs requests at DEBUG, which is off too.
    broker = NatsBroker(url, logger=None)

    @broker.subscriber(SUBJECTS["consent_record"], queue=QUEUE, max_workers=concurrency)
    async def record(
        user_id: str, scope: str, metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await consent.record_consent(user_id, scope, metadata)

    @broker.subscriber(SUBJECTS["passkey_verify"], queue=QUEUE, max_workers=concurrency)
    async def verify(assertion: dict[str, Any]) -> dict[str, Any]:
        return await passkey.verify_passkey(assertion)

    @broker.subscriber(SUBJECTS["context_handoff"], queue=QUEUE, max_workers=concurrency)
    async def handoff(ctx: dict[str, Any], target: str = "default") -> dict[str, Any]:
        return await context.handoff_context(ctx, target)

    await broker.start()
    try:
        yield dict(SUBJECTS)
    finally:
        await broker.stop()
