"""The snapshot file: what pysyncobj calls a "full dump".

pysyncobj compacts its log by asking a serializer hook to write a snapshot to
``fullDumpFile + ".tmp"`` and then renaming it over ``fullDumpFile`` itself. The
hook receives the last applied Raft entry, the entry before it and the cluster
nodes; the state machine's own bytes are added by the caller. On restart (and
when a follower installs a snapshot sent by the leader) the deserializer must
hand the two entries back as ``(command, index, term)`` *tuples*: pysyncobj
compares them with journal entries using ``!=``, and a list never equals a
tuple, which would make it discard the whole journal on every restart.

File layout (all integers little-endian)::

    magic    8 bytes   b"RCSNAPSH"
    version  u32       FORMAT_VERSION
    meta_len u32       length of the msgpack meta block
    meta_crc u32       CRC32 of the meta block
    state_crc u32      CRC32 of the state blob
    state_len u64      length of the state blob
    meta     meta_len  msgpack [last_entry, prev_entry, node_ids, segments]
    state    state_len opaque bytes of the state machine
    (segments, embedded: only in a snapshot sent to another node, see below)

The meta block carries its own checksum so the anchor can be found without
trusting the state blob, but every reader here verifies both checksums: a
snapshot whose state is damaged must not be used to trim the journal.
Only msgpack is used, never pickle, so reading a file cannot run code.

``segments`` (format version 2; version 1 files have none) lists the *segment files*
the state refers to, as ``[name, size, crc32]``: files written beside the snapshot by
earlier snapshots of the same node and never changed after, so that a snapshot writes
only what is new (see raftchan.item_segments). A snapshot and its segments are one
whole: every reader verifies each segment's size and checksum too, and a missing or
damaged segment makes the snapshot corrupt. :class:`SnapshotStream` reads a snapshot
as one stream with its segments appended, in the order listed: that is how a leader
sends it, and the file the follower stores is a valid snapshot whose segments are
*embedded* (found after the state, instead of in files of their own).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Entry",
    "Segment",
    "Snapshot",
    "SnapshotCorrupt",
    "SnapshotStream",
    "fsync_directory",
    "read_snapshot",
    "read_snapshot_anchor",
    "read_snapshot_meta",
    "stored_bytes",
    "write_snapshot",
    "write_synced",
]

MAGIC = b"RCSNAPSH"
#: The version written; version 1 (no segments) is still read.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, FORMAT_VERSION)

# magic, version, meta_len, meta_crc, state_crc, state_len
_HEADER = struct.Struct("<8sIIIIQ")

# The meta block holds two log entries and the member list; anything this big is damage,
# and refusing it keeps a corrupt length field from triggering a huge allocation.
_MAX_META_LEN = 256 * 1024 * 1024

# Read the state in pieces when checking its CRC, so that verifying a snapshot for its
# anchor does not need the whole blob in memory at once.
_CHUNK = 1 << 20

# A large snapshot is synced to disk as it is written, a few MiB at a time. Written
# whole and fsynced at the end, 300 MB of it went to disk with the journal's next
# fdatasync (ext4 commits the file system's journal as a whole, and the data of the
# files in it with it): the Raft thread waited in that fdatasync for half a second,
# sent no heartbeat, and the followers stood for election.
_SYNC_EVERY_BYTES = 4 << 20

Entry = tuple[bytes, int, int]
"""A Raft log entry as pysyncobj handles it: ``(command, index, term)``."""


class SnapshotCorrupt(ValueError):
    """The snapshot file is damaged, truncated, or not a snapshot of this format."""


@dataclass(frozen=True)
class Segment:
    """A segment file a snapshot refers to: its name beside the snapshot, its size and
    its CRC32."""

    name: str
    size: int
    crc: int


@dataclass(frozen=True)
class Snapshot:
    """The decoded contents of a snapshot file."""

    last_entry: Entry
    """The last Raft entry applied to ``state``."""
    prev_entry: Entry
    """The entry just before ``last_entry``; the journal is trimmed to start here."""
    node_ids: tuple[str, ...]
    """Ids of the cluster members when the snapshot was taken."""
    state: bytes
    """The state machine's own snapshot bytes, opaque to this module."""
    segments: tuple[Segment, ...] = ()
    """The segment files the state refers to, verified like the rest."""
    embedded_at: int | None = None
    """Where the first segment starts inside the snapshot file itself, when they are
    embedded (a snapshot received from another node); None: in files of their own."""

    def segment_location(self, snapshot_path: str | os.PathLike[str], i: int) -> tuple[str, int]:
        """The file that holds segment ``i`` and the offset at which it starts there."""
        if self.embedded_at is not None:
            return os.fspath(snapshot_path), self.embedded_at + sum(
                s.size for s in self.segments[:i]
            )
        directory = os.path.dirname(os.path.abspath(snapshot_path))
        return os.path.join(directory, self.segments[i].name), 0


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (file creations, renames, removals) to disk.

    ``path`` is the directory itself. A rename is only durable once the directory that
    holds it is fsynced; the file's own fsync does not cover it. On platforms that cannot
    open a directory (Windows) this does nothing.
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (IsADirectoryError, PermissionError):  # pragma: no cover - not on Linux
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_entry(entry: Any, name: str) -> Entry:
    """Validate one entry supplied by a caller and return it as a plain tuple."""
    if not isinstance(entry, Sequence) or isinstance(entry, (str, bytes)) or len(entry) != 3:
        raise TypeError(f"{name} must be a (command: bytes, index: int, term: int) tuple")
    command, index, term = entry
    if not isinstance(command, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}[0] (command) must be bytes, not {type(command).__name__}")
    if not isinstance(index, int) or not isinstance(term, int):
        raise TypeError(f"{name} index and term must be int")
    if index < 0 or term < 0:
        raise ValueError(f"{name} index and term must not be negative")
    return (bytes(command), index, term)


