"""Items to bytes and back: the msgpack encoding a channel stores for each item.

The nodes never decode items; they store and return each item's bytes as the client
made them. So everything about an item's encoding lives here, on the client side.

:class:`ItemCodec` is the seam for richer item types: a subclass overrides
:meth:`ItemCodec.default` (turn an object msgpack cannot encode into a
``msgpack.ExtType``) and :meth:`ItemCodec.ext_hook` (turn that ext type back into an
object). The clients take a codec as a parameter, so such a subclass plugs in without
touching the client.

Items may hold references to outside objects that must stay alive while a channel holds
them (Dask futures). :meth:`ItemCodec.encode_items` therefore returns :class:`Encoded`
records: the bytes, the keys of those references (sent with the append so the cluster can
count them) and the objects themselves (which the client keeps until the append is
answered). :meth:`ItemCodec.decode_items` decodes a whole page at once, so a subclass can
do one round trip per page instead of one per item.

Round trip: msgpack has no tuple, so tuples come back as lists; ``bytes`` stay ``bytes``
and ``str`` stays ``str`` (``use_bin_type=True`` / ``raw=False``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from raftchan.errors import ItemNotEncodable, LimitExceeded, ProtocolError
from raftchan.limits import DEFAULT_LIMITS


@dataclass(frozen=True, eq=False)
class Encoded:
    """One encoded item: its bytes, the keys it references, and the objects behind them.

    ``keys`` travel with the append (each an opaque ``bytes``); ``refs`` never leave the
    client: holding them until the append is answered keeps the referenced objects alive.
    """

    data: bytes
    keys: tuple[bytes, ...] = ()
    refs: tuple[Any, ...] = ()


class ItemCodec:
    """Encodes items for a channel and decodes them back.

    ``max_item_bytes`` bounds one encoded item (``None``: no client-side bound); it
    defaults to the cluster's default limit so an oversized item fails at ``append`` in
    the caller's own thread rather than later at ``flush``.

    Instances must be safe to use from several threads at once: the blocking client
    encodes in each caller's thread.
    """

    def __init__(self, max_item_bytes: int | None = DEFAULT_LIMITS.max_item_bytes) -> None:
        self.max_item_bytes = max_item_bytes

    def default(self, obj: Any) -> Any:
        """Hook for objects msgpack cannot encode by itself; return something it can.

        The base codec knows no extra types and refuses every such object.
        """
        raise _Unsupported(obj)

    def ext_hook(self, code: int, data: bytes) -> Any:
        """Hook for msgpack ext types met while decoding; the base codec leaves them as is."""
        return msgpack.ExtType(code, data)

    def encode(self, item: Any) -> bytes:
        """The bytes stored for ``item``.

        Raises :class:`ItemNotEncodable` (naming the offending type) when msgpack cannot
        represent the item or the result would not decode back, and :class:`LimitExceeded`
        (``limit="max_item_bytes"``) when the encoding is larger than ``max_item_bytes``.
        Nothing is sent in either case.
        """
        try:
            data = msgpack.packb(item, use_bin_type=True, default=self.default)
        except _Unsupported as exc:
            raise ItemNotEncodable(exc.describe(), type=exc.type_name) from None
        except (TypeError, ValueError, OverflowError) as exc:
            # e.g. a str with lone surrogates, or a structure nested too deeply
            name = type(item).__name__
            raise ItemNotEncodable(f"cannot encode {name} item: {exc}", type=name) from None
        if type(item) not in SCALAR_TYPES:  # a scalar's encoding always decodes back
            _check_decodable(data, item)
        if self.max_item_bytes is not None and len(data) > self.max_item_bytes:
            raise LimitExceeded(
                f"item of {len(data)} bytes exceeds max_item_bytes={self.max_item_bytes}",
                limit="max_item_bytes",
                size=len(data),
            )
        return data

    def encode_items(self, channel: str, items: Iterable[Any]) -> list[Encoded]:
        """Encode the items of one append to ``channel``; all or none (errors as :meth:`encode`).

        The base codec knows no referenced objects: every record has empty keys and refs.
        """
        return [Encoded(self.encode(item)) for item in items]

    def decode_items(self, datas: Iterable[bytes]) -> list[Any]:
        """Decode the stored items of one response (errors as :meth:`decode`)."""
        return [self.decode(data) for data in datas]

    async def settle_page(self) -> None:
        """Called right after :meth:`decode_items` on an event loop, before the page is
        handed to the reader: a subclass may finish what the page's objects need there."""

    def decode(self, data: bytes) -> Any:
        """The item stored as ``data``; :class:`ProtocolError` if it is not msgpack."""
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=self.ext_hook)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"a stored item is not valid msgpack: {exc}") from None


class _Unsupported(Exception):
    """Raised by :meth:`ItemCodec.default` so that :meth:`ItemCodec.encode` can name the type."""

    def __init__(self, obj: Any) -> None:
        super().__init__(obj)
        self.type_name = type(obj).__qualname__
        self.is_big_int = isinstance(obj, int)

    def describe(self) -> str:
        if self.is_big_int:
            # msgpack hands integers beyond 64 bits to ``default`` too
            return "cannot encode an int outside the 64-bit range msgpack supports"
        return (
            f"cannot encode an item containing a value of type {self.type_name!r} "
            "(msgpack has no such type)"
        )


#: Item types msgpack encodes without containers, hooks or keys.
SCALAR_TYPES = frozenset({bytes, str, int, float, bool, type(None)})


def _check_decodable(data: bytes, item: Any) -> None:
    """Refuse encodings that could never be read back, e.g. a map keyed by a tuple.

    Such an item would otherwise be stored and break every reader of the channel. Ext
    types are not interpreted here (no ``ext_hook``), so the check has no side effects.
    """
    try:
        msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError) as exc:
        name = type(item).__name__
        raise ItemNotEncodable(
            f"{name} item would not decode back ({exc}); use hashable scalar map keys",
            type=name,
        ) from None


_DEFAULT_CODEC = ItemCodec()


def encode_item(item: Any, max_bytes: int | None = None) -> bytes:
    """Encode one item with the plain codec; ``max_bytes`` bounds its size (``None``: no bound).

    Raises :class:`ItemNotEncodable` or :class:`LimitExceeded` as :meth:`ItemCodec.encode`.
    """
    return ItemCodec(max_item_bytes=max_bytes).encode(item)


def decode_item(data: bytes) -> Any:
    """Decode one stored item with the plain codec (ext types come back as ``ExtType``)."""
    return _DEFAULT_CODEC.decode(data)
