"""The client wire protocol, sans I/O: bytes in, typed messages out, and back.

Nothing here touches a socket. The node server and the client library each own one
place that reads and writes the socket and hand the bytes to this module.

Framing
    Every frame is a 4-byte big-endian unsigned length followed by that many bytes of one
    msgpack map. A frame longer than the receiver's ``max_frame_bytes`` is a
    :class:`~raftchan.errors.ProtocolError` (the connection is dropped before the body is
    buffered), as is a body that is not a msgpack map.

Handshake
    The client's first frame is ``{"type": "hello", "version": PROTOCOL_VERSION}``, with a
    ``"token": STR`` when the client has one. The node answers ``{"type": "hello",
    "version": PROTOCOL_VERSION, "node": NAME}`` or, on a version it does not speak, an
    error response with code ``protocol_error`` and closes; a node that requires a token
    answers a hello without an accepted one with code ``unauthorized`` and closes.

Requests and responses
    A request is ``{"id": INT, "type": NAME, ...fields}``. Requests on one connection may be
    pipelined; responses carry the request's ``id`` and may arrive in any order:
    ``{"id": INT, "ok": True, ...fields}`` or
    ``{"id": INT, "ok": False, "error": {"code": CODE, "message": STR, "details": MAP}}``
    where CODE is one of :data:`raftchan.errors.ERROR_CODES`.

Items travel as msgpack ``bin`` values holding each item's own msgpack encoding; the nodes
store and return them without decoding, so an item comes back exactly as it was sent.

Request types and their fields (see each dataclass below):

==============  ==========================================  ===============================
type            fields                                      ok-response fields
==============  ==========================================  ===============================
open            channel, maxlen (int or nil)                ChannelInfo fields
append          channel, session (bin 16), seq, items,      indexes (list of int or nil),
                [keys (list of list of bin, optional)]      [lost (list of bin)]
info            channel                                     ChannelInfo fields
read            channel, start (int or nil), end (int/nil)  ReadResult fields
poll            channel, start, min_position, wait          ReadResult fields
stop            channel                                     ChannelInfo fields
delete          channel                                     (none)
end_session     session                                     (none)
status          (none)                                      NodeStatus fields
ping            (none)                                      (none)
member_list     (none)                                      members, leader, change_pending
member_add      address, client_address, name               members
member_remove   address                                     members
==============  ==========================================  ===============================

``open``, ``append``, ``info``, ``read``, ``stop``, ``delete`` and ``end_session`` are
served by the leader only (others answer ``not_leader`` with the leader's client address
when known), as are the ``member_*`` requests. ``info``, ``read`` and ``member_list`` are
linearizable; ``member_add`` and ``member_remove`` answer once the change is committed.
``poll``, ``status`` and ``ping`` are served by any node; ``poll`` waits until the node has
applied at least ``min_position`` so that a reader moving between nodes never goes back.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from raftchan.errors import ProtocolError, RaftchanError, RequestInvalid, error_from_wire
from raftchan.limits import DEFAULT_LIMITS

PROTOCOL_VERSION = 1
SESSION_ID_BYTES = 16

_HEADER = struct.Struct(">I")


# ---------------------------------------------------------------------------------------
# Framing


def encode_frame(message: dict[str, Any]) -> bytes:
    """Encode one message as a length-prefixed frame."""
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Accumulates received bytes and yields complete messages.

    ``feed(data)`` then iterate ``messages()``. Raises :class:`ProtocolError` on an
    oversized frame (as soon as its header arrives) or on a body that is not a msgpack map;
    after that the decoder is unusable and the connection should be closed.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_LIMITS.max_frame_bytes) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self.max_frame_bytes:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes}",
                    limit="max_frame_bytes",
                    size=length,
                )

    def messages(self) -> Iterator[dict[str, Any]]:
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self.max_frame_bytes:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes}",
                    limit="max_frame_bytes",
                    size=length,
                )
            end = _HEADER.size + length
            if len(self._buffer) < end:
                return
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            yield decode_body(body)


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body; raise ProtocolError unless it is a msgpack map."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        # Some of them (StackError for deep nesting, FormatError for reserved bytes) carry
        # no message; their name is then all the peer can be told about its mistake.
        reason = str(exc) or type(exc).__name__
        raise ProtocolError(f"frame body is not valid msgpack: {reason}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"frame body is a {type(message).__name__}, not a map")
    return message


# ---------------------------------------------------------------------------------------
# Handshake


def hello_request(token: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "hello", "version": PROTOCOL_VERSION}
    if token is not None:
        message["token"] = token
    return message


def hello_response(node_name: str, limits: Any = None) -> dict[str, Any]:
    """The node's hello; with ``limits``, the bounds a client must fit its requests to.

    A node may run with smaller limits than a client assumes (they are node flags): a
    client that sized its batches from its own defaults would send frames the node can
    only refuse, again and again.
    """
    message: dict[str, Any] = {"type": "hello", "version": PROTOCOL_VERSION, "node": node_name}
    if limits is not None:
        message["limits"] = {name: getattr(limits, name) for name in ANNOUNCED_LIMITS}
    return message


#: The limits a node announces in its hello.
ANNOUNCED_LIMITS = ("max_frame_bytes", "max_item_bytes", "max_batch_items", "max_pending_requests")


def announced_limits(hello: dict[str, Any]) -> dict[str, int]:
    """The positive integer limits a node's hello announced (older nodes announce none)."""
    limits = hello.get("limits")
    if not isinstance(limits, dict):
        return {}
    return {
        name: value
        for name, value in limits.items()
        if name in ANNOUNCED_LIMITS
        and isinstance(value, int)
        and not isinstance(value, bool)
        and value > 0
    }


