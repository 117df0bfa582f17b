"""The framing of Raft peer messages: stored zlib streams any node can read."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import pysyncobj.pickle
import pytest
from pysyncobj.poller import PollPoller
from pysyncobj.tcp_connection import CONNECTION_STATE

from raftchan.peer_connection import (
    COMPRESS_FROM_BYTES,
    BoundedTcpConnection,
    stored_zlib,
)


@pytest.mark.parametrize("size", [0, 1, 300, 65_535, 65_536, 200_000])
def test_a_stored_stream_is_what_zlib_decompress_reads(size: int) -> None:
    data = os.urandom(size)
    assert zlib.decompress(stored_zlib(data)) == data


def test_a_small_message_is_stored_not_compressed() -> None:
    # Highly compressible on purpose: a compressing framing would shrink it.
    message = {"type": "append_entries", "entries": [(b"x" * 10_000, 7, 2)]}
    data = pysyncobj.pickle.dumps(message)
    assert len(data) < COMPRESS_FROM_BYTES
    framed = stored_zlib(data)
    assert len(data) < len(framed) < len(data) + 64
    assert pysyncobj.pickle.loads(zlib.decompress(framed)) == message


def test_a_large_message_is_compressed() -> None:
    message = {"type": "append_entries", "serialized": (b"x" * 65_536, False, False)}
    data = pysyncobj.pickle.dumps(message)
    framed = stored_zlib(data)
    assert len(framed) < len(data) // 10
    assert pysyncobj.pickle.loads(zlib.decompress(framed)) == message


def test_a_message_larger_than_the_socket_buffer_goes_out_whole_without_a_next_send() -> None:
    # pysyncobj left what the socket did not take in its buffer until the next message to
    # the same peer; a leader's batch then waited for the next heartbeat.
    sender_socket, receiver = socket.socketpair()
    sender_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sender_socket.setblocking(False)
    receiver.setblocking(False)
    poller = PollPoller()
    connection = BoundedTcpConnection(poller, socket=sender_socket, timeout=30.0)
    try:
        poller.poll(0.05)  # the first writable event: pysyncobj stops watching for more
        message = {"type": "append_entries", "entries": [(os.urandom(1_000_000), 7, 2)]}
        connection.send(message)
        # No further send: only the poller can move the rest.
        assert pysyncobj.pickle.loads(zlib.decompress(_received_frame(poller, receiver))) == message
    finally:
        connection.disconnect()
        receiver.close()


def _framed(message: object) -> bytes:
    data = stored_zlib(pysyncobj.pickle.dumps(message))
    return struct.pack("i", len(data)) + data


def _poll_until(poller: PollPoller, done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        poller.poll(0.01)


def _received_frame(poller: PollPoller, peer: socket.socket, timeout: float = 10.0) -> bytes:
    """One whole frame read from ``peer`` (non-blocking) while ``poller`` runs the sender."""
    (frame,) = _received_frames(poller, peer, 1, timeout)
    return frame


def _received_frames(
    poller: PollPoller, peer: socket.socket, count: int, timeout: float = 10.0
) -> list[bytes]:
    """``count`` whole frames read from ``peer`` (non-blocking), in order, while
    ``poller`` runs the sender."""
    received = bytearray()
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count and time.monotonic() < deadline:
        poller.poll(0.01)
        with contextlib.suppress(BlockingIOError):
            while chunk := peer.recv(1 << 16):
                received += chunk
        while len(received) >= 4 and len(received) >= 4 + struct.unpack_from("i", received)[0]:
            (length,) = struct.unpack_from("i", received)
            frames.append(bytes(received[4 : 4 + length]))
            del received[: 4 + length]
    assert len(frames) == count
    return frames


@contextlib.contextmanager
def _accepted_connection(
    timeout: float, on_message: Callable[[object], None] | None = None
) -> Iterator[tuple[PollPoller, BoundedTcpConnection, socket.socket]]:
    """A connection as this node gets one it accepted, its poller, and the peer's socket
    (non-blocking); both ends closed afterwards."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    poller = PollPoller()
    connection = BoundedTcpConnection(
        poller, onMessageReceived=on_message, socket=ours, timeout=timeout
    )
    try:
        yield poller, connection, peer
    finally:
        connection.disconnect()
        peer.close()


