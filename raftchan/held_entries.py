"""A follower keeps the log entries it already holds when a leader sends them again.

pysyncobj's follower, handed entries that follow ``prevLogIdx``, deletes everything it
has after ``prevLogIdx`` and appends the entries anew, whether or not they differ. A
leader sends entries again when the answer to an earlier message moves its next index
for that follower back while later messages are in flight (pysyncobj does that under
pipelined commands). The follower then cut entries it had acknowledged, even applied,
out of its journal and wrote them again: for a moment they were not on its disk, and
each time pysyncobj logged "truncating already-applied log entries ... state machine may
have diverged" at CRITICAL, though nothing had.

Raft deletes a follower's entries only from the first one that conflicts with the
leader's (same index, other term). :func:`without_held_entries` rewrites an
append-entries message so that pysyncobj starts after the entries the follower already
holds: by the log matching property an entry with the same index and term is the same
entry, and so is everything before it.

When the follower holds every entry sent and more after them, that is not enough:
pysyncobj, handed no entries after ``prevLogIdx``, deletes whatever follows it. Raft
deletes nothing without a conflict. :func:`for_follower` turns such a message into one
pysyncobj handles as a heartbeat at the end of the log, with the commit index held to
what the message showed to match; the follower's answer must then name the entry after
the last one sent, not after its whole log, which it has not shown to match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["for_follower", "without_held_entries"]

#: One log entry as pysyncobj keeps it: (command, index, term).
Entry = tuple[Any, int, int]


def without_held_entries(log: Sequence[Entry], message: dict[str, Any]) -> dict[str, Any]:
    """``message`` (an append-entries with ``entries``) without the leading entries ``log``
    holds with the same index and term; ``prevLogIdx``/``prevLogTerm`` then name the last
    of those. Returned unchanged when it starts with none held (or ``log`` is empty).

    Entries below the first one ``log`` keeps (compacted into a snapshot) are left to
    pysyncobj: their terms cannot be compared here.
    """
    entries = message.get("entries") or []
    if not entries or not log:
        return message
    first_index = log[0][1]
    last_index = log[-1][1]
    held = 0
    for _command, index, term in entries:
        position = index - first_index
        if position < 0 or index > last_index or log[position][2] != term:
            break
        held += 1
    if held == 0:
        return message
    _command, index, term = entries[held - 1]
    return {**message, "entries": entries[held:], "prevLogIdx": index, "prevLogTerm": term}


def for_follower(
    log: Sequence[Entry], message: dict[str, Any]
) -> tuple[dict[str, Any], int | None]:
    """The append-entries ``message`` (with ``entries``) a follower holding ``log`` should
    hand pysyncobj, and the next index its answer must name (None: pysyncobj's own).

    That is :func:`without_held_entries`, except when ``log`` holds every entry sent and
    more after them: then the message has no entries and names ``log``'s last entry as
    ``prevLogIdx`` and ``prevLogTerm``, so pysyncobj neither cuts nor appends; its
    ``commit_index`` is at most the last entry sent, so entries the leader did not vouch
    for are not applied; and the answer names the entry after the last one sent.
    """
    trimmed = without_held_entries(log, message)
    if trimmed is message or trimmed["entries"]:
        return trimmed, None
    last_sent = trimmed["prevLogIdx"]
    _command, last_index, last_term = log[-1]
    if last_index <= last_sent:
        return trimmed, None
    heartbeat = {
        **trimmed,
        "prevLogIdx": last_index,
        "prevLogTerm": last_term,
        "commit_index": min(message["commit_index"], last_sent),
    }
    return heartbeat, last_sent + 1
