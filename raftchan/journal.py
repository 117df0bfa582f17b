"""The Raft log on disk: a pysyncobj journal that survives crashes and power loss.

pysyncobj's own ``FileJournal`` writes through mmap without ever fsyncing, rewrites its
file in place when it compacts, and is trimmed one tick after the snapshot it depends on
was renamed into place; a restart in that window makes pysyncobj discard the whole log.
:class:`DurableJournal` replaces it through pysyncobj's ``createJournal`` seam and fixes
those three things:

- records are appended with ``os.write`` and made durable by :meth:`DurableJournal.sync`;
- a prefix is trimmed by writing a new file, fsyncing it and renaming it over the old one,
  so a crash leaves the whole old journal or the whole new one. After a snapshot
  (:meth:`DurableJournal.deleteEntriesTo`) the entries are dropped from memory at once
  and the file is rewritten on a thread of its own: in pysyncobj's thread, rewriting the
  8-46 MB of 4 KiB appends that arrived while a snapshot was written held every commit
  of the node for 30-830 ms. Until the new file is in place the old one holds entries
  the snapshot covers as well, which opening the journal drops (see below);
- on open the journal is trimmed to start at the snapshot's anchor entry, so pysyncobj
  accepts it instead of clearing it.

File layout (integers little-endian)::

    header   magic b"RCJOURNL" (8 bytes), u32 format version, u32 CRC32 of those 12 bytes
    record   u32 command length, u32 CRC32, u64 index, u64 term, command bytes

A record's CRC covers its length, index, term and command. Records must have consecutive
indexes and non-decreasing terms; reading stops at the first record that is short, fails
its CRC, or breaks that sequence, and the file is truncated there.

Term, vote and commit index live next to the log in ``<path>.meta`` (a msgpack map),
replaced atomically on every write.

Test aid: when the environment variable ``RAFTCHAN_TEST_COMPACTION_PAUSE`` holds a number
of seconds, every compaction (:meth:`DurableJournal.deleteEntriesTo`) logs the WARNING
"compaction paused for tests" once the new journal is written and fsynced, then sleeps that
long before renaming it into place. A fault test waits for that line and kills the node,
which is otherwise a window of microseconds. It holds up the journal's compactions, so it
has no place outside tests; other rewrites (creating the file, recovery, :meth:`clear`)
never pause.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, overload

import msgpack
import pysyncobj.journal
import pysyncobj.syncobj

from raftchan import retired_files
from raftchan.snapshot import Entry, SnapshotCorrupt, fsync_directory, read_snapshot_anchor

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "TEST_PAUSE_ENV",
    "DurableJournal",
    "JournalCorrupt",
    "install_journal_factory",
    "read_synced_length",
    "register_journal",
    "unregister_journal",
]

logger = logging.getLogger(__name__)

MAGIC = b"RCJOURNL"
FORMAT_VERSION = 1
META_VERSION = 1

_FILE_HEADER = struct.Struct("<8sII")  # magic, format version, CRC32 of magic + version
_RECORD = struct.Struct("<IIQQ")  # command length, CRC32, index, term
_CRC_FIELDS = struct.Struct("<IQQ")  # the header fields the CRC covers besides the command

_SYNCED_WIDTH = 20  # digits of the recorded synced length; fixed so a rewrite never shrinks


def _file_header() -> bytes:
    head = struct.pack("<8sI", MAGIC, FORMAT_VERSION)
    return head + struct.pack("<I", zlib.crc32(head))


_HEADER_BYTES = _file_header()


class JournalCorrupt(ValueError):
    """A journal or meta file is not readable as raftchan's format.

    Raised instead of starting empty: a node that silently forgot its log, term or vote
    could break Raft's guarantees for the whole cluster.
    """


def _encode_record(command: bytes, idx: int, term: int) -> bytes:
    crc = zlib.crc32(command, zlib.crc32(_CRC_FIELDS.pack(len(command), idx, term)))
    return _RECORD.pack(len(command), crc, idx, term) + command


#: The new file a compaction writes, beside the journal, before renaming it into place.
_COMPACTING_SUFFIX = ".compacting"
#: How long closing waits for a compaction under way to give up.
_CLOSE_WAIT_S = 10.0

# Copied a few MiB at a time, so that a large journal is never read into memory whole.
_COPY_CHUNK = 4 << 20


def _copy_range(source: int, target: int, start: int, end: int) -> None:
    """Append bytes ``start`` to ``end`` of file ``source`` to file ``target``."""
    while start < end:
        data = os.pread(source, min(_COPY_CHUNK, end - start), start)
        if not data:
            raise OSError(f"the journal ended at {start}, before {end}")
        _write_all(target, data)
        start += len(data)


def _write_all(fd: int, data: bytes) -> None:
    # os.write may write less than asked (signals, some file systems); keep going.
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class DurableJournal(pysyncobj.journal.Journal):
    """pysyncobj's Raft log, as a list of ``(command, index, term)`` tuples kept on disk.

    pysyncobj calls this from its tick thread. :meth:`sync` may be called from another
    thread as well; every mutation holds an internal lock.

    Durability when each call returns (with ``fsync=True``):

    - :meth:`add`: the record is written to the file (page cache) but not durable.
    - :meth:`sync` / :meth:`flush`: every entry added so far is durable.
    - :meth:`deleteEntriesFrom`: the shortened file is durable (and so are all entries).
    - :meth:`deleteEntriesTo`: the snapshot file and its rename are durable; the entries
      leave memory, and the file is rewritten without them in the background.
    - :meth:`clear`: the snapshot file and its rename, and the empty journal, are durable.
    - :meth:`setCurrentTerm`: term, vote and the current commit index are durable.
    - :meth:`setRaftCommitIndex`: memory only; written by :meth:`onOneSecondTimer`.

    With ``fsync=False`` nothing is ever fsynced (files are still replaced atomically), so
    the journal survives a killed process through the page cache but not a power loss.

    ``record_synced=True`` writes the synced byte length of the journal to
    ``<path>.synced`` after every change to it, without fsync. Fault tests use it to emulate
    a power loss: kill the process, truncate the journal to that length, restart.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        snapshot_path: str | os.PathLike[str] | None,
        fsync: bool = True,
        record_synced: bool = False,
    ) -> None:
        """Open (or create) the journal at ``path`` and recover it.

        A torn or damaged tail is cut off, a leftover temporary file from an interrupted
        rewrite is removed, and if ``snapshot_path`` holds a snapshot whose anchor entry is
        in the journal, the entries before the anchor are dropped. When this returns, the
        journal file as recovered is durable.
        """
        super().__init__()
        self._path = os.fspath(path)
        self._dir = os.path.dirname(os.path.abspath(self._path))
        self._snapshot_path = os.fspath(snapshot_path) if snapshot_path is not None else None
        self._fsync_enabled = fsync
        self._record_synced = record_synced
        self._lock = threading.RLock()
        self._test_pause_before_replace = _test_pause_from_env()

        self._entries: list[Entry] = []
        self._offsets: list[int] = []  # file offset of each entry's record
        self._end = 0  # file length: offset of the next record
        self._synced_length = 0
        self._dirty = False
        self._fd = -1
        self._synced_fd = -1
        self._closed = False
        #: Counts changes that make a compaction under way useless: a rewrite of the file,
        #: or records cut from its end (see _compact_file).
        self._file_generation = 0
        #: The thread rewriting the file without its dropped prefix, and whether another
        #: rewrite was asked for while it ran.
        self._compactor: threading.Thread | None = None
        self._compact_again = False

        self._meta: dict[str, Any] = self._load_meta()
        self._meta_dirty = False

        if record_synced:
            self._synced_fd = os.open(self._path + ".synced", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            self._remove_stale_tmp()
            self._open_and_recover()
            self._reconcile_with_snapshot()
        except BaseException:
            self._close_fds()
            raise

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> str:
        """The journal file's path, as given."""
        return self._path

    @property
    def snapshot_path(self) -> str | None:
        """The snapshot file this journal reconciles with on open, if any."""
        return self._snapshot_path

    @property
    def synced_length(self) -> int:
        """Bytes at the start of the journal file known to be durable (see :meth:`sync`)."""
        return self._synced_length

    @property
    def log_bytes(self) -> int:
        """Bytes of the records the journal holds (not of those dropped from it whose
        file is still being rewritten)."""
        return self._end - self._offsets[0] if self._offsets else 0

    # ------------------------------------------------------------------ list protocol

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, item: int) -> Entry: ...

    @overload
    def __getitem__(self, item: slice) -> list[Entry]: ...

    def __getitem__(self, item: int | slice) -> Entry | list[Entry]:
        # Plain list semantics: negative indexes, slices returning lists, IndexError.
        return self._entries[item]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    def __repr__(self) -> str:
        first = self._entries[0][1] if self._entries else None
        last = self._entries[-1][1] if self._entries else None
        return (
            f"DurableJournal({self._path!r}, entries={len(self._entries)}, "
            f"first={first}, last={last}, synced={self._synced_length}/{self._end})"
        )

    # ------------------------------------------------------------------ log writes

    def add(self, command: bytes | bytearray | memoryview, idx: int, term: int) -> None:
        """Append an entry. Written to the file, not yet durable: call :meth:`sync`.

        Indexes must follow on from the last entry and terms must not decrease (the
        reader relies on both); a violation raises ValueError and changes nothing.
        """
        with self._lock:
            self._check_open()
            cmd = command if type(command) is bytes else bytes(command)
            if self._entries:
                _, last_idx, last_term = self._entries[-1]
                if idx != last_idx + 1 or term < last_term:
                    raise ValueError(
                        f"entry ({idx}, term {term}) does not follow ({last_idx}, term "
                        f"{last_term}) in journal {self._path!r}"
                    )
            record = _encode_record(cmd, idx, term)
            offset = self._end
            try:
                _write_all(self._fd, record)
            except BaseException:
                # A partial record followed by later good ones would make the reader stop
                # here on restart and drop them all: cut it off before anyone appends more.
                try:
                    os.ftruncate(self._fd, offset)
                except OSError:
                    logger.exception("journal %s: could not remove a partial record", self._path)
                raise
            self._entries.append((cmd, idx, term))
            self._offsets.append(offset)
            self._end = offset + len(record)
            self._dirty = True

    def sync(self) -> None:
        """Make every entry added so far durable; cheap when nothing changed.

        With ``fsync=False`` no fsync is issued and :attr:`synced_length` stays where it
        was: the data is with the operating system, which survives a killed process but
        not a power loss (the emulated power loss of the tests then cuts it, as it should).
        """
        with self._lock:
            if not self._dirty or self._closed:
                return
            if self._fsync_enabled:
                # fdatasync also flushes the file size, which is all the metadata an
                # append changes; it skips the timestamps.
                _fdatasync_or_die(self._fd, self._path)
                self._synced_length = self._end
            self._dirty = False
            self._write_synced_record()

    def flush(self) -> None:
        """Same as :meth:`sync`."""
        self.sync()

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop entries ``entryFrom`` and after (like ``del journal[entryFrom:]``).

        The file is truncated at that record; when this returns, the shortened file and all
        remaining entries are durable.
        """
        with self._lock:
            self._check_open()
            start = slice(entryFrom, None).indices(len(self._entries))[0]
            if start >= len(self._entries):
                return
            new_end = self._offsets[start]
            logger.debug(
                "journal %s: dropping %d entries from index %d",
                self._path,
                len(self._entries) - start,
                self._entries[start][1],
            )
            self._file_generation += 1
            os.ftruncate(self._fd, new_end)
            if self._fsync_enabled:
                # Without this a power loss could bring the dropped (conflicting) entries back.
                _fdatasync_or_die(self._fd, self._path)
            del self._entries[start:]
            del self._offsets[start:]
            self._end = new_end
            self._synced_length = min(self._synced_length, new_end)
            if self._fsync_enabled:
                self._synced_length = new_end
            self._dirty = False
            self._write_synced_record()

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop the entries before ``entryTo`` (compaction; like ``journal[entryTo:]``).

        pysyncobj calls this right after renaming a new snapshot into place, so the
        snapshot file and its directory entry are made durable first: trimming the log
        before the snapshot that replaces it is on disk would lose data on power loss. The
        entries leave memory at once; the file keeps them until a thread of the journal's
        own has written the remaining entries to a new file and renamed it over the old
        one (see :meth:`_compact_file`). A crash at any point leaves the whole old journal
        or the whole new one, and either starts at or before the snapshot's anchor.
        """
        with self._lock:
            self._check_open()
            self._persist_snapshot()
            start = slice(entryTo, None).indices(len(self._entries))[0]
            if start > 0:
                start = self._limit_to_snapshot_on_disk(start)
            if start == 0:
                return
            logger.debug(
                "journal %s: compacting away %d entries before index %s",
                self._path,
                start,
                self._entries[start][1] if start < len(self._entries) else "end",
            )
            del self._entries[:start]
            del self._offsets[:start]
            self._start_compactor()

    def _start_compactor(self) -> None:
        """Have the compaction thread rewrite the file (again, if it is running)."""
        if self._compactor is not None and self._compactor.is_alive():
            self._compact_again = True
            return
        self._compact_again = False
        self._compactor = threading.Thread(
            target=self._compact_file, name="raftchan-journal-compaction", daemon=True
        )
        self._compactor.start()

    def wait_compacted(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds in all (None: without end) until no rewrite of
        the file is going on; True then. A rewrite may also have given up (the file was
        cut or replaced meanwhile, or an error was logged): the old file then stays whole."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            compactor = self._compactor
            if compactor is None:
                return True
            compactor.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if compactor.is_alive():
                return False
            with self._lock:
                if self._compactor is compactor:
                    return True

    def _compact_file(self) -> None:
        """The compaction thread: see :meth:`_compact_file_once`; again while asked to, or
        while the file changed under it."""
        while True:
            retry = False
            try:
                retry = not self._compact_file_once()
            except Exception:  # noqa: BLE001 - the old file stays whole; tried again later
                logger.exception("journal %s: cannot compact the file", self._path)
            with self._lock:
                if self._closed or not (self._compact_again or retry):
                    self._compactor = None
                    return
                self._compact_again = False

    def _compact_file_once(self) -> bool:
        """Copy the records still in the log to a new file without holding the lock, then,
        holding it, copy what was appended meanwhile, sync, and rename the new file over
        the journal. False when the file was cut or replaced meanwhile (the old one stays
        whole, and another try is worth it)."""
        tmp = self._path + _COMPACTING_SUFFIX
        with self._lock:
            if self._closed:
                return True
            first = self._offsets[0] if self._offsets else self._end
            if first <= len(_HEADER_BYTES):
                return True  # nothing dropped since the file was last written
            generation = self._file_generation
            copied = self._end
            source = os.dup(self._fd)
        fd = -1
        try:
            # Opened for appending: once renamed into place, this descriptor is the
            # journal's. A file left behind by a crash is removed at the next open.
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            try:
                _write_all(fd, _HEADER_BYTES)
                _copy_range(source, fd, first, copied)
                self._fsync(fd)
            except OSError:
                with self._lock:
                    replaced = self._file_generation != generation
                if not replaced:
                    raise
                # The file was rewritten meanwhile (a snapshot installed) and its old copy
                # freed under the reader: nothing is lost, the new file is in place.
                _unlink_if_same(tmp, fd)
                return False
            if self._test_pause_before_replace > 0:
                # Test aid only: lets a fault test SIGKILL the node between writing the new
                # journal and swapping it in (see the module docstring).
                logger.warning(
                    "journal %s: compaction paused for tests, %.1f s before the rename (%s=%s)",
                    self._path,
                    self._test_pause_before_replace,
                    TEST_PAUSE_ENV,
                    os.environ.get(TEST_PAUSE_ENV),
                )
                time.sleep(self._test_pause_before_replace)
            with self._lock:
                if self._closed or self._file_generation != generation:
                    _unlink_if_same(tmp, fd)
                    return self._closed
                # What was appended meanwhile, then the new file in the old one's place.
                _copy_range(source, fd, copied, self._end)
                self._fsync(fd)
                self._swap_in_compacted(tmp, fd, first)
                fd = -1  # the journal's now
        finally:
            if fd >= 0:
                os.close(fd)
            os.close(source)
        return True

    def _swap_in_compacted(self, tmp: str, fd: int, first: int) -> None:
        """Holding the lock: rename the synced new file at ``tmp`` (open as ``fd``), which
        holds the records from file offset ``first`` on, over the journal and use it."""
        # If this raises, nothing was renamed: the journal goes on with the old file.
        retired = retired_files.replace(tmp, self._path)
        # From here the name is the new file's: every later record must go there.
        old_fd, self._fd = self._fd, fd
        os.close(old_fd)
        shift = first - len(_HEADER_BYTES)
        self._offsets = [offset - shift for offset in self._offsets]
        self._end -= shift
        self._file_generation += 1
        # All of the new file was synced (without fsync, nothing of it is known to be).
        self._synced_length = self._end if self._fsync_enabled else 0
        self._dirty = False
        if self._fsync_enabled:
            # Until the rename is durable, a power loss brings back the old file, which
            # lacks every record appended from now on: a node that went on without it
            # would acknowledge entries it may lose.
            _fsync_directory_or_die(self._dir, self._path)
        self._write_synced_record()
        retired_files.remove_gradually(retired)
        logger.debug("journal %s: file compacted, %d bytes dropped", self._path, shift)

    def _limit_to_snapshot_on_disk(self, start: int) -> int:
        """How many of the first ``start`` entries the snapshot on disk lets us drop.

        pysyncobj asks to compact up to the snapshot *it* wrote, but it learns that the
        write succeeded one tick later; if a snapshot from the leader was installed in
        between, the file on disk is that older one and trimming to the requested point
        would drop entries no snapshot holds (measured: a follower that was sent the
        leader's snapshot again and again while compacting its own log). So the journal
        keeps everything from the on-disk snapshot's anchor on, and drops nothing if that
        anchor cannot be found in it.
        """
        if self._snapshot_path is None:
            return start
        try:
            anchor = read_snapshot_anchor(self._snapshot_path)
        except (SnapshotCorrupt, OSError) as exc:
            logger.error("journal %s: not compacting, snapshot unreadable: %s", self._path, exc)
            return 0
        first_idx = self._entries[0][1]
        pos = anchor[1] - first_idx if anchor is not None else -1
        if anchor is None or not 0 <= pos < len(self._entries) or self._entries[pos] != anchor:
            logger.warning(
                "journal %s: not compacting, the snapshot on disk (anchor %s) does not "
                "cover the entries pysyncobj asked to drop",
                self._path,
                None if anchor is None else anchor[1],
            )
            return 0
        if pos < start:
            logger.warning(
                "journal %s: compacting to the snapshot on disk (index %d), not to index %d",
                self._path,
                anchor[1],
                self._entries[start][1] if start < len(self._entries) else first_idx + start,
            )
        return min(start, pos)

    def clear(self) -> None:
        """Drop every entry, atomically (see :meth:`deleteEntriesTo`).

        pysyncobj calls this when it loads a snapshot over the log (on restart, or when a
        follower installs one from the leader), so the snapshot is made durable first.
        When this returns, the empty journal is durable.
        """
        with self._lock:
            self._check_open()
            self._persist_snapshot()
            self._rewrite([])

    def _destroy(self) -> None:
        """Sync the log, store the meta if it changed, and close the files. A compaction
        of the file under way is given up to ``_CLOSE_WAIT_S`` seconds to finish; after
        that it gives up (the old file stays whole)."""
        compactor = self._compactor
        if compactor is not None and compactor is not threading.current_thread():
            compactor.join(_CLOSE_WAIT_S)
        with self._lock:
            if self._closed:
                return
            try:
                self.sync()
                if self._meta_dirty:
                    self._store_meta()
            finally:
                self._close_fds()
                self._closed = True

    def close(self) -> None:
        """Same as ``_destroy``: sync and close. Safe to call more than once."""
        self._destroy()

    # ------------------------------------------------------------------ term, vote, commit

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        """Set term and vote; both (and the commit index) are durable when this returns.

        Raft requires it: a vote must never be granted twice in one term, even across a
        crash, and pysyncobj sends the vote message right after this call.
        """
        if votedForNodeId is not None and not isinstance(votedForNodeId, str):
            raise TypeError("votedForNodeId must be a str or None")
        with self._lock:
            self._check_open()
            self._meta["term"] = int(term)
            self._meta["voted_for"] = votedForNodeId
            self._store_meta()

    def getCurrentTerm(self) -> int:
        """The last stored term; 0 for a new journal."""
        return int(self._meta.get("term", 0))

    def getVotedForNodeId(self) -> str | None:
        """The node voted for in the current term, or None."""
        voted = self._meta.get("voted_for")
        return voted if isinstance(voted, str) else None

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        """Remember the commit index; in memory only until :meth:`onOneSecondTimer`.

        Losing it is harmless: Raft learns the commit index again from the leader.
        """
        with self._lock:
            if self._meta.get("commit") != raftCommitIndex:
                self._meta["commit"] = int(raftCommitIndex)
                self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        """The last stored commit index; 1 (pysyncobj's initial no-op) for a new journal."""
        return int(self._meta.get("commit", 1))

    def onOneSecondTimer(self) -> None:
        """Write the meta file if the commit index changed; durable when this returns."""
        with self._lock:
            if self._meta_dirty and not self._closed:
                self._store_meta()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"journal {self._path!r} is closed")

    def _fsync(self, fd: int) -> None:
        if self._fsync_enabled:
            os.fsync(fd)

    def _fsync_dir(self) -> None:
        if self._fsync_enabled:
            fsync_directory(self._dir)

    def _close_fds(self) -> None:
        for name in ("_fd", "_synced_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def _write_synced_record(self) -> None:
        if self._synced_fd < 0:
            return
        # One small pwrite at offset 0 with a fixed width: a killed process leaves either
        # the old number or the new one, never a mix or an empty file.
        data = b"%0*d\n" % (_SYNCED_WIDTH, self._synced_length)
        os.pwrite(self._synced_fd, data, 0)

    def _persist_snapshot(self) -> None:
        """Make the snapshot file's data and its rename durable before the log relies on it."""
        if not self._fsync_enabled:
            return
        if self._snapshot_path is not None:
            # pysyncobj renames the snapshot without fsyncing it; for a snapshot received
            # from the leader even the file data was never fsynced.
            try:
                fd = os.open(self._snapshot_path, os.O_RDONLY)
            except FileNotFoundError:
                pass
            else:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            snapshot_dir = os.path.dirname(os.path.abspath(self._snapshot_path))
            if snapshot_dir != self._dir:
                fsync_directory(snapshot_dir)
        self._fsync_dir()

    def _remove_stale_tmp(self) -> None:
        for tmp in (self._path + ".tmp", self._path + _COMPACTING_SUFFIX, self._path + ".meta.tmp"):
            if os.path.exists(tmp):
                # An interrupted rewrite: the file it was meant to replace is still intact.
                logger.warning(
                    "journal %s: removing leftover %s from an interrupted write", self._path, tmp
                )
                os.unlink(tmp)

    def _open_and_recover(self) -> None:
        if not os.path.exists(self._path):
            logger.info("journal %s: creating a new journal", self._path)
            self._rewrite([])
            return

        fd = os.open(self._path, os.O_RDWR | os.O_APPEND)
        self._fd = fd
        with open(self._path, "rb") as f:
            data = f.read()

        if len(data) < _FILE_HEADER.size:
            if _HEADER_BYTES.startswith(data):
                # Nothing but (part of) a header: no entry was ever stored here.
                logger.warning(
                    "journal %s: header incomplete (%d bytes); starting empty",
                    self._path,
                    len(data),
                )
                self._rewrite([])
                return
            raise JournalCorrupt(f"{self._path!r} is too short to be a raftchan journal")
        magic, version, header_crc = _FILE_HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise JournalCorrupt(f"{self._path!r} is not a raftchan journal (magic {magic!r})")
        if header_crc != zlib.crc32(data[:12]):
            raise JournalCorrupt(f"journal {self._path!r}: header checksum mismatch")
        if version != FORMAT_VERSION:
            raise JournalCorrupt(
                f"journal {self._path!r} has format version {version}; "
                f"this code reads version {FORMAT_VERSION}"
            )

        entries, offsets, good_end, reason = _parse_records(data, _FILE_HEADER.size)
        self._entries = entries
        self._offsets = offsets
        if good_end < len(data):
            after = _count_valid_records_after(data, good_end)
            log = logger.error if after else logger.warning
            log(
                "journal %s: %s at byte %d; keeping %d entries, dropping %d bytes "
                "(%d intact records after the damage are lost)",
                self._path,
                reason,
                good_end,
                len(entries),
                len(data) - good_end,
                after,
            )
            os.ftruncate(fd, good_end)
        # Whatever was read may so far live only in the page cache (the previous process
        # may have been killed before syncing): make the recovered journal durable.
        if self._fsync_enabled:
            os.fsync(fd)
        self._end = good_end
        self._synced_length = good_end
        self._dirty = False
        self._write_synced_record()
        logger.debug("journal %s: opened with %d entries", self._path, len(entries))

    def _reconcile_with_snapshot(self) -> None:
        """Trim the journal to start at the snapshot's anchor, where pysyncobj expects it.

        pysyncobj keeps the journal on restart only if ``journal[0]`` is the snapshot's
        previous entry. It renames a snapshot into place one tick before trimming the log,
        so a crash in between leaves a journal that starts earlier and that pysyncobj would
        throw away whole. Only a journal that holds the anchor itself is trimmed; in every
        other case pysyncobj's own handling (clear, then load the snapshot) is right.
        """
        if self._snapshot_path is None or not self._entries:
            return
        try:
            anchor = read_snapshot_anchor(self._snapshot_path)
        except (SnapshotCorrupt, OSError) as exc:
            logger.error(
                "journal %s: cannot read snapshot %s (%s); journal left as it is",
                self._path,
                self._snapshot_path,
                exc,
            )
            return
        if anchor is None:
            return
        first_idx = self._entries[0][1]
        pos = anchor[1] - first_idx
        if pos == 0 and self._entries[0] == anchor:
            return
        if pos < 0 or pos >= len(self._entries):
            logger.warning(
                "journal %s: snapshot anchor index %d is outside the journal (%d..%d); "
                "left as it is",
                self._path,
                anchor[1],
                first_idx,
                self._entries[-1][1],
            )
            return
        if self._entries[pos] != anchor:
            logger.warning(
                "journal %s: entry %d differs from the snapshot's anchor; left as it is",
                self._path,
                anchor[1],
            )
            return
        logger.info(
            "journal %s: dropping %d entries before snapshot anchor %d (interrupted compaction)",
            self._path,
            pos,
            anchor[1],
        )
        self._rewrite(self._entries[pos:])

    def _rewrite(self, entries: list[Entry]) -> None:
        """Atomically replace the journal file with one holding exactly ``entries``."""
        self._file_generation += 1
        tmp = self._path + ".tmp"
        chunks = [_HEADER_BYTES]
        offsets = []
        offset = len(_HEADER_BYTES)
        for command, idx, term in entries:
            record = _encode_record(command, idx, term)
            chunks.append(record)
            offsets.append(offset)
            offset += len(record)

        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, b"".join(chunks))
            self._fsync(fd)
        finally:
            os.close(fd)
        # The old journal is freed gradually (see raftchan.retired_files).
        retired = retired_files.replace(tmp, self._path)
        self._fsync_dir()

        new_fd = os.open(self._path, os.O_RDWR | os.O_APPEND)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = new_fd
        retired_files.remove_gradually(retired)
        self._entries = list(entries)
        self._offsets = offsets
        self._end = offset
        # Without fsync nothing of the new file is known to be on disk.
        self._synced_length = offset if self._fsync_enabled else 0
        self._dirty = False
        self._write_synced_record()

    # ------------------------------------------------------------------ meta file

    @property
    def _meta_path(self) -> str:
        return self._path + ".meta"

    def _load_meta(self) -> dict[str, Any]:
        try:
            with open(self._meta_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {"v": META_VERSION}
        try:
            meta = msgpack.unpackb(raw, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise JournalCorrupt(f"meta file {self._meta_path!r} does not decode: {exc}") from exc
        if (
            not isinstance(meta, dict)
            or meta.get("v") != META_VERSION
            or not isinstance(meta.get("term", 0), int)
            or not isinstance(meta.get("commit", 1), int)
            or not isinstance(meta.get("voted_for"), (str, type(None)))
        ):
            raise JournalCorrupt(f"meta file {self._meta_path!r} is malformed: {meta!r:.200}")
        return meta

    def _store_meta(self) -> None:
        # Same pattern as the journal rewrite: a crash leaves the old meta or the new one.
        tmp = self._meta_path + ".tmp"
        data = msgpack.packb(self._meta, use_bin_type=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            self._fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._meta_path)
        self._fsync_dir()
        self._meta_dirty = False


def _parse_records(data: bytes, start: int) -> tuple[list[Entry], list[int], int, str]:
    """Decode records from ``start`` up to the first bad one.

    Returns the entries, their offsets, the offset where valid data ends, and why reading
    stopped there (meaningful only if that is before the end of ``data``).
    """
    view = memoryview(data)
    entries: list[Entry] = []
    offsets: list[int] = []
    pos = start
    size = len(data)
    reason = ""
    while pos < size:
        if size - pos < _RECORD.size:
            reason = "short record header"
            break
        length, crc, idx, term = _RECORD.unpack_from(data, pos)
        body = pos + _RECORD.size
        if size - body < length:
            reason = "short record"
            break
        command = view[body : body + length]
        if zlib.crc32(command, zlib.crc32(_CRC_FIELDS.pack(length, idx, term))) != crc:
            reason = "record CRC mismatch"
            break
        if entries and (idx != entries[-1][1] + 1 or term < entries[-1][2]):
            reason = f"record index {idx}/term {term} out of sequence"
            break
        entries.append((bytes(command), idx, term))
        offsets.append(pos)
        pos = body + length
    return entries, offsets, pos, reason


def _count_valid_records_after(data: bytes, bad: int) -> int:
    """Best effort, for the log message: intact records following a damaged one."""
    if len(data) - bad < _RECORD.size:
        return 0
    length = _RECORD.unpack_from(data, bad)[0]
    nxt = bad + _RECORD.size + length
    if nxt >= len(data):
        return 0
    entries, _, _, _ = _parse_records(data, nxt)
    return len(entries)


#: Test aid: seconds a compaction waits between writing the new journal and renaming it
#: into place, so that a fault test can kill the node in the middle of a compaction.
TEST_PAUSE_ENV = "RAFTCHAN_TEST_COMPACTION_PAUSE"


def _test_pause_from_env() -> float:
    raw = os.environ.get(TEST_PAUSE_ENV)
    if not raw:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        # Say so: a test waiting for the pause would otherwise just time out, unexplained.
        logger.warning("ignoring %s=%r: not a number of seconds", TEST_PAUSE_ENV, raw)
        return 0.0


def read_synced_length(journal_path: str | os.PathLike[str]) -> int | None:
    """The synced length recorded in ``<journal_path>.synced``, or None if there is none."""
    try:
        with open(os.fspath(journal_path) + ".synced", "rb") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


# ---------------------------------------------------------------------- factory seam

_registry: dict[str, pysyncobj.journal.Journal] = {}
_registry_lock = threading.Lock()
_original_create_journal: Callable[..., Any] | None = None


def register_journal(path: str | os.PathLike[str], journal: pysyncobj.journal.Journal) -> None:
    """Have the next ``SyncObj`` whose ``journalFile`` is exactly ``path`` use ``journal``.

    A registration is used once: the factory removes it when it hands the journal out, so
    a destroyed journal can never be given to a later ``SyncObj`` on the same path.
    Register a new journal before constructing each ``SyncObj``. Requires
    :func:`install_journal_factory`.
    """
    with _registry_lock:
        _registry[os.fspath(path)] = journal


def unregister_journal(path: str | os.PathLike[str]) -> pysyncobj.journal.Journal | None:
    """Remove and return a registration that was never used (e.g. the SyncObj failed)."""
    with _registry_lock:
        return _registry.pop(os.fspath(path), None)


def _create_journal(journalFile: str | None = None) -> Any:
    if journalFile is not None:
        with _registry_lock:
            journal = _registry.pop(os.fspath(journalFile), None)
        if journal is not None:
            return journal
        _refuse_foreign_open(journalFile)
    assert _original_create_journal is not None
    return _original_create_journal(journalFile)


def _refuse_foreign_open(path: str) -> None:
    # pysyncobj's FileJournal would misread this format and write over it.
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError:
        return
    if head == MAGIC:
        raise RuntimeError(
            f"{path!r} is a raftchan journal but no DurableJournal was registered for it; "
            "call register_journal() before creating the SyncObj"
        )


def install_journal_factory() -> None:
    """Make pysyncobj create journals through :func:`register_journal`'s registry.

    Replaces ``pysyncobj.syncobj.createJournal`` (the name ``SyncObj.__init__`` calls) with
    a function that returns the journal registered for the exact ``journalFile`` path and
    otherwise falls back to pysyncobj's original. Calling it again does nothing.
    """
    global _original_create_journal
    with _registry_lock:
        current = pysyncobj.syncobj.createJournal
        if current is _create_journal:
            return
        _original_create_journal = current
        pysyncobj.syncobj.createJournal = _create_journal


def _unlink_if_same(path: str, fd: int) -> None:
    """Remove ``path`` if it still is the file open as ``fd`` (not one written since by
    another journal object on the same path)."""
    try:
        named, opened = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return
    if (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _fsync_directory_or_die(directory: str, path: str) -> None:
    """fsync a folder after a rename the journal relies on; end the process at once if
    that fails (see :func:`_fdatasync_or_die`)."""
    try:
        fsync_directory(directory)
    except OSError as exc:
        logger.critical("journal %s: folder fsync failed (%s); stopping the node", path, exc)
        logging.shutdown()
        os._exit(70)


def _fdatasync_or_die(fd: int, path: str) -> None:
    """fdatasync, and end the process at once if it fails.

    After a failed fsync Linux may already have dropped the dirty pages and marked them
    clean, so a retry can "succeed" without the data ever reaching the disk; a node that
    went on would acknowledge entries it does not have. Stopping is the only safe answer:
    on restart the journal is read back from what really is on disk, and the leader sends
    the rest again.
    """
    try:
        os.fdatasync(fd)
    except OSError as exc:
        logger.critical("journal %s: fsync failed (%s); stopping the node", path, exc)
        logging.shutdown()
        os._exit(70)
