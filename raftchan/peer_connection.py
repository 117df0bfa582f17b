"""A bound on what a Raft peer connection buffers, before and after it is authenticated.

pysyncobj frames each peer message as a 4-byte length and the message (zlib-compressed
pickle, encrypted and signed when the cluster has a secret) and reads a connection into
one growing buffer until a whole frame is there. It puts no limit on the declared length,
so anyone who reaches the Raft port can make a node buffer without end, authenticated or
not. This module replaces the connection class pysyncobj uses with one that

- refuses (closes) a connection whose next frame declares a negative length or more than
  the bound: :data:`UNAUTHENTICATED_MESSAGE_BYTES` until a first message on it has been
  decoded (with a secret: decrypted and verified), the full bound after that;
- stops reading a connection for the current poll round once its buffer holds more than
  a bound's worth, so that what was read is parsed (and a forged message refused) before
  more is read.

The first message on a connection another node opened to this one is a handshake of a
few dozen bytes (a random key, or the sender's address), so the small bound never cuts
legitimate traffic. A connection this node opened itself leads to a member it chose;
the member sends no handshake on it, and its first message may be a batch of entries of
any size, so such a connection gets the full bound from the start.

The class also sends small messages uncompressed (see :func:`stored_zlib`), calls a
connection dead only when it went unanswered, not merely quiet (see
:meth:`BoundedTcpConnection._TcpConnection__processConnectionTimeout`), and keeps both
buffers in ``bytearray`` (see :meth:`BoundedTcpConnection._write_buffer`).
"""

from __future__ import annotations

import errno
import logging
import pickle
import struct
import zlib
from typing import Any, ClassVar

import pysyncobj.tcp_connection
import pysyncobj.tcp_server
import pysyncobj.transport
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE

__all__ = [
    "COMPRESS_FROM_BYTES",
    "PICKLE_PROTOCOL",
    "UNAUTHENTICATED_MESSAGE_BYTES",
    "BoundedTcpConnection",
    "install_message_bound",
    "stored_zlib",
]

logger = logging.getLogger(__name__)

#: Largest frame accepted on a connection before any message on it was decoded.
UNAUTHENTICATED_MESSAGE_BYTES = 64 * 1024

_FRAME_HEADER = struct.Struct("i")  # pysyncobj's: native int, signed
#: Messages from this size on are compressed (see :func:`stored_zlib`).
COMPRESS_FROM_BYTES = 16 * 1024
#: The smallest window zlib offers: a stored stream never looks back.
_STORED_WINDOW_BITS = 9
#: Bytes taken from the start and from the middle of a large message and compressed
#: quickly to tell whether compressing the whole message pays.
_SAMPLE_BYTES = 4 * 1024
#: A sample that compresses to more than this share of its size is incompressible.
_WORTHWHILE_RATIO = 0.9
#: Peer messages and log entries are pickled in this protocol, where bytes are stored as
#: they are (pysyncobj's protocol 2 stores them as UTF-8 of latin-1: 1.5 times the size
#: of random bytes). Every Python 3 ``pickle.loads`` reads it.
PICKLE_PROTOCOL = 4
_monotonic = pysyncobj.tcp_connection.monotonicTime


