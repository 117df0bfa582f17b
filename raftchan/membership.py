"""Cluster membership: which Raft addresses form the group, and how a node knows it.

Raft's single-server changes (one node added or removed at a time; a new configuration
takes effect on each node as soon as its entry is in that node's log, committed or not)
keep every majority of the old configuration overlapping every majority of the new one.
pysyncobj 0.3.17 implements the entries (``addNodeToCluster``/``removeNodeFromCluster``)
but, measured, leaves three gaps that :mod:`raftchan.replica` closes with this module:

- **One change at a time is not enforced.** Its guard (``__changeClusterIDx``) is never
  set, so a leader appended a second change while the first was uncommitted. The replica
  refuses a change while the log holds a membership entry not yet applied.
- **A restart starts from the command line's peers.** Membership came back from the
  snapshot and from log entries only as they were re-applied, so a restarted node ran
  on its ``--peers`` for a while (uncommitted changes: until a leader committed them).
  And the snapshot hook received the membership of the log's *end*, not of the snapshot's
  index. Here the membership is a function of the log: the snapshot's members (as of its
  index) plus every change entry after it, computed before pysyncobj starts.
  ``--peers`` is only the bootstrap list, kept in :data:`MEMBERS_FILE` at first start.
- **Node ids in a custom snapshot came back as strings** that pysyncobj did not recognise
  as the node itself, which then counted itself twice in every majority.

Everything here is pure except :func:`bootstrap_members`, which reads and writes the
bootstrap file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from raftchan.errors import MemberExists, MemberNotFound, MembershipError
from raftchan.snapshot import fsync_directory

__all__ = [
    "ADD",
    "MEMBERS_FILE",
    "MIN_MEMBERS",
    "REMOVE",
    "Change",
    "apply_changes",
    "bootstrap_members",
    "check_add",
    "check_remove",
    "undo_changes",
]

logger = logging.getLogger(__name__)

#: The bootstrap membership, written once when a node starts with an empty data folder.
MEMBERS_FILE = "raft.members"
_FORMAT_VERSION = 1

ADD = "add"
REMOVE = "rem"  # pysyncobj's own spelling in its log entries

#: A removal that would leave fewer members than this is refused: a one-node cluster
#: survives no fault, and its last node could not be removed safely either.
MIN_MEMBERS = 2

Change = tuple[str, str]
"""One membership log entry: ``(ADD or REMOVE, raft address)``."""


def apply_changes(members: Iterable[str], changes: Iterable[Change]) -> list[str]:
    """The membership after ``changes``, in order, starting from ``members`` (sorted).

    Adding a member or removing a non-member changes nothing, as in pysyncobj; so applying
    a run of changes to a membership that already includes some of them gives the same end.
    """
    result = set(members)
    for kind, address in changes:
        if kind == ADD:
            result.add(address)
        elif kind == REMOVE:
            result.discard(address)
    return sorted(result)


def undo_changes(members: Iterable[str], changes: Sequence[Change]) -> list[str]:
    """The membership before ``changes`` (sorted), given the membership after them.

    Exact when ``changes`` were each effective (no add of a member, no removal of a
    non-member), which one-change-at-a-time on the leader guarantees for the log.
    """
    result = set(members)
    for kind, address in reversed(changes):
        if kind == ADD:
            result.discard(address)
        elif kind == REMOVE:
            result.add(address)
    return sorted(result)


def check_add(members: Iterable[str], address: str) -> None:
    """Raise :class:`MemberExists` if ``address`` is already a member."""
    if address in set(members):
        raise MemberExists(f"{address} is already a member of the cluster", address=address)


def check_remove(members: Iterable[str], address: str, leader: str | None) -> None:
    """Raise unless removing ``address`` is allowed.

    :class:`MemberNotFound`: not a member. :class:`MembershipError`: the removal would
    leave fewer than :data:`MIN_MEMBERS` members, or ``address`` is the leader's own
    (``leader``): a leader cannot remove itself in pysyncobj; stop it (another node takes
    over) and remove it through the new leader.
    """
    current = set(members)
    if address not in current:
        raise MemberNotFound(f"{address} is not a member of the cluster", address=address)
    if len(current) - 1 < MIN_MEMBERS:
        raise MembershipError(
            f"removing {address} would leave {len(current) - 1} member(s); a cluster keeps "
            f"at least {MIN_MEMBERS}",
            address=address,
            reason="too_few_members",
        )
    if address == leader:
        raise MembershipError(
            f"{address} is the leader, which cannot remove itself: stop that node (another "
            "member takes over within an election timeout), then remove it again",
            address=address,
            reason="leader",
        )


def bootstrap_members(
    data_dir: str | os.PathLike[str], self_address: str, peers: Sequence[str]
) -> list[str]:
    """The membership this node's log starts from (sorted, this node included).

    The first start of a data folder records ``self_address`` and ``peers`` in
    :data:`MEMBERS_FILE` (fsynced); every later start reads that file and ignores
    ``peers``, logging so when they differ: after membership changes the command line is
    routinely out of date, and the log (with this starting point) says what is current.
    Raises :class:`ValueError` if the file exists but is damaged.
    """
    path = Path(data_dir) / MEMBERS_FILE
    given = sorted({self_address, *peers})
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _write_atomically(path, json.dumps({"version": _FORMAT_VERSION, "bootstrap": given}))
        return given
    try:
        decoded = json.loads(text)
        members = decoded["bootstrap"]
        if decoded.get("version") != _FORMAT_VERSION or not all(
            isinstance(m, str) for m in members
        ):
            raise ValueError("unexpected content")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path} is damaged ({exc}); it holds the cluster's first members"
        ) from None
    if sorted(members) != given:
        logger.info(
            "--peers is only read at a data folder's first start: membership comes from "
            "the log, which began with %s",
            ",".join(members),
        )
    return sorted(members)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)
