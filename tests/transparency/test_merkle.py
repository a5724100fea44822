"""RFC 6962 tree hashing and proofs: known answers from transparency-dev/merkle, properties.

Known answers are transcribed from github.com/transparency-dev/merkle at commit
417fb0c314750d94e53942e9f92e79b6d35915db: `testonly/constants.go` (the reference 8-leaf tree
inherited from certificate-transparency's RFC 6962 tests: leaf inputs, every node hash and the
root at each size 0..8) and `testdata/inclusion/*`, `testdata/consistency/*` (proof probes).
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lukhas.transparency.errors import ProofError
from lukhas.transparency.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MemoryNodeStore,
    NodeId,
    consistency_plan,
    inclusion_plan,
    leaf_hash,
    node_hash,
    root_plan,
    verify_consistency,
    verify_inclusion,
)

LEAF_INPUTS = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)]
NODE_HASHES = [
    ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
     "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
     "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
     "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
     "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
     "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
     "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
     "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1"],
    ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
     "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
     "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
     "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"],
    ["d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
     "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    ["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]

# testdata/inclusion/{0..4}/happy-path.json: (leafIdx, treeSize, root, leafHash, proof)
INCLUSION_PROBES = [
    (0, 1, "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
     "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=", []),
    (0, 8, "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
     ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
      "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ="]),
    (5, 8, "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     "QnGia+DYqE8L1UyMMC58s6O10fpngKQLzOKHNHfatlg=",
     ["vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms=",
      "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
      "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
    (2, 3, "rra8/idLcKFPsGel5VeCZNsPqbUa9eC6FZFY8yngbnc=",
     "ApjRIpBtz8EIkstTpzmS/FufST6kybrbJ7eRtBJ6f+c=",
     ["+sVCA+fMaWzw38tCySodnbr3CtnmIfS9jZhmLwDjwSU="]),
    (1, 5, "Tju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=",
     "lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
     ["bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
      "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms="]),
]

# testdata/consistency/{0..4}/happy-path.json: (size1, size2, root1, root2, proof)
CONSISTENCY_PROBES = [
    (1, 1, "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
     "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=", []),
    (1, 8, "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
     "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
      "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ="]),
    (6, 8, "duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=",
     "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     ["DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=",
      "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
      "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
    (2, 5, "+sVCA+fMaWzw38tCySodnbr3CtnmIfS9jZhmLwDjwSU=",
     "Tju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=",
     ["Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms="]),
    (6, 7, "duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=",
     "3bib5AOAnjJXUNPSY814kpwpQreUKjS3fhIslZSnTIw=",
     ["DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=",
      "sIaT7C5yFZcTBkHoIR5+7cy0wmQTlj7ubB4u0W/7Gl8=",
      "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
]

E = base64.b64encode(EMPTY_ROOT).decode()  # 47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=
# testdata/consistency/additional/*.json whose hashes are 32 bytes (all want an error).
CONSISTENCY_ERRORS = [
    (0, 1, E, E, [E]),          # consistency check on empty tree (size1 is zero) is useless
    (1, 1, E, E, [E]),          # sizes match but proof is not empty and sizes are one
    (0, 0, E, E, [E]),          # sizes match but proof is not empty and sizes are zero
]


def b(text: str) -> bytes:
    return base64.b64decode(text)


def reference_root(leaves: list[bytes]) -> bytes:
    """MTH of RFC 6962 §2.1, written from the definition (independent of the module)."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))


def store_of(leaves: list[bytes]) -> MemoryNodeStore:
    store = MemoryNodeStore()
    for leaf in leaves:
        store.append(leaf)
    return store


def test_reference_tree_node_hashes_and_roots() -> None:
    store = store_of(LEAF_INPUTS)
    for level, row in enumerate(NODE_HASHES):
        for index, want in enumerate(row):
            assert store.nodes[NodeId(level, index)].hex() == want
    for size, want in enumerate(ROOTS):
        assert store.root(size).hex() == want
        assert reference_root(LEAF_INPUTS[:size]).hex() == want
    assert EMPTY_ROOT.hex() == ROOTS[0]


def test_compact_range_roots_at_every_size() -> None:
    cr = CompactRange()
    assert cr.root().hex() == ROOTS[0]
    for size, leaf in enumerate(LEAF_INPUTS, start=1):
        cr.append(leaf_hash(leaf))
        assert cr.root().hex() == ROOTS[size]
        restored = CompactRange.restore(size, store_of(LEAF_INPUTS).get)
        assert restored.root() == cr.root()


@pytest.mark.parametrize("probe", INCLUSION_PROBES, ids=lambda p: f"{p[0]}of{p[1]}")
def test_inclusion_known_answers(probe: tuple) -> None:
    index, size, root, leaf, proof = probe
    verify_inclusion(index, size, b(leaf), [b(p) for p in proof], b(root))
    generated = store_of(LEAF_INPUTS).inclusion_proof(index, size)
    assert [base64.b64encode(p).decode() for p in generated] == proof


