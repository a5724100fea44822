"""What a slice serves: one `Endpoint` per request subject, declared beside the slice's API.

A slice lists its endpoints as data (`ENDPOINTS` in its `endpoints.py`): the subject, the
message Struct a body decodes into, the instrumented handler that takes that Struct, the body
limit, whether answering may wait on I/O, the Structs its replies take, and whether it is a
read-only query (a message nobody awaits is then not handled). The slice
service serves whatever the slices declare; the manifest check, discovery, the gate and
the generated AsyncAPI document (`lukhas asyncapi`) read the same declarations.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from lukhas._validation import convert, decode
from lukhas.errors import LukhasError
from lukhas.observability.matriz_decorators import emit_rejected
from lukhas.replies import ErrorReply

if TYPE_CHECKING:
    from lukhas.config import Settings
    from lukhas.observability.matriz_decorators import EmitPoint
    from lukhas.runtime import Runtime

M = TypeVar("M")
Reply = dict[str, Any]


#: Completes a deferred call: with its reply, or with the error it ended in.
Answer = Callable[[Reply | Exception], Awaitable[None]]


class Deferral(Protocol):
    """How an endpoint answers without a task parked on each call's I/O confirmation.

    `begin(message, answer)` does the call's work up to the I/O and returns the reply at
    once (a refusal, say), or None: then `answer` is awaited later, by `confirm()`, once the
    I/O is confirmed, for many calls at a time. The service runs `confirm()` in its task
    group while it serves, and calls `close()` after its last `begin`; `confirm()` returns
    once every parked call is answered.
    """

    @property
    def parked(self) -> int:
        """Calls begun and not yet answered (waiting for their confirmation)."""
        ...

    @property
    def waits_on_io(self) -> bool:
        """Whether `begin` may wait on I/O (the service then never runs it in a reader)."""
        ...

    async def begin(self, message: Any, answer: Answer) -> Reply | None: ...

    async def confirm(self) -> None: ...

    def close(self) -> None: ...


def _always(settings: Settings) -> bool:
    return True


def _never(runtime: Runtime) -> Deferral | None:
    return None


@dataclass(frozen=True, slots=True)
class Endpoint(Generic[M]):
    """One request subject of a slice.

    `handler` is MATRIZ-instrumented and takes the decoded message; the slice's public
    Python API validates its arguments into the same message and calls the same handler, so
    a request is validated once whichever way it arrives.
    """

    #: The nats.micro endpoint name, e.g. `consent_record`.
    name: str
    subject: str
    #: What a body decodes into (a msgspec Struct, or `dict[str, Any]` for an open object).
    message: type[M] | Any
    handler: Callable[[M], Awaitable[Reply]]
    #: The public API function that calls `handler` (a manifest capability).
    capability: str
    #: Bytes a body may take, or a function of the settings for configurable limits.
    max_bytes: int | Callable[[Settings], int]
    #: Whether answering may wait on I/O (a JetStream ack, a flush), for these settings.
    #: Such endpoints get the concurrent handler pool; the rest are answered inline by their
    #: reader, which in asyncio is several times cheaper than handing each message on.
    waits_on_io: Callable[[Settings], bool] = _always
    #: The Structs a reply may be: the success shapes, then the refusals. Any endpoint may
    #: also answer `ErrorReply`. Replies are still built as dicts; this declares them for
    #: the published contract, and the contract tests check every reply against it.
    reply: tuple[type, ...] = ()
    #: A query: answering changes nothing anyone relies on but the reply. A message without
    #: a reply subject is then not a request (nobody awaits its answer): the service counts
    #: it (`unawaited` in the endpoint's stats) and does not handle it, so the subject may
    #: also carry announcements (the consent ledger publishes its signed checkpoints on the
    #: checkpoint subject) without each one showing as a failed request.
    read_only: bool = False
    #: The endpoint's `Deferral` in this runtime, or None to await `handler` per request.
    #: The slice service begins a deferring endpoint's calls inline (one task), so a call
    #: parked on I/O holds a little memory, not a task.
    deferral: Callable[[Runtime], Deferral | None] = _never

    @property
    def replies(self) -> tuple[type, ...]:
        """Every shape a reply may take: the declared ones and `ErrorReply`."""
        return (*self.reply, ErrorReply)

    @property
    def emit_point(self) -> EmitPoint:
        return self.handler.__matriz_emit_point__  # type: ignore[attr-defined, no-any-return]

    @property
    def tag(self) -> str | None:
        """The message's wire tag (e.g. `consent.record`), None for an open object."""
        config = getattr(self.message, "__struct_config__", None)
        tag = getattr(config, "tag", None)
        return tag if isinstance(tag, str) else None

    def body_limit(self, settings: Settings) -> int:
        """The body limit under `settings`, never above LUKHAS_REQUEST_MAX_BYTES."""
        limit = self.max_bytes(settings) if callable(self.max_bytes) else self.max_bytes
        return min(limit, settings.request_max_bytes)

    def decode(self, data: bytes, *, max_bytes: int) -> M:
        """The message in `data`; an empty body reads as `{}`, so the error names the fields.

        Raises:
            PayloadTooLarge: the body is over `max_bytes`.
            InvalidRequest: the body is not JSON or does not match the message.
        """
        return decode(self.message, data or b"{}", max_bytes=max_bytes)  # type: ignore[no-any-return]

    async def call(self, **fields: Any) -> Reply:
        """Validate `fields` into the message and run the handler: the public API's path.

        Input refused here still shows in MATRIZ, as an error node of this emit point.

        Raises:
            InvalidRequest / PayloadTooLarge: `fields` do not make a valid message.
        """
        started = time.perf_counter()
        try:
            message = convert(self.message, fields)
        except LukhasError as exc:
            emit_rejected(self.emit_point, (time.perf_counter() - started) * 1000, code=exc.code)
            raise
        return await self.handler(message)
