"""Bad input against real node processes: every kind is refused by name, nothing else breaks.

A node faces clients it does not control: buggy libraries, port scanners, half-dead
networks. The contract (DESIGN.md, "Limits"; :mod:`raftchan.protocol`) is that each bad
input gets a named error or, for bytes that are not the protocol at all, a
``protocol_error`` frame and a closed connection; and that the node goes on serving
everyone else with the data it already stored untouched. So every test here checks
three things: the named error, that a fresh well-behaved client can still append and
read through the node that took the abuse, and that a channel flushed before the abuse
reads back exactly as it did.

Raw sockets speak the wire protocol by hand (:class:`RawConnection`) so that the tests
can send what the client library never would. Every socket operation is bounded. Cases
of one kind share one cluster (a loop, not a parametrization), because starting a
cluster costs more than all the cases together.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

import raftchan
from cluster.harness import LocalCluster
from cluster.ports import free_ports
from raftchan import protocol
from raftchan.codec import ItemCodec, decode_item, encode_item
from raftchan.config import split_address
from raftchan.limits import DEFAULT_LIMITS

#: Bounds each raw socket operation (connect, send, one receive) and each wait for a close.
IO_TIMEOUT = 5.0
#: Overall deadline of each operation of the well-behaved clients.
CLIENT_TIMEOUT = 15.0
#: Bounds one ``raftchan node`` process that is expected to refuse to start.
REFUSE_TIMEOUT = 30.0

#: The channel filled before any abuse; it must read back exactly like this afterwards.
KEPT = "kept"
KEPT_ITEMS: list[Any] = ["first", {"x": 1, "nested": [1, 2.5, None]}, [1, 2, 3], b"\x00\xff", 42]

_HEADER = struct.Struct(">I")


def frame_of(body: Any) -> bytes:
    """A length-prefixed frame around any msgpack value (encode_frame insists on a map)."""
    packed = msgpack.packb(body, use_bin_type=True)
    return _HEADER.pack(len(packed)) + packed


class ConnectionClosedByNode(AssertionError):
    """The node closed the raw connection where the test expected a frame."""


class RawConnection:
    """One client connection spoken by hand: frames in and out, every step time-bounded."""

    def __init__(self, address: str) -> None:
        host, port = split_address(address)
        self.sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        self.sock.settimeout(IO_TIMEOUT)
        # The node's frames are bounded by the same limit as ours.
        self._decoder = protocol.FrameDecoder(DEFAULT_LIMITS.max_frame_bytes)
        self._next_id = 1

    def close(self) -> None:
        self.sock.close()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_message(self, message: dict[str, Any]) -> None:
        self.sock.sendall(protocol.encode_frame(message))

    def receive(self) -> dict[str, Any]:
        """The next frame from the node; ConnectionClosedByNode if it closes instead."""
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            message = next(self._decoder.messages(), None)
            if message is not None:
                return message
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete frame within {IO_TIMEOUT} s")
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                raise ConnectionClosedByNode("the node closed the connection")
            self._decoder.feed(data)

    def hello(self) -> dict[str, Any]:
        self.send_message(protocol.hello_request())
        answer = self.receive()
        assert answer.get("type") == "hello", answer
        return answer

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` under a fresh id and return the node's response to it."""
        request_id = self._next_id
        self._next_id += 1
        self.send_message({**message, "id": request_id})
        response = self.receive()
        assert response.get("id") == request_id, response
        return response

    def assert_closed_by_node(self) -> None:
        """Wait (bounded) for the node to close; any further bytes from it fail the test."""
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return
            if not data:
                return
            raise AssertionError(f"expected the node to close, got {len(data)} more bytes")
        raise AssertionError(f"the node kept the connection open for {IO_TIMEOUT} s")


Connect = Callable[..., RawConnection]