def check_hello(message: dict[str, Any]) -> None:
    """Raise ProtocolError unless ``message`` is a hello of our protocol version."""
    if message.get("type") != "hello":
        raise ProtocolError("the first frame must be a hello")
    version = message.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})",
            supported=PROTOCOL_VERSION,
        )


# ---------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class Request:
    """Base of every request; ``id`` ties the response to it."""

    TYPE: ClassVar[str] = ""
    id: int

    def to_wire(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": self.TYPE}
        for f in fields(self):
            message[f.name] = getattr(self, f.name)
        return message


@dataclass(frozen=True)
class Open(Request):
    """Create the channel if missing; set its ``maxlen`` (``None`` = unbounded)."""

    TYPE: ClassVar[str] = "open"
    channel: str = ""
    maxlen: int | None = None


@dataclass(frozen=True)
class Append(Request):
    """Append ``items`` (each a msgpack encoding) with sequence numbers seq, seq+1, ...

    ``(session, seq)`` identifies each item for de-duplication: a repeat is not stored
    again and answers the index of its first append.

    ``keys`` (optional; omitted on the wire when ``None``) lists, per item, the Dask future
    keys the item holds, each the msgpack encoding of the key. The leader confirms their
    pins on the Dask scheduler before it answers; the answer's ``lost`` lists the keys the
    scheduler did not know (stored, but marked lost).
    """

    TYPE: ClassVar[str] = "append"
    channel: str = ""
    session: bytes = b""
    seq: int = 0
    items: list[bytes] = field(default_factory=list)
    keys: list[list[bytes]] | None = None

    def to_wire(self) -> dict[str, Any]:
        message = super().to_wire()
        if self.keys is None:
            del message["keys"]
        return message


@dataclass(frozen=True)
class Info(Request):
    TYPE: ClassVar[str] = "info"
    channel: str = ""


@dataclass(frozen=True)
class Read(Request):
    """Linearizable read of indexes ``[start, end)``; ``None`` means head / current end."""

    TYPE: ClassVar[str] = "read"
    channel: str = ""
    start: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class Poll(Request):
    """Wait up to ``wait`` seconds for items at ``start`` (or the stop marker).

    Served by any node once it has applied ``min_position``.
    """

    TYPE: ClassVar[str] = "poll"
    channel: str = ""
    start: int = 0
    min_position: int = 0
    wait: float = 0.0


@dataclass(frozen=True)
class Stop(Request):
    TYPE: ClassVar[str] = "stop"
    channel: str = ""


@dataclass(frozen=True)
class Delete(Request):
    TYPE: ClassVar[str] = "delete"
    channel: str = ""


@dataclass(frozen=True)
class EndSession(Request):
    TYPE: ClassVar[str] = "end_session"
    session: bytes = b""


@dataclass(frozen=True)
class Status(Request):
    TYPE: ClassVar[str] = "status"


@dataclass(frozen=True)
class Ping(Request):
    """Answered by any node, leader or not, as soon as it reads it, without touching the
    replicated state (a node that has ``max_pending_requests`` requests of the connection
    in hand reads no further until it answers one).

    A client sends it on a connection where its requests wait and nothing has come back
    for a while, to tell a node that holds them (an election, a slow commit) from one that
    is gone without closing the connection (its host lost power or was cut off the
    network). Any answer proves the node is there: a node of an earlier version answers
    with an unknown-type error.
    """

    TYPE: ClassVar[str] = "ping"


@dataclass(frozen=True)
class Fault(Request):
    """Test aid: drop this node's Raft traffic to the peers whose Raft addresses are listed.

    Served only by a node started with ``--fault-injection``; an empty list heals. The
    fault suite cuts both directions of a pair by telling both nodes.
    """

    TYPE: ClassVar[str] = "fault"
    block: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MemberList(Request):
    """The cluster's members (Raft address, name, client address), as the leader has them."""

    TYPE: ClassVar[str] = "member_list"


@dataclass(frozen=True)
class MemberAdd(Request):
    """Add the node with Raft address ``address`` to the cluster (one node at a time).

    ``client_address`` and ``name`` are recorded for it at once, so that every node can
    point clients at it should it lead before it has registered itself.
    """

    TYPE: ClassVar[str] = "member_add"
    address: str = ""
    client_address: str = ""
    name: str = ""


@dataclass(frozen=True)
class MemberRemove(Request):
    """Remove the node with Raft address ``address`` from the cluster."""

    TYPE: ClassVar[str] = "member_remove"
    address: str = ""


REQUEST_TYPES: dict[str, type[Request]] = {
    cls.TYPE: cls
    for cls in (
        Open,
        Append,
        Info,
        Read,
        Poll,
        Stop,
        Delete,
        EndSession,
        Status,
        Ping,
        Fault,
        MemberList,
        MemberAdd,
        MemberRemove,
    )
}

#: The longest address or node name a membership request may carry.
MAX_MEMBER_FIELD = 256

# Which python types each field accepts on the wire (bool is excluded from int on purpose).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "channel": (str,),
    "maxlen": (int, type(None)),
    "session": (bytes,),
    "seq": (int,),
    "items": (list,),
    "start": (int, type(None)),
    "end": (int, type(None)),
    "min_position": (int,),
    "wait": (int, float),
    "block": (list,),
    "keys": (list, type(None)),
    "address": (str,),
    "client_address": (str,),
    "name": (str,),
}
#: Fields a request may leave out; they then take their dataclass default.
_OPTIONAL_FIELDS = frozenset({("append", "keys")})
# Where one request type is stricter than the table above: a poll needs a start index.
_REQUEST_FIELD_TYPES: dict[tuple[str, str], tuple[type, ...]] = {
    ("poll", "start"): (int,),
}