def test_a_connection_this_node_dialed_takes_a_large_first_message() -> None:
    # The member at the other end sends no handshake on it: a catching-up follower's
    # first message from its leader can be a batch of entries far above the small bound.
    listener = socket.create_server(("127.0.0.1", 0))
    poller = PollPoller()
    got: list[object] = []
    connection = BoundedTcpConnection(poller, onMessageReceived=got.append, timeout=30.0)
    accepted: socket.socket | None = None
    try:
        connection.connect("127.0.0.1", listener.getsockname()[1])
        accepted, _ = listener.accept()
        accepted.settimeout(10)  # a stuck send fails the test instead of hanging it
        message = {"type": "append_entries", "entries": [(os.urandom(200_000), 7, 2)]}
        accepted.sendall(_framed(message))
        _poll_until(poller, lambda: bool(got) or connection.state == CONNECTION_STATE.DISCONNECTED)
        assert got == [message]
    finally:
        connection.disconnect()
        if accepted is not None:
            accepted.close()
        listener.close()


def test_a_connection_a_stranger_opened_refuses_a_large_first_message() -> None:
    got: list[object] = []
    with _accepted_connection(30.0, got.append) as (poller, connection, stranger):
        frame = _framed({"type": "append_entries", "entries": [(os.urandom(200_000), 7, 2)]})
        stranger.sendall(frame[:32_768])  # the declared length is what gets refused
        _poll_until(poller, lambda: connection.state == CONNECTION_STATE.DISCONNECTED)
        assert connection.state == CONNECTION_STATE.DISCONNECTED
        assert got == []


#: The connections' timeout in the quiet-connection tests (seconds).
QUIET_TIMEOUT = 0.2


def test_a_connection_quiet_for_longer_than_its_timeout_carries_the_next_message() -> None:
    # Two followers say nothing to each other while a leader lives; pysyncobj dropped the
    # first vote request after that quiet at both ends.
    left_socket, right_socket = socket.socketpair()
    for end in (left_socket, right_socket):
        end.setblocking(False)
    poller = PollPoller()
    got: list[object] = []
    left = BoundedTcpConnection(poller, socket=left_socket, timeout=QUIET_TIMEOUT)
    right = BoundedTcpConnection(
        poller, onMessageReceived=got.append, socket=right_socket, timeout=QUIET_TIMEOUT
    )
    try:
        poller.poll(0.05)
        time.sleep(3 * QUIET_TIMEOUT)
        message = {"type": "request_vote", "term": 7, "last_log_index": 3, "last_log_term": 6}
        left.send(message)
        _poll_until(poller, lambda: bool(got) or right.state == CONNECTION_STATE.DISCONNECTED)
        assert got == [message]
        assert left.state == right.state == CONNECTION_STATE.CONNECTED
    finally:
        left.disconnect()
        right.disconnect()


def test_a_connection_whose_messages_go_unanswered_for_its_timeout_is_closed() -> None:
    # What the timeout is for: a peer that stopped answering (its end is never read).
    with _accepted_connection(QUIET_TIMEOUT) as (_poller, connection, _silent):
        connection.send({"type": "append_entries", "term": 1})
        assert connection.state == CONNECTION_STATE.CONNECTED
        time.sleep(2 * QUIET_TIMEOUT)
        connection.send({"type": "append_entries", "term": 1})
        assert connection.state == CONNECTION_STATE.DISCONNECTED


def test_a_quiet_connection_reads_a_message_that_arrives() -> None:
    # The receiving end of the same quiet: pysyncobj closed it on the readable event,
    # before reading what had come.
    got: list[object] = []
    with _accepted_connection(QUIET_TIMEOUT, got.append) as (poller, connection, peer):
        poller.poll(0.05)
        time.sleep(3 * QUIET_TIMEOUT)
        message = {"type": "request_vote", "term": 7, "last_log_index": 3, "last_log_term": 6}
        peer.sendall(_framed(message))
        _poll_until(poller, lambda: bool(got) or connection.state == CONNECTION_STATE.DISCONNECTED)
        assert got == [message]
        assert connection.state == CONNECTION_STATE.CONNECTED