@pytest.fixture(name="raw")
def raw_fixture() -> Iterator[Connect]:
    """Opens raw connections on demand (greeted unless ``greet=False``); closes them all
    after the test."""
    opened: list[RawConnection] = []

    def connect(address: str, *, greet: bool = True) -> RawConnection:
        connection = RawConnection(address)
        opened.append(connection)
        if greet:
            connection.hello()
        return connection

    yield connect
    for connection in opened:
        connection.close()


@pytest.fixture(name="kept")
def kept_fixture(cluster: LocalCluster) -> list[Any]:
    """Fill channel KEPT through a normal client and flush it; returns what it holds."""
    with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
        chan = client.channel(KEPT)
        chan.extend(KEPT_ITEMS)
        chan.flush()
        stored = list(chan.data)
    assert stored == KEPT_ITEMS
    return stored


@contextlib.contextmanager
def case(label: str) -> Iterator[None]:
    """Name the case of a loop in its failure (the loop stands in for a parametrization)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"case {label}: {exc}") from exc


def leader_index(cluster: LocalCluster) -> int:
    return cluster.wait_leader(timeout=CLIENT_TIMEOUT)


def assert_error(response: dict[str, Any], code: str) -> dict[str, Any]:
    """Check ``response`` is an error response naming ``code``; return its error map."""
    assert response.get("ok") is False, response
    error = response.get("error")
    assert isinstance(error, dict), response
    assert error.get("code") == code, response
    assert isinstance(error.get("message"), str) and error["message"], response
    assert isinstance(error.get("details"), dict), response
    return error


def raw_read(connection: RawConnection, channel: str) -> list[Any]:
    """The whole channel through a raw read request (the connection is on the leader)."""
    response = connection.request({"type": "read", "channel": channel, "start": None, "end": None})
    assert response.get("ok") is True, response
    return [decode_item(item) for item in response["items"]]


def assert_node_serves(cluster: LocalCluster, index: int, kept: list[Any]) -> None:
    """Node ``index`` still answers, a fresh client can append and read, KEPT is unchanged.

    The fresh client knows only node ``index``, so it reaches the cluster through the
    very node that took the abuse (a follower would redirect it to the leader).
    """
    address = cluster.client_addresses[index]
    connection = RawConnection(address)
    try:
        connection.hello()
        answer = connection.request({"type": "status"})
        assert answer.get("ok") is True, answer
    finally:
        connection.close()
    marker = f"probe-{uuid.uuid4().hex}"
    with raftchan.Client(address, timeout=CLIENT_TIMEOUT) as client:
        assert list(client.channel(KEPT).data) == kept
        probe = client.channel("probe")
        probe.append(marker)
        probe.flush()
        assert probe.read()[-1] == marker
    assert_no_tracebacks(cluster)


def assert_no_tracebacks(cluster: LocalCluster) -> None:
    """Bad input is expected and answered; it must never surface as an unhandled error
    in a node (a traceback, or an asyncio task whose exception nobody retrieved)."""
    for name, text in cluster.logs().items():
        for sign in ("Traceback", "exception was never retrieved", "internal error"):
            assert sign not in text, f"node {name} logged {sign!r}:\n{text[-4000:]}"


# ---------------------------------------------------------------------------------------
# Items the client library refuses before anything is sent


def test_unencodable_item_raises_at_append_and_sends_nothing(
    cluster: LocalCluster, kept: list[Any]
) -> None:
    """An object msgpack cannot encode fails in the caller's thread, naming its type."""
    with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
        chan = client.channel(KEPT)
        with pytest.raises(raftchan.ItemNotEncodable) as caught:
            chan.append(object())
        assert caught.value.details.get("type") == "object"
        # One bad item in an extend queues none of its good neighbours either.
        with pytest.raises(raftchan.ItemNotEncodable):
            chan.extend(["good", {1, 2}, "also good"])
        # A map the node could store but no reader could decode is refused up front too.
        with pytest.raises(raftchan.ItemNotEncodable):
            chan.append({(1, 2): "tuple key"})
        chan.flush()  # nothing was queued, so nothing can be refused later
        assert list(chan.data) == kept
        assert chan.info().next == len(kept)
    assert_node_serves(cluster, leader_index(cluster), kept)


