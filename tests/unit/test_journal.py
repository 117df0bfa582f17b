"""Tests of the durable Raft journal (raftchan.journal)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pysyncobj.journal
import pysyncobj.syncobj
import pytest
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

import raftchan.journal as journal_mod
from raftchan.journal import (
    DurableJournal,
    JournalCorrupt,
    install_journal_factory,
    read_synced_length,
    register_journal,
    unregister_journal,
)
from raftchan.snapshot import read_snapshot, write_snapshot

Entry = tuple[bytes, int, int]
HEADER_SIZE = 16
RECORD_HEADER_SIZE = 24
#: Bounds each wait for the journal's compaction thread.
WAIT_TIMEOUT = 10.0


def entry(idx: int, term: int = 1) -> Entry:
    return (b"\x01cmd-%d" % idx, idx, term)


def entries(first: int, last: int, term: int = 1) -> list[Entry]:
    return [entry(i, term) for i in range(first, last + 1)]


@pytest.fixture
def jpath(tmp_path: Path) -> str:
    return str(tmp_path / "raft.journal")


@pytest.fixture
def spath(tmp_path: Path) -> str:
    return str(tmp_path / "raft.dump")


@pytest.fixture
def opened() -> Iterator[Callable[..., DurableJournal]]:
    """Open journals and close every one of them at the end of the test."""
    journals: list[DurableJournal] = []

    def _open(path: str, **kwargs: Any) -> DurableJournal:
        kwargs.setdefault("snapshot_path", None)
        j = DurableJournal(path, **kwargs)
        journals.append(j)
        return j

    yield _open
    for j in journals:
        j._destroy()


def fill(j: DurableJournal, items: list[Entry]) -> None:
    for e in items:
        j.add(*e)


def record_offsets(path: str) -> list[int]:
    """Offsets of the records in a journal file, parsed independently of the module."""
    data = Path(path).read_bytes()
    offsets, pos = [], HEADER_SIZE
    while pos + RECORD_HEADER_SIZE <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "little")
        offsets.append(pos)
        pos += RECORD_HEADER_SIZE + length
    return offsets


# --------------------------------------------------------------------------- basics


def test_new_journal_is_empty_with_defaults(jpath: str, opened: Callable[..., DurableJournal]):
    j = opened(jpath)
    assert len(j) == 0
    assert list(j) == []
    assert j.getCurrentTerm() == 0
    assert j.getVotedForNodeId() is None
    assert j.getRaftCommitIndex() == 1
    assert j.path == jpath
    assert os.path.getsize(jpath) == HEADER_SIZE
    assert j.synced_length == HEADER_SIZE
    assert isinstance(j, pysyncobj.journal.Journal)


def test_roundtrip_after_reopen(jpath: str, opened: Callable[..., DurableJournal]) -> None:
    items = [(b"", 1, 0)] + entries(2, 100, term=2) + [(os.urandom(70_000), 101, 3)]
    j = opened(jpath)
    fill(j, items)
    j.sync()
    j._destroy()
    j2 = opened(jpath)
    assert list(j2) == items
    assert all(type(e) is tuple for e in j2)


def test_unsynced_entries_survive_a_killed_process(
    jpath: str, opened: Callable[..., DurableJournal]
) -> None:
    # A killed process never closes its journal; what it wrote is in the page cache.
    j = opened(jpath)
    fill(j, entries(1, 20))
    assert list(opened(jpath)) == entries(1, 20)


def test_behaves_like_a_list(jpath: str, opened: Callable[..., DurableJournal]) -> None:
    model = entries(5, 24)
    j = opened(jpath)
    fill(j, model)
    assert len(j) == len(model)
    for i in range(-len(model), len(model)):
        assert j[i] == model[i]
    for a in (-25, -5, -1, 0, 3, 19, 20, 30):
        assert j[a:] == model[a:]
        assert j[:a] == model[:a]
        for b in (-3, 0, 2, 7, 20, 40):
            assert j[a:b] == model[a:b]
    assert j[::2] == model[::2]
    assert isinstance(j[2:4], list)
    with pytest.raises(IndexError):
        j[20]
    with pytest.raises(IndexError):
        j[-21]
    assert j[0] == (b"\x01cmd-5", 5, 1)


def test_add_accepts_bytes_like_commands(jpath: str, opened: Callable[..., DurableJournal]):
    j = opened(jpath)
    j.add(bytearray(b"abc"), 1, 1)
    j.add(memoryview(b"def"), 2, 1)
    assert j[0] == (b"abc", 1, 1) and type(j[0][0]) is bytes
    assert j[1] == (b"def", 2, 1)


def test_add_refuses_out_of_sequence_entries(
    jpath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath)
    fill(j, entries(1, 3, term=2))
    size = os.path.getsize(jpath)
    with pytest.raises(ValueError):
        j.add(b"x", 5, 2)  # gap
    with pytest.raises(ValueError):
        j.add(b"x", 3, 2)  # repeat
    with pytest.raises(ValueError):
        j.add(b"x", 4, 1)  # older term
    assert len(j) == 3 and os.path.getsize(jpath) == size


def test_closed_journal_refuses_writes(jpath: str, opened: Callable[..., DurableJournal]):
    j = opened(jpath)
    j._destroy()
    j._destroy()  # idempotent
    j.sync()  # harmless
    with pytest.raises(ValueError, match="closed"):
        j.add(b"x", 1, 1)


# --------------------------------------------------------------------------- recovery


def test_torn_tail_is_dropped(
    jpath: str, opened: Callable[..., DurableJournal], caplog: pytest.LogCaptureFixture
) -> None:
    j = opened(jpath)
    fill(j, entries(1, 10))
    j._destroy()
    good_size = os.path.getsize(jpath)
    # Half of a record, as a crash during a write would leave it.
    whole = Path(jpath).read_bytes()[record_offsets(jpath)[-1] :]
    with open(jpath, "ab") as f:
        f.write(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="raftchan.journal"):
        j2 = opened(jpath)
    assert list(j2) == entries(1, 10)
    assert os.path.getsize(jpath) == good_size
    assert any("keeping 10 entries" in r.getMessage() for r in caplog.records)
    # Appending after the repair works and survives another reopen.
    j2.add(*entry(11))
    j2._destroy()
    assert list(opened(jpath)) == entries(1, 11)


@pytest.mark.parametrize("garbage", [b"\x00", b"\x00" * 7, b"\x00" * 4096, os.urandom(100)])
def test_garbage_tail_is_dropped(
    jpath: str, opened: Callable[..., DurableJournal], garbage: bytes
) -> None:
    j = opened(jpath)
    fill(j, entries(1, 5))
    j._destroy()
    good_size = os.path.getsize(jpath)
    with open(jpath, "ab") as f:
        f.write(garbage)
    assert list(opened(jpath)) == entries(1, 5)
    assert os.path.getsize(jpath) == good_size


def test_bad_crc_in_the_middle_stops_reading_there(
    jpath: str, opened: Callable[..., DurableJournal], caplog: pytest.LogCaptureFixture
) -> None:
    j = opened(jpath)
    fill(j, entries(1, 10))
    j._destroy()
    offsets = record_offsets(jpath)
    data = bytearray(Path(jpath).read_bytes())
    data[offsets[6] + RECORD_HEADER_SIZE + 2] ^= 0x55  # a command byte of entry 7
    Path(jpath).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="raftchan.journal"):
        j2 = opened(jpath)
    assert list(j2) == entries(1, 6)
    assert os.path.getsize(jpath) == offsets[6]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "3 intact records after the damage" in errors[0].getMessage()


def test_out_of_sequence_record_stops_reading(
    jpath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath)
    fill(j, entries(1, 4))
    j._destroy()
    with open(jpath, "ab") as f:
        f.write(journal_mod._encode_record(b"stray", 9, 1))  # valid CRC, wrong index
    assert list(opened(jpath)) == entries(1, 4)


def test_foreign_or_damaged_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(b"PYSYNCOBJ" + b"\x00" * 40)
    with pytest.raises(JournalCorrupt, match="not a raftchan journal"):
        DurableJournal(str(path), snapshot_path=None)
    path.write_bytes(b"garbage")
    with pytest.raises(JournalCorrupt):
        DurableJournal(str(path), snapshot_path=None)
    path.write_bytes(journal_mod._HEADER_BYTES[:12] + b"\x00\x00\x00\x00")
    with pytest.raises(JournalCorrupt, match="checksum"):
        DurableJournal(str(path), snapshot_path=None)


def test_empty_or_partial_header_starts_empty(
    tmp_path: Path, opened: Callable[..., DurableJournal]
) -> None:
    for content in (b"", journal_mod._HEADER_BYTES[:5]):
        path = tmp_path / "j"
        path.write_bytes(content)
        j = opened(str(path))
        assert len(j) == 0
        assert path.read_bytes() == journal_mod._HEADER_BYTES


# --------------------------------------------------------------------------- deletions


def test_delete_entries_from_survives_reopen(
    jpath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath)
    fill(j, entries(1, 20))
    j.deleteEntriesFrom(15)
    assert list(j) == entries(1, 15)
    assert j.synced_length == os.path.getsize(jpath)
    j.deleteEntriesFrom(100)  # past the end: nothing
    j.deleteEntriesFrom(-5)  # like del l[-5:]
    assert list(j) == entries(1, 10)
    fill(j, entries(11, 12, term=2))  # a new leader's entries replace the dropped ones
    j._destroy()
    assert list(opened(jpath)) == entries(1, 10) + entries(11, 12, term=2)


def test_delete_entries_to_survives_reopen(
    jpath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath)
    fill(j, entries(1, 20))
    j.deleteEntriesTo(0)  # nothing to drop
    assert len(j) == 20
    j.deleteEntriesTo(12)
    assert list(j) == entries(13, 20)
    assert j[0][1] == 13
    assert j.wait_compacted(WAIT_TIMEOUT)
    assert (
        j.synced_length
        == os.path.getsize(jpath)
        == HEADER_SIZE + sum(RECORD_HEADER_SIZE + len(e[0]) for e in j)
    )
    assert not os.path.exists(jpath + ".compacting")
    j.add(*entry(21))
    j.deleteEntriesTo(-2)
    assert list(j) == entries(20, 21)
    j.add(*entry(22))
    j._destroy()
    assert list(opened(jpath)) == entries(20, 22)


def test_delete_entries_to_everything(jpath: str, opened: Callable[..., DurableJournal]):
    j = opened(jpath)
    fill(j, entries(1, 5))
    j.deleteEntriesTo(50)
    assert len(j) == 0
    j._destroy()
    assert len(opened(jpath)) == 0


def test_clear_survives_reopen(jpath: str, opened: Callable[..., DurableJournal]) -> None:
    j = opened(jpath)
    fill(j, entries(1, 20))
    j.clear()
    assert len(j) == 0
    assert os.path.getsize(jpath) == HEADER_SIZE
    # pysyncobj adds a snapshot's two entries right after clearing: any index may follow.
    fill(j, entries(500, 501, term=4))
    j._destroy()
    assert list(opened(jpath)) == entries(500, 501, term=4)


def test_delete_entries_to_persists_the_snapshot_before_replacing(
    jpath: str, spath: str, opened: Callable[..., DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_snapshot(spath, entry(11), entry(10), ["a"], b"")
    j = opened(jpath, snapshot_path=spath)
    fill(j, entries(1, 20))
    calls: list[str] = []
    real_fsync_dir, real_fsync, real_replace = (
        journal_mod.fsync_directory,
        os.fsync,
        os.replace,
    )
    fd_paths: dict[int, str] = {}  # descriptor numbers are reused: remember the latest
    real_open = os.open

    def spy_open(path: Any, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, *args, **kwargs)
        fd_paths[fd] = os.fspath(path)
        return fd

    def spy_fsync(fd: int) -> None:
        calls.append("fsync snapshot" if fd_paths.get(fd) == spath else "fsync")
        real_fsync(fd)

    def spy_fsync_dir(path: Any) -> None:
        calls.append("fsync dir")
        real_fsync_dir(path)

    def spy_replace(src: Any, dst: Any) -> None:
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(journal_mod, "fsync_directory", spy_fsync_dir)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "open", spy_open)
    j.deleteEntriesTo(9)
    assert j.wait_compacted(WAIT_TIMEOUT)
    # The snapshot's data and rename first, then the new journal's data, its rename, and
    # the directory again to make that rename durable.
    assert calls[0] == "fsync snapshot"
    first_replace = calls.index("replace")
    assert "fsync dir" in calls[:first_replace]
    assert calls[first_replace - 1] == "fsync"  # the new journal file itself
    assert calls[first_replace + 1] == "fsync dir"


def test_compaction_never_drops_entries_the_snapshot_on_disk_lacks(
    jpath: str, spath: str, opened: Callable[..., DurableJournal]
) -> None:
    # pysyncobj's order of events on a follower: it writes its own snapshot at index 42,
    # then installs the leader's older snapshot (anchor 37) over the file and reloads the
    # log from it, and only on the next tick asks to compact up to 42.
    write_snapshot(spath, entry(43), entry(42), ["a"], b"own")
    write_snapshot(spath, entry(38), entry(37), ["a"], b"from the leader")
    j = opened(jpath, snapshot_path=spath)
    fill(j, entries(37, 50))
    j.deleteEntriesTo(42 - 37)
    assert list(j) == entries(37, 50)  # 38..41 are in no snapshot: all kept
    fill(j, entries(51, 52))
    write_snapshot(spath, entry(46), entry(45), ["a"], b"own again")
    j.deleteEntriesTo(45 - 37)
    assert j[0] == entry(45)
    j._destroy()
    assert list(opened(jpath, snapshot_path=spath)) == entries(45, 52)


@pytest.mark.parametrize("anchor", [None, entry(60), entry(12, term=3)])
def test_compaction_without_a_matching_snapshot_on_disk_drops_nothing(
    jpath: str, spath: str, opened: Callable[..., DurableJournal], anchor: Entry | None
) -> None:
    if anchor is not None:
        write_snapshot(spath, (b"x", anchor[1] + 1, anchor[2]), anchor, ["a"], b"")
    j = opened(jpath, snapshot_path=spath)
    fill(j, entries(1, 40))
    j.deleteEntriesTo(20)
    assert list(j) == entries(1, 40)


# --------------------------------------------------------------------------- crash safety


def test_leftover_tmp_from_interrupted_compaction_is_ignored(
    jpath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath)
    fill(j, entries(1, 30))
    j.sync()
    # A crash while the new file was being written: a partial .tmp next to the intact journal.
    Path(jpath + ".tmp").write_bytes(journal_mod._HEADER_BYTES + b"\x07\x00")
    j2 = opened(jpath)
    assert list(j2) == entries(1, 30)
    assert not os.path.exists(jpath + ".tmp")


def test_crash_before_rename_keeps_the_whole_old_journal(
    jpath: str, spath: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = DurableJournal(jpath, snapshot_path=spath)
    fill(j, entries(1, 30))
    # pysyncobj renamed a snapshot anchored at entry 20, then we "crash" inside the trim
    # (run here in the test's thread instead of the journal's compaction thread).
    write_snapshot(spath, entry(21), entry(20), ["a"], b"")
    monkeypatch.setattr(j, "_start_compactor", lambda: None)
    j.deleteEntriesTo(19)

    def crash(*args: Any) -> None:
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        j._compact_file_once()
    monkeypatch.undo()
    assert os.path.exists(jpath + ".compacting")
    # The dead process never closed anything. The restart finds the whole old journal and
    # trims it to the snapshot's anchor itself.
    j2 = DurableJournal(jpath, snapshot_path=spath)
    try:
        assert list(j2) == entries(20, 30)
        assert not os.path.exists(jpath + ".compacting")
    finally:
        j2._destroy()
        os.close(j._fd)


def test_crash_after_rename_keeps_the_whole_new_journal(
    jpath: str, spath: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = DurableJournal(jpath, snapshot_path=spath)
    fill(j, entries(1, 30))
    write_snapshot(spath, entry(21), entry(20), ["a"], b"")
    real_replace = os.replace

    def replace_then_crash(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(j, "_start_compactor", lambda: None)
    j.deleteEntriesTo(19)
    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        j._compact_file_once()
    monkeypatch.undo()
    j2 = DurableJournal(jpath, snapshot_path=spath)
    try:
        assert list(j2) == entries(20, 30)
    finally:
        j2._destroy()
        os.close(j._fd)


# --------------------------------------------------------------------------- snapshot anchor


def test_reopen_starts_at_the_snapshot_anchor(
    jpath: str, spath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath, snapshot_path=spath)
    fill(j, entries(1, 40))
    j._destroy()
    # The snapshot was renamed into place but the journal was never trimmed.
    write_snapshot(spath, entry(26), entry(25), ["a", "b"], b"state")
    j2 = opened(jpath, snapshot_path=spath)
    assert list(j2) == entries(25, 40)
    # pysyncobj's condition for keeping the journal when it loads the snapshot:
    snap = read_snapshot(spath)
    assert j2[0] == snap.prev_entry and j2[1] == snap.last_entry
    j2._destroy()
    # The trim was written to disk, not only done in memory.
    assert list(opened(jpath)) == entries(25, 40)


def test_journal_already_at_the_anchor_is_not_rewritten(
    jpath: str, spath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath)
    fill(j, entries(25, 40))
    j._destroy()
    write_snapshot(spath, entry(26), entry(25), ["a"], b"")
    inode = os.stat(jpath).st_ino
    assert list(opened(jpath, snapshot_path=spath)) == entries(25, 40)
    assert os.stat(jpath).st_ino == inode


@pytest.mark.parametrize(
    "anchor",
    [
        entry(60),  # past the end of the journal
        entry(41),  # just past the end
        entry(25, term=2),  # same index, other term: the journal diverged
        (b"other", 25, 1),  # same index and term, other command
        entry(3),  # before the start of the journal
    ],
)
def test_unusable_anchor_leaves_the_journal_unchanged(
    jpath: str, spath: str, opened: Callable[..., DurableJournal], anchor: Entry
) -> None:
    j = opened(jpath)
    fill(j, entries(5, 40))
    j._destroy()
    before = Path(jpath).read_bytes()
    write_snapshot(spath, (b"x", anchor[1] + 1, anchor[2]), anchor, ["a"], b"")
    assert list(opened(jpath, snapshot_path=spath)) == entries(5, 40)
    assert Path(jpath).read_bytes() == before


def test_corrupt_snapshot_leaves_the_journal_unchanged(
    jpath: str, spath: str, opened: Callable[..., DurableJournal], caplog: pytest.LogCaptureFixture
) -> None:
    j = opened(jpath)
    fill(j, entries(1, 40))
    j._destroy()
    write_snapshot(spath, entry(26), entry(25), ["a"], b"state")
    data = bytearray(Path(spath).read_bytes())
    data[-1] ^= 1
    Path(spath).write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="raftchan.journal"):
        assert list(opened(jpath, snapshot_path=spath)) == entries(1, 40)
    assert any("cannot read snapshot" in r.getMessage() for r in caplog.records)


def test_missing_snapshot_or_empty_journal(
    jpath: str, spath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath, snapshot_path=spath)  # no snapshot yet
    fill(j, entries(1, 5))
    j._destroy()
    assert list(opened(jpath, snapshot_path=spath)) == entries(1, 5)
    write_snapshot(spath, entry(3), entry(2), ["a"], b"")
    os.unlink(jpath)
    assert len(opened(jpath, snapshot_path=spath)) == 0


# --------------------------------------------------------------------------- sync bookkeeping


def test_synced_length_is_recorded_and_emulates_power_loss(
    jpath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath, record_synced=True)
    assert read_synced_length(jpath) == HEADER_SIZE
    fill(j, entries(1, 5))
    j.sync()
    synced = j.synced_length
    assert synced == os.path.getsize(jpath)
    assert read_synced_length(jpath) == synced
    fill(j, entries(6, 9))  # written, never synced
    assert os.path.getsize(jpath) > synced
    assert j.synced_length == synced
    assert read_synced_length(jpath) == synced
    # "Power loss": the process dies and only the synced bytes reach the disk.
    os.close(j._fd)
    j._fd = -1
    j._closed = True
    os.truncate(jpath, read_synced_length(jpath) or 0)
    assert list(opened(jpath)) == entries(1, 5)


def test_synced_length_follows_deletions(jpath: str, opened: Callable[..., DurableJournal]):
    j = opened(jpath, record_synced=True)
    fill(j, entries(1, 10))
    j.deleteEntriesFrom(7)
    assert read_synced_length(jpath) == j.synced_length == os.path.getsize(jpath)
    j.deleteEntriesTo(3)
    assert read_synced_length(jpath) == j.synced_length == os.path.getsize(jpath)
    j.clear()
    assert read_synced_length(jpath) == HEADER_SIZE


def test_read_synced_length_without_a_record(jpath: str) -> None:
    assert read_synced_length(jpath) is None


def test_sync_is_cheap_when_clean(
    jpath: str, opened: Callable[..., DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    j = opened(jpath)
    calls: list[int] = []
    real = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    j.sync()
    assert calls == []
    j.add(*entry(1))
    j.add(*entry(2))
    j.flush()
    assert len(calls) == 1
    j.sync()
    assert len(calls) == 1


def test_fsync_false_never_fsyncs_and_records_nothing_as_synced(
    jpath: str, opened: Callable[..., DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync"))
    monkeypatch.setattr(journal_mod, "fsync_directory", lambda p: calls.append("dir"))
    j = opened(jpath, fsync=False, record_synced=True)
    fill(j, entries(1, 10))
    j.sync()
    # Nothing was fsynced, so an emulated power loss may take it all.
    assert j.synced_length == 0 == read_synced_length(jpath)
    assert len(j) == 10  # still readable: only the durability claim differs
    j.deleteEntriesFrom(8)
    j.deleteEntriesTo(2)
    j.setCurrentTerm(3, "n1")
    j.clear()
    assert calls == []
    monkeypatch.undo()
    j._destroy()
    assert len(opened(jpath)) == 0


# --------------------------------------------------------------------------- meta


def test_term_and_vote_are_durable_at_once(
    jpath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath)
    j.setCurrentTerm(7, "127.0.0.1:4001")
    # Read by a second instance while the first one is still open (as after a kill).
    j2 = opened(jpath)
    assert j2.getCurrentTerm() == 7
    assert j2.getVotedForNodeId() == "127.0.0.1:4001"
    j.setCurrentTerm(8, None)
    assert opened(jpath).getVotedForNodeId() is None
    assert opened(jpath).getCurrentTerm() == 8
    assert not os.path.exists(jpath + ".meta.tmp")


def test_commit_index_is_written_by_the_timer(
    jpath: str, opened: Callable[..., DurableJournal]
) -> None:
    j = opened(jpath)
    j.setRaftCommitIndex(42)
    assert j.getRaftCommitIndex() == 42
    assert opened(jpath).getRaftCommitIndex() == 1  # memory only so far
    j.onOneSecondTimer()
    assert opened(jpath).getRaftCommitIndex() == 42
    j.setRaftCommitIndex(43)
    j.setCurrentTerm(2, None)  # the term write carries the commit index along
    assert opened(jpath).getRaftCommitIndex() == 43
    j.setRaftCommitIndex(44)
    j._destroy()  # and so does closing
    assert opened(jpath).getRaftCommitIndex() == 44


def test_meta_validation(jpath: str, opened: Callable[..., DurableJournal]) -> None:
    j = opened(jpath)
    with pytest.raises(TypeError):
        j.setCurrentTerm(1, 5)  # type: ignore[arg-type]
    j._destroy()
    Path(jpath + ".meta").write_bytes(b"\xc1garbage")
    with pytest.raises(JournalCorrupt):
        DurableJournal(jpath, snapshot_path=None)
    Path(jpath + ".meta").write_bytes(msgpack.packb({"v": 1, "term": "x"}))
    with pytest.raises(JournalCorrupt):
        DurableJournal(jpath, snapshot_path=None)


# --------------------------------------------------------------------------- factory seam


def test_factory_hands_out_registered_journals_once(
    jpath: str, opened: Callable[..., DurableJournal], tmp_path: Path
) -> None:
    install_journal_factory()
    install_journal_factory()  # idempotent
    create = pysyncobj.syncobj.createJournal
    assert create is journal_mod._create_journal
    assert journal_mod._original_create_journal is pysyncobj.journal.createJournal

    j = opened(jpath)
    register_journal(jpath, j)
    assert create(jpath) is j
    # Used once: a second SyncObj on the same path must bring its own journal.
    with pytest.raises(RuntimeError, match="register_journal"):
        create(jpath)
    assert isinstance(create(None), pysyncobj.journal.MemoryJournal)
    register_journal(jpath, j)
    assert unregister_journal(jpath) is j
    assert unregister_journal(jpath) is None
    # Paths that are not raftchan journals still get pysyncobj's own journal.
    other = create(str(tmp_path / "plain.journal"))
    assert isinstance(other, pysyncobj.journal.FileJournal)
    other._destroy()


# --------------------------------------------------------------------------- real cluster


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class CountingJournal(DurableJournal):
    """Counts clear() calls: pysyncobj clears the journal when it rejects it on restart."""

    clears = 0

    def clear(self) -> None:
        self.clears += 1
        super().clear()


class Recorder(SyncObj):
    """A minimal replicated list of byte strings with msgpack snapshots."""

    def __init__(self, addr: str, others: list[str], base: Path) -> None:
        # Set before SyncObj.__init__: the tick thread may apply entries during it.
        self.items: list[bytes] = []
        self.journal_path = str(base / "journal")
        self.dump_path = str(base / "dump")
        self.journal = CountingJournal(self.journal_path, snapshot_path=self.dump_path)
        register_journal(self.journal_path, self.journal)
        conf = SyncObjConf(
            journalFile=self.journal_path,
            fullDumpFile=self.dump_path,
            serializer=self._write_dump,
            deserializer=self._read_dump,
            logCompactionMinEntries=50,
            bindAddress=addr,
            raftMinTimeout=0.3,
            raftMaxTimeout=0.6,
            appendEntriesPeriod=0.05,
            connectionRetryTime=0.5,
            autoTickPeriod=0.01,
        )
        super().__init__(addr, others, conf)
        self.addOnTickCallback(self.journal.sync)

    @replicated
    def append(self, data: bytes) -> int:
        self.items.append(data)
        return len(self.items)

    def _write_dump(self, filename: str, data: Any) -> None:
        last, prev, nodes = data
        write_snapshot(filename, last, prev, [n.id for n in nodes], msgpack.packb(self.items))
        self.dumps_written = getattr(self, "dumps_written", 0) + 1

    def _read_dump(self, filename: str) -> tuple[Entry, Entry, list[str]]:
        snap = read_snapshot(filename)
        self.items = list(msgpack.unpackb(snap.state))
        return snap.last_entry, snap.prev_entry, list(snap.node_ids)


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _start_cluster(addrs: list[str], tmp_path: Path) -> list[Recorder]:
    nodes = []
    for i, addr in enumerate(addrs):
        base = tmp_path / f"node{i}"
        base.mkdir(exist_ok=True)
        nodes.append(Recorder(addr, [a for a in addrs if a != addr], base))
    return nodes


def _leader(nodes: list[Recorder]) -> Recorder | None:
    leaders = [n for n in nodes if n._isLeader()]
    return leaders[0] if len(leaders) == 1 else None


def _stop(nodes: list[Recorder]) -> None:
    for n in nodes:
        n.destroy_synchronous()


@pytest.mark.timeout(60)
def test_real_cluster_keeps_every_command_across_a_full_restart(tmp_path: Path) -> None:
    install_journal_factory()
    addrs = [f"127.0.0.1:{p}" for p in _free_ports(3)]
    nodes = _start_cluster(addrs, tmp_path)
    try:
        _wait(lambda: _leader(nodes) is not None, 10, "a leader")
        leader = _leader(nodes)
        assert leader is not None

        acked: dict[int, bytes] = {}
        failed: list[int] = []
        lock = threading.Lock()
        done = threading.Event()
        total = 500

        def callback_for(i: int, data: bytes) -> Callable[[Any, int], None]:
            def callback(result: Any, err: int) -> None:
                with lock:
                    if err == FAIL_REASON.SUCCESS:
                        acked[i] = data
                    else:
                        failed.append(i)
                    if len(acked) + len(failed) == total:
                        done.set()

            return callback

        for i in range(total):
            data = b"command-%04d" % i
            leader.append(data, callback=callback_for(i, data))
            if i % 50 == 49:
                time.sleep(0.02)  # spread over several ticks so compaction runs in between
        assert done.wait(15), f"only {len(acked) + len(failed)} of {total} commands answered"
        assert failed == []
        expected = [acked[i] for i in range(total)]
        _wait(lambda: all(n.items == expected for n in nodes), 10, "all nodes to apply")
        assert all(getattr(n, "dumps_written", 0) > 0 for n in nodes), "no compaction ran"
        assert all(len(n.journal) < total for n in nodes), "the journals were never trimmed"
    finally:
        _stop(nodes)

    nodes = _start_cluster(addrs, tmp_path)
    try:
        _wait(lambda: _leader(nodes) is not None, 10, "a leader after the restart")
        _wait(lambda: all(len(n.items) >= total for n in nodes), 10, "nodes to reapply the log")
        for n in nodes:
            assert n.items == expected
            # pysyncobj kept the journal (it clears it when journal[0] is not the snapshot's
            # anchor): it starts at the anchor.
            assert n.journal.clears == 0
            assert n.journal[0] == read_snapshot(n.dump_path).prev_entry
        # The restarted cluster still takes new commands.
        result = nodes[0].append(b"after-restart", sync=True, timeout=10)
        assert result == total + 1
        _wait(lambda: all(n.items[-1:] == [b"after-restart"] for n in nodes), 10, "replication")
    finally:
        _stop(nodes)


def _held_compaction(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold the compaction thread in its first copy (outside the journal's lock) until the
    returned event is set."""
    release = threading.Event()
    real_copy = journal_mod._copy_range
    calls = []

    def held_copy(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 1:
            assert release.wait(WAIT_TIMEOUT)
        real_copy(*args)

    monkeypatch.setattr(journal_mod, "_copy_range", held_copy)
    return release


def _compacting_with_the_thread_held(
    jpath: str, spath: str, opened: Callable[..., DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> tuple[DurableJournal, threading.Event]:
    """A synced journal of entries 1-30 beside a snapshot anchored at 20, whose next
    compaction thread is held (see _held_compaction)."""
    write_snapshot(spath, entry(21), entry(20), ["a"], b"")
    j = opened(jpath, snapshot_path=spath)
    fill(j, entries(1, 30))
    j.sync()
    return j, _held_compaction(monkeypatch)


def test_compaction_rewrites_the_file_off_the_callers_thread_and_keeps_later_appends(
    jpath: str, spath: str, opened: Callable[..., DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    j, release = _compacting_with_the_thread_held(jpath, spath, opened, monkeypatch)
    size_before = os.path.getsize(jpath)
    j.deleteEntriesTo(19)  # returns while the file is still being rewritten
    assert list(j) == entries(20, 30)
    assert j.log_bytes == sum(RECORD_HEADER_SIZE + len(e[0]) for e in entries(20, 30))
    fill(j, entries(31, 40))  # appends and syncs go on meanwhile
    j.sync()
    assert os.path.getsize(jpath) > size_before
    fill(j, entries(41, 42))  # not synced yet when the new file is swapped in
    release.set()
    assert j.wait_compacted(WAIT_TIMEOUT)
    expected = entries(20, 42)
    assert os.path.getsize(jpath) == HEADER_SIZE + sum(
        RECORD_HEADER_SIZE + len(e[0]) for e in expected
    )
    assert j.synced_length == os.path.getsize(jpath)  # the swap synced 41 and 42 too
    j.deleteEntriesFrom(len(j) - 1)  # offsets into the new file are right
    j.add(*entry(42, term=2))  # and appends go to the new file
    j._destroy()
    assert list(opened(jpath, snapshot_path=spath)) == entries(20, 41) + [entry(42, term=2)]


def test_a_compaction_gives_up_quietly_when_the_journal_is_cleared_meanwhile(
    jpath: str,
    spath: str,
    opened: Callable[..., DurableJournal],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    j, release = _compacting_with_the_thread_held(jpath, spath, opened, monkeypatch)
    j.deleteEntriesTo(19)
    j.clear()  # a leader's snapshot installed: the file it was copying is freed
    fill(j, entries(500, 501, term=4))
    release.set()
    assert j.wait_compacted(WAIT_TIMEOUT)
    assert not os.path.exists(jpath + ".compacting")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    j._destroy()
    assert list(opened(jpath)) == entries(500, 501, term=4)


def test_a_compaction_that_cannot_rename_leaves_the_journal_working(
    jpath: str, spath: str, opened: Callable[..., DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    j, release = _compacting_with_the_thread_held(jpath, spath, opened, monkeypatch)
    release.set()

    def refuse(src: str, dst: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal_mod.retired_files, "replace", refuse)
    j.deleteEntriesTo(19)
    assert j.wait_compacted(WAIT_TIMEOUT)
    monkeypatch.undo()
    fill(j, entries(31, 32))  # into the old file, still the journal's
    j.sync()
    j._destroy()
    assert list(opened(jpath, snapshot_path=spath)) == entries(20, 32)


def test_a_compaction_gives_up_when_entries_are_cut_meanwhile(
    jpath: str, spath: str, opened: Callable[..., DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    j, release = _compacting_with_the_thread_held(jpath, spath, opened, monkeypatch)
    j.deleteEntriesTo(19)
    j.deleteEntriesFrom(5)  # a new leader's log conflicts from entry 25 on
    fill(j, entries(25, 26, term=2))
    release.set()
    assert j.wait_compacted(WAIT_TIMEOUT)
    assert not os.path.exists(jpath + ".compacting")
    j._destroy()
    # The old file stayed whole (with the prefix the snapshot covers, dropped on open).
    assert list(opened(jpath, snapshot_path=spath)) == entries(20, 24) + entries(25, 26, term=2)
