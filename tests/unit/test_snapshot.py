"""Tests of the snapshot file format (raftchan.snapshot)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

import raftchan.snapshot as snapshot_module
from raftchan.snapshot import (
    FORMAT_VERSION,
    MAGIC,
    Snapshot,
    SnapshotCorrupt,
    fsync_directory,
    read_snapshot,
    read_snapshot_anchor,
    write_snapshot,
)

LAST = (b"\x01last-command", 42, 3)
PREV = (b"\x01prev-command", 41, 3)
NODES = ["127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1:4003"]

# Byte offsets inside the header: magic(8) version(4) meta_len(4) meta_crc(4) state_crc(4)
# state_len(8).
HEADER_SIZE = 32


def _write(path: Path, state: bytes = b"state-bytes") -> Path:
    write_snapshot(str(path), LAST, PREV, NODES, state)
    return path


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_roundtrip_returns_tuples(tmp_path: Path) -> None:
    path = _write(tmp_path / "dump.bin")
    snap = read_snapshot(str(path))
    assert snap == Snapshot(LAST, PREV, tuple(NODES), b"state-bytes")
    # Tuples, not lists: pysyncobj compares them with journal entries using !=.
    assert type(snap.last_entry) is tuple
    assert type(snap.prev_entry) is tuple
    assert snap.last_entry == LAST and snap.prev_entry == PREV
    assert isinstance(snap.last_entry[0], bytes)


def test_snapshot_is_frozen(tmp_path: Path) -> None:
    snap = read_snapshot(str(_write(tmp_path / "dump.bin")))
    with pytest.raises(AttributeError):
        snap.state = b"other"  # type: ignore[misc]


def test_empty_and_large_state(tmp_path: Path) -> None:
    _write(tmp_path / "empty.bin", b"")
    assert read_snapshot(str(tmp_path / "empty.bin")).state == b""
    big = os.urandom(3 * 1024 * 1024 + 17)  # more than one verification chunk
    _write(tmp_path / "big.bin", big)
    assert read_snapshot(str(tmp_path / "big.bin")).state == big
    assert read_snapshot_anchor(str(tmp_path / "big.bin")) == PREV


def test_accepts_pathlike_memoryview_and_node_generator(tmp_path: Path) -> None:
    path = tmp_path / "dump.bin"
    write_snapshot(path, LAST, PREV, (n for n in NODES), memoryview(b"abc"))
    assert read_snapshot(path).state == b"abc"
    assert read_snapshot(path).node_ids == tuple(NODES)


def test_writes_exactly_the_given_path_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "dump.bin.tmp"
    write_snapshot(str(path), LAST, PREV, NODES, b"one")
    write_snapshot(str(path), LAST, PREV, NODES, b"two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump.bin.tmp"]
    assert read_snapshot(str(path)).state == b"two"


def test_header_carries_magic_and_version(tmp_path: Path) -> None:
    data = _write(tmp_path / "dump.bin").read_bytes()
    assert data[:8] == MAGIC
    assert struct.unpack_from("<I", data, 8)[0] == FORMAT_VERSION


def test_anchor_is_prev_entry_or_none(tmp_path: Path) -> None:
    assert read_snapshot_anchor(str(tmp_path / "missing.bin")) is None
    anchor = read_snapshot_anchor(str(_write(tmp_path / "dump.bin")))
    assert anchor == PREV
    assert type(anchor) is tuple


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_snapshot(str(tmp_path / "missing.bin"))


def test_corrupt_is_a_value_error() -> None:
    assert issubclass(SnapshotCorrupt, ValueError)


@pytest.mark.parametrize(
    "where",
    ["magic", "version", "meta_len", "state_len", "meta", "state"],
)
def test_damaged_byte_is_detected(tmp_path: Path, where: str) -> None:
    path = _write(tmp_path / "dump.bin")
    size = path.stat().st_size
    offset = {
        "magic": 0,
        "version": 8,
        "meta_len": 12,
        "state_len": 24,
        "meta": HEADER_SIZE + 3,
        "state": size - 2,
    }[where]
    _flip_byte(path, offset)
    with pytest.raises(SnapshotCorrupt):
        read_snapshot(str(path))
    with pytest.raises(SnapshotCorrupt):
        read_snapshot_anchor(str(path))


def test_truncated_file_is_detected(tmp_path: Path) -> None:
    path = _write(tmp_path / "dump.bin")
    data = path.read_bytes()
    for cut in (0, 5, HEADER_SIZE - 1, HEADER_SIZE + 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(SnapshotCorrupt):
            read_snapshot(str(path))


def test_trailing_garbage_is_detected(tmp_path: Path) -> None:
    path = _write(tmp_path / "dump.bin")
    with open(path, "ab") as f:
        f.write(b"junk")
    with pytest.raises(SnapshotCorrupt, match="header says"):
        read_snapshot(str(path))


def test_other_file_formats_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dump.bin"
    # A pysyncobj default dump starts with a gzip header.
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 60)
    with pytest.raises(SnapshotCorrupt, match="not a raftchan snapshot"):
        read_snapshot(str(path))


def test_wrong_argument_types_are_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "dump.bin")
    with pytest.raises(TypeError):
        write_snapshot(path, ("cmd", 1, 1), PREV, NODES, b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        write_snapshot(path, LAST, (b"x", 1), NODES, b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        write_snapshot(path, LAST, PREV, [1, 2], b"")  # type: ignore[list-item]
    with pytest.raises(TypeError):
        write_snapshot(path, LAST, PREV, NODES, "text")  # type: ignore[arg-type]


def test_fsync_directory(tmp_path: Path) -> None:
    fsync_directory(str(tmp_path))
    fsync_directory(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_directory(str(tmp_path / "missing"))


def test_a_state_in_pieces_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "dump.bin"
    pieces = (p for p in [b"ab", b"", bytearray(b"cd"), memoryview(b"ef"), b"g" * 3_000_000])
    write_snapshot(path, LAST, PREV, NODES, pieces)
    snap = read_snapshot(path)
    assert snap.state == b"abcdef" + b"g" * 3_000_000
    assert read_snapshot_anchor(path) == PREV


def test_a_piece_that_is_not_bytes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_snapshot(tmp_path / "dump.bin", LAST, PREV, NODES, [b"ab", "cd"])  # type: ignore[list-item]


def test_an_anchor_verified_before_is_looked_up_until_the_file_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    read_file = snapshot_module._read_file

    def counting(path: str, *, load_state: bool) -> tuple[Snapshot, tuple[int, int, int, int]]:
        reads.append(path)
        return read_file(path, load_state=load_state)

    monkeypatch.setattr(snapshot_module, "_read_file", counting)
    path = _write(tmp_path / "dump.bin")
    assert read_snapshot_anchor(path) == PREV
    assert read_snapshot_anchor(path) == PREV
    assert len(reads) == 1  # the second call only looked at the file's identity

    # Replaced, as every snapshot is (written beside it and renamed over it): read again,
    # and damage in the new file is found.
    replacement = tmp_path / "dump.bin.tmp"
    write_snapshot(replacement, LAST, (b"\x01other", 40, 3), NODES, b"state-bytes")
    os.replace(replacement, path)
    assert read_snapshot_anchor(path) == (b"\x01other", 40, 3)
    assert len(reads) == 2
    write_snapshot(replacement, LAST, PREV, NODES, b"state-bytes")
    _flip_byte(replacement, replacement.stat().st_size - 2)  # in the state
    os.replace(replacement, path)
    with pytest.raises(SnapshotCorrupt):
        read_snapshot_anchor(path)
    path.unlink()
    assert read_snapshot_anchor(path) is None


def test_a_state_larger_than_a_sync_step_is_written_whole(tmp_path: Path) -> None:
    state = os.urandom(9 * 1024 * 1024 + 5)  # synced twice on the way, and at the end
    pieces = [state[i : i + 1_000_000] for i in range(0, len(state), 1_000_000)]
    write_snapshot(tmp_path / "a.bin", LAST, PREV, NODES, pieces)
    assert read_snapshot(tmp_path / "a.bin").state == state
