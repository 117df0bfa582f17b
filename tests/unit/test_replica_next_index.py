"""The leader's next index for a follower: answers to earlier messages never move it back.

Built on a real pysyncobj node (no tick thread, nothing bound); only the leader's
bookkeeping of one follower is set by hand, as an election would have left it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pysyncobj import SyncObjConf
from pysyncobj.syncobj import _RAFT_STATE

from raftchan import journal as journal_module
from raftchan.replica import _MembershipJournal, _RaftNode


@pytest.fixture(name="leader")
def leader_fixture(tmp_path: Path) -> Iterator[tuple[_RaftNode, Any]]:
    path = str(tmp_path / "raft.journal")
    journal = _MembershipJournal(path, snapshot_path=str(tmp_path / "raft.snapshot"))
    journal_module.install_journal_factory()
    journal_module.register_journal(path, journal)
    conf = SyncObjConf(autoTick=False, journalFile=path, dynamicMembershipChange=True)
    node = _RaftNode(
        lambda command: [],
        journal,
        selfNode="127.0.0.1:1",
        otherNodes=["127.0.0.1:2", "127.0.0.1:3"],
        conf=conf,
    )
    follower = sorted(node._SyncObj__otherNodes, key=lambda n: n.id)[0]
    node._SyncObj__raftState = _RAFT_STATE.LEADER
    # Entries up to 103 sent to the follower in two messages; it confirmed up to 99.
    node._SyncObj__raftNextIndex[follower] = 104
    node._SyncObj__raftMatchIndex[follower] = 99
    try:
        yield node, follower
    finally:
        node.destroy()
        journal.close()


def _answer(next_index: int, *, success: bool, reset: bool) -> dict[str, Any]:
    return {
        "type": "next_node_idx",
        "next_node_idx": next_index,
        "success": success,
        "reset": reset,
    }


def test_the_answer_to_an_earlier_message_raises_the_match_but_keeps_the_next(
    leader: tuple[_RaftNode, Any],
) -> None:
    node, follower = leader
    node._SyncObj__onMessageReceived(follower, _answer(102, success=True, reset=False))
    assert node._SyncObj__raftMatchIndex[follower] == 101
    assert node._SyncObj__raftNextIndex[follower] == 104  # pysyncobj alone: 102


def test_a_refusal_still_moves_the_next_index_back(leader: tuple[_RaftNode, Any]) -> None:
    node, follower = leader
    node._SyncObj__onMessageReceived(follower, _answer(90, success=False, reset=True))
    assert node._SyncObj__raftNextIndex[follower] == 90


def test_an_answer_past_what_was_sent_moves_it_forward(leader: tuple[_RaftNode, Any]) -> None:
    node, follower = leader
    node._SyncObj__onMessageReceived(follower, _answer(106, success=True, reset=False))
    assert node._SyncObj__raftNextIndex[follower] == 106