def test_bytes_in_a_message_travel_at_their_size() -> None:
    # pysyncobj pickled messages in protocol 2, where bytes become UTF-8 of latin-1: 1.5
    # times the size of random bytes, which were then compressed back at great cost.
    payload = os.urandom(200_000)
    with _accepted_connection(30.0) as (poller, connection, receiver):
        connection.send({"entries": [(payload, 7, 2)]})
        framed = _received_frame(poller, receiver)
        assert len(framed) < 1.01 * len(payload)
        assert pysyncobj.pickle.loads(zlib.decompress(framed)) == {"entries": [(payload, 7, 2)]}


def test_a_large_incompressible_message_is_stored_not_compressed() -> None:
    data = os.urandom(4 * COMPRESS_FROM_BYTES)
    framed = stored_zlib(data)
    # zlib's header names the window: 2**9 for the stored streams, 2**15 for compress().
    assert framed[0] == 0x18
    assert zlib.decompress(framed) == data


def test_queued_messages_go_out_in_order_from_one_buffer_drained_in_place() -> None:
    # pysyncobj dropped what the socket took with ``buffer = buffer[sent:]``, a copy of
    # all that was still queued: a snapshot transfer queues megabytes in 64 KiB pieces,
    # and the leader spent most of its time copying them.
    messages = [{"type": "append_entries", "data": os.urandom(65_536), "n": n} for n in range(40)]
    with _accepted_connection(30.0) as (poller, connection, receiver):
        for message in messages:
            connection.send(message)
        queued = connection._TcpConnection__writeBuffer
        assert len(queued) > 1_000_000  # the socket took only part of it
        received = _received_frames(poller, receiver, len(messages))
        assert connection._TcpConnection__writeBuffer is queued
        assert len(queued) == 0
    assert [pysyncobj.pickle.loads(zlib.decompress(frame)) for frame in received] == messages


def test_frames_read_together_are_parsed_in_order_from_one_buffer_dropped_in_place() -> None:
    # pysyncobj appended each read with ``buffer += chunk`` and dropped each parsed frame
    # with ``buffer = buffer[length:]``, both copies of the whole buffer: a follower
    # receiving a snapshot spent most of its time there and missed its heartbeats.
    # Each under the bound of a first message on a connection accepted from a stranger.
    messages = [{"type": "append_entries", "data": os.urandom(30_000), "n": n} for n in range(60)]
    got: list[object] = []
    buffers: set[int] = set()

    def on_message(message: object) -> None:
        got.append(message)
        buffers.add(id(connection._TcpConnection__readBuffer))

    with _accepted_connection(30.0, on_message) as (poller, connection, peer):
        peer.setblocking(True)
        sender = threading.Thread(target=peer.sendall, args=(b"".join(map(_framed, messages)),))
        sender.start()
        _poll_until(poller, lambda: len(got) == len(messages))
        sender.join(10)
        assert got == messages
        assert len(buffers) == 1
        assert len(connection._TcpConnection__readBuffer) == 0


def test_a_frame_that_does_not_decode_closes_the_connection_after_the_ones_before_it() -> None:
    got: list[object] = []
    with _accepted_connection(30.0, got.append) as (poller, connection, peer):
        good = _framed({"type": "append_entries", "term": 3})
        peer.sendall(good + struct.pack("i", 8) + b"notzlib!" + good)
        _poll_until(poller, lambda: connection.state == CONNECTION_STATE.DISCONNECTED)
        assert connection.state == CONNECTION_STATE.DISCONNECTED
        assert got == [{"type": "append_entries", "term": 3}]


def test_a_connection_answering_a_backlog_slowly_stays_open_for_all_of_it() -> None:
    # pysyncobj reads all the socket holds, then handles message after message. A
    # follower that answered each message of a leader's backlog for longer than the
    # timeout counted its own answers as unanswered, closed the connection to its live
    # leader and lost the rest of the backlog.
    messages = [{"type": "append_entries", "n": n} for n in range(10)]
    got: list[object] = []

    def answer_slowly(message: object) -> None:
        got.append(message)
        time.sleep(QUIET_TIMEOUT / 4)
        connection.send({"type": "next_node_idx", "next_node_idx": len(got)})

    with _accepted_connection(QUIET_TIMEOUT, answer_slowly) as (poller, connection, peer):
        peer.sendall(b"".join(map(_framed, messages)))
        _poll_until(
            poller,
            lambda: len(got) == len(messages) or connection.state == CONNECTION_STATE.DISCONNECTED,
        )
        assert got == messages
        assert connection.state == CONNECTION_STATE.CONNECTED
