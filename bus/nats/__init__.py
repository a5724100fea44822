"""The NATS backend: a thin `Bus` over a nats-py client. The only package that imports `nats`.

- `_bus.py`: `NatsBus` (publish path, requests, flush, drain/close, connection callbacks)
- `_subscription.py`: `NatsSubscription`, the read path of every consumer, and its drain
- `_refusals.py`: the server's permission violations handed back to the refused call
- `_errors.py`: nats-py exceptions turned into `bus.errors`
- `_options.py`: connect options, TLS, URLs safe to log
- `_compat.py`: the nats-py internals still used, checked at import, with public fallbacks
  (`queue_hpubs`: a JetStream batch's commands laid out and queued, or written, in one piece)
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from nats.js import JetStreamContext

from bus._types import Bus
from bus.errors import BusConnectError, JetStreamUnavailable
from bus.nats._bus import NatsBus
from bus.nats._compat import queue_hpubs
from bus.nats._errors import describe
from bus.nats._options import DEFAULT_INBOX_PREFIX, client_options, redact, tls_context
from bus.nats._subscription import NatsSubscription

__all__ = ["NatsBus", "NatsSubscription", "jetstream", "open_nats_bus", "queue_hpubs"]


def jetstream(bus: Bus, **options: Any) -> JetStreamContext:
    """nats-py's JetStream context over `bus`'s connection, for components that need durability.

    `options` go to nats-py's `Client.jetstream()` (e.g. `timeout`, `domain`).

    Raises:
        JetStreamUnavailable: `bus` is not a NATS bus (the memory bus has no JetStream).
    """
    if not isinstance(bus, NatsBus):
        raise JetStreamUnavailable(bus.backend)
    return bus.jetstream(**options)


@asynccontextmanager
async def open_nats_bus(
    url: str,
    *,
    name: str | None = None,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    creds: str | None = None,
    nkey_seed: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    inbox_prefix: str | None = None,
    connect_timeout: float = 2.0,
    max_reconnect_attempts: int = -1,
    reconnect_wait: float = 2.0,
    drain_timeout: float = 10.0,
) -> AsyncIterator[NatsBus]:
    """Connect to NATS at `url` (comma-separate several servers); close on exit.

    The first connect is tried twice, briefly, so a missing server is reported at
    once; after that, reconnects are automatic (unbounded unless
    `max_reconnect_attempts` >= 0) and counted in `statistics().reconnects`.

    Args:
        creds: path to a `.creds` file (JWT + nkey seed).
        nkey_seed: an nkey seed (`SU...`) or the path of a file holding one.
        tls_ca, tls_cert, tls_key: PEM files for server verification and client auth.
        inbox_prefix: where replies to this connection's requests (and its JetStream
            deliveries) go; nats-py's `_INBOX` unless given. With per-user permissions
            each user may read only its own prefix.
        connect_timeout: seconds allowed for each connection attempt.
        max_reconnect_attempts: after a lost connection, tries per server before the
            bus closes for good; -1 retries forever, 0 does not reconnect.
        reconnect_wait: pause between reconnect attempts to the same server.
        drain_timeout: how long `drain()` waits for consumers to empty their buffers.

    Raises:
        BusConnectError: no server answered, authentication failed or the TLS or
            credential files could not be used.
    """
    bus = NatsBus(
        url,
        drain_timeout=drain_timeout,
        max_reconnect_attempts=max_reconnect_attempts,
        reconnect_wait=reconnect_wait,
        inbox_prefix=inbox_prefix or DEFAULT_INBOX_PREFIX,
    )
    try:
        tls = tls_context(tls_ca, tls_cert, tls_key)
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise BusConnectError(redact(url), f"bad TLS settings: {describe(exc)}") from exc
    options = client_options(
        name=name,
        user=user,
        password=password,
        token=token,
        creds=creds,
        nkey_seed=nkey_seed,
        tls=tls,
        inbox_prefix=inbox_prefix,
        connect_timeout=connect_timeout,
        drain_timeout=drain_timeout,
    )
    try:
        await bus.connect(**options)
    except ModuleNotFoundError as exc:  # nats-py imports `nkeys` only for creds/nkeys
        raise BusConnectError(redact(url), f"{exc}; install the `nkeys` package") from exc
    try:
        yield bus
    finally:
        await bus.close()
