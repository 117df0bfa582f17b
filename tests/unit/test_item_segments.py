"""Snapshots that write only new items into segment files (raftchan.item_segments)."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path
from typing import Any

import pytest

import raftchan.snapshot as snapshot_module
from raftchan.item_segments import MAX_SEGMENTS, SEGMENT_MARK, Capture, SegmentBook, load_state
from raftchan.retired_files import wait_idle
from raftchan.snapshot import SnapshotCorrupt, SnapshotStream, read_snapshot, stored_bytes
from raftchan.state import ChannelState, encode_command

SESSION = b"S" * 16
WAIT_TIMEOUT = 10.0


class _Node:
    """A state, its segment book and its snapshot file, as one node holds them."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        self.path = folder / "raft.snapshot"
        self.state = ChannelState()
        self.book = SegmentBook(str(self.path))
        self.seq = 0
        self.index = 1

    def run(self, *ops: list[Any]) -> None:
        for result in self.state.apply(encode_command(list(ops), 10_000, 10_000)):
            assert result["ok"], result

    def append(self, name: str, *values: bytes) -> None:
        self.seq += 1
        self.run(["append", name, SESSION, self.seq, list(values)])
        self.seq += len(values) - 1

    def snapshot(self) -> Capture:
        """Capture, write, put in place and adopt a snapshot, as a node does."""
        self.index += 1
        capture = self.book.capture(
            self.state, (b"", self.index, 1), (b"", self.index - 1, 1), ["a"]
        )
        tmp = str(self.path) + ".tmp"
        capture.write(tmp)
        os.replace(tmp, self.path)
        self.book.adopt(capture)
        assert wait_idle(WAIT_TIMEOUT)  # segments no longer used are removed
        return capture

    def segment_files(self) -> list[str]:
        return sorted(p.name for p in self.path.parent.iterdir() if SEGMENT_MARK in p.name)

    def loaded(self, path: Path | None = None) -> ChannelState:
        path = path or self.path
        state, _runs = load_state(str(path), read_snapshot(path))
        return state


def _same(a: ChannelState, b: ChannelState) -> None:
    assert a.to_bytes() == b.to_bytes()


def test_a_second_snapshot_writes_only_the_new_items(tmp_path: Path) -> None:
    node = _Node(tmp_path)
    node.run(["open", "big", None], ["open", "small", None])
    for i in range(100):
        node.append("big", os.urandom(4096), bytes([i]))
    node.append("small", b"x")
    first = node.snapshot()
    assert first.new_bytes > 100 * 4096
    _same(node.loaded(), node.state)

    node.append("big", b"new-1", b"new-2")
    second = node.snapshot()
    assert 0 < second.new_bytes < 100  # two small items, not the 400 KB before them
    assert len(node.segment_files()) == 2
    assert stored_bytes(node.path) > first.new_bytes + second.new_bytes
    _same(node.loaded(), node.state)

    third = node.snapshot()  # nothing new: no segment written
    assert third.new_bytes == 0
    assert len(node.segment_files()) == 2
    _same(node.loaded(), node.state)


def test_trimmed_items_free_their_segments(tmp_path: Path) -> None:
    node = _Node(tmp_path)
    node.run(["open", "window", 3])
    for round_ in range(4):
        node.append("window", *[bytes([round_, i]) * 1000 for i in range(5)])
        node.snapshot()
        _same(node.loaded(), node.state)
    # Each snapshot's items pushed the ones before out of the window: one segment left.
    assert len(node.segment_files()) == 1


def test_a_channel_deleted_and_opened_again_is_written_whole(tmp_path: Path) -> None:
    node = _Node(tmp_path)
    node.run(["open", "c", None])
    node.append("c", b"old-1", b"old-2", b"old-3")
    node.snapshot()
    node.run(["delete", "c"], ["open", "c", None])
    node.append("c", b"new")
    node.snapshot()
    loaded = node.loaded()
    _same(loaded, node.state)
    assert loaded.read("c", None, None, 10)["items"] == [b"new"]
    assert len(node.segment_files()) == 1  # the old items' segment went with them


