"""Suite-wide MATRIZ audit: every node emitted in this process is schema-valid and PII-free."""

from __future__ import annotations

from collections.abc import Iterator

import jsonschema
import msgspec
import pytest

from lukhas.observability.matriz_emit import MatrizEmitter, MatrizNode
from lukhas.testing import matriz_schema

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
