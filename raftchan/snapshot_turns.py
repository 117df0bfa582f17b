"""Which nodes write a snapshot now: one follower at a time, the leader half as often.

Writing a snapshot wrote the whole state (it now writes only the items appended since
the last one, see raftchan.item_segments, which can still be hundreds of MB). While a
node does, its process stalls now and then (encoding pieces of the state holds the GIL
for 7-30 ms, and fsyncs of its disk wait behind the write). Every node reached the
compaction policy's threshold at the same entry, so all of them wrote at once, and an
append waited for whichever of them its commit needed. Measured on one host (3 nodes, a
300 MB state compacted over and over, one producer of 4 KiB appends every 5 ms): p99
22-32 ms with every node compacting at once, 10-13 ms with the leader holding its
snapshot back, 7-8 ms with the followers also taking turns; 4.4 ms without compactions.

So the followers write one at a time, and the leader, which every commit needs, half as
often:

- A follower due for one (:class:`raftchan.compaction.CompactionPolicy`) says so in its
  answers to the leader, and writes it once the leader gives it the turn. The leader gives
  the turn to the follower that has waited longest, one at a time, for one write: the
  holder keeps it until it answers that its write is over (or has not started within
  :data:`GRANT_TIMEOUT_S`), and writes at most once per grant number.
- The leader puts its own snapshot off until its log reaches :data:`UNCOORDINATED_FACTOR`
  times the policy's thresholds, and gives no turn while it writes (a follower already
  writing goes on).
- A node that hears no turn (no leader, a leader of an earlier version, a holder that
  never finishes) writes its snapshot anyway at that same factor, so the log stays
  bounded, at twice what the policy alone would let it hold; such writes may overlap.
- At that factor the time rule (``min_time``) does not count: after a long quiet, every
  node would be due at once. The leader therefore takes no snapshot on time alone.

The wish rides on pysyncobj's ``next_node_idx`` answers and the turn on ``append_entries``,
as two extra keys: nodes of earlier versions ignore them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Hashable
from enum import IntEnum

__all__ = [
    "GRANT_TIMEOUT_S",
    "TURN_KEY",
    "UNCOORDINATED_FACTOR",
    "WISH_KEY",
    "SnapshotTurns",
    "Wish",
    "follower_wish",
]

#: Key of a follower's wish in its ``next_node_idx`` answers (absent: Wish.IDLE).
WISH_KEY = "rc_snapshot"
#: Key of the grant number in the ``append_entries`` sent to the follower holding the turn.
TURN_KEY = "rc_snapshot_turn"
#: A node writes its snapshot without a turn, and the leader writes its own, once the log
#: reaches this many times the compaction policy's thresholds.
UNCOORDINATED_FACTOR = 2.0
#: A follower given the turn that has not started writing within this many seconds loses
#: it (pysyncobj may decline a snapshot, for one, when nothing was applied since the last).
GRANT_TIMEOUT_S = 5.0


class Wish(IntEnum):
    """What a follower tells its leader about its snapshot."""

    IDLE = 0
    WANTS = 1
    WRITING = 2


def follower_wish(*, writing: bool, wanted: bool, turn_spent: bool) -> Wish:
    """What a follower tells its leader: WRITING while a write of its snapshot is under
    way, WANTS when one is due, else IDLE. A follower that still holds a turn it has
    written under (``turn_spent``) says IDLE even when due again: the leader would take
    WANTS for an answer sent before the turn reached it, and leave the turn with it until
    GRANT_TIMEOUT_S (a write that began and ended between two of its messages). It asks
    again, at the back, once the turn is gone."""
    if writing:
        return Wish.WRITING
    return Wish.WANTS if wanted and not turn_spent else Wish.IDLE


class SnapshotTurns:
    """The leader's side: the followers' latest wishes and which one holds the turn.

    A turn is good for one write: the holder that answers anything but WRITING once it
    has started gives it back, and the follower writes at most once per grant number
    (which the leader sends with the turn). The turn goes to the follower that has
    wanted one the longest.

    Used in pysyncobj's thread only. ``clock`` is monotonic seconds (for the grant
    timeout).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._waiting: dict[Hashable, int] = {}  # wanting since (an order, not a time)
        self._order = itertools.count()
        self._grants = itertools.count(1)
        self.holder: Hashable | None = None
        self._grant = 0
        self._granted_at = 0.0
        self._holder_started = False
        #: Set by the leader while it writes a snapshot of its own: no turn is given then.
        self.leader_writing = False

    def heard(self, node: Hashable, wish: int) -> None:
        """``node`` answered with ``wish`` (answers come in order on one connection)."""
        known = Wish(wish) if wish in Wish._value2member_map_ else Wish.IDLE
        if node == self.holder:
            if known is Wish.WRITING:
                self._holder_started = True
                return
            if not self._holder_started and known is Wish.WANTS:
                return  # an answer sent before the turn reached it
            self.holder = None  # its write is over, or it no longer wants one
        elif self.holder is None and known is Wish.WRITING:
            # A write this leader did not grant (an earlier leader's turn, or a log
            # twice over): no other follower writes beside it.
            self._take_turn(node, started=True)
            return
        if known is Wish.WANTS:
            self._waiting.setdefault(node, next(self._order))  # a holder goes to the back
        else:
            self._waiting.pop(node, None)

    def forget(self, node: Hashable) -> None:
        """``node``'s connection closed: its wish is unknown, and it loses the turn."""
        self._waiting.pop(node, None)
        if node == self.holder:
            self.holder = None

    def keep_only(self, members: Collection[Hashable]) -> None:
        """Forget every node but ``members`` (a node removed from the cluster is never
        heard from again, and pysyncobj drops its connection without a word)."""
        for node in [n for n in self._waiting if n not in members]:
            self.forget(node)
        if self.holder is not None and self.holder not in members:
            self.holder = None

    def reset(self) -> None:
        """This node does not lead any more: everything heard is stale."""
        self._waiting.clear()
        self.holder = None
        self.leader_writing = False

    def grant_for(self, node: Hashable, term: int) -> int | None:
        """The grant number ``node`` may write one snapshot under, or None if it may not
        write now; gives it the turn if it has wanted one the longest and nobody holds
        it. ``term`` is this leader's: numbers of different terms never repeat. Called
        for each ``append_entries`` sent to ``node``."""
        if (
            self.holder is not None
            and not self._holder_started
            and self._clock() - self._granted_at > GRANT_TIMEOUT_S
        ):
            # Never started: let the next one have it, and this one ask again (from its
            # next answer on, at the back).
            self.holder = None
        if (
            self.holder is None
            and not self.leader_writing
            and self._waiting
            and min(self._waiting, key=self._waiting.__getitem__) == node
        ):
            self._take_turn(node, started=False)
            self._grant = (term << 32) | next(self._grants)
        return self._grant if node == self.holder else None

    def _take_turn(self, node: Hashable, *, started: bool) -> None:
        self.holder = node
        self._granted_at = self._clock()
        self._holder_started = started
        self._waiting.pop(node, None)