class BoundedTcpConnection(pysyncobj.tcp_connection.TcpConnection):
    """pysyncobj's TcpConnection with a bound on the frames it buffers (see module doc)."""

    #: Largest frame accepted once the connection is authenticated; set by
    #: :func:`install_message_bound`.
    max_message_bytes: ClassVar[int] = 64 * 1024 * 1024

    # pysyncobj's attributes this class reads and writes (its __init__ sets them).
    _TcpConnection__writeBuffer: bytes | bytearray
    _TcpConnection__readBuffer: bytes | bytearray
    recvLastTimestamp: int

    _raftchan_authenticated = False
    #: When this end first sent something after it last read (see _unanswered_since).
    _raftchan_unanswered_since: float | None = None
    #: When this end last took a message from its read buffer (see _unanswered_since).
    _raftchan_last_parsed: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # pysyncobj passes the socket of a connection it accepted; one it will dial has
        # none (see the module doc).
        accepted = kwargs.get("socket", args[4] if len(args) > 4 else None) is not None
        self._raftchan_authenticated = not accepted

    def _bound(self) -> int:
        if self._raftchan_authenticated:
            return self.max_message_bytes
        return UNAUTHENTICATED_MESSAGE_BYTES

    # pysyncobj's private reading methods, overridden under their mangled names: the base
    # class calls them as self.__processRead() and self.__processParseMessage().

    def _write_buffer(self) -> bytearray:
        """The bytes waiting to be sent, as a ``bytearray``.

        pysyncobj keeps both buffers as ``bytes``: it appends each message read or sent
        with ``buffer += data`` and drops what the socket took or what was parsed with
        ``buffer = buffer[n:]``, each a copy of the whole buffer. A snapshot transfer
        queues many megabytes in 64 KiB pieces, so both ends copied the buffer over and
        over: py-spy put 60-76% of the sending leader's samples and 72% of the receiving
        follower's on those two lines, and the follower, its tick thread busy, heard no
        heartbeat in time, stood for election and took the leadership away (a follower
        restarted behind a 120 MB snapshot caught up after 96-143 s, the term rising
        by 200-330). A ``bytearray`` appends and drops from the front in amortized
        constant time. pysyncobj puts ``bytes`` back when it connects or disconnects.
        """
        buffer = self._TcpConnection__writeBuffer
        if not isinstance(buffer, bytearray):
            buffer = self._TcpConnection__writeBuffer = bytearray(buffer)
        return buffer

    def unsent_bytes(self) -> int:
        """How many bytes wait in this end's buffer for the socket to take them."""
        return len(self._TcpConnection__writeBuffer)

    def _read_buffer(self) -> bytearray:
        """The bytes read and not yet parsed, as a ``bytearray`` (see _write_buffer)."""
        buffer = self._TcpConnection__readBuffer
        if not isinstance(buffer, bytearray):
            buffer = self._TcpConnection__readBuffer = bytearray(buffer)
        return buffer

    def _TcpConnection__processSend(self) -> bool:  # noqa: N802 - pysyncobj's name
        # pysyncobj's, with the sent bytes dropped in place (see _write_buffer).
        buffer = self._write_buffer()
        if not buffer:
            return False
        try:
            sent = self._TcpConnection__socket.send(buffer)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if sent <= 0:
            return False
        del buffer[:sent]
        return True

    def _TcpConnection__processRead(self) -> bool:  # noqa: N802 - pysyncobj's name
        self._read_buffer()  # pysyncobj's += then extends it in place
        if not super()._TcpConnection__processRead():
            return False
        buffer = self._read_buffer()
        bound = self._bound()
        if len(buffer) >= _FRAME_HEADER.size:
            (declared,) = _FRAME_HEADER.unpack_from(buffer)
            if declared < 0 or declared > bound:
                logger.warning(
                    "closing a Raft peer connection that announced a %d-byte message "
                    "(bound %d bytes%s)",
                    declared,
                    bound,
                    "" if self._raftchan_authenticated else ", not yet authenticated",
                )
                self.disconnect()
                return False
        # Enough for now: let the caller parse (and refuse a forged frame) before reading on.
        return len(buffer) <= _FRAME_HEADER.size + bound

    def _TcpConnection__processConnectionTimeout(self) -> None:  # noqa: N802 - pysyncobj's
        # pysyncobj calls a connection dead once nothing was read on it for its timeout,
        # and checks that right before it sends and when the socket turns readable. While
        # a leader lives, its two followers say nothing to each other: the first vote
        # request after a second of that quiet was dropped at both ends (the sender's
        # check closed the connection instead of sending; the receiver's closed it
        # instead of reading). Both followers then stood again after the reconnect and
        # split the vote, and a failover took 0.3-0.7 s instead of 0.1-0.2 s. Quiet is not
        # death: a connection is dead when what this end sent has gone unanswered for
        # the timeout. A connection still being dialled keeps pysyncobj's rule.
        if self.state != CONNECTION_STATE.CONNECTED:
            super()._TcpConnection__processConnectionTimeout()
            return
        since = self._unanswered_since()
        if since is not None and _monotonic() - since > self._TcpConnection__timeout:
            self.disconnect()

    def _unanswered_since(self) -> float | None:
        """When this end first sent something nothing read since answers (None: all
        it sent was answered, or it sent nothing).

        A message taken from the read buffer counts as an answer too: pysyncobj reads
        all the socket holds and then handles message after message without reading
        again. A follower that read a leader's backlog at once (a snapshot in chunks, a
        run of large batches) and answered each message while it worked through them
        for more than the timeout closed its connection to a live leader, dropping the
        rest, and then stood for election because its leader's connection had closed.
        """
        since = self._raftchan_unanswered_since
        if since is None:
            return None
        heard = max(self._TcpConnection__lastReadTime, self._raftchan_last_parsed)
        return None if since < heard else since

    def send(self, message: Any) -> None:
        """pysyncobj's send, with the message framed by :func:`stored_zlib`."""
        if self._unanswered_since() is None:
            self._raftchan_unanswered_since = _monotonic()
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        data = stored_zlib(pickle.dumps(message, protocol=PICKLE_PROTOCOL))
        if self.encryptor:
            data = self.encryptor.encrypt_at_time(data, int(_monotonic()))
        buffer = self._write_buffer()
        buffer += _FRAME_HEADER.pack(len(data))
        buffer += data
        self._TcpConnection__trySendBuffer()
        if self._TcpConnection__writeBuffer and self._TcpConnection__fileno is not None:
            # The socket took only part of it. pysyncobj watches a connected socket for
            # writability only while handling a writable event, so the rest would wait
            # for the next message to this peer (a heartbeat, up to 75 ms later): every
            # batch larger than the socket buffer stalled that long (64 producers of
            # 4 KiB random items: 422 items/s). Ask to hear when it can take more.
            self._TcpConnection__poller.subscribe(
                self._TcpConnection__fileno,
                self._TcpConnection__processConnection,
                POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR,
            )

    def _TcpConnection__processParseMessage(self) -> Any:  # noqa: N802 - pysyncobj's name
        # pysyncobj's, with the parsed frame dropped in place (see _write_buffer).
        buffer = self._read_buffer()
        if len(buffer) < _FRAME_HEADER.size:
            return None
        (length,) = _FRAME_HEADER.unpack_from(buffer)
        end = _FRAME_HEADER.size + length
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view, view[_FRAME_HEADER.size : end] as frame:
            data = bytes(frame)
        try:
            message = self._decode(data)
        except Exception:  # noqa: BLE001 - a frame that does not decode ends the connection
            # As pysyncobj does: whatever a peer sent that does not decrypt, verify or
            # unpickle closes the connection; the peer reconnects if it is a member.
            self.disconnect()
            return None
        del buffer[:end]
        self._raftchan_authenticated = True
        self._raftchan_last_parsed = _monotonic()
        return message

    def _decode(self, data: bytes) -> Any:
        """One frame's message: decrypted and verified when the cluster has a secret,
        decompressed, unpickled, and its connection key checked (pysyncobj's order)."""
        if self.encryptor:
            timestamp = self.encryptor.extract_timestamp(data)
            if timestamp < self.recvLastTimestamp:
                raise ValueError("a peer message older than the last one")
            self.recvLastTimestamp = timestamp
            data = self.encryptor.decrypt(data)
        message = pickle.loads(zlib.decompress(data))  # noqa: S301 - pysyncobj's peer protocol
        if self.recvRandKey:
            key, message = message
            if key != self.recvRandKey:
                raise ValueError("a peer message with another connection's key")
        return message