def test_oversized_item_is_refused_by_client_and_by_node(
    cluster: LocalCluster, kept: list[Any], raw: Connect
) -> None:
    """Above max_item_bytes: LimitExceeded at append, and from the node for a client
    that does not check (or assumes a larger limit)."""
    too_big = b"x" * DEFAULT_LIMITS.max_item_bytes  # its msgpack encoding adds a header
    with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
        chan = client.channel(KEPT)
        with pytest.raises(raftchan.LimitExceeded) as caught:
            chan.append(too_big)
        assert caught.value.details.get("limit") == "max_item_bytes"
        chan.flush()
        assert list(chan.data) == kept

        # The limit is inclusive: an item whose encoding is exactly max_item_bytes is stored.
        largest = b"y" * (DEFAULT_LIMITS.max_item_bytes - 5)  # bin 32 header: 5 bytes
        assert len(encode_item(largest)) == DEFAULT_LIMITS.max_item_bytes
        edge = client.channel("edge")
        edge.append(largest)
        edge.flush()
        assert edge.read() == [largest]

    # A client whose codec does not bound items learns the limit from the node at flush.
    unchecked = ItemCodec(max_item_bytes=None)
    with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT, codec=unchecked) as client:
        chan = client.channel(KEPT)
        chan.append(too_big)
        with pytest.raises(raftchan.LimitExceeded) as caught:
            chan.flush()
        assert caught.value.details.get("limit") == "max_item_bytes"
        assert list(chan.data) == kept

    # The same by hand: the node names the limit (and the item) and keeps the connection.
    leader = leader_index(cluster)
    connection = raw(cluster.client_addresses[leader])
    response = connection.request(
        {
            "type": "append",
            "channel": KEPT,
            "session": os.urandom(protocol.SESSION_ID_BYTES),
            "seq": 1,
            "items": [encode_item("small"), b"\xc4" * (DEFAULT_LIMITS.max_item_bytes + 1)],
        }
    )
    error = assert_error(response, "limit_exceeded")
    assert error["details"].get("limit") == "max_item_bytes", error
    assert error["details"].get("item") == 1, error
    assert error["details"].get("size") == DEFAULT_LIMITS.max_item_bytes + 1, error
    assert raw_read(connection, KEPT) == kept
    assert_node_serves(cluster, leader, kept)


# ---------------------------------------------------------------------------------------
# Bytes that are not the protocol: protocol_error frame, then the node closes


def expect_protocol_error_and_close(connection: RawConnection) -> dict[str, Any]:
    """The node's answer to bytes it cannot parse: one protocol_error frame, then close."""
    response = connection.receive()
    error = assert_error(response, "protocol_error")
    assert response.get("id") is None, response
    connection.assert_closed_by_node()
    return error


#: (label, greet first?, the bytes) of inputs that are not the protocol at all.
GARBAGE: list[tuple[str, bool, bytes]] = [
    ("http-before-hello", False, b"GET / HTTP/1.1\r\nHost: raftchan\r\n\r\n"),
    ("tls-client-hello", False, bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40),
    ("not-msgpack-before-hello", False, _HEADER.pack(5) + b"\xc1" * 5),
    ("not-msgpack-after-hello", True, _HEADER.pack(5) + b"\xc1" * 5),
    ("list-not-map", True, frame_of([1, 2, 3])),
    ("nil-not-map", True, frame_of(None)),
    ("empty-body", True, _HEADER.pack(0)),
    ("truncated-msgpack-in-frame", True, _HEADER.pack(3) + b"\x92\x01\xdc"),
    ("trailing-bytes-in-frame", True, _HEADER.pack(3) + b"\x80\x80\x80"),
    ("invalid-utf8-string", True, _HEADER.pack(4) + b"\x81\xa1\xff\x01"),
    ("map-keyed-by-a-map", True, _HEADER.pack(3) + b"\x81\x80\x01"),
    ("map-keyed-by-a-list", True, _HEADER.pack(3) + b"\x81\x90\x01"),
    ("array-claiming-4g-elements", True, _HEADER.pack(5) + b"\xdd\xff\xff\xff\xff"),
    ("map-claiming-4g-entries", True, _HEADER.pack(5) + b"\xdf\xff\xff\xff\xff"),
    ("nested-100k-deep", True, _HEADER.pack(100_001) + b"\x91" * 100_000 + b"\x01"),
    ("request-before-hello", False, protocol.encode_frame({"id": 1, "type": "status"})),
    ("wrong-version", False, protocol.encode_frame({"type": "hello", "version": 99})),
    ("hello-without-version", False, protocol.encode_frame({"type": "hello"})),
]