def request_id_of(message: dict[str, Any]) -> int | None:
    """The request's ``id`` if it is one a response may carry back, else ``None``.

    A bool is refused although Python counts it as an int: echoed back as ``true`` it
    would compare equal to the id 1 in the asker's table of pending requests and settle
    a request it does not answer.
    """
    request_id = message.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        return None
    return request_id


def parse_request(message: dict[str, Any], limits: Any = DEFAULT_LIMITS) -> Request:
    """Validate a decoded request map and build its typed request.

    Raises :class:`RequestInvalid` (carrying ``details['id']`` when the id was readable)
    for an unknown type, a missing or wrong-typed field, or out-of-range values; and
    :class:`~raftchan.errors.LimitExceeded` for breaking ``limits``.
    """
    from raftchan.errors import LimitExceeded

    request_id = request_id_of(message)
    if request_id is None:
        raise RequestInvalid("request has no integer 'id'")
    kind = message.get("type")
    cls = REQUEST_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RequestInvalid(f"unknown request type {kind!r}", id=request_id)
    values: dict[str, Any] = {"id": request_id}
    for f in fields(cls):
        if f.name == "id":
            continue
        if f.name not in message and (cls.TYPE, f.name) in _OPTIONAL_FIELDS:
            continue
        if f.name not in message:
            raise RequestInvalid(f"{kind}: missing field {f.name!r}", id=request_id)
        value = message[f.name]
        allowed = _REQUEST_FIELD_TYPES.get((cls.TYPE, f.name), _FIELD_TYPES[f.name])
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise RequestInvalid(
                f"{kind}: field {f.name!r} has type {type(value).__name__}",
                id=request_id,
            )
        values[f.name] = value
    channel = values.get("channel")
    if channel is not None and not 0 < len(channel) <= limits.max_channel_name:
        raise RequestInvalid(
            f"channel name must have 1 to {limits.max_channel_name} characters", id=request_id
        )
    for name in ("maxlen", "seq", "start", "end", "min_position"):
        value = values.get(name)
        if isinstance(value, int) and value < 0:
            raise RequestInvalid(f"{kind}: field {name!r} must not be negative", id=request_id)
    if values.get("seq") == 0:
        raise RequestInvalid("seq must be at least 1: a session numbers from 1", id=request_id)
    if any(not isinstance(peer, str) for peer in values.get("block", ())):
        raise RequestInvalid("fault: 'block' must list Raft addresses as strings", id=request_id)
    for name in ("address", "client_address", "name"):
        if name in values and not 0 < len(values[name]) <= MAX_MEMBER_FIELD:
            raise RequestInvalid(
                f"{kind}: field {name!r} must have 1 to {MAX_MEMBER_FIELD} characters",
                id=request_id,
            )
    if values.get("maxlen") == 0:
        raise RequestInvalid("maxlen must be at least 1 (or nil for unbounded)", id=request_id)
    if "wait" in values:
        if isinstance(values["wait"], float) and math.isnan(values["wait"]):
            # NaN would pass the clamp below and end up as an event-loop deadline.
            raise RequestInvalid(f"{kind}: field 'wait' is not a number", id=request_id)
        values["wait"] = min(max(float(values["wait"]), 0.0), limits.max_poll_wait)
    if "session" in values and len(values["session"]) != SESSION_ID_BYTES:
        raise RequestInvalid(f"session id must be {SESSION_ID_BYTES} bytes", id=request_id)
    if "items" in values:
        items = values["items"]
        if not items:
            raise RequestInvalid("append carries no items", id=request_id)
        if len(items) > limits.max_batch_items:
            raise LimitExceeded(
                f"append of {len(items)} items exceeds max_batch_items={limits.max_batch_items}",
                id=request_id,
                limit="max_batch_items",
                size=len(items),
            )
        for position, item in enumerate(items):
            if not isinstance(item, bytes):
                raise RequestInvalid(
                    f"append: item {position} is {type(item).__name__}, not bin", id=request_id
                )
            if len(item) > limits.max_item_bytes:
                raise LimitExceeded(
                    f"item {position} of {len(item)} bytes exceeds "
                    f"max_item_bytes={limits.max_item_bytes}",
                    id=request_id,
                    limit="max_item_bytes",
                    size=len(item),
                    item=position,  # its position in this request, for the error message
                    max_item_bytes=limits.max_item_bytes,
                )
        values["items"] = list(items)
    keys = values.get("keys")
    if keys is not None and (
        len(keys) != len(values["items"])
        or not all(
            isinstance(item_keys, list) and all(isinstance(k, bytes) for k in item_keys)
            for item_keys in keys
        )
    ):
        raise RequestInvalid(
            "append: 'keys' must hold one list of bin keys per item", id=request_id
        )
    return cls(**values)