def stored_zlib(data: bytes) -> bytes:
    """``data`` as a zlib stream: stored (uncompressed) when small, compressed when large.

    pysyncobj compresses every peer message at level 3. Setting up that compressor costs
    tens of microseconds even for a message of a few hundred bytes, paid once per
    follower for every command and every answer: a stored stream skips it. Large
    messages (batches of big items, snapshot chunks) are compressed when samples of them
    compress: sent uncompressed, a compressible state made snapshot transfers a hundred
    times longer, long enough for elections to start during them; compressing
    incompressible ones took 100 ms of the leader's tick per 4 MiB and per follower,
    long enough to hold heartbeats back. Any ``zlib.decompress`` reads both, nodes of
    earlier versions included, so a rolling upgrade can mix them.
    """
    if len(data) >= COMPRESS_FROM_BYTES and _compresses(data):
        return zlib.compress(data, 3)
    compressor = zlib.compressobj(0, zlib.DEFLATED, _STORED_WINDOW_BITS, 1)
    return compressor.compress(data) + compressor.flush()


def _compresses(data: bytes) -> bool:
    """Whether samples of ``data`` (its start and its middle) shrink when compressed."""
    view = memoryview(data)
    middle = len(data) // 2
    for sample in (view[:_SAMPLE_BYTES], view[middle : middle + _SAMPLE_BYTES]):
        if len(zlib.compress(sample, 1)) > _WORTHWHILE_RATIO * len(sample):
            return False
    return True


def install_message_bound(max_message_bytes: int) -> None:
    """Make pysyncobj open every peer connection as a :class:`BoundedTcpConnection`.

    ``max_message_bytes`` bounds one frame once a connection is authenticated; it must
    exceed the largest message the cluster sends (an append-entries batch or a snapshot
    chunk, compressed and encrypted). Affects the whole process; calling it again only
    changes the bound.
    """
    BoundedTcpConnection.max_message_bytes = max_message_bytes
    pysyncobj.tcp_server.TcpConnection = BoundedTcpConnection
    pysyncobj.transport.TcpConnection = BoundedTcpConnection