@pytest.mark.parametrize("position", [0, 2])
def test_an_item_the_node_refuses_is_the_only_one_not_stored(
    cluster: LocalCluster, position: int
) -> None:
    """Appends batched with an item the node refuses are stored, in order, and flush
    names the refused one; once the client knows the node's bound it refuses at append."""
    too_big = b"x" * DEFAULT_LIMITS.max_item_bytes
    unchecked = ItemCodec(max_item_bytes=None)  # as a client assuming a larger limit
    channel = f"neighbours-{position}"
    good = ["a", "b", "c"]
    with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT, codec=unchecked) as client:
        chan = client.channel(channel)
        # One batch, the session's first: at position 0 the refused item holds its seq 1.
        chan.extend([*good[:position], too_big, *good[position:]])
        with pytest.raises(raftchan.LimitExceeded) as caught:
            chan.flush()
        assert caught.value.details.get("size") == len(encode_item(too_big))
        assert channel in str(caught.value)
        chan.append("d")
        chan.flush()
        assert list(chan.data) == [*good, "d"]

        # The client now knows the node's bound and refuses such an item at once.
        with pytest.raises(raftchan.LimitExceeded):
            chan.append(too_big)
        chan.flush()
        assert len(chan) == len(good) + 1


def test_garbage_gets_protocol_error_and_close(
    cluster: LocalCluster, kept: list[Any], raw: Connect
) -> None:
    """Garbage on one connection closes that connection only, on every node."""
    leader = leader_index(cluster)
    bystanders = [raw(address) for address in cluster.client_addresses]
    for label, greet, garbage in GARBAGE:
        for index, address in enumerate(cluster.client_addresses):
            with case(f"{label} on node {index}"):
                victim = raw(address, greet=greet)
                victim.send_bytes(garbage)
                error = expect_protocol_error_and_close(victim)
                assert not error["message"].rstrip().endswith(":"), error  # it says what
                # A connection greeted before the garbage arrived is not affected.
                assert bystanders[index].request({"type": "status"}).get("ok") is True
    assert raw_read(bystanders[leader], KEPT) == kept
    for index in range(cluster.size):
        assert_node_serves(cluster, index, kept)


def test_wrong_protocol_version_names_the_supported_one(
    cluster: LocalCluster, kept: list[Any], raw: Connect
) -> None:
    """A client of another protocol version learns which one the node speaks."""
    leader = leader_index(cluster)
    victim = raw(cluster.client_addresses[leader], greet=False)
    victim.send_message({"type": "hello", "version": protocol.PROTOCOL_VERSION + 1})
    error = expect_protocol_error_and_close(victim)
    assert error["details"].get("supported") == protocol.PROTOCOL_VERSION, error
    assert_node_serves(cluster, leader, kept)


def test_oversized_frame_header_is_refused_before_the_body(
    cluster: LocalCluster, kept: list[Any], raw: Connect
) -> None:
    """A length above max_frame_bytes is refused as soon as the header arrives: the node
    names the limit without waiting for (or buffering) the body."""
    leader = leader_index(cluster)
    address = cluster.client_addresses[leader]
    for size in (DEFAULT_LIMITS.max_frame_bytes + 1, 0xFFFFFFFF):
        for greet in (False, True):
            with case(f"size {size}, greeted {greet}"):
                victim = raw(address, greet=greet)
                victim.send_bytes(_HEADER.pack(size))
                error = expect_protocol_error_and_close(victim)
                assert error["details"].get("limit") == "max_frame_bytes", error
                assert error["details"].get("size") == size, error
    assert_node_serves(cluster, leader, kept)


