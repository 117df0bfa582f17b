"""A snapshot sent in chunks is installed only when it arrived whole."""

from __future__ import annotations

import functools
import os
import zlib
from pathlib import Path

from raftchan.snapshot import Segment, SnapshotStream, read_snapshot, write_snapshot
from raftchan.snapshot_transfer import SnapshotReceiver

CHUNK = 4096


def _snapshot_bytes(tmp_path: Path, last_index: int, state: bytes) -> bytes:
    source = tmp_path / f"source-{last_index}"
    write_snapshot(source, (b"", last_index, 3), (b"", last_index - 1, 3), ["a:1", "b:2"], state)
    return source.read_bytes()


def _chunks(data: bytes) -> list[tuple[bytes, bool, bool]]:
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    return [(piece, i == 0, i == len(pieces) - 1) for i, piece in enumerate(pieces)]


def test_a_whole_transfer_replaces_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "raft.snapshot"
    path.write_bytes(_snapshot_bytes(tmp_path, 10, b"old" * 1000))
    receiver = SnapshotReceiver(str(path))
    answers = [
        receiver.receive(chunk)
        for chunk in _chunks(_snapshot_bytes(tmp_path, 50, os.urandom(50_000)))
    ]
    assert answers[-1] is True
    assert not any(answers[:-1])
    assert read_snapshot(path).last_entry[1] == 50
    assert not os.path.exists(receiver.incoming)


def test_a_transfer_with_a_lost_chunk_is_refused_and_the_old_snapshot_stays(
    tmp_path: Path,
) -> None:
    path = tmp_path / "raft.snapshot"
    old = _snapshot_bytes(tmp_path, 10, b"old" * 1000)
    path.write_bytes(old)
    receiver = SnapshotReceiver(str(path))
    chunks = _chunks(_snapshot_bytes(tmp_path, 50, os.urandom(50_000)))
    del chunks[3]  # lost with a connection that closed
    assert not any(receiver.receive(chunk) for chunk in chunks)
    assert path.read_bytes() == old
    assert not os.path.exists(receiver.incoming)


def test_a_restarted_transfer_starts_the_file_over(tmp_path: Path) -> None:
    path = tmp_path / "raft.snapshot"
    receiver = SnapshotReceiver(str(path))
    first = _chunks(_snapshot_bytes(tmp_path, 30, os.urandom(20_000)))
    for chunk in first[:2]:
        receiver.receive(chunk)  # cut off after two chunks
    second = _chunks(_snapshot_bytes(tmp_path, 40, os.urandom(20_000)))
    assert [receiver.receive(chunk) for chunk in second][-1] is True
    assert read_snapshot(path).last_entry[1] == 40


def test_chunks_without_a_start_are_ignored_and_leftovers_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "raft.snapshot"
    leftover = tmp_path / "raft.snapshot.incoming"
    leftover.write_bytes(b"half a transfer from before a crash")
    receiver = SnapshotReceiver(str(path))
    assert not leftover.exists()
    chunks = _chunks(_snapshot_bytes(tmp_path, 30, b"x" * 10_000))
    assert not any(receiver.receive(chunk) for chunk in chunks[1:])
    assert receiver.receive(None) is False
    assert not path.exists()


def test_the_node_is_asked_right_before_a_whole_transfer_replaces_its_snapshot(
    tmp_path: Path,
) -> None:
    # The node waits there for a snapshot of its own still being written, which would
    # otherwise replace the leader's newer one.
    path = tmp_path / "raft.snapshot"
    path.write_bytes(_snapshot_bytes(tmp_path, 10, b"old" * 1000))
    seen_at_the_call: list[int] = []
    receiver = SnapshotReceiver(
        str(path), before_install=lambda: seen_at_the_call.append(read_snapshot(path).last_entry[1])
    )
    for chunk in _chunks(_snapshot_bytes(tmp_path, 50, os.urandom(50_000))):
        receiver.receive(chunk)
    assert seen_at_the_call == [10]
    assert read_snapshot(path).last_entry[1] == 50


def test_a_transfer_that_lost_its_segments_is_refused_even_if_files_of_their_names_exist(
    tmp_path: Path,
) -> None:
    path = tmp_path / "raft.snapshot"
    own = _snapshot_bytes(tmp_path, 10, b"own")
    path.write_bytes(own)
    # The sender's snapshot refers to a segment; this node happens to hold a file of the
    # same name and contents (its own numbering), which must not stand in for it.
    segment = tmp_path / "raft.snapshot.seg-1"
    segment.write_bytes(b"segment bytes")
    source = tmp_path / "sent.snapshot"
    write_snapshot(
        source,
        (b"", 50, 3),
        (b"", 49, 3),
        ["a:1"],
        b"state",
        [Segment(segment.name, segment.stat().st_size, zlib.crc32(segment.read_bytes()))],
    )
    receiver = SnapshotReceiver(str(path))
    answers = [receiver.receive(chunk) for chunk in _chunks(source.read_bytes())]
    assert not any(answers)
    assert path.read_bytes() == own
    # Sent with its segment appended, as a leader sends it, the same snapshot is taken.
    whole = b"".join(iter(functools.partial(SnapshotStream(source).read, 1 << 20), b""))
    answers = [receiver.receive(chunk) for chunk in _chunks(whole)]
    assert answers[-1] is True
    assert read_snapshot(path).embedded_at is not None
