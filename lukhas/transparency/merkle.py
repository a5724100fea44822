"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs from a store of subtree hashes, verification.

Hashing (RFC 9162 §2.1.1): leaf = SHA-256(0x00 || data), node = SHA-256(0x01 || left || right),
the empty tree's root is SHA-256 of nothing.

Storage model. A *node* `(level, index)` is the complete subtree over leaves
`[index * 2**level, (index + 1) * 2**level)`; its hash never changes once the tree has that many
leaves. The writer keeps only the compact range of the tree (`CompactRange`: one node per set bit
of the size, O(log n) state) and stores each node it completes under its `NodeId` (amortised two
stores per append). Every hash a proof needs is a stored node or the right-fold of at most
O(log n) stored nodes, so `inclusion_plan` / `consistency_plan` name O(log n) nodes to read and
`ProofPlan.assemble` turns what was read into the proof. The plan is pure: the caller does the
I/O (e.g. concurrent KV gets), which keeps this module free of it.

Verification follows the algorithms of RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency)
step by step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from lukhas.transparency.errors import ProofError

HASH_SIZE = 32
_sha256 = hashlib.sha256
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the hash of one leaf."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an interior node."""
    return _sha256(b"\x01" + left + right).digest()


class NodeId(NamedTuple):
    """A complete subtree: `2**level` leaves starting at leaf `index * 2**level`."""

    level: int
    index: int

    @property
    def begin(self) -> int:
        return self.index << self.level

    @property
    def end(self) -> int:
        return (self.index + 1) << self.level


def _largest_power_of_two_below(n: int) -> int:
    """The k of RFC 9162: the largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_nodes(begin: int, end: int) -> list[NodeId]:
    """The complete subtrees that make up leaves `[begin, end)`, left to right.

    `begin` must be aligned as RFC 6962 ranges are (a multiple of the largest power of two not
    above `end - begin`); the hash of the range is then the right-fold of these nodes' hashes.
    """
    nodes: list[NodeId] = []
    while begin < end:
        level = (end - begin).bit_length() - 1
        while begin & ((1 << level) - 1):
            level -= 1
        nodes.append(NodeId(level, begin >> level))
        begin += 1 << level
    return nodes


def fold_right(hashes: Sequence[bytes]) -> bytes:
    """The hash of a range from its complete subtrees' hashes, left to right."""
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


@dataclass(frozen=True, slots=True)
class ProofPlan:
    """Which stored nodes a proof needs, and how to combine them.

    `ranges` lists, in proof order, each proof hash as the stored nodes whose right-fold it is
    (one node for a complete subtree; at most one range per proof spans several). `nodes` is the
    flat list to read, in the same order.
    """

    ranges: tuple[tuple[NodeId, ...], ...]

    @property
    def nodes(self) -> tuple[NodeId, ...]:
        return tuple(n for r in self.ranges for n in r)

    def assemble(self, hashes: Sequence[bytes]) -> list[bytes]:
        """The proof, given the hashes of `self.nodes` in order."""
        if len(hashes) != len(self.nodes):
            raise ValueError(f"{len(hashes)} hashes given for a plan of {len(self.nodes)} nodes")
        proof, at = [], 0
        for r in self.ranges:
            proof.append(fold_right(hashes[at : at + len(r)]))
            at += len(r)
        return proof

    def resolve(self, get: Callable[[NodeId], bytes]) -> list[bytes]:
        """The proof, reading each node with `get` (for in-memory stores)."""
        return self.assemble([get(n) for n in self.nodes])


def _plan(ranges: Iterable[tuple[int, int]]) -> ProofPlan:
    return ProofPlan(tuple(tuple(range_nodes(b, e)) for b, e in ranges))


def root_plan(size: int) -> ProofPlan:
    """The stored nodes whose right-fold is the root of the first `size` leaves."""
    if size < 0:
        raise ValueError("tree size must be >= 0")
    return _plan([(0, size)] if size else [])