def test_a_mostly_dead_segment_is_rewritten(tmp_path: Path) -> None:
    node = _Node(tmp_path)
    node.run(["open", "doomed", None], ["open", "kept", None])
    node.append("doomed", *[os.urandom(1000) for _ in range(50)])
    node.append("kept", b"k" * 100)
    node.snapshot()
    [old_segment] = node.segment_files()
    node.run(["delete", "doomed"])
    capture = node.snapshot()
    # "kept" alone held the segment: its items moved to the new one, the old one went.
    assert capture.new_bytes >= 100
    assert old_segment not in node.segment_files()
    assert len(node.segment_files()) == 1
    _same(node.loaded(), node.state)


def test_too_many_segments_are_merged_into_one(tmp_path: Path) -> None:
    node = _Node(tmp_path)
    node.run(["open", "c", None])
    for i in range(MAX_SEGMENTS + 1):
        node.append("c", bytes([i % 256]) * 10)
        node.snapshot()
        assert len(node.segment_files()) <= MAX_SEGMENTS
    assert len(node.segment_files()) < MAX_SEGMENTS
    _same(node.loaded(), node.state)


def test_after_a_restart_the_node_goes_on_writing_only_new_items(tmp_path: Path) -> None:
    node = _Node(tmp_path)
    node.run(["open", "c", None])
    node.append("c", *[os.urandom(1000) for _ in range(20)])
    node.snapshot()
    # A write cut short by a crash left a segment no snapshot refers to.
    leftover = node.path.parent / f"raft.snapshot{SEGMENT_MARK}999"
    leftover.write_bytes(b"partial")

    restarted = _Node(tmp_path)
    snap = read_snapshot(node.path)
    state, runs = load_state(str(node.path), snap)
    restarted.state = state
    restarted.index = node.index
    restarted.book.restart(snap, runs, state)
    assert wait_idle(WAIT_TIMEOUT)
    assert not leftover.exists()
    restarted.append("c", b"after")
    capture = restarted.snapshot()
    assert capture.new_bytes < 100
    assert capture.new_segment.endswith(f"{SEGMENT_MARK}1000")  # past every number seen
    _same(restarted.loaded(), restarted.state)


def test_a_snapshot_sent_to_a_peer_carries_its_segments(tmp_path: Path) -> None:
    leader = _Node(tmp_path / "leader")
    leader.run(["open", "c", 2], ["open", "d", None])
    for i in range(3):
        leader.append("c", bytes([i]) * 500, bytes([i + 10]) * 500)
        leader.append("d", bytes([i]) * 300)
        leader.snapshot()
    stream = SnapshotStream(leader.path)
    received = tmp_path / "received.snapshot"
    with open(received, "wb") as f:
        while chunk := stream.read(1000):
            f.write(chunk)
    assert received.stat().st_size == stream.size == stored_bytes(leader.path)
    snap = read_snapshot(received)
    assert snap.embedded_at is not None
    _same(leader.loaded(received), leader.state)

    # The follower that installs it drops its own segments and writes whole next time.
    follower = _Node(tmp_path / "follower")
    follower.run(["open", "own", None])
    follower.append("own", b"o" * 100)
    follower.snapshot()
    os.replace(received, follower.path)
    follower.state, _runs = load_state(str(follower.path), read_snapshot(follower.path))
    follower.book.forget()
    assert wait_idle(WAIT_TIMEOUT)
    assert follower.segment_files() == []
    follower.snapshot()
    _same(follower.loaded(), leader.state)
    assert read_snapshot(follower.path).embedded_at is None


def test_a_capture_taken_before_a_received_snapshot_is_not_adopted(tmp_path: Path) -> None:
    node = _Node(tmp_path)
    node.run(["open", "c", None])
    node.append("c", b"1")
    capture = node.book.capture(node.state, (b"", 5, 1), (b"", 4, 1), ["a"])
    capture.write(str(node.path))
    node.book.forget()  # a leader's snapshot was installed meanwhile
    node.book.adopt(capture)
    assert node.book.segment_count == 0


@pytest.mark.parametrize("damage", ["missing", "flipped", "short"])
def test_a_damaged_segment_makes_the_snapshot_corrupt(tmp_path: Path, damage: str) -> None:
    node = _Node(tmp_path)
    node.run(["open", "c", None])
    node.append("c", b"a" * 100, b"b" * 100)
    node.snapshot()
    segment = tmp_path / node.segment_files()[0]
    if damage == "missing":
        segment.unlink()
    elif damage == "flipped":
        data = bytearray(segment.read_bytes())
        data[10] ^= 0xFF
        segment.write_bytes(bytes(data))
    else:
        segment.write_bytes(segment.read_bytes()[:-1])
    with pytest.raises(SnapshotCorrupt):
        read_snapshot(node.path)
    if damage == "missing":
        with pytest.raises(SnapshotCorrupt):
            SnapshotStream(node.path)


