"""The runtime a public API call runs in: settings, bus, MATRIZ emitter, pseudonymizer.

There are no module-level connections: a worker (or a test) opens a runtime with
`async with open_runtime(settings, bus=bus)`, which binds it to the current task and every
task started inside. The public APIs keep the promotion plan's signatures and find it with
`current_runtime()`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio

from bus import Bus, connect
from lukhas.config import Settings
from lukhas.errors import RuntimeNotBound
from lukhas.observability.matriz_emit import MatrizEmitter
from lukhas.observability.pseudonym import Pseudonymizer

logger = logging.getLogger(__name__)

_current: ContextVar[Runtime | None] = ContextVar("lukhas_runtime", default=None)


@dataclass(slots=True)
class Runtime:
    """What a public API needs besides its arguments."""

    settings: Settings
    bus: Bus
    emitter: MatrizEmitter
    pseudonymize: Pseudonymizer
    producer: str = "lukhas"
    #: Per-runtime state a slice keeps between calls (e.g. the handoff limiter), by owner name.
    slice_state: dict[str, Any] = field(default_factory=dict)


def bound_runtime() -> Runtime | None:
    """The runtime bound to this task, or None outside `open_runtime()`."""
    return _current.get()


def current_runtime() -> Runtime:
    """The runtime bound to this task.

    Raises:
        RuntimeNotBound: called outside `open_runtime()`.
    """
    runtime = _current.get()
    if runtime is None:
        raise RuntimeNotBound(
            "no LUKHAS runtime is bound to this task: call the slice APIs inside "
            "`async with open_runtime(...)` (the workers and `lukhas up` do this for you)"
        )
    return runtime


@asynccontextmanager
async def open_runtime(
    settings: Settings | None = None,
    *,
    bus: Bus | None = None,
    producer: str = "lukhas",
) -> AsyncIterator[Runtime]:
    """Open (or adopt) a bus, start the MATRIZ emitter, and bind the runtime to this task.

    On exit the emitter publishes what it buffered and the bus is flushed; a bus opened
    here is drained and closed, an adopted one is left open for its owner.
    """
    settings = settings or Settings.from_env()
    async with AsyncExitStack() as stack:
        if bus is None:
            bus = await stack.enter_async_context(connect(settings))
        emitter = MatrizEmitter(bus, producer=producer, buffer=settings.matriz_buffer)
        runtime = Runtime(
            settings=settings,
            bus=bus,
            emitter=emitter,
            pseudonymize=Pseudonymizer(
                settings.pseudonym_key,
                previous=settings.pseudonym_previous_keys,
                warn=not settings.dry_run,
            ),
            producer=producer,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(emitter.run)
            token = _current.set(runtime)
            try:
                yield runtime
            finally:
                _current.reset(token)
                await emitter.aclose()