def inclusion_plan(index: int, size: int) -> ProofPlan:
    """The audit path of RFC 6962 §2.1.1 (PATH) for leaf `index` in a tree of `size` leaves.

    Raises:
        ValueError: `index` is not a leaf of that tree.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    ranges: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _largest_power_of_two_below(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo = lo + k
    ranges.reverse()  # PATH lists the deepest sibling first
    return _plan(ranges)


def consistency_plan(size1: int, size2: int) -> ProofPlan:
    """The consistency proof of RFC 6962 §2.1.2 (PROOF / SUBPROOF) from `size1` to `size2`.

    Raises:
        ValueError: not 0 < size1 <= size2.
    """
    if not 0 < size1 <= size2:
        raise ValueError(f"no consistency proof from size {size1} to size {size2}")
    ranges: list[tuple[int, int]] = []
    m, lo, hi, complete = size1, 0, size2, True
    while m != hi - lo:
        k = _largest_power_of_two_below(hi - lo)
        if m <= k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            m, lo, complete = m - k, lo + k, False
    if not complete:
        ranges.append((lo, hi))
    ranges.reverse()
    return _plan(ranges)


class CompactRange:
    """The writer's O(log n) state: the complete subtrees covering leaves `[0, size)`.

    `append` returns every node it completes, so the caller can store each under its `NodeId`;
    `CompactRange.restore(size, get)` rebuilds the state from those stored nodes.
    """

    __slots__ = ("_size", "_hashes")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []  # one per set bit of size, largest subtree first

    @classmethod
    def restore(cls, size: int, get: Callable[[NodeId], bytes]) -> CompactRange:
        """The range for `size` leaves, reading its popcount(size) nodes with `get`."""
        cr = cls()
        cr._size = size
        cr._hashes = [get(n) for n in range_nodes(0, size)]
        return cr

    @classmethod
    def from_hashes(cls, size: int, hashes: Sequence[bytes]) -> CompactRange:
        """The range for `size` leaves from the hashes of `root_plan(size).nodes`."""
        if len(hashes) != bin(size).count("1"):
            raise ValueError(f"a tree of size {size} has {bin(size).count('1')} frontier nodes")
        cr = cls()
        cr._size = size
        cr._hashes = list(hashes)
        return cr

    @property
    def size(self) -> int:
        return self._size

    def nodes(self) -> list[tuple[NodeId, bytes]]:
        """The frontier: each complete subtree with its hash, left to right."""
        return list(zip(range_nodes(0, self._size), self._hashes, strict=True))

    def copy(self) -> CompactRange:
        """An independent range of the same leaves (appending to it leaves this one as is)."""
        cr = CompactRange()
        cr._size = self._size
        cr._hashes = self._hashes.copy()
        return cr

    def append(self, leaf: bytes) -> list[tuple[NodeId, bytes]]:
        """Add one leaf *hash*; return the nodes completed by it, the leaf first."""
        index = self._size
        return [(NodeId(level, index >> level), h) for level, h in enumerate(self.push(leaf))]

    def push(self, leaf: bytes) -> list[bytes]:
        """`append` without naming the nodes: the hashes of the nodes completed by leaf *hash*
        `leaf`, by level (the leaf first). Appended as leaf `i` (= the size before), the
        one of level `l` is `NodeId(l, i >> l)`. (The writer's hot path: no `NodeId` per
        node.)"""
        index = self._size
        hashes = self._hashes
        done = [leaf]
        h = leaf
        while index & 1:
            h = _sha256(b"\x01" + hashes.pop() + h).digest()  # node_hash, inlined
            index >>= 1
            done.append(h)
        hashes.append(h)
        self._size += 1
        return done

    def root(self) -> bytes:
        """The tree head (RFC 6962 MTH) of the leaves so far."""
        return fold_right(self._hashes)


class MemoryNodeStore:
    """Node hashes in a dict: the reference store for tests and small in-process logs."""

    def __init__(self) -> None:
        self.nodes: dict[NodeId, bytes] = {}
        self.reads = 0
        self.range = CompactRange()

    def append(self, data: bytes) -> int:
        """Add the leaf `data`; return its index."""
        index = self.range.size
        self.nodes.update(self.range.append(leaf_hash(data)))
        return index

    def get(self, node: NodeId) -> bytes:
        self.reads += 1
        try:
            return self.nodes[node]
        except KeyError:
            raise KeyError(f"node {node} is not stored (tree size {self.range.size})") from None

    def root(self, size: int | None = None) -> bytes:
        """The tree head at `size` leaves (default: all), read from the stored nodes."""
        plan = root_plan(self.range.size if size is None else size)
        return fold_right([self.get(n) for n in plan.nodes])

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return inclusion_plan(index, size).resolve(self.get)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        return consistency_plan(size1, size2).resolve(self.get)


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{name} is {len(value)} bytes, not a {HASH_SIZE}-byte SHA-256 hash")


def root_from_inclusion_proof(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes]
) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 §2.1.3.2 steps 1-4).

    Raises:
        ProofError: the proof cannot be for that leaf index and tree size.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not below the tree size {size}")
    _check_hash("leaf hash", leaf)
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        _check_hash("inclusion proof hash", p)
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the inclusion proof is shorter than the path to the root")
    return r


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that `leaf` (a leaf hash) is leaf `index` of the tree of `size` with this `root`.

    Raises:
        ProofError: it is not (wrong proof, leaf, index, size or root).
    """
    _check_hash("root hash", root)
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise ProofError(f"leaf {index} is not included in the tree of size {size} with that root")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Check that the tree of `size1` with `root1` is a prefix of the tree of `size2` with `root2`.

    RFC 9162 §2.1.4.2, with the cases it leaves to the caller: equal sizes need equal roots and
    an empty proof; a proof from the empty tree is meaningless and refused (every tree extends it).

    Raises:
        ProofError: the trees are not consistent, or the proof is malformed.
    """
    _check_hash("first root hash", root1)
    _check_hash("second root hash", root2)
    for c in proof:
        _check_hash("consistency proof hash", c)
    if size1 > size2:
        raise ProofError(f"the first tree ({size1}) is larger than the second ({size2})")
    if size1 == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise ProofError("equal tree sizes need an empty consistency proof")
        if root1 != root2:
            raise ProofError(f"two different roots for the same tree size {size1}")
        return
    # 1. An empty path fails.
    if not proof:
        raise ProofError("the consistency proof is empty")
    path = list(proof)
    # 2. If first is an exact power of 2, prepend first_hash.
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    # 3.-4.
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is longer than needed")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # 7.
    if sn != 0:
        raise ProofError("the consistency proof is shorter than needed")
    if fr != root1:
        raise ProofError(f"the proof does not lead to the first root (size {size1})")
    if sr != root2:
        raise ProofError(f"the proof does not lead to the second root (size {size2})")
