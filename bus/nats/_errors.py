"""nats-py's exceptions turned into the bus's own, so callers never import `nats`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import nats.errors

from bus.errors import (
    BusClosed,
    BusError,
    InvalidHeader,
    InvalidSubject,
    NoResponders,
    RequestTimeout,
)

__all__ = ["describe", "raise_translated", "translated"]


@contextmanager
def translated(subject: str = "", timeout: float = 0.0) -> Iterator[None]:
    """Re-raise a nats-py error inside the block as the matching `BusError`."""
    try:
        yield
    except nats.errors.Error as exc:
        raise_translated(exc, subject, timeout)


def raise_translated(exc: nats.errors.Error, subject: str = "", timeout: float = 0.0) -> NoReturn:
    """Raise the `BusError` that stands for `exc` (a plain function for hot paths)."""
    if isinstance(exc, nats.errors.NoRespondersError):
        raise NoResponders(subject) from None
    if isinstance(exc, nats.errors.TimeoutError):  # also FlushTimeoutError
        raise RequestTimeout(subject, timeout) from None
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.ConnectionDrainingError):
        raise BusClosed() from None
    if isinstance(exc, nats.errors.BadSubjectError):
        raise InvalidSubject(subject, "refused by nats-py") from None
    if isinstance(exc, nats.errors.BadHeaderError):
        raise InvalidHeader(exc.key) from None
    if isinstance(exc, nats.errors.OutboundBufferLimitError):
        raise BusError("not connected to NATS and the outbound buffer is full") from exc
    raise BusError(str(exc)) from exc


def describe(exc: BaseException) -> str:
    """`TypeName: message`, or just the type name when the message is empty."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
