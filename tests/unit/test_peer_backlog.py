"""Tests of the leader's bound on what it queues per follower (raftchan.peer_backlog)."""

from __future__ import annotations

from pathlib import Path

from raftchan.peer_backlog import ConnectedPeers, may_hold_after
from raftchan.snapshot_writer import BackgroundSnapshots


def test_a_held_peer_reads_as_absent_and_nothing_else_changes() -> None:
    held: set[str] = set()
    peers = ConnectedPeers({"a", "b"}, held)
    held.add("a")
    assert "a" not in peers and "b" in peers
    assert sorted(peers) == ["a", "b"] and len(peers) == 2
    peers.discard("b")
    peers.add("c")
    assert "c" in peers and "b" not in peers
    held.clear()
    assert "a" in peers


def test_the_leader_may_stop_after_entries_and_snapshot_chunks_but_the_last() -> None:
    entries = {"type": "append_entries", "term": 3, "entries": [(b"x", 5, 3)]}
    assert may_hold_after(entries)
    assert may_hold_after({"type": "append_entries", "term": 3, "serialized": None})
    assert may_hold_after({"type": "append_entries", "serialized": (b"chunk", True, False)})
    # pysyncobj moves the peer past the snapshot only once it saw the last chunk go.
    assert not may_hold_after({"type": "append_entries", "serialized": (b"end", False, True)})
    # An entry sent in pieces must get all of them.
    assert not may_hold_after({"type": "append_entries", "transmission": "start", "data": b""})
    assert not may_hold_after({"type": "request_vote", "term": 4})


def test_a_transfer_to_a_held_peer_is_kept(tmp_path: Path) -> None:
    held: set[str] = set()
    snapshots = BackgroundSnapshots(
        str(tmp_path / "raft.snapshot"), 65536, print, print, held_peers=held
    )
    transfers = snapshots._Serializer__transmissions  # type: ignore[attr-defined]
    transfers["a"] = transfers["b"] = "under way"
    held.add("a")
    snapshots.cancelTransmisstion("a")
    snapshots.cancelTransmisstion("b")
    assert transfers == {"a": "under way"}
    held.clear()
    snapshots.cancelTransmisstion("a")
    assert transfers == {}