def test_oversized_frame_streamed_in_full_is_refused_by_name(
    cluster: LocalCluster, kept: list[Any], raw: Connect
) -> None:
    """A sender that streams the oversized body regardless still learns why it was cut off.

    The node must not buffer the body; it refuses at the header and closes. The sender
    is still writing then, so the refusal must survive the close.
    """
    leader = leader_index(cluster)
    victim = raw(cluster.client_addresses[leader])
    size = 2 * DEFAULT_LIMITS.max_frame_bytes
    victim.send_bytes(_HEADER.pack(size))
    chunk = b"\x00" * (1 << 16)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for _ in range(size // len(chunk)):
            victim.send_bytes(chunk)
    error = expect_protocol_error_and_close(victim)
    assert error["details"].get("limit") == "max_frame_bytes", error
    assert_node_serves(cluster, leader, kept)


# ---------------------------------------------------------------------------------------
# Well-formed frames asking for something invalid: invalid_request, connection stays


#: (label, request without its id) whose type no node serves.
UNKNOWN_TYPES: list[tuple[str, dict[str, Any]]] = [
    ("unknown-type", {"type": "explode", "channel": KEPT}),
    ("type-not-a-string", {"type": 7}),
    ("type-is-bin", {"type": b"status"}),
    ("second-hello", {"type": "hello", "version": protocol.PROTOCOL_VERSION}),
    ("no-type", {}),
]


def test_unknown_request_type_is_invalid_request(
    cluster: LocalCluster, kept: list[Any], raw: Connect
) -> None:
    """An unknown type is invalid_request under its id; the same connection goes on."""
    leader = leader_index(cluster)
    connection = raw(cluster.client_addresses[leader])
    for label, request_map in UNKNOWN_TYPES:
        with case(label):
            error = assert_error(connection.request(request_map), "invalid_request")
            assert "type" in error["message"], error
            assert raw_read(connection, KEPT) == kept
    assert_node_serves(cluster, leader, kept)


def test_every_node_answers_a_ping_leader_or_not(cluster: LocalCluster, raw: Connect) -> None:
    """Clients ping a quiet connection to tell a node holding their request from a gone
    one; leader and followers answer at once, with nothing but ok and the id."""
    for address in cluster.client_addresses:
        answer = raw(address).request({"type": "ping"})  # under a fresh id, checked
        assert answer.get("ok") is True and set(answer) == {"id", "ok"}, (address, answer)


def _append(**overrides: Any) -> dict[str, Any]:
    """A valid append to KEPT, with some fields replaced."""
    request = {
        "type": "append",
        "channel": KEPT,
        "session": os.urandom(protocol.SESSION_ID_BYTES),
        "seq": 1,
        "items": [encode_item("must not be stored")],
    }
    return {**request, **overrides}


_READ: dict[str, Any] = {"type": "read", "channel": KEPT, "start": None, "end": None}
_POLL: dict[str, Any] = {"type": "poll", "channel": KEPT, "start": 0, "min_position": 0, "wait": 0}

#: (label, request without its id) with a missing, wrong-typed or out-of-range field.
WRONG_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("read-channel-int", {**_READ, "channel": 5}),
    ("read-channel-nil", {**_READ, "channel": None}),
    ("read-channel-bin", {**_READ, "channel": b"kept"}),
    ("read-start-str", {**_READ, "start": "0"}),
    ("read-start-bool", {**_READ, "start": True}),
    ("read-start-float", {**_READ, "start": 0.0}),
    ("read-end-negative", {**_READ, "end": -1}),
    ("read-missing-fields", {"type": "read", "channel": KEPT}),
    ("info-empty-channel", {"type": "info", "channel": ""}),
    ("info-channel-too-long", {"type": "info", "channel": "c" * 257}),
    ("open-maxlen-zero", {"type": "open", "channel": KEPT, "maxlen": 0}),
    ("open-maxlen-str", {"type": "open", "channel": KEPT, "maxlen": "1"}),
    ("open-channel-list", {"type": "open", "channel": [KEPT], "maxlen": None}),
    ("append-items-str", _append(items="not a list")),
    ("append-items-map", _append(items={"a": b"x"})),
    ("append-items-empty", _append(items=[])),
    ("append-items-nil", _append(items=None)),
    ("append-item-str", _append(items=[encode_item(1), "text"])),
    ("append-item-int", _append(items=[encode_item(1), 3])),
    ("append-item-list", _append(items=[[encode_item(1)]])),
    ("append-session-str", _append(session="x" * 16)),
    ("append-session-short", _append(session=b"short")),
    ("append-seq-negative", _append(seq=-1)),
    ("append-seq-float", _append(seq=1.0)),
    ("append-seq-str", _append(seq="1")),
    ("append-channel-int", _append(channel=1)),
    ("append-channel-map", _append(channel={"name": KEPT})),
    ("stop-channel-int", {"type": "stop", "channel": 0}),
    ("delete-channel-nil", {"type": "delete", "channel": None}),
    ("end-session-int", {"type": "end_session", "session": 1}),
    ("poll-start-nil", {**_POLL, "start": None}),
    ("poll-wait-nan", {**_POLL, "wait": float("nan")}),
    ("poll-wait-str", {**_POLL, "wait": "1"}),
    ("poll-min-position-negative", {**_POLL, "min_position": -5}),
]