def test_a_failed_write_leaves_no_segment(tmp_path: Path) -> None:
    node = _Node(tmp_path)
    node.run(["open", "c", None])
    node.append("c", b"item")
    capture = node.book.capture(node.state, (b"", 5, 1), (b"", 4, 1), ["a"])
    in_the_way = tmp_path / "raft.snapshot.tmp"
    in_the_way.mkdir()  # the segment is written, the snapshot cannot be
    with pytest.raises(IsADirectoryError):
        capture.write(str(in_the_way))
    assert node.segment_files() == []


def test_a_channel_trimmed_down_frees_its_old_segment(tmp_path: Path) -> None:
    node = _Node(tmp_path)
    node.run(["open", "c", None])
    node.append("c", *[os.urandom(1000) for _ in range(100)])
    node.snapshot()
    [old_segment] = node.segment_files()
    node.run(["open", "c", 1])  # a smaller maxlen: one item of the hundred is left
    node.snapshot()
    # The one retained item moved to a new segment; the 100 KB one went.
    assert old_segment not in node.segment_files()
    assert stored_bytes(node.path) < 10_000
    _same(node.loaded(), node.state)


def test_a_deleted_channel_is_not_held_in_memory_by_the_record(tmp_path: Path) -> None:
    node = _Node(tmp_path)
    node.run(["open", "c", None])
    node.append("c", b"x")
    node.snapshot()
    channel = weakref.ref(node.state.channels["c"])
    node.run(["delete", "c"])
    gc.collect()
    assert channel() is None


def test_earlier_segments_are_not_read_again_to_verify_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _Node(tmp_path)
    node.run(["open", "c", None])
    node.append("c", b"a" * 1000)
    node.snapshot()
    read_snapshot(node.path)  # the first segment verified once
    checked: list[str] = []
    crc_of = snapshot_module._crc_of

    def counting(f: Any, length: int, what: str, spath: str) -> int:
        if what.startswith("segment"):
            checked.append(what.split("'")[1])
        return crc_of(f, length, what, spath)

    monkeypatch.setattr(snapshot_module, "_crc_of", counting)
    node.append("c", b"b" * 1000)
    capture = node.snapshot()
    read_snapshot(node.path)
    assert checked == [capture.new_segment]
    # A segment replaced by another file of the same name is read again (and refused).
    segment = tmp_path / capture.new_segment
    damaged = bytearray(segment.read_bytes())
    damaged[5] ^= 0xFF
    os.remove(segment)
    segment.write_bytes(bytes(damaged))
    with pytest.raises(SnapshotCorrupt):
        read_snapshot(node.path)


def test_the_memo_of_verified_segments_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One key per segment ever verified: without a bound a long-lived node would keep
    # the keys of files long replaced.
    monkeypatch.setattr(snapshot_module, "VERIFIED_SEGMENTS_MAX", 3)
    node = _Node(tmp_path)
    node.run(["open", "c", None])
    for i in range(6):
        node.append("c", bytes([i]) * 1000)
        node.snapshot()
        read_snapshot(node.path)
        assert len(snapshot_module._verified_segments) <= 3
    _same(node.loaded(node.path), node.state)


def test_a_received_snapshot_verified_on_arrival_is_not_checked_again_when_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leader = _Node(tmp_path / "leader")
    leader.run(["open", "c", None])
    leader.append("c", *[os.urandom(1000) for _ in range(20)])
    leader.snapshot()
    incoming = tmp_path / "raft.snapshot.incoming"
    stream = SnapshotStream(leader.path)
    incoming.write_bytes(b"".join(iter(lambda: stream.read(1 << 16), b"")))
    read_snapshot(incoming)  # the receiver's check
    installed = tmp_path / "raft.snapshot"
    os.replace(incoming, installed)
    segment_reads: list[str] = []
    crc_of = snapshot_module._crc_of

    def counting(f: Any, length: int, what: str, spath: str) -> int:
        if what.startswith("segment"):
            segment_reads.append(what)
        return crc_of(f, length, what, spath)

    monkeypatch.setattr(snapshot_module, "_crc_of", counting)
    _same(leader.loaded(installed), leader.state)
    assert segment_reads == []
