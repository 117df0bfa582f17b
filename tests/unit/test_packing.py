"""Tests of msgpack encoding in pieces (raftchan.packing)."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from raftchan.packing import packb_in_pieces

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.binary(max_size=300),
    st.text(max_size=40),
)
# Lists long enough to be encoded in runs (longer than 64) as well as short ones.
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=200),
        st.dictionaries(st.text(max_size=8), inner, max_size=8),
    ),
    max_leaves=600,
)


def _joined(value: Any, piece_bytes: int) -> bytes:
    return b"".join(packb_in_pieces(value, piece_bytes))


@settings(max_examples=300, deadline=None)
@given(_values, st.sampled_from([1, 50, 1000, 1 << 20]))
def test_the_pieces_are_the_bytes_of_one_packb(value: Any, piece_bytes: int) -> None:
    assert _joined(value, piece_bytes) == msgpack.packb(value, use_bin_type=True)


def test_a_long_list_of_items_comes_in_pieces_of_about_the_size_asked() -> None:
    items = [bytes([i % 256]) * 1000 for i in range(5000)]
    value = {"v": 2, "channels": {"c": [None, False, 0, items, [], []]}}
    pieces = list(packb_in_pieces(value, piece_bytes=64 * 1024))
    assert b"".join(pieces) == msgpack.packb(value, use_bin_type=True)
    assert len(pieces) > 50
    # A piece ends once it holds the size asked: it overshoots by at most one run.
    assert max(len(p) for p in pieces) < 3 * 64 * 1024


def test_long_lists_inside_a_long_list_and_tuples() -> None:
    value = [list(range(100)), *range(70), (b"x",) * 90, {"k": [b"y"] * 80}]
    assert _joined(value, 10) == msgpack.packb(value, use_bin_type=True)


def test_an_element_larger_than_a_piece_is_one_piece() -> None:
    big = b"z" * 100_000
    value = [b"a"] * 100 + [big] + [b"b"] * 100
    pieces = list(packb_in_pieces(value, piece_bytes=1000))
    assert b"".join(pieces) == msgpack.packb(value, use_bin_type=True)
    assert any(len(p) >= len(big) for p in pieces)


def test_a_small_value_is_one_piece() -> None:
    assert list(packb_in_pieces({"a": [1, 2, 3]})) == [msgpack.packb({"a": [1, 2, 3]})]
    assert list(packb_in_pieces([])) == [msgpack.packb([])]