def test_wrong_typed_fields_are_invalid_requests_on_a_working_connection(
    cluster: LocalCluster, kept: list[Any], raw: Connect
) -> None:
    """Each malformed request gets invalid_request under its own id; the connection stays.

    All of them go down one connection, each followed by a valid read on it, so the test
    shows both that every shape is refused and that none of them poisons the connection.
    """
    leader = leader_index(cluster)
    connection = raw(cluster.client_addresses[leader])
    for label, request_map in WRONG_FIELDS:
        with case(label):
            assert_error(connection.request(request_map), "invalid_request")
            assert raw_read(connection, KEPT) == kept
    assert_node_serves(cluster, leader, kept)


def test_requests_without_a_usable_id_are_refused_and_the_connection_stays(
    cluster: LocalCluster, kept: list[Any], raw: Connect
) -> None:
    """A request whose id cannot be echoed is still refused by name, under id nil.

    A bool id in particular must not come back as ``true``: to a Python client that is
    the id 1 and would settle the wrong pending request.
    """
    leader = leader_index(cluster)
    connection = raw(cluster.client_addresses[leader])
    cases: list[tuple[str, dict[Any, Any], int | None]] = [
        ("no-id", {"type": "status"}, None),
        ("id-str", {"id": "1", "type": "status"}, None),
        ("id-bool", {"id": True, "type": "status"}, None),
        ("id-float", {"id": 1.5, "type": "status"}, None),
        ("keys-not-strings", {1: 2, b"id": 3}, None),
        ("id-most-negative", {"id": -(2**63), "type": "nonsense"}, -(2**63)),
        ("id-largest", {"id": 2**64 - 1, "type": "nonsense"}, 2**64 - 1),
    ]
    for label, request_map, expected_id in cases:
        with case(label):
            connection.send_bytes(frame_of(request_map))
            response = connection.receive()
            assert_error(response, "invalid_request")
            assert response.get("id") == expected_id, response
            assert type(response.get("id")) is type(expected_id), response
            assert raw_read(connection, KEPT) == kept
    assert_node_serves(cluster, leader, kept)


# ---------------------------------------------------------------------------------------
# Connections that vanish half-way


