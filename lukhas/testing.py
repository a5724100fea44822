"""Test helpers shipped with the package: a DRY_RUN runtime and a MATRIZ recorder.

They are for this project's tests and for users testing code that calls the slices; nothing
in the service imports them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources
from typing import Any

import msgspec

from bus import Bus, Subscription
from lukhas.config import Settings
from lukhas.runtime import Runtime, open_runtime
from lukhas.subjects import MATRIZ_ALL

#: The queue budget of test services (ms): functional tests check behaviour, not load, and a
#: busy machine must not make them shed; overload tests set their own budgets.
TEST_QUEUE_BUDGET_MS = 10_000.0


def dry_run_settings(**overrides: Any) -> Settings:
    """Settings for an offline DRY_RUN process, with `overrides` applied."""
    base = Settings(
        dry_run=True, offline=True, pseudonym_key="test-pseudonym-key",
        worker_queue_budget_ms=TEST_QUEUE_BUDGET_MS,
    )
    return dataclasses.replace(base, **overrides)


@cache
def matriz_schema() -> dict[str, Any]:
    """The MATRIZ node JSON schema the emitter's output must satisfy."""
    text = resources.files("lukhas.observability").joinpath("matriz_node_v1.json").read_text()
    return json.loads(text)


class MatrizRecorder:
    """Reads nodes from a `matriz.>` subscription; `take(n)` waits for the next n."""

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub
        self.nodes: list[dict[str, Any]] = []
        self.subjects: list[str] = []

    async def take(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next `count` nodes, decoded; raises RequestTimeout if they do not come."""
        taken = []
        for _ in range(count):
            env = await self._sub.next(timeout)
            node = msgspec.json.decode(env.data)
            self.subjects.append(env.subject)
            taken.append(node)
        self.nodes.extend(taken)
        return taken


@asynccontextmanager
async def open_test_runtime(
    settings: Settings | None = None, *, bus: Bus | None = None
) -> AsyncIterator[tuple[Runtime, MatrizRecorder]]:
    """A runtime (DRY_RUN, memory bus unless `bus` is given) and a recorder of its nodes."""
    async with open_runtime(settings or dry_run_settings(), bus=bus) as runtime:
        async with runtime.bus.subscribe(MATRIZ_ALL) as sub:
            yield runtime, MatrizRecorder(sub)
