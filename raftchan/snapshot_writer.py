"""Writing this node's snapshots on a thread of their own instead of pysyncobj's.

pysyncobj writes a snapshot in its one thread, the one that also sends the heartbeats
and handles every message. A 120 MB state took 0.8-1.4 s to write and fsync there: a
leader went silent for longer than the election timeout at each compaction, its
followers stood for election, and the cluster changed leader. Followers, compacting at
the same moment, missed their leader in the same way.

:class:`BackgroundSnapshots` stands in for pysyncobj's ``Serializer``. It takes the state
in pysyncobj's thread, where it is the state at the snapshot's index, and encodes,
writes, fsyncs, renames and reads back the file on a thread of its own (the file I/O and
checksums release the GIL; the encoding goes in pieces, see raftchan.packing).
pysyncobj asks each tick whether the write is done and trims its log only once it is, as
it does after a write of its own. Sending the snapshot to followers, receiving
one and loading it stay pysyncobj's.

A snapshot received from the leader must not be overwritten by an older one of this
node still being written: :meth:`BackgroundSnapshots.wait` lets the receiver wait for
the write to finish before it installs the leader's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Container
from typing import Any

from pysyncobj.serializer import SERIALIZER_STATE, Serializer

from raftchan import retired_files
from raftchan.snapshot import SnapshotCorrupt, SnapshotStream, fsync_directory

__all__ = ["BackgroundSnapshots", "WriteSnapshot"]

logger = logging.getLogger(__name__)

#: Writes a captured snapshot to the path it is given and fsyncs the file.
WriteSnapshot = Callable[[str], None]


class _Write:
    """One snapshot being written on its own thread."""

    def __init__(
        self,
        index: int,
        write: WriteSnapshot,
        verify: Callable[[str], object],
        path: str,
        started: float,
    ) -> None:
        self.index = index
        self.error: BaseException | None = None
        self.seconds = 0.0
        #: The snapshot this one replaced, kept under a retired name until no transfer
        #: reads it any more (see raftchan.retired_files).
        self.retired: str | None = None
        self._write = write
        self._verify = verify
        self._path = path
        self._started = started
        self.thread = threading.Thread(
            target=self._run, name=f"raftchan-snapshot-{index}", daemon=True
        )

    def _run(self) -> None:
        tmp = self._path + ".tmp"
        try:
            self._write(tmp)
            self.retired = retired_files.replace(tmp, self._path)
            fsync_directory(os.path.dirname(os.path.abspath(self._path)))
            self._verify(self._path)
        except BaseException as exc:  # noqa: BLE001 - reported to pysyncobj as a failure
            self.error = exc
        self.seconds = time.perf_counter() - self._started


class BackgroundSnapshots(Serializer):
    """pysyncobj's ``Serializer`` with this node's snapshots written in the background.

    ``capture(data)`` is called in pysyncobj's thread with what pysyncobj hands its
    serializer (``(last_entry, prev_entry, cluster)``) and returns a function that
    writes that snapshot to a given path (see :data:`WriteSnapshot`); it runs on the
    writer's thread. ``on_written(seconds)`` is called in pysyncobj's thread when it
    learns of a successful write, with the time from the capture to the rename, and
    ``on_failed()`` when a state could not be taken or a write failed.
    ``verify(path)`` is called on the writer's thread once the snapshot is in place; if
    it raises, the write is reported as failed. It is there to read the new file back
    and check it off pysyncobj's thread (see :func:`raftchan.snapshot.read_snapshot_anchor`).
    A transfer to a peer in ``held_peers`` is not cancelled (see :meth:`cancelTransmisstion`).
    """

    def __init__(
        self,
        path: str,
        transmission_batch_size: int,
        capture: Callable[[Any], WriteSnapshot],
        deserializer: Callable[[str], Any],
        on_written: Callable[[float], None] = lambda seconds: None,
        verify: Callable[[str], object] = lambda path: None,
        on_failed: Callable[[], None] = lambda: None,
        held_peers: Container[Any] = frozenset(),
    ) -> None:
        super().__init__(path, transmission_batch_size, False, None, deserializer, None)
        self.path = path
        self._capture = capture
        self._on_written = on_written
        self._on_failed = on_failed
        self._verify = verify
        self._held_peers = held_peers
        self._current: _Write | None = None

    def serialize(self, data: Any, index: int) -> None:
        """Start writing the snapshot pysyncobj asks for (``data`` is ``(None, last_entry,
        prev_entry, cluster)``, ``index`` the last entry it replaces); returns at once.
        Ignored while a write is still going, as pysyncobj's own is."""
        if self._current is not None:
            return
        started = time.perf_counter()
        try:
            write = self._capture(data[1:])
        except Exception:  # noqa: BLE001 - an exception would end pysyncobj's thread
            # Nothing was started: a later tick tries again, as after a failed write
            # (once on_failed's back-off is over).
            logger.exception("cannot take the state for snapshot %s", self.path)
            self._on_failed()
            return
        self._current = _Write(index, write, self._verify, self.path, started)
        self._current.thread.start()

    @property
    def writing(self) -> bool:
        """Whether a snapshot write was started and pysyncobj has not yet reaped it."""
        return self._current is not None

    def checkSerializing(self) -> tuple[int, int | None]:  # noqa: N802 - pysyncobj's name
        """pysyncobj's poll: whether a write is going, and once it ended, how it ended
        (reported once) with the index it covers."""
        current = self._current
        if current is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if current.thread.is_alive():
            return SERIALIZER_STATE.SERIALIZING, current.index
        self._current = None
        if current.error is not None:
            logger.error("cannot write snapshot %s: %s", self.path, current.error)
            if current.retired is not None:
                # It failed after its rename (checking it): the old file was replaced.
                self.retire(current.retired)
            self._on_failed()
            return SERIALIZER_STATE.FAILED, current.index
        self.retire(current.retired)
        self._on_written(current.seconds)
        return SERIALIZER_STATE.SUCCESS, current.index

    def retire(self, path: str | None) -> None:
        """The snapshot file was replaced (a write of this node's own, or one received
        from the leader): transfers under way read the old one, so they start over from
        the one now in place, as pysyncobj does after a write of its own. Then the old
        one, kept at ``path`` (None: nothing to free), is freed a few MiB at a time:
        freed at once, it held up every fsync on the file system (see
        raftchan.retired_files). Call in pysyncobj's thread, which sends the transfers."""
        self._Serializer__transmissions: dict[Any, Any] = {}
        retired_files.remove_gradually(path)

    def getTransmissionData(self, transmission_id: Any) -> Any:  # noqa: N802 - pysyncobj's name
        """pysyncobj's: the next chunk of the snapshot for a peer. The snapshot is read
        with its segment files appended (see raftchan.snapshot.SnapshotStream), so the
        peer receives one whole file."""
        transmissions = self._Serializer__transmissions
        if transmission_id not in transmissions:
            try:
                stream = SnapshotStream(self.path)
            except (OSError, SnapshotCorrupt) as exc:
                logger.error("cannot send snapshot %s: %s", self.path, exc)
                return None
            transmissions[transmission_id] = {"file": stream, "transmitted": 0}
        return super().getTransmissionData(transmission_id)

    def cancelTransmisstion(self, node: Any) -> None:  # noqa: N802 - pysyncobj's name
        """pysyncobj's: forget how far ``node`` got in receiving the snapshot. Not for a
        peer the leader only holds back for a round (see raftchan.peer_backlog): pysyncobj
        cancels the transfer to any peer that reads as not connected, and the transfer
        would start over from its first chunk each time."""
        if node in self._held_peers:
            return
        super().cancelTransmisstion(node)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: without end) for a write under way to
        end; True when none is going on any more."""
        current = self._current
        if current is None:
            return True
        current.thread.join(timeout)
        return not current.thread.is_alive()
