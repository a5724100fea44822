"""The nats-py internals the bus uses (bus/nats/_compat.py): checked at import, with a public
fallback. The whole bus contract also runs on the fallback (the "nats-public" parameter of the
`open_bus` fixture); these tests pin the check itself and what the fallback must still do."""

from __future__ import annotations

import logging

import anyio
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription as RawSubscription

from bus import open_nats_bus
from bus.nats import _compat

pytestmark = pytest.mark.nats


def test_the_installed_nats_py_has_every_internal_the_fast_path_uses() -> None:
    # pyproject bounds nats-py to releases this passes on; a new release that changed the
    # internals fails here (and the bus would still work, on the public API).
    assert _compat.missing_internals() == []
    assert isinstance(_compat.INTERNALS, _compat.PrivateInternals)


def test_a_nats_py_without_send_unsubscribe_falls_back_to_the_public_api(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(Client, "_send_unsubscribe")
    with caplog.at_level(logging.WARNING, logger=_compat.__name__):
        chosen = _compat._choose()
    assert isinstance(chosen, _compat.PublicInternals)
    assert "async Client._send_unsubscribe" in caplog.text


def test_a_subscription_that_no_longer_keeps_a_pending_queue_is_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = RawSubscription.__init__

    def reworked(self: RawSubscription, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RawSubscription, "__init__", reworked)
    missing = _compat.missing_internals()
    assert "Subscription._pending_queue" in missing
    assert isinstance(_compat._choose(), _compat.PublicInternals)


def test_use_public_api_switches_buses_opened_afterwards() -> None:
    previous = _compat.use_public_api()
    try:
        assert isinstance(_compat.INTERNALS, _compat.PublicInternals)
    finally:
        _compat.INTERNALS = previous
    assert isinstance(_compat.INTERNALS, _compat.PrivateInternals)


async def test_both_paths_serve_requests_and_drain_what_is_buffered(
    nats_url: str, subject_root: str, internals: str
) -> None:
    async with open_nats_bus(nats_url) as server, open_nats_bus(nats_url) as client:
        assert server.internals == internals
        async with server.subscribe(f"{subject_root}.echo") as sub:
            async with anyio.create_task_group() as tg:

                async def echo() -> None:
                    async for env in sub:
                        assert env.reply is not None
                        await server.publish(env.reply, env.data.upper())

                tg.start_soon(echo)
                for i in range(50):
                    reply = await client.request(f"{subject_root}.echo", b"ping%d" % i)
                    assert reply.data == b"PING%d" % i
                tg.cancel_scope.cancel()

        # Messages already buffered when drain() starts are all delivered, in order.
        async with server.subscribe(f"{subject_root}.drain") as sub:
            for i in range(100):
                await client.publish(f"{subject_root}.drain", b"%d" % i)
            await client.flush()
            await server.flush()
            with anyio.fail_after(5):
                while sub.statistics().pending < 100:
                    await anyio.lowlevel.checkpoint()
            await sub.drain()
            got = [env.data async for env in sub]
            assert got == [b"%d" % i for i in range(100)]
            assert sub.statistics().delivered == 100


async def test_both_paths_end_a_waiting_consumer_when_the_bus_closes(
    nats_url: str, subject_root: str, internals: str
) -> None:
    ended = anyio.Event()
    async with open_nats_bus(nats_url) as bus, bus.subscribe(f"{subject_root}.idle") as sub:
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                async for _ in sub:
                    raise AssertionError("nothing was published")
                ended.set()

            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            await bus.close()
            with anyio.fail_after(5):
                await ended.wait()


async def test_the_open_bus_fixture_runs_the_contract_on_both_paths(
    open_bus: object, request: pytest.FixtureRequest
) -> None:
    expected = {"memory": None, "nats": "private", "nats-public": "public"}
    async with open_bus() as bus:  # type: ignore[operator]
        assert getattr(bus, "internals", None) == expected[request.node.callspec.params["open_bus"]]
