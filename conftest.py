"""Suite-wide audits: every MATRIZ node emitted in this process is schema-valid and PII-free,
and every reply the suite sees matches its published schema (the AsyncAPI document)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import jsonschema
import msgspec
import pytest

from lukhas.observability.matriz_emit import MatrizEmitter, MatrizNode
from lukhas.testing import TEST_QUEUE_BUDGET_MS, matriz_schema

# Worker processes the tests start read their settings from the environment: the same
# generous queue budget as in-process test services (see lukhas.testing).
os.environ.setdefault("LUKHAS_WORKER_QUEUE_BUDGET_MS", f"{TEST_QUEUE_BUDGET_MS:g}")

#: Raw user ids the tests use all start with this, so any leak is easy to spot.
RAW_USER_PREFIX = "usr_"

_emitted: list[MatrizNode] = []


@pytest.fixture(autouse=True)
def _record_matriz_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    original = MatrizEmitter.emit

    def recording_emit(self: MatrizEmitter, node: MatrizNode) -> None:
        _emitted.append(node)
        original(self, node)

    monkeypatch.setattr(MatrizEmitter, "emit", recording_emit)


@pytest.fixture(scope="session", autouse=True)
def _audit_matriz_nodes() -> Iterator[None]:
    yield
    validator = jsonschema.Draft202012Validator(matriz_schema())
    problems = []
    for node in _emitted:
        encoded = msgspec.json.encode(node)
        decoded = msgspec.json.decode(encoded)
        problems += [f"{node.id}: {e.message}" for e in validator.iter_errors(decoded)]
        if RAW_USER_PREFIX.encode() in encoded:
            problems.append(f"{node.id}: raw user id in node: {encoded!r}")
    assert not problems, f"{len(problems)} bad MATRIZ node(s) of {len(_emitted)}:\n" + "\n".join(
        problems[:20]
    )


# -- the reply audit: every reply the suite sees matches its published schema ----------------
#
# Replies the slice service sends (its `_respond`, `$SRV` included) and the public Python API
# returns (`Endpoint.call`) are recorded, one per distinct shape per subject plus the first
# few of each subject, and checked at the end of the session against the reply schemas of
# the AsyncAPI document the code generates (tests/contract/_replies.py). Replies made by
# test doubles (providers defined in a test_*.py module) are not the contract: skipped.

_REPLIES_PER_SUBJECT = 50
_SHAPE_VALUES = frozenset({"ok", "reason", "code", "status", "mode", "action", "type"})

_replies: list[tuple[str, bytes, dict[str, str] | None]] = []
_reply_shapes: set[tuple[str, object]] = set()
_reply_counts: dict[str, int] = {}
_reply_encode_problems: list[str] = []
#: Our own decoder: tests may spy on `msgspec.json.decode` and count calls.
_reply_decoder = msgspec.json.Decoder()


class _TestDoubleReply(dict):  # type: ignore[type-arg]
    """A reply from a provider defined in a test module: not checked against the contract."""


def _is_test_double(provider: object) -> bool:
    module = type(provider).__module__
    return module.rsplit(".", 1)[-1].startswith("test_")


def _shape(value: object, key: str = "") -> object:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _shape(v, str(k))) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("list", frozenset(_shape(v) for v in value))
    if key in _SHAPE_VALUES and isinstance(value, str | bool):
        return value
    return type(value).__name__


def _record_reply(subject: str, reply: object, headers: dict[str, str] | None) -> None:
    if isinstance(reply, _TestDoubleReply):
        return
    try:
        data = msgspec.json.encode(reply)
    except (TypeError, msgspec.EncodeError) as exc:
        _reply_encode_problems.append(f"{subject}: reply not JSON-encodable ({exc}): {reply!r}")
        return
    count = _reply_counts[subject] = _reply_counts.get(subject, 0) + 1
    shape = (subject, (_shape(_reply_decoder.decode(data)), headers is None, bool(headers)))
    if count <= _REPLIES_PER_SUBJECT or shape not in _reply_shapes:
        _reply_shapes.add(shape)
        _replies.append((subject, data, headers))


@pytest.fixture(autouse=True)
def _record_replies(monkeypatch: pytest.MonkeyPatch) -> None:
    from lukhas.endpoint import Endpoint
    from lukhas.registry import ProviderRegistry
    from workers.service.slices import SliceService

    respond = SliceService._respond
    call = Endpoint.call
    registry_call = ProviderRegistry.call

    async def recording_respond(
        self: SliceService, env: Any, reply: Any, headers: dict[str, str] | None = None
    ) -> None:
        _record_reply(env.subject, reply, dict(headers or {}))
        await respond(self, env, reply, headers)

    async def recording_call(self: Endpoint[Any], **fields: Any) -> Any:
        reply = await call(self, **fields)
        _record_reply(self.subject, reply, None)
        return reply

    async def marking_call(
        self: ProviderRegistry[Any], settings: Any, operation: str, *args: Any, **options: Any
    ) -> Any:
        reply = await registry_call(self, settings, operation, *args, **options)
        if isinstance(reply, dict) and _is_test_double(self.get(settings)):
            return _TestDoubleReply(reply)
        return reply

    monkeypatch.setattr(SliceService, "_respond", recording_respond)
    monkeypatch.setattr(Endpoint, "call", recording_call)
    monkeypatch.setattr(ProviderRegistry, "call", marking_call)


@pytest.fixture(scope="session", autouse=True)
def _audit_replies() -> Iterator[None]:
    yield
    if not _replies and not _reply_encode_problems:
        return
    from tests.contract._replies import current_audit

    audit = current_audit()
    problems = list(_reply_encode_problems)
    for subject, data, headers in _replies:
        problems += audit.problems(subject, data, headers)
    seen = sum(_reply_counts.values())
    assert not problems, (
        f"{len(problems)} repl(ies) do not match the published contract (of {seen} seen, "
        f"{len(_replies)} checked); declare new fields or shapes in the slice's reply Structs "
        "(messages.py) and regenerate asyncapi.json (`lukhas asyncapi --output asyncapi.json`):\n"
        + "\n".join(problems[:20])
    )