def write_snapshot(
    path: str | os.PathLike[str],
    last_entry: Entry,
    prev_entry: Entry,
    node_ids: Iterable[str],
    state: bytes | bytearray | memoryview | Iterable[bytes],
    segments: Iterable[Segment] = (),
) -> None:
    """Write a snapshot to exactly ``path`` and fsync the file.

    ``state`` is the state machine's bytes, whole or as consecutive pieces (see
    :func:`raftchan.packing.packb_in_pieces`): pieces are written as they come, so the
    whole blob is never in memory at once, and the header's length and checksum are
    filled in once the last piece is written. ``segments`` are the segment files, beside
    ``path``, that the state refers to; they must be on disk already.

    When this returns, the file's contents are on disk. The directory entry is *not*
    fsynced: pysyncobj passes a ``.tmp`` name and renames the file into place itself;
    the journal fsyncs the directory before it trims anything the snapshot replaces.
    """
    last = _check_entry(last_entry, "last_entry")
    prev = _check_entry(prev_entry, "prev_entry")
    nodes = list(node_ids)
    if not all(isinstance(n, str) for n in nodes):
        raise TypeError("node_ids must be strings")
    if isinstance(state, (bytes, bytearray, memoryview)):
        pieces: Iterable[Any] = [memoryview(state).cast("B")]
    elif isinstance(state, Iterable) and not isinstance(state, str):
        pieces = state
    else:
        raise TypeError(f"state must be bytes or pieces of bytes, not {type(state).__name__}")

    table = []
    for segment in segments:
        _check_segment_name(segment.name)
        table.append([segment.name, segment.size, segment.crc])
    meta = msgpack.packb([list(last), list(prev), nodes, table], use_bin_type=True)
    with open(path, "wb") as f:
        # The state's length and checksum are known only at its end: the header is
        # written again then, and the file is fsynced after that.
        f.write(_header(meta, 0, 0))
        f.write(meta)
        crc, length = write_synced(f, pieces)
        f.seek(0)
        f.write(_header(meta, crc, length))
        f.flush()
        os.fsync(f.fileno())


def write_synced(f: BinaryIO, pieces: Iterable[Any], crc: int = 0) -> tuple[int, int]:
    """Write ``pieces`` of bytes at ``f``'s position, syncing the file's data every few
    MiB on the way (not after the last piece: the caller syncs at its end). Returns the
    CRC32 of what was written, continued from ``crc``, and its length."""
    length = synced = 0
    for piece in pieces:
        if not isinstance(piece, (bytes, bytearray, memoryview)):
            raise TypeError(f"a piece of the state must be bytes, not {type(piece).__name__}")
        crc = zlib.crc32(piece, crc)
        length += len(piece)
        f.write(piece)
        if length - synced >= _SYNC_EVERY_BYTES:
            f.flush()
            os.fdatasync(f.fileno())
            synced = length
    return crc, length