# ---------------------------------------------------------------------------------------
# Responses


def ok_response(request_id: int, **result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, **result}


def error_response(request_id: int | None, error: RaftchanError) -> dict[str, Any]:
    wire = error.to_wire()
    wire["details"] = {k: v for k, v in wire["details"].items() if k != "id"}
    return {"id": request_id, "ok": False, "error": wire}


def response_error(message: dict[str, Any]) -> RaftchanError | None:
    """The error an error response carries, or ``None`` for an ok response."""
    if message.get("ok", False):
        return None
    error = message.get("error")
    if not isinstance(error, dict):
        return ProtocolError("response has neither ok nor a well-formed error")
    details = error.get("details")
    return error_from_wire(
        str(error.get("code", "error")),
        str(error.get("message", "")),
        # Only string keys can become keyword details, and "message" is the message itself.
        {k: v for k, v in details.items() if isinstance(k, str) and k != "message"}
        if isinstance(details, dict)
        else None,
    )


@dataclass(frozen=True)
class ChannelInfo:
    """What a node reports about a channel.

    ``first`` is the index of the oldest retained item, ``next`` the index the next append
    gets (so ``next - first`` items are retained), ``position`` the state's applied
    position when this was read.
    """

    channel: str
    first: int
    next: int
    stopped: bool
    maxlen: int | None
    position: int

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> ChannelInfo:
        return cls(**{f.name: message[f.name] for f in fields(cls)})

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ReadResult:
    """Items ``[first, first + len(items))`` of a channel, as stored (msgpack encodings).

    ``next`` is the channel's next index at read time, ``stopped`` whether the stop marker
    was set, ``position`` the node's applied state position.
    """

    channel: str
    first: int
    items: list[bytes]
    next: int
    stopped: bool
    position: int

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> ReadResult:
        return cls(**{f.name: message[f.name] for f in fields(cls)})

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
