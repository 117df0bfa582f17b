"""The documented, configurable limits of a raftchan cluster.

Channels carry small administrative data. These bounds keep one careless client from
filling a node's memory or stalling the Raft log; breaking one gets a
:class:`~raftchan.errors.LimitExceeded` error that names the limit, and nothing already
stored is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Limits:
    """Bounds enforced by every node.

    Attributes:
        max_frame_bytes: largest wire frame a node or client accepts (both directions).
        max_item_bytes: largest single item, measured as its msgpack encoding.
        max_batch_items: most items in one append request.
        max_channels: most channels that may exist at once in the cluster.
        max_sessions: most client sessions the replicated state remembers for
            de-duplication; the least recently used one is forgotten beyond that.
        max_channel_name: longest channel name, in characters.
        max_read_items: most items one read or poll response carries (clients page).
        max_poll_wait: longest a long-poll may wait on a node, in seconds.
        max_pending_requests: requests one connection may have unanswered on a node;
            beyond it the node stops reading that connection until one is answered, so a
            client that never reads its answers cannot make the node queue without end.
    """

    max_frame_bytes: int = 4 * MIB
    max_item_bytes: int = 1 * MIB
    max_batch_items: int = 10_000
    max_channels: int = 10_000
    max_sessions: int = 10_000
    max_channel_name: int = 256
    max_read_items: int = 10_000
    max_poll_wait: float = 30.0
    max_pending_requests: int = 256


DEFAULT_LIMITS = Limits()