def _check_segment_name(name: object) -> str:
    """A segment is named by a plain file name beside the snapshot, never a path."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or os.path.basename(name) != name
        or "\x00" in name
    ):
        raise ValueError(f"a segment is named by a plain file name, not {name!r:.100}")
    return name


def _header(meta: bytes, state_crc: int, state_len: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(meta), zlib.crc32(meta), state_crc, state_len)


def _read_exact(f: BinaryIO, n: int, what: str, path: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SnapshotCorrupt(
            f"snapshot {path!r} is truncated: {what} needs {n} bytes, found {len(data)}"
        )
    return data


def _decode_entry(raw: Any, name: str, path: str) -> Entry:
    if (
        not isinstance(raw, list)
        or len(raw) != 3
        or not isinstance(raw[0], bytes)
        or not isinstance(raw[1], int)
        or not isinstance(raw[2], int)
    ):
        raise SnapshotCorrupt(f"snapshot {path!r} has a malformed {name}: {raw!r:.200}")
    # A tuple, never a list: pysyncobj compares it with journal tuples.
    return (raw[0], raw[1], raw[2])


#: A file's identity: it changes when the file is replaced (a new inode) or rewritten.
_Identity = tuple[int, int, int, int]

#: The anchor of each snapshot file verified whole, by path, with the identity of the
#: file that was verified (see read_snapshot_anchor).
_verified_anchors: dict[str, tuple[_Identity, Entry]] = {}

#: Segments verified before: the identity of the file that holds them, their offset in
#: it, size and CRC (see _check_segment). Files come and go as snapshots are replaced,
#: so the set is emptied once it holds this many (a node keeps at most 32 segments, and
#: forgetting one costs only a read of it).
_verified_segments: set[tuple[_Identity, int, int, int]] = set()
VERIFIED_SEGMENTS_MAX = 1024


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: str | os.PathLike[str], *, load_state: bool) -> Snapshot:
    """Read and verify a snapshot; the state blob is returned only if ``load_state``."""
    return _read_file(path, load_state=load_state)[0]


def _read_file(path: str | os.PathLike[str], *, load_state: bool) -> tuple[Snapshot, _Identity]:
    """:func:`_read`, and the identity of the file that was read."""
    spath = os.fspath(path)
    with open(spath, "rb") as f:
        identity = _identity(os.fstat(f.fileno()))
        version, meta, state_crc, state_len = _read_head(f, spath)
        last, prev, nodes, segments = _decode_meta(meta, version, spath)
        state_end = _HEADER.size + len(meta) + state_len
        embedded_at = _segments_layout(identity[2], state_end, segments, spath)
        if load_state:
            state = _read_exact(f, state_len, "the state", spath)
            crc = zlib.crc32(state)
        else:
            state = b""
            crc = _crc_of(f, state_len, "the state", spath)
        if crc != state_crc:
            raise SnapshotCorrupt(f"snapshot {spath!r}: CRC mismatch in the state")
        if embedded_at is not None:
            offset = embedded_at
            for segment in segments:
                _check_segment(f, identity, offset, segment, spath)
                offset += segment.size
    if embedded_at is None:
        directory = os.path.dirname(os.path.abspath(spath))
        for segment in segments:
            segment_path = os.path.join(directory, segment.name)
            try:
                with open(segment_path, "rb") as f:
                    seen = _identity(os.fstat(f.fileno()))
                    if seen[2] != segment.size:
                        raise SnapshotCorrupt(
                            f"snapshot {spath!r}: segment {segment.name!r} is not "
                            f"{segment.size} bytes"
                        )
                    _check_segment(f, seen, 0, segment, spath)
            except FileNotFoundError as exc:
                # Not "no snapshot" (what FileNotFoundError means to the callers): a
                # snapshot that lacks a part of its state.
                raise SnapshotCorrupt(
                    f"snapshot {spath!r}: segment {segment.name!r} is missing"
                ) from exc
    snapshot = Snapshot(last, prev, nodes, state, segments, embedded_at)
    return snapshot, identity


def _read_head(f: BinaryIO, spath: str) -> tuple[int, bytes, int, int]:
    """The header and the verified meta block: ``(version, meta, state_crc, state_len)``."""
    header = _read_exact(f, _HEADER.size, "the header", spath)
    magic, version, meta_len, meta_crc, state_crc, state_len = _HEADER.unpack(header)
    if magic != MAGIC:
        raise SnapshotCorrupt(f"{spath!r} is not a raftchan snapshot (bad magic {magic!r})")
    if version not in _READABLE_VERSIONS:
        raise SnapshotCorrupt(
            f"snapshot {spath!r} has format version {version}; "
            f"this code reads versions {', '.join(map(str, _READABLE_VERSIONS))}"
        )
    if meta_len > _MAX_META_LEN:
        raise SnapshotCorrupt(f"snapshot {spath!r} declares an implausible meta size")
    meta = _read_exact(f, meta_len, "the meta block", spath)
    if zlib.crc32(meta) != meta_crc:
        raise SnapshotCorrupt(f"snapshot {spath!r}: CRC mismatch in the meta block")
    return version, meta, state_crc, state_len


def _decode_meta(
    meta: bytes, version: int, spath: str
) -> tuple[Entry, Entry, tuple[str, ...], tuple[Segment, ...]]:
    try:
        decoded = msgpack.unpackb(meta, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise SnapshotCorrupt(f"snapshot {spath!r}: meta block does not decode: {exc}") from exc
    if not isinstance(decoded, list) or len(decoded) != (3 if version == 1 else 4):
        raise SnapshotCorrupt(f"snapshot {spath!r}: meta block has the wrong shape")
    raw_last, raw_prev, raw_nodes, *rest = decoded
    if not isinstance(raw_nodes, list) or not all(isinstance(n, str) for n in raw_nodes):
        raise SnapshotCorrupt(f"snapshot {spath!r}: node ids are not a list of strings")
    segments: list[Segment] = []
    for raw in rest[0] if rest else ():
        if (
            not isinstance(raw, list)
            or len(raw) != 3
            or not isinstance(raw[1], int)
            or not isinstance(raw[2], int)
            or raw[1] < 0
        ):
            raise SnapshotCorrupt(f"snapshot {spath!r} has a malformed segment: {raw!r:.200}")
        try:
            name = _check_segment_name(raw[0])
        except ValueError as exc:
            raise SnapshotCorrupt(f"snapshot {spath!r}: {exc}") from exc
        segments.append(Segment(name, raw[1], raw[2]))
    return (
        _decode_entry(raw_last, "last entry", spath),
        _decode_entry(raw_prev, "previous entry", spath),
        tuple(raw_nodes),
        tuple(segments),
    )


def _segments_layout(
    size: int, state_end: int, segments: tuple[Segment, ...], spath: str
) -> int | None:
    """Where the segments are: embedded after the state (their offset) or in files of
    their own (None), from the file's size; anything else is damage."""
    if size == state_end:
        return None
    embedded_end = state_end + sum(s.size for s in segments)
    if segments and size == embedded_end:
        return state_end
    raise SnapshotCorrupt(
        f"snapshot {spath!r} is {size} bytes, its header says {state_end}"
        + (f" ({embedded_end} with its segments)" if segments else "")
    )


