"""Which nodes write a snapshot now: one follower at a time, the leader last.

Writing a snapshot rewrites the whole state. While a node does, its process stalls now and
then (encoding pieces of the state holds the GIL for 7-30 ms, and fsyncs of its disk wait
behind the write). Every node reached the compaction policy's threshold at the same entry,
so all of them wrote at once, and an append waited for whichever of them its commit
needed. Measured on one host (3 nodes, a 300 MB state compacted over and over, one
producer of 4 KiB appends every 5 ms): p99 22-32 ms with every node compacting at once,
10-13 ms with the leader holding its snapshot back, 7-8 ms with the followers also taking
turns; 4.4 ms without compactions.

So a commit never needs a node that is writing a snapshot:

- A follower due for one (:class:`raftchan.compaction.CompactionPolicy`) says so in its
  answers to the leader, and writes it once the leader gives it the turn. The leader gives
  the turn to one follower at a time, which keeps it until it answers that it is done (or
  fails to start within :data:`GRANT_TIMEOUT_S`).
- The leader puts its own snapshot off until its log reaches :data:`UNCOORDINATED_FACTOR`
  times the policy's thresholds, and gives no turn while it writes.
- A node that hears no turn (no leader, a leader of an earlier version, a follower that
  holds the turn and never finishes) writes its snapshot anyway at that same factor, so
  the log stays bounded, at twice what the policy alone would let it hold.

The wish rides on pysyncobj's ``next_node_idx`` answers and the turn on ``append_entries``,
as two extra keys: nodes of earlier versions ignore them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from enum import IntEnum

__all__ = [
    "GRANT_TIMEOUT_S",
    "TURN_KEY",
    "UNCOORDINATED_FACTOR",
    "WISH_KEY",
    "SnapshotTurns",
    "Wish",
]

#: Key of a follower's wish in its ``next_node_idx`` answers (absent: Wish.IDLE).
WISH_KEY = "rc_snapshot"
#: Key set (to True) in the ``append_entries`` sent to the follower holding the turn.
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


class SnapshotTurns:
    """The leader's side: the followers' latest wishes and which one holds the turn.

    Used in pysyncobj's thread only. ``clock`` is monotonic seconds (for the grant
    timeout).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._wishes: dict[Hashable, Wish] = {}
        self.holder: Hashable | None = None
        self._granted_at = 0.0
        self._holder_started = False
        #: Set by the leader while it writes a snapshot of its own: no turn is given then.
        self.leader_writing = False

    def heard(self, node: Hashable, wish: int) -> None:
        """``node`` answered with ``wish``. The holder that answers IDLE is done (the
        answers come in order on one connection, and the turn was given after a WANTS)."""
        known = Wish(wish) if wish in Wish._value2member_map_ else Wish.IDLE
        self._wishes[node] = known
        if node == self.holder:
            if known is Wish.WRITING:
                self._holder_started = True
            elif known is Wish.IDLE:
                self.holder = None

    def forget(self, node: Hashable) -> None:
        """``node``'s connection closed: its wish is unknown, and it loses the turn."""
        self._wishes.pop(node, None)
        if node == self.holder:
            self.holder = None

    def reset(self) -> None:
        """This node does not lead any more: everything heard is stale."""
        self._wishes.clear()
        self.holder = None
        self.leader_writing = False

    def has_turn(self, node: Hashable) -> bool:
        """Whether ``node`` may write its snapshot now; gives it the turn if it wants one
        and nobody holds it. Called for each ``append_entries`` sent to ``node``."""
        now = self._clock()
        if (
            self.holder is not None
            and not self._holder_started
            and now - self._granted_at > GRANT_TIMEOUT_S
        ):
            # Never started: let the next one have it, and this one ask again.
            self._wishes.pop(self.holder, None)
            self.holder = None
        if self.holder is None and not self.leader_writing and self._wishes.get(node) is Wish.WANTS:
            self.holder = node
            self._granted_at = now
            self._holder_started = False
        return node == self.holder
