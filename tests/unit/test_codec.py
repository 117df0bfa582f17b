"""Item encoding: what round-trips, what is refused at append time, and the codec seam."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from raftchan.codec import ItemCodec, decode_item, encode_item
from raftchan.errors import ItemNotEncodable, LimitExceeded, ProtocolError


@pytest.mark.parametrize(
    "item",
    [
        None,
        True,
        0,
        -(2**63),
        2**64 - 1,
        1.5,
        "",
        "text ✓",
        b"\x00bytes",
        [],
        [1, "two", [3]],
        {"x": 123, "nested": {"list": [1, 2, {"deep": None}]}},
        {1: "int keys survive", 2.5: "and float keys"},
    ],
)
def test_round_trip(item: Any) -> None:
    assert decode_item(encode_item(item)) == item


def test_str_and_bytes_stay_distinct() -> None:
    assert decode_item(encode_item("abc")) == "abc"
    assert decode_item(encode_item(b"abc")) == b"abc"


def test_tuples_come_back_as_lists() -> None:
    assert decode_item(encode_item((1, (2, 3)))) == [1, [2, 3]]


def test_encoding_is_plain_msgpack() -> None:
    assert encode_item({"a": [1, b"b"]}) == msgpack.packb({"a": [1, b"b"]}, use_bin_type=True)


@pytest.mark.parametrize(
    ("item", "type_name"),
    [({1, 2}, "set"), (object(), "object"), ({"k": [1, 2j]}, "complex")],
)
def test_unencodable_item_names_the_offending_type(item: Any, type_name: str) -> None:
    with pytest.raises(ItemNotEncodable, match=type_name) as info:
        encode_item(item)
    assert info.value.details["type"] == type_name


def test_int_beyond_64_bits_is_refused() -> None:
    with pytest.raises(ItemNotEncodable, match="64-bit"):
        encode_item(2**64)


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(ItemNotEncodable, match="str"):
        encode_item("\ud800")


def test_map_that_would_not_decode_back_is_refused() -> None:
    # A tuple key encodes as an array, which cannot be a dict key again when read back:
    # storing it would break every reader of the channel.
    with pytest.raises(ItemNotEncodable, match="decode back"):
        encode_item({(1, 2): "x"})


def test_size_limit_counts_the_encoding() -> None:
    data = encode_item(b"x" * 100)
    assert encode_item(b"x" * 100, max_bytes=len(data)) == data
    with pytest.raises(LimitExceeded) as info:
        encode_item(b"x" * 100, max_bytes=len(data) - 1)
    assert info.value.details == {"limit": "max_item_bytes", "size": len(data)}


def test_codec_default_limit_is_the_cluster_default() -> None:
    from raftchan.limits import DEFAULT_LIMITS

    assert ItemCodec().max_item_bytes == DEFAULT_LIMITS.max_item_bytes
    with pytest.raises(LimitExceeded):
        ItemCodec().encode(b"x" * DEFAULT_LIMITS.max_item_bytes)
    assert ItemCodec(max_item_bytes=None).encode(b"x" * DEFAULT_LIMITS.max_item_bytes)


def test_garbage_bytes_do_not_decode() -> None:
    with pytest.raises(ProtocolError):
        decode_item(b"\xc1")


def test_unknown_ext_types_come_back_untouched() -> None:
    data = msgpack.packb(msgpack.ExtType(42, b"payload"))
    assert decode_item(data) == msgpack.ExtType(42, b"payload")


class _Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Point) and (self.x, self.y) == (other.x, other.y)


class _PointCodec(ItemCodec):
    """The seam another module uses to add a type: an ext code both ways."""

    def default(self, obj: Any) -> Any:
        if isinstance(obj, _Point):
            return msgpack.ExtType(7, msgpack.packb([obj.x, obj.y]))
        return super().default(obj)

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == 7:
            return _Point(*msgpack.unpackb(data))
        return super().ext_hook(code, data)


def test_subclass_adds_a_type_through_ext() -> None:
    codec = _PointCodec()
    item = {"where": [_Point(1, 2), _Point(3, 4)]}
    assert codec.decode(codec.encode(item)) == item
    # ... and still refuses what neither it nor msgpack knows.
    with pytest.raises(ItemNotEncodable, match="set"):
        codec.encode({1})
    # The plain codec reads the same bytes as an opaque ExtType.
    assert decode_item(codec.encode(_Point(5, 6))) == msgpack.ExtType(7, msgpack.packb([5, 6]))