def _crc_of(f: BinaryIO, length: int, what: str, spath: str) -> int:
    crc = 0
    remaining = length
    while remaining:
        chunk = _read_exact(f, min(remaining, _CHUNK), what, spath)
        crc = zlib.crc32(chunk, crc)
        remaining -= len(chunk)
    return crc


def _check_segment(
    f: BinaryIO, identity: _Identity, offset: int, segment: Segment, spath: str
) -> None:
    """Verify the segment at ``offset`` of ``f`` (a file of that identity).

    A segment never changes once written: one verified before, in the same file since
    (a rename keeps the identity), is not read again. Each snapshot writes only new
    items, and reading every earlier segment back each time would cost what writing them
    whole did; a snapshot received from the leader is verified once on arrival, not
    again when it is loaded.
    """
    key = (identity, offset, segment.size, segment.crc)
    if key in _verified_segments:
        return
    f.seek(offset)
    if _crc_of(f, segment.size, f"segment {segment.name!r}", spath) != segment.crc:
        raise SnapshotCorrupt(f"snapshot {spath!r}: CRC mismatch in segment {segment.name!r}")
    if len(_verified_segments) >= VERIFIED_SEGMENTS_MAX:
        _verified_segments.clear()
    _verified_segments.add(key)


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read and verify the snapshot at ``path``.

    Raises :class:`SnapshotCorrupt` when the file is truncated, fails a checksum, or is not
    a snapshot of this format; ``FileNotFoundError`` when it does not exist.
    Entries come back as ``(bytes, int, int)`` tuples.
    """
    return _read(path, load_state=True)


def read_snapshot_meta(path: str | os.PathLike[str]) -> Snapshot | None:
    """The snapshot at ``path`` without its state blob (``state`` is ``b""``); None if
    there is no file.

    The whole file is verified as by :func:`read_snapshot` (the state in chunks), and
    :class:`SnapshotCorrupt` is raised if it is damaged.
    """
    try:
        return _read(path, load_state=False)
    except FileNotFoundError:
        return None


def read_snapshot_anchor(path: str | os.PathLike[str]) -> Entry | None:
    """Return the ``prev_entry`` of the snapshot at ``path``, or None if there is no file.

    This is the entry the journal must start with for pysyncobj to keep it. The whole file
    is verified (state included, read in chunks) and :class:`SnapshotCorrupt` is raised if
    it is damaged: the journal must not be trimmed against a snapshot that cannot be loaded.

    A file verified whole before, and neither replaced nor rewritten since (same inode,
    size and modification time), is not read again: the snapshot writer verifies each
    snapshot on its own thread right after writing it, so that the journal, trimming
    itself in pysyncobj's thread, only looks the anchor up. Reading and checking 300 MB
    there took about half a second, during which the node sent no heartbeat.
    """
    spath = os.fspath(path)
    try:
        known = _verified_anchors.get(spath)
        if known is not None and known[0] == _identity(os.stat(spath)):
            return known[1]
        snapshot, identity = _read_file(spath, load_state=False)
    except FileNotFoundError:
        return None
    _verified_anchors[spath] = (identity, snapshot.prev_entry)
    return snapshot.prev_entry


def stored_bytes(path: str | os.PathLike[str]) -> int:
    """What the snapshot at ``path`` takes on disk, its segments included; 0 when there is
    no file. Reads only the header and the meta block; a file too damaged for that counts
    as its own size (reading it whole will refuse it)."""
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                version, meta, _crc, state_len = _read_head(f, spath)
                segments = _decode_meta(meta, version, spath)[3]
            except SnapshotCorrupt:
                return size
    except FileNotFoundError:
        return 0
    if size > _HEADER.size + len(meta) + state_len:
        return size  # embedded
    return size + sum(s.size for s in segments)


class SnapshotStream:
    """The snapshot at ``path`` read as one stream: the file, then each of its segments in
    the order listed. The bytes read make a valid snapshot with embedded segments.

    Every file is opened when the stream is made, so a snapshot replaced afterwards, or
    a segment removed, does not change what is read (a segment *shrunk* by
    raftchan.retired_files would: such streams must be dropped before). Raises
    ``FileNotFoundError`` when there is no snapshot and :class:`SnapshotCorrupt` when its
    head is damaged or a segment is missing; the contents are verified by the receiver.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        spath = os.fspath(path)
        self._files: list[BinaryIO] = []
        first = open(spath, "rb")  # noqa: SIM115 - kept open until the stream ends
        self._files.append(first)
        try:
            version, meta, _crc, state_len = _read_head(first, spath)
            segments = _decode_meta(meta, version, spath)[3]
            size = os.fstat(first.fileno()).st_size
            state_end = _HEADER.size + len(meta) + state_len
            self.size = size
            if _segments_layout(size, state_end, segments, spath) is None:
                directory = os.path.dirname(os.path.abspath(spath))
                for segment in segments:
                    try:
                        self._files.append(open(os.path.join(directory, segment.name), "rb"))  # noqa: SIM115
                    except FileNotFoundError as exc:
                        raise SnapshotCorrupt(
                            f"snapshot {spath!r}: segment {segment.name!r} is missing"
                        ) from exc
                    self.size += segment.size
            first.seek(0)
        except BaseException:
            self.close()
            raise

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of one of the files); b"" at the end."""
        while self._files:
            data = self._files[0].read(n)
            if data:
                return data
            self._files.pop(0).close()
        return b""

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()

    def __del__(self) -> None:
        # pysyncobj drops a finished or cancelled transfer without closing its file.
        self.close()
