"""A reference in-memory ledger writer built only from the library's public functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from lukhas.transparency.bundle import build_bundle
from lukhas.transparency.checkpoint import Checkpoint
from lukhas.transparency.merkle import MemoryNodeStore
from lukhas.transparency.note import Signer
from lukhas.transparency.record import RecordKey, make_leaf


class Log:
    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self.key = RecordKey.of(signer)
        self.store = MemoryNodeStore()
        self.leaves: list[bytes] = []

    def append_leaf(self, leaf: bytes) -> int:
        self.leaves.append(leaf)
        return self.store.append(leaf)

    def append(self, body: dict[str, Any]) -> int:
        return self.append_leaf(make_leaf(self.key, len(self.leaves), body))

    def checkpoint(self, size: int | None = None) -> bytes:
        size = len(self.leaves) if size is None else size
        return Checkpoint(self.signer.name, size, self.store.root(size)).sign(self.signer)

    def bundle(self, indexes: Sequence[int], from_size: int | None = None) -> bytes:
        size = len(self.leaves)
        records = [(i, self.leaves[i], self.store.inclusion_proof(i, size)) for i in indexes]
        consistency = None
        if from_size is not None and 0 < from_size < size:
            consistency = (from_size, self.store.consistency_proof(from_size, size))
        return msgspec.json.encode(build_bundle(self.checkpoint(), records, consistency))