def test_connections_dropped_mid_frame_leave_the_node_serving(
    cluster: LocalCluster, kept: list[Any], raw: Connect
) -> None:
    """Half a header, half a body, a request nobody waits for: then the peer is gone."""
    leader = leader_index(cluster)
    address = cluster.client_addresses[leader]
    full = protocol.encode_frame({**_READ, "id": 1})
    cuts = [
        (False, protocol.encode_frame(protocol.hello_request())[:6]),
        (False, b"\x00\x00"),
        (True, b"\x00\x00"),
        (True, full[: len(full) // 2]),
        (True, _HEADER.pack(DEFAULT_LIMITS.max_frame_bytes) + b"\x80" * 1000),
    ]
    for greet, data in cuts * 5:
        victim = raw(address, greet=greet)
        victim.send_bytes(data)
        victim.close()
    # A reset (not a clean close) mid-frame.
    victim = raw(address)
    victim.send_bytes(full[:3])
    victim.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    victim.close()

    # Appends whose askers leave before the answer: the node must not trip over writing
    # to a closed connection, and whatever it applied is in order and not doubled.
    setup = raw(address)
    assert setup.request({"type": "open", "channel": "abandoned", "maxlen": None})["ok"]
    session = os.urandom(protocol.SESSION_ID_BYTES)
    for seq in range(1, 4):
        victim = raw(address)
        items = [encode_item(seq)]
        victim.send_message(
            {**_append(channel="abandoned", session=session, seq=seq, items=items), "id": 1}
        )
        victim.close()

    assert_node_serves(cluster, leader, kept)
    applied = raw_read(setup, "abandoned")
    assert applied == list(range(1, len(applied) + 1)), applied


# ---------------------------------------------------------------------------------------
# A node refuses an unsafe or unusable configuration before binding anything


def _node_command(tmp_path: Path, client_port: int, peer: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "raftchan", "node",
        "--name", "lonely",
        "--client-address", f"127.0.0.1:{client_port}",
        "--peer-address", peer,
        "--peers", "127.0.0.1:1,127.0.0.1:2",
        "--data-dir", str(tmp_path / "data"),
        "--log-level", "DEBUG",
        *extra,
    ]  # fmt: skip


def _run_refused(
    command: list[str],
    *,
    bound_first: bool = False,
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a node that must refuse to start: non-zero status, quickly, no traceback.

    Unless ``bound_first``, it must refuse before binding anything: the tests hold its
    ports, so a bind would have failed with 'address in use' instead.
    """
    started = time.monotonic()
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=REFUSE_TIMEOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec,
    )
    elapsed = time.monotonic() - started
    report = f"status {done.returncode} after {elapsed:.1f} s\nstderr:\n{done.stderr}"
    assert done.returncode != 0, report
    assert "Traceback" not in done.stderr, report
    if not bound_first:
        assert "in use" not in done.stderr.lower(), report
    return done


@contextlib.contextmanager
def _listening(host: str) -> Iterator[int]:
    """A port this test listens on at ``host``; no other program can bind it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(name="held_port")
def held_port_fixture() -> Iterator[int]:
    """A loopback port this test listens on, for the refused node's client address."""
    with _listening("127.0.0.1") as port:
        yield port


@pytest.mark.parametrize(
    ("peer_host", "peers"),
    [
        ("10.1.2.3", "127.0.0.1:1,127.0.0.1:2"),
        ("0.0.0.0", "127.0.0.1:1,127.0.0.1:2"),
        ("127.0.0.1", "10.1.2.4:7202,10.1.2.5:7203"),  # remote peers need it just as much
    ],
)
def test_node_refuses_non_loopback_peers_without_secret(
    tmp_path: Path, held_port: int, peer_host: str, peers: str
) -> None:
    # The Raft port is held too (10.1.2.3 is no address of this host: binding it fails
    # with a message of its own).
    held = contextlib.nullcontext(free_ports(1)[0]) if peer_host == "10.1.2.3" else None
    with held or _listening(peer_host) as raft_port:
        command = _node_command(tmp_path, held_port, f"{peer_host}:{raft_port}")
        command[command.index("--peers") + 1] = peers
        done = _run_refused(command)
    assert "--cluster-secret-file" in done.stderr, done.stderr


def _unusable_secrets(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    yield "missing", tmp_path / "no-such-secret"
    folder = tmp_path / "secret-folder"
    folder.mkdir()
    yield "folder", folder
    empty = tmp_path / "empty-secret"
    empty.write_text("  \n")
    yield "empty", empty


def test_node_refuses_a_secret_file_it_cannot_use(tmp_path: Path, held_port: int) -> None:
    """Missing, a folder or empty: one clear line naming the file, no start."""
    (raft_port,) = free_ports(1)
    for label, path in _unusable_secrets(tmp_path):
        with case(label):
            command = _node_command(
                tmp_path, held_port, f"10.1.2.3:{raft_port}", "--cluster-secret-file", str(path)
            )
            done = _run_refused(command)
            assert path.name in done.stderr, done.stderr


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def _without_file_overrides() -> None:
    """In the child before exec: drop the superuser's right to read any file, so a file
    of mode 0 is unreadable to the node as it is to every other user (run as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_node_refuses_a_secret_file_it_cannot_read(tmp_path: Path, held_port: int) -> None:
    unreadable = tmp_path / "unreadable-secret"
    unreadable.write_text("s3cret\n")
    unreadable.chmod(0)
    preexec = _without_file_overrides if os.geteuid() == 0 else None
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"open({str(unreadable)!r}).read()"],
            preexec_fn=preexec,
            capture_output=True,
            timeout=REFUSE_TIMEOUT,
        )
        readable = probe.returncode == 0 or b"PermissionError" not in probe.stderr
    except subprocess.SubprocessError:  # the right could not be dropped
        readable = True
    if readable:
        pytest.skip("this host lets the test's user read a file of mode 0, and will not drop that")
    (raft_port,) = free_ports(1)
    command = _node_command(
        tmp_path, held_port, f"10.1.2.3:{raft_port}", "--cluster-secret-file", str(unreadable)
    )
    done = _run_refused(command, preexec=preexec)
    assert unreadable.name in done.stderr, done.stderr


@pytest.mark.parametrize("taken", ["--peer-address", "--client-address", "--http-address"])
def test_a_node_whose_port_is_taken_stops_with_one_line_naming_it(
    tmp_path: Path, taken: str
) -> None:
    """Another program listens on the node's Raft, client or HTTP port: the node must not
    run (pysyncobj alone retried the Raft port forever while the node said it was ready)."""
    free_client, free_raft, free_http = free_ports(3)
    with _listening("127.0.0.1") as held:
        client_port = held if taken == "--client-address" else free_client
        raft_port = held if taken == "--peer-address" else free_raft
        http_port = held if taken == "--http-address" else free_http
        http = ("--http-address", f"127.0.0.1:{http_port}")
        command = _node_command(tmp_path, client_port, f"127.0.0.1:{raft_port}", *http)
        done = _run_refused(command, bound_first=True)
    assert f"127.0.0.1:{held} ({taken})" in done.stderr, done.stderr
    assert "in use" in done.stderr.lower(), done.stderr


def test_a_cluster_runs_on_a_secret_file_of_random_bytes(tmp_path: Path) -> None:
    """``head -c 32 /dev/urandom > secret`` is a common way to make a secret: the nodes
    must take it as it is (bytes, not text), elect a leader and commit through it."""
    secret = tmp_path / "binary-secret"
    secret.write_bytes(b"\xff\xfe\x00\x81" + os.urandom(28))
    local = LocalCluster(
        3, base_dir=tmp_path / "cluster", extra_args=["--cluster-secret-file", str(secret)]
    )
    try:
        local.start()
        local.wait_ready(timeout=60.0)
        with raftchan.Client(local.addresses, timeout=CLIENT_TIMEOUT) as client:
            chan = client.channel("secret")
            chan.extend(["a", "b"])
            chan.flush()
            assert list(chan.data) == ["a", "b"]
    finally:
        local.close()
