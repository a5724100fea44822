"""The Merkle tree's stored nodes as tiles (after C2SP tlog-tiles). Pure functions, no I/O.

A tile `(tile_level, n)` holds up to 256 consecutive hashes of tree level `8 * tile_level`:
the nodes `n * 256 ... n * 256 + 255` of that level, 32 bytes each, concatenated. Every
complete node of the tree is either such a hash or the perfect subtree over at most 128
consecutive hashes of one tile, so any node a `ProofPlan` names is one tile read away, and a
proof needs at most a couple of tile reads per 8 levels: O(log n) reads, each small.

The writer keeps the rightmost (partial) tile of each tile level in memory, appends the hashes
`CompactRange.append` completes at levels 0, 8, 16, ..., and writes each tile it changed once
per batch (one KV put per tile level per batch, not one per node).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lukhas.transparency.merkle import HASH_SIZE, NodeId
from lukhas.transparency.merkle import node_hash as merkle_node

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT

TileId = tuple[int, int]


def key(tile: TileId) -> str:
    return f"t.{tile[0]}.{tile[1]}"


def tile_of(node: NodeId) -> TileId:
    """The tile holding what `node` is computed from."""
    tile_level, k = divmod(node.level, TILE_HEIGHT)
    return tile_level, (node.index << k) >> TILE_HEIGHT


def tiles_for(nodes: Iterable[NodeId]) -> list[TileId]:
    return sorted({tile_of(n) for n in nodes})


def node_hash(node: NodeId, tiles: Mapping[TileId, bytes]) -> bytes:
    """The hash of `node` from the tiles read for it.

    Raises:
        KeyError: the tile is missing or too short (the node is not stored).
    """
    tile_level, k = divmod(node.level, TILE_HEIGHT)
    first = node.index << k
    data = tiles[(tile_level, first >> TILE_HEIGHT)]
    offset = (first & (TILE_WIDTH - 1)) * HASH_SIZE
    width = (1 << k) * HASH_SIZE
    if len(data) < offset + width:
        raise KeyError(f"node {node} is not stored")
    hashes = [data[i : i + HASH_SIZE] for i in range(offset, offset + width, HASH_SIZE)]
    return _perfect(hashes)


def _perfect(hashes: list[bytes]) -> bytes:
    """The root of a perfect subtree over `hashes` (a power of two of them), pairwise."""
    while len(hashes) > 1:
        hashes = [merkle_node(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
    return hashes[0]


def partial_tiles(size: int) -> dict[TileId, int]:
    """For a tree of `size` leaves: each tile level's rightmost partial tile and how many
    hashes it holds (full tiles are not listed)."""
    out: dict[TileId, int] = {}
    tile_level = 0
    while True:
        count = size >> (TILE_HEIGHT * tile_level)
        if count == 0:
            return out
        n, filled = divmod(count, TILE_WIDTH)
        if filled:
            out[(tile_level, n)] = filled
        tile_level += 1


class TileWriter:
    """The writer's partial tiles: add completed nodes, then take the tiles to store."""

    def __init__(self, partial: Mapping[TileId, bytes] | None = None) -> None:
        self._tiles: dict[TileId, bytearray] = {t: bytearray(v) for t, v in (partial or {}).items()}
        self._dirty: set[TileId] = set()

    def add(self, node: NodeId, value: bytes) -> None:
        """Record a completed node (only levels 0, 8, 16... are stored)."""
        tile_level, k = divmod(node.level, TILE_HEIGHT)
        if k:
            return
        tile = (tile_level, node.index >> TILE_HEIGHT)
        offset = (node.index & (TILE_WIDTH - 1)) * HASH_SIZE
        data = self._tiles.setdefault(tile, bytearray())
        if len(data) != offset:
            raise ValueError(f"tile {tile} holds {len(data)} bytes, node {node} needs {offset}")
        data += value
        self._dirty.add(tile)

    def add_leaves(self, first: int, hashes: Sequence[bytes]) -> None:
        """Record the leaf hashes of leaves `first`, `first + 1`, ... (what `add` stores of
        level 0, a tile's run at a time)."""
        at, count = 0, len(hashes)
        while at < count:
            index = first + at
            tile = (0, index >> TILE_HEIGHT)
            slot = index & (TILE_WIDTH - 1)
            take = min(count - at, TILE_WIDTH - slot)
            data = self._tiles.setdefault(tile, bytearray())
            if len(data) != slot * HASH_SIZE:
                raise ValueError(f"tile {tile} holds {len(data)} bytes, leaf {index} needs "
                                 f"{slot * HASH_SIZE}")
            data += b"".join(hashes[at : at + take])
            self._dirty.add(tile)
            at += take

    def take(self) -> dict[TileId, bytes]:
        """The tiles changed since the last call; full tiles are forgotten after this."""
        out = {t: bytes(self._tiles[t]) for t in self._dirty}
        for t, data in out.items():
            if len(data) == TILE_WIDTH * HASH_SIZE:
                del self._tiles[t]
        self._dirty.clear()
        return out