@pytest.mark.parametrize("probe", CONSISTENCY_PROBES, ids=lambda p: f"{p[0]}to{p[1]}")
def test_consistency_known_answers(probe: tuple) -> None:
    size1, size2, root1, root2, proof = probe
    verify_consistency(size1, size2, [b(p) for p in proof], b(root1), b(root2))
    generated = store_of(LEAF_INPUTS).consistency_proof(size1, size2) if size1 != size2 else []
    assert [base64.b64encode(p).decode() for p in generated] == proof


@pytest.mark.parametrize("probe", CONSISTENCY_ERRORS)
def test_consistency_known_errors(probe: tuple) -> None:
    size1, size2, root1, root2, proof = probe
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, [b(p) for p in proof], b(root1), b(root2))


def test_inclusion_single_entry_known_answers() -> None:
    # testdata/inclusion/single-entry: matching root and leaf verifies; empty values do not.
    h = b("DTrtAjFI/9KiWfvQzcf7PPl1ZYdg03dbgq9vkKrMLfw=")
    verify_inclusion(0, 1, h, [], h)
    for leaf, root in ((b""), h), (h, b""), (b"", b""):
        with pytest.raises(ProofError):
            verify_inclusion(0, 1, leaf, [], root)


def test_inclusion_probe_mutations_fail() -> None:
    # The mutations transparency-dev's probes apply: index/size off by one, doubled, halved,
    # a flipped bit, a component inserted or removed, a wrong leaf or root.
    index, size, root, leaf, proof = INCLUSION_PROBES[2]
    proof_b = [b(p) for p in proof]
    bad = [
        (index + 1, size, b(leaf), proof_b, b(root)),
        (index - 1, size, b(leaf), proof_b, b(root)),
        (index ^ 2, size, b(leaf), proof_b, b(root)),
        (index, size * 2, b(leaf), proof_b, b(root)),
        (index, size // 2, b(leaf), proof_b, b(root)),
        (index, size, b(leaf), [proof_b[0], proof_b[1], bytes([proof_b[2][0] ^ 8]) +
                                proof_b[2][1:]], b(root)),
        (index, size, b(leaf), proof_b + [proof_b[0]], b(root)),
        (index, size, b(leaf), proof_b[:-1], b(root)),
        (index, size, leaf_hash(b"other"), proof_b, b(root)),
        (index, size, b(leaf), proof_b, EMPTY_ROOT),
    ]
    for args in bad:
        with pytest.raises(ProofError):
            verify_inclusion(*args)


def test_proofs_read_log_many_nodes() -> None:
    size = 100_003
    for index in (0, 1, 4097, size // 2, size - 2, size - 1):
        assert len(inclusion_plan(index, size).nodes) <= 2 * size.bit_length()
    for size1 in (1, 2, 3, 4096, 50_001, size - 1):
        assert len(consistency_plan(size1, size).nodes) <= 2 * size.bit_length()
    assert len(root_plan(size).nodes) == bin(size).count("1")


leaf_lists = st.lists(st.binary(max_size=8), min_size=1, max_size=70, unique=True)


@given(leaf_lists, st.data())
def test_every_inclusion_proof_verifies_and_tampering_fails(leaves: list[bytes], data) -> None:
    store = store_of(leaves)
    size = data.draw(st.integers(1, len(leaves)))
    index = data.draw(st.integers(0, size - 1))
    root = store.root(size)
    assert root == reference_root(leaves[:size])
    proof = store.inclusion_proof(index, size)
    verify_inclusion(index, size, leaf_hash(leaves[index]), proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaf_hash(leaves[index] + b"x"), proof, root)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        tampered = list(proof)
        tampered[i] = bytes([tampered[i][0] ^ 1]) + tampered[i][1:]
        with pytest.raises(ProofError):
            verify_inclusion(index, size, leaf_hash(leaves[index]), tampered, root)
    other = data.draw(st.integers(0, size))
    if other != index:
        with pytest.raises(ProofError):
            verify_inclusion(other, size, leaf_hash(leaves[index]), proof, root)


@given(leaf_lists, st.data())
def test_every_consistency_proof_verifies_and_tampering_fails(leaves: list[bytes], data) -> None:
    store = store_of(leaves)
    size2 = data.draw(st.integers(1, len(leaves)))
    size1 = data.draw(st.integers(1, size2))
    root1, root2 = store.root(size1), store.root(size2)
    proof = store.consistency_proof(size1, size2) if size1 != size2 else []
    verify_consistency(size1, size2, proof, root1, root2)
    # A rewritten old leaf: the earlier root no longer matches.
    rewritten = list(leaves[:size2])
    rewritten[data.draw(st.integers(0, size1 - 1))] += b"!"
    forged = store_of(rewritten)
    forged_proof = forged.consistency_proof(size1, size2) if size1 != size2 else []
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, forged_proof, root1, forged.root(size2))
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        tampered = list(proof)
        tampered[i] = bytes([tampered[i][0] ^ 1]) + tampered[i][1:]
        with pytest.raises(ProofError):
            verify_consistency(size1, size2, tampered, root1, root2)
        with pytest.raises(ProofError):
            verify_consistency(size1, size2, proof[:-1], root1, root2)
