"""When a node takes a snapshot of its state and trims its Raft log: the compaction policy.

pysyncobj takes a snapshot once the log holds ``logCompactionMinEntries`` entries or
``logCompactionMinTime`` seconds have passed, whatever the sizes. Each snapshot wrote
the whole state then, and group commit packs many appends into one entry, so the count
says little about bytes:

- a large state was rewritten for a few small appends: with 627 MB retained, the 1,000
  single appends of a paced phase crossed the 5,000th entry, and every node wrote and
  synced 627 MB while that phase ran (its 4 KiB appends' p99: 31-35 ms, against 3.3
  ms without a snapshot);
- a log of large batches was never trimmed: 4,000 entries of 64 appends of 4 KiB held
  493 MB of log, in memory and to replay at start.

:class:`CompactionPolicy` decides by bytes as well, as Redis does before it rewrites its
append-only file. A snapshot is due once the log holds ``growth`` times the last
snapshot's size (its segment files included) *and* more than ``min_entries`` entries
or ``min_bytes`` bytes. The log then stays under ``growth`` times the last snapshot or
``min_bytes``, whichever is larger. (A snapshot now writes only the items appended
since the last one, see raftchan.item_segments; when each wrote the whole state, the
rule bounded that to ``1 + 1 / growth`` bytes per byte appended.) A snapshot is also
due ``min_time`` seconds after the last one, whatever the log holds: that bounds how
many entries a slow trickle leaves in memory, and frees the space of deleted channels
and trimmed items.

Who writes when it is due, and who waits for twice the thresholds (``factor``), is
raftchan.snapshot_turns's to decide.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from raftchan.snapshot import stored_bytes

__all__ = [
    "DEFAULT_GROWTH",
    "DEFAULT_MIN_BYTES",
    "RETRY_FIRST_S",
    "RETRY_MAX_S",
    "CompactionPolicy",
]

#: The log must reach this share of the last snapshot's size before the next snapshot.
DEFAULT_GROWTH = 0.5
#: A log this large is compacted whatever its number of entries (once past the growth).
DEFAULT_MIN_BYTES = 64 * 1024 * 1024
#: After a snapshot that failed, the next waits this long, doubling after each further
#: failure up to RETRY_MAX_S.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0


class CompactionPolicy:
    """Whether a node's log is due for a snapshot, given the snapshot file at
    ``snapshot_path``; see the module's docstring for the rule. ``growth`` 0 leaves
    pysyncobj's rule (entries or time) with a bound on bytes added. All four settings
    must be finite numbers >= 0.

    The snapshot's size is read from the file when first needed and again after
    :meth:`snapshot_changed`; call that whenever the file is replaced (a snapshot of this
    node's own written, or one received from the leader installed).
    """

    def __init__(
        self,
        snapshot_path: str,
        *,
        min_entries: int,
        min_time: float,
        growth: float = DEFAULT_GROWTH,
        min_bytes: int = DEFAULT_MIN_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("min_entries", min_entries),
            ("min_time", min_time),
            ("growth", growth),
            ("min_bytes", min_bytes),
        ):
            if not 0 <= value < math.inf:  # also refuses NaN
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        self._path = snapshot_path
        self.min_entries = min_entries
        self.min_time = min_time
        self.growth = growth
        self.min_bytes = min_bytes
        self._clock = clock
        self._snapshot_bytes: int | None = None
        self._snapshot_at = self._clock()
        self._retry_delay = 0.0
        self._retry_at = -math.inf

    @property
    def snapshot_bytes(self) -> int:
        """Size of the snapshot in bytes, its segment files included; 0 while there is
        none."""
        if self._snapshot_bytes is None:
            self._snapshot_bytes = stored_bytes(self._path)
        return self._snapshot_bytes

    def snapshot_changed(self) -> None:
        """The snapshot file was replaced: read its size again when next needed, and count
        ``min_time`` from now."""
        self._snapshot_bytes = None
        self._snapshot_at = self._clock()
        self._retry_delay = 0.0
        self._retry_at = -math.inf

    def snapshot_failed(self) -> None:
        """A snapshot could not be taken or written (a full disk, say): none is due for
        RETRY_FIRST_S seconds, twice as long after each further failure (up to
        RETRY_MAX_S), instead of the whole state written again on every tick."""
        self._retry_delay = min(2 * self._retry_delay or RETRY_FIRST_S, RETRY_MAX_S)
        self._retry_at = self._clock() + self._retry_delay

    def due(
        self, entries: int, log_bytes: int, factor: float = 1.0, *, by_time: bool = True
    ) -> bool:
        """Whether a log of ``entries`` entries and ``log_bytes`` bytes since the snapshot
        should be compacted now, with each of the four thresholds multiplied by
        ``factor`` (the snapshot's size times ``growth`` counts as one; see
        raftchan.snapshot_turns for who waits for a larger log). ``by_time`` False
        leaves ``min_time`` out."""
        now = self._clock()
        if now < self._retry_at:
            return False
        if by_time and now - self._snapshot_at >= self.min_time * factor:
            return True
        if log_bytes < self.growth * self.snapshot_bytes * factor:
            return False
        return entries > self.min_entries * factor or log_bytes >= self.min_bytes * factor
