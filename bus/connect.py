"""Pick and open the bus the settings ask for: in-memory or NATS, never silently swapped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal, Protocol

from bus._types import Bus
from bus.errors import BusConnectError
from bus.memory import open_memory_bus
from bus.nats import open_nats_bus

__all__ = ["BusSettings", "choose_backend", "connect", "inbox_prefix"]

#: nats-py's own inbox prefix, used when neither NATS_INBOX_PREFIX nor NATS_USER is set.
DEFAULT_INBOX_PREFIX = "_INBOX"


class BusSettings(Protocol):
    """What `connect` reads from the service settings (`lukhas.config.Settings` fits)."""

    @property
    def offline(self) -> bool: ...
    @property
    def dry_run(self) -> bool: ...
    @property
    def nats_url(self) -> str | None: ...
    @property
    def nats_user(self) -> str | None: ...
    @property
    def nats_password(self) -> str | None: ...
    @property
    def nats_token(self) -> str | None: ...
    @property
    def nats_creds(self) -> str | None: ...
    @property
    def nats_nkey_seed(self) -> str | None: ...
    @property
    def nats_tls_ca(self) -> str | None: ...
    @property
    def nats_tls_cert(self) -> str | None: ...
    @property
    def nats_tls_key(self) -> str | None: ...
    @property
    def nats_inbox_prefix(self) -> str | None: ...


def inbox_prefix(settings: BusSettings) -> str:
    """The inbox prefix this connection's replies use: NATS_INBOX_PREFIX if set, else
    `_INBOX_<NATS_USER>` (characters a subject token cannot hold become `_`), else `_INBOX`.

    deploy/nats-server.conf lets each user read only `_INBOX_<user>.>`, so the default
    follows the credentials: the same command works as whichever user runs it.
    """
    if settings.nats_inbox_prefix:
        return settings.nats_inbox_prefix
    if settings.nats_user:
        return "_INBOX_" + "".join(
            c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in settings.nats_user
        )
    return DEFAULT_INBOX_PREFIX


def choose_backend(settings: BusSettings) -> Literal["memory", "nats"]:
    """OFFLINE always, and DRY_RUN without a NATS_URL, use memory; anything else uses NATS."""
    if settings.offline or (settings.dry_run and settings.nats_url is None):
        return "memory"
    return "nats"


@asynccontextmanager
async def connect(settings: BusSettings, *, name: str | None = None) -> AsyncIterator[Bus]:
    """Open the bus the settings choose, closing it when the block exits.

    Args:
        name: the connection name NATS monitoring shows (e.g. the worker's role).

    Raises:
        BusConnectError: NATS is required but NATS_URL is unset, or unreachable. A
            failure is never papered over with the in-memory bus.
    """
    if choose_backend(settings) == "memory":
        async with open_memory_bus() as bus:
            yield bus
        return
    if settings.nats_url is None:
        raise BusConnectError(
            "(unset)",
            "NATS_URL is not set; set it to a running server, run `lukhas up` (which "
            "starts an embedded nats-server), or use LUKHAS_DRY_RUN_MODE=true or "
            "LUKHAS_OFFLINE=true for the in-memory bus",
        )
    async with open_nats_bus(
        settings.nats_url,
        name=name,
        user=settings.nats_user,
        password=settings.nats_password,
        token=settings.nats_token,
        creds=settings.nats_creds,
        nkey_seed=settings.nats_nkey_seed,
        tls_ca=settings.nats_tls_ca,
        tls_cert=settings.nats_tls_cert,
        tls_key=settings.nats_tls_key,
        inbox_prefix=inbox_prefix(settings),
    ) as bus:
        yield bus
