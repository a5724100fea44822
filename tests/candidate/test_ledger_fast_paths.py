"""The ledger writer's fast paths make exactly what the reference paths make.

`CompactRange.push` (the tree without a `NodeId` per node), `TileWriter.add_leaves` (level 0
a tile's run at a time), `make_leaf` (laid out as bytes from a keyed HMAC state) and the
pseudonymizer (a keyed HMAC state copied per user) are checked against the plain
construction each one replaces: same hashes, same tiles, same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from candidate.governance.consent_ledger import _tiles
from lukhas.observability.pseudonym import PREFIX, Pseudonymizer
from lukhas.transparency.merkle import CompactRange, MemoryNodeStore, NodeId, leaf_hash
from lukhas.transparency.note import Signer
from lukhas.transparency.record import RecordKey, leaf_text, make_leaf, open_leaf

SIGNER = Signer("fast.lukhas.invalid/consent", bytes(range(32)))


def _leaves(count: int, start: int = 0) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(start, start + count)]


def test_push_completes_the_nodes_append_names_and_a_copy_is_independent() -> None:
    by_append, by_push = CompactRange(), CompactRange()
    for index, leaf in enumerate(_leaves(1100)):
        done = by_push.push(leaf)
        assert [(NodeId(level, index >> level), h) for level, h in enumerate(done)] == (
            by_append.append(leaf))
        assert by_push.root() == by_append.root() and by_push.size == by_append.size
    copy = by_push.copy()
    copy.push(leaf_hash(b"only the copy"))
    assert copy.size == by_push.size + 1 and by_push.root() == by_append.root()


@given(st.lists(st.integers(min_value=0, max_value=600), min_size=1, max_size=6))
def test_leaves_added_in_runs_make_the_tiles_nodes_make(runs: list[int]) -> None:
    one_by_one, in_runs = _tiles.TileWriter(), _tiles.TileWriter()
    tree = MemoryNodeStore()
    first = 0
    for count in runs:
        hashes = _leaves(count, first)
        for h in hashes:
            for node, value in tree.range.append(h):
                one_by_one.add(node, value)
        in_runs.add_leaves(first, hashes)
        first += count
        by_node = {t: v for t, v in one_by_one.take().items() if t[0] == 0}
        assert in_runs.take() == by_node


def test_leaves_that_would_leave_a_gap_in_a_tile_are_refused() -> None:
    writer = _tiles.TileWriter()
    writer.add_leaves(0, _leaves(3))
    with pytest.raises(ValueError):
        writer.add_leaves(5, _leaves(1, 5))


@pytest.mark.parametrize("body", [
    {"event": "given", "scope": "a:b/c", "ts": 1, "n": None},
    {"b": 1, "a": "é", "nested": {"z": [1, "\u2014"]}},
    {},
])
@pytest.mark.parametrize("index", [0, 7, 2**40])
def test_a_leaf_is_its_text_and_the_hmac_line_as_specified(
    body: dict[str, object], index: int
) -> None:
    key = RecordKey.of(SIGNER)
    text = leaf_text(SIGNER.name, index, body).encode()
    secret = SIGNER.derive_secret(b"lukhas/consent-record/v2 HMAC-SHA256")
    tag = base64.b64encode(hmac.digest(secret, text, hashlib.sha256)).decode()
    expected = text + f"\n\u2014 {SIGNER.name} {tag}\n".encode()
    assert make_leaf(key, index, body) == expected
    assert key.tag(text) == key.tag(text)  # the keyed state is copied, never consumed
    assert open_leaf(expected, key, index=index).body == body
    with pytest.raises(ValueError):
        make_leaf(key, -1, body)


def test_pseudonyms_are_the_keyed_hmac_under_every_key_version() -> None:
    current, earlier = b"c" * 32, b"e" * 32
    pseudonymize = Pseudonymizer(current, previous=[earlier])
    for user_id in ("usr_1", "ü\ud800", ""):
        raw = user_id.encode("utf-8", "surrogatepass")
        want = [PREFIX + hmac.digest(k, raw, "sha256")[:16].hex() for k in (current, earlier)]
        assert pseudonymize(user_id) == want[0]
        assert pseudonymize.all_versions(user_id) == tuple(want)
        assert pseudonymize.all_versions(user_id) == tuple(want)  # repeatable
