"""Receiving a snapshot the leader sends in chunks: install it only when it is whole.

pysyncobj writes the chunks of a leader's snapshot to a temporary file and, on the last
one, renames it over the node's own snapshot before anything reads it. A transfer that
lost chunks on the way (a connection that closed with chunks in its buffer, the leader
resuming after it) then replaced a good snapshot with one that has a hole in it: the
node stopped on loading it and could not start again. :class:`SnapshotReceiver` takes
the chunks instead and renames the file into place only after it verified it (size and
checksums, as :func:`raftchan.snapshot.read_snapshot_meta` does). A damaged transfer is
thrown away and refused; the leader sends the snapshot again when the node's answers
show it still lacks the entries.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import BinaryIO

from raftchan import retired_files
from raftchan.snapshot import SnapshotCorrupt, fsync_directory, read_snapshot_meta

__all__ = ["SnapshotReceiver"]

logger = logging.getLogger(__name__)


class SnapshotReceiver:
    """Collects one transfer at a time into ``<path>.incoming``; see the module doc.

    :meth:`receive` takes what pysyncobj's ``Serializer.setTransmissionData`` takes, a
    ``(chunk, is_first, is_last)`` tuple or None, and returns True only when a whole,
    verified snapshot now is at ``path``.
    """

    def __init__(
        self,
        path: str,
        before_install: Callable[[], object] = lambda: None,
        retire: Callable[[str | None], object] = retired_files.remove_gradually,
    ) -> None:
        """Also removes what a transfer cut short by a crash left behind.

        ``before_install()`` is called right before a verified snapshot replaces the
        node's own (the node waits there for a snapshot of its own still being written,
        which would otherwise replace the leader's). ``retire(path)`` is handed the
        replaced snapshot, kept under a retired name (see raftchan.retired_files), or None.
        """
        self.path = path
        self._before_install = before_install
        self._retire = retire
        self.incoming = path + ".incoming"
        self._file: BinaryIO | None = None
        self._discard()

    def receive(self, transmission: tuple[bytes, bool, bool] | None) -> bool:
        if transmission is None:
            return False
        chunk, is_first, is_last = transmission
        if is_first:
            self._discard()
            self._file = open(self.incoming, "wb")  # noqa: SIM115 - spans many calls
        elif self._file is None:
            return False  # the middle of a transfer whose start this node never saw
        try:
            self._file.write(chunk)
        except OSError:
            logger.exception("cannot write the incoming snapshot %s", self.incoming)
            self._discard()
            return False
        if not is_last:
            return False
        try:
            # On disk before it replaces the node's snapshot: pysyncobj clears the journal
            # right after, and a power loss must not leave a renamed file without its data.
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError:
            logger.exception("cannot write the incoming snapshot %s", self.incoming)
            self._discard()
            return False
        self._file = None
        try:
            snapshot = read_snapshot_meta(self.incoming)
            if snapshot is not None and snapshot.segments and snapshot.embedded_at is None:
                # A sent snapshot carries its segments: one that names files beside it
                # lost them on the way, and files of those names here are this node's.
                raise SnapshotCorrupt(f"{self.incoming!r} arrived without its segments")
        except (SnapshotCorrupt, OSError) as exc:
            logger.warning("refusing a snapshot sent by the leader: %s", exc)
            self._discard()
            return False
        self._before_install()
        self._retire(retired_files.replace(self.incoming, self.path))
        fsync_directory(os.path.dirname(os.path.abspath(self.path)))
        return True

    def close(self) -> None:
        """Drop an unfinished transfer (the node is closing)."""
        self._discard()

    def _discard(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.incoming)
