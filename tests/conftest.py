"""Bus fixtures: one real nats-server per session, and a factory that opens either backend.

The server fixture is synchronous and holds no task group or event loop, so it can live
for the whole session; each test opens its bus in its own body through `open_bus()`,
because pytest-asyncio sets fixtures up and tears them down in different tasks
(pytest-dev/pytest-asyncio#1191) and a bus must be closed in the task that opened it.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from functools import partial

import pytest

from bus import Bus, NatsServer, open_memory_bus, open_nats_bus
from bus.nats import _compat
from bus.server import find_nats_server

BusFactory = Callable[[], AbstractAsyncContextManager[Bus]]


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free loopback port, shared by the session."""
    try:
        find_nats_server()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    server = NatsServer(store_dir=tmp_path_factory.mktemp("nats-store"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture(
    params=[
        "memory",
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("nats-public", marks=pytest.mark.nats),
    ]
)
def open_bus(request: pytest.FixtureRequest) -> BusFactory:
    """`async with open_bus() as bus:` opens the backend this test run is parametrized with.

    "nats-public" is the NATS bus forced onto nats-py's public API only (the fallback
    `bus/nats/_compat.py` takes when a nats-py release lacks the internals it checks for).
    """
    if request.param == "memory":
        return open_memory_bus
    if request.param == "nats-public":
        use_public_natspy(request.getfixturevalue("monkeypatch"))
    return partial(open_nats_bus, request.getfixturevalue("nats_url"))


@pytest.fixture(params=["private", "public"])
def internals(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which nats-py access `bus/nats/_compat.py` uses for this run of the test: "private"
    (its checked internals, the default) or "public" (nats-py's public API only, the
    fallback for a release without them). The name, for tests that assert on it."""
    if request.param == "public":
        use_public_natspy(monkeypatch)
    return str(request.param)


def use_public_natspy(monkeypatch: pytest.MonkeyPatch) -> None:
    """For this test, the NATS bus uses nats-py's public API only (`_compat.PublicInternals`)."""
    monkeypatch.setattr(_compat, "INTERNALS", _compat.PublicInternals())


@pytest.fixture
def subject_root() -> str:
    """A subject prefix no other test uses, so tests sharing one server never cross-talk."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Unfreeze, after the test, a heap it froze in this process as a worker does
    (`freeze_heap`)."""
    yield None
    gc.unfreeze()
