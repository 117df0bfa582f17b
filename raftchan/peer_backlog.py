"""A bound on what the leader queues for one follower.

pysyncobj's leader sends a follower everything it lacks in one go, limited only by time:
each round it pickles entries (or snapshot chunks) into the connection's write buffer
until the follower is sent all of them or the heartbeat period is spent, whether or not
the socket takes them. A follower catching up behind a 115 MB snapshot and 85 MB of
entries had most of it queued in the leader's memory (the leader grew by 180 MB), and a
larger state would grow it by as much again.

:class:`ConnectedPeers` stands in for pysyncobj's set of connected peers. pysyncobj ends
its send loop for a peer as soon as that peer is no longer in the set, so once a message
leaves a follower's buffer holding :data:`MAX_UNSENT_BYTES` or more, the leader holds the
follower back: it reads as not connected until that round of sending ends. A follower
whose buffer holds that much when a round starts is held from the start and sent
nothing (its snapshot transfer is kept, not cancelled as pysyncobj does for a peer that
is gone). The buffer then holds at most the bound plus one message, and a follower
gets entries and snapshot chunks as fast as it takes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "MAX_UNSENT_BYTES",
    "ConnectedPeers",
    "is_backlogged",
    "is_snapshot_chunk_before_last",
    "may_hold_after",
]

#: Bytes queued for one follower (beyond what its socket took) from which the leader
#: sends it nothing more in the current round. As much again fits in the socket's own
#: buffer (see replica.PEER_SOCKET_BUFFER_BYTES).
MAX_UNSENT_BYTES = 4 * 1024 * 1024


class ConnectedPeers(set[Any]):
    """pysyncobj's set of connected peers, where a peer can be held back for one round.

    A peer in :attr:`held` reads as absent (``in``), nothing else changes: iteration,
    ``len`` and the peers' connections are as pysyncobj keeps them.
    """

    def __init__(self, peers: Iterable[Any] = (), held: set[Any] | None = None) -> None:
        super().__init__(peers)
        #: Peers held back until the end of the current round of sending.
        self.held: set[Any] = set() if held is None else held

    def __contains__(self, node: object) -> bool:
        return set.__contains__(self, node) and node not in self.held


def may_hold_after(message: Any) -> bool:
    """Whether the leader may stop sending to a peer right after ``message``.

    Not after the last chunk of a snapshot: pysyncobj moves the peer past the snapshot
    only once it has seen that chunk go, and would otherwise send the whole snapshot
    again. Not in the middle of an entry sent in pieces (pysyncobj's ``transmission``,
    for an entry larger than a batch, which raftchan never builds): the pieces after it
    would never be sent.
    """
    if message.get("type") != "append_entries" or "transmission" in message:
        return False
    return message.get("serialized") is None or is_snapshot_chunk_before_last(message)


def is_snapshot_chunk_before_last(message: Any) -> bool:
    """Whether ``message`` is a leader's append-entries carrying a chunk of its snapshot
    other than the last one (pysyncobj sends ``(chunk, is_first, is_last)``)."""
    if message.get("type") != "append_entries":
        return False
    chunk = message.get("serialized")
    return isinstance(chunk, tuple) and len(chunk) == 3 and not chunk[2]


def is_backlogged(connection: Any) -> bool:
    """Whether the leader holds back the peer of ``connection`` (a BoundedTcpConnection):
    :data:`MAX_UNSENT_BYTES` or more wait in its buffer."""
    return bool(connection.unsent_bytes() >= MAX_UNSENT_BYTES)
