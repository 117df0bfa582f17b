"""Snapshots written on a thread of their own, as pysyncobj's serializer is asked for them."""

from __future__ import annotations

import threading
from pathlib import Path

from pysyncobj.serializer import SERIALIZER_STATE

from raftchan.retired_files import RETIRED_MARK, wait_idle
from raftchan.snapshot import write_snapshot
from raftchan.snapshot_writer import BackgroundSnapshots, WriteSnapshot

#: Bounds each wait for the writer's thread.
WAIT_TIMEOUT = 10.0


def _snapshot_file(tmp_path: Path, state: bytes) -> bytes:
    """The bytes of a real snapshot file holding ``state`` (transfers read its head)."""
    scratch = tmp_path / "scratch.snapshot"
    write_snapshot(scratch, (b"", 2, 1), (b"", 1, 1), ["a"], state)
    data = scratch.read_bytes()
    scratch.unlink()
    return data


class _GatedWrite:
    """A capture whose write blocks until the test opens the gate."""

    def __init__(self, content: bytes, error: Exception | None = None) -> None:
        self.content = content
        self.error = error
        self.gate = threading.Event()
        self.captured: list[object] = []

    def capture(self, data: object) -> WriteSnapshot:
        self.captured.append(data)

        def write(path: str) -> None:
            Path(path).write_bytes(self.content[:1])  # a partial file while it waits
            assert self.gate.wait(WAIT_TIMEOUT)
            if self.error is not None:
                raise self.error
            Path(path).write_bytes(self.content)

        return write


def _snapshots(path: Path, write: _GatedWrite, written: list[float]) -> BackgroundSnapshots:
    return BackgroundSnapshots(str(path), 65536, write.capture, lambda name: None, written.append)


def test_a_snapshot_is_written_in_the_background_and_reported_once_done(tmp_path: Path) -> None:
    path = tmp_path / "raft.snapshot"
    path.write_bytes(b"old")
    write = _GatedWrite(b"new snapshot")
    written: list[float] = []
    snapshots = _snapshots(path, write, written)
    assert snapshots.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None)

    snapshots.serialize((None, ("last",), ("prev",), {"n1"}), 41)  # returns while it writes
    assert write.captured == [(("last",), ("prev",), {"n1"})]
    assert snapshots.checkSerializing() == (SERIALIZER_STATE.SERIALIZING, 41)
    assert path.read_bytes() == b"old"  # the old one stays in place until the new is whole
    snapshots.serialize((None, ("later",), ("prev",), set()), 42)  # ignored meanwhile
    assert len(write.captured) == 1

    write.gate.set()
    assert snapshots.wait(WAIT_TIMEOUT)
    assert path.read_bytes() == b"new snapshot"
    assert snapshots.checkSerializing() == (SERIALIZER_STATE.SUCCESS, 41)
    assert len(written) == 1
    assert snapshots.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None)


def test_a_failed_write_is_reported_and_leaves_the_old_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "raft.snapshot"
    old = _snapshot_file(tmp_path, b"old")
    path.write_bytes(old)
    write = _GatedWrite(b"new", error=OSError(28, "No space left on device"))
    written: list[float] = []
    failures: list[None] = []
    snapshots = BackgroundSnapshots(
        str(path),
        65536,
        write.capture,
        lambda name: None,
        written.append,
        on_failed=lambda: failures.append(None),
    )
    # A transfer of the old snapshot goes on: the failed write replaced nothing.
    assert snapshots.getTransmissionData("follower") == (old, True, False)
    snapshots.serialize((None, ("last",), ("prev",), set()), 7)
    write.gate.set()
    assert snapshots.wait(WAIT_TIMEOUT)
    assert failures == []  # told when pysyncobj learns of it, in its thread
    assert snapshots.checkSerializing() == (SERIALIZER_STATE.FAILED, 7)
    assert path.read_bytes() == old
    assert written == []
    assert snapshots.getTransmissionData("follower") == (b"", False, True)
    assert failures == [None]


def test_wait_gives_up_after_its_timeout_while_a_write_goes_on(tmp_path: Path) -> None:
    write = _GatedWrite(b"new")
    snapshots = _snapshots(tmp_path / "raft.snapshot", write, [])
    snapshots.serialize((None, ("last",), ("prev",), set()), 3)
    assert not snapshots.wait(0.05)
    write.gate.set()
    assert snapshots.wait(WAIT_TIMEOUT)


def test_a_capture_that_fails_starts_no_write_and_raises_nothing(tmp_path: Path) -> None:
    # pysyncobj calls serialize in its only thread: an exception there would end it.
    def capture(data: object) -> WriteSnapshot:
        raise MemoryError

    failures: list[None] = []
    snapshots = BackgroundSnapshots(
        str(tmp_path / "raft.snapshot"),
        65536,
        capture,
        print,
        on_failed=lambda: failures.append(None),
    )
    snapshots.serialize((None, ("last",), ("prev",), set()), 9)
    assert snapshots.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None)
    assert not (tmp_path / "raft.snapshot").exists()
    assert failures == [None]  # the compaction policy then backs off


def test_the_new_snapshot_is_verified_on_the_writers_thread(tmp_path: Path) -> None:
    path = tmp_path / "raft.snapshot"
    seen: list[tuple[str, bytes, str]] = []

    def verify(name: str) -> None:
        seen.append((name, Path(name).read_bytes(), threading.current_thread().name))

    write = _GatedWrite(b"new snapshot")
    write.gate.set()
    snapshots = BackgroundSnapshots(str(path), 65536, write.capture, print, verify=verify)
    snapshots.serialize((None, ("last",), ("prev",), set()), 5)
    assert snapshots.wait(WAIT_TIMEOUT)
    assert snapshots.checkSerializing() == (SERIALIZER_STATE.SUCCESS, 5)
    # Called once the file was in place, and not in the thread that asked for it.
    assert seen == [(str(path), b"new snapshot", "raftchan-snapshot-5")]


def test_a_snapshot_that_fails_verification_is_reported_as_a_failed_write(
    tmp_path: Path,
) -> None:
    def verify(name: str) -> None:
        raise ValueError("damaged")

    write = _GatedWrite(b"new snapshot")
    write.gate.set()
    written: list[float] = []
    snapshots = BackgroundSnapshots(
        str(tmp_path / "raft.snapshot"), 65536, write.capture, print, written.append, verify
    )
    snapshots.serialize((None, ("last",), ("prev",), set()), 6)
    assert snapshots.wait(WAIT_TIMEOUT)
    # pysyncobj then keeps its whole log: nothing is trimmed against this file.
    assert snapshots.checkSerializing() == (SERIALIZER_STATE.FAILED, 6)
    assert written == []


def test_the_replaced_snapshot_is_freed_only_once_its_transfers_start_over(
    tmp_path: Path,
) -> None:
    path = tmp_path / "raft.snapshot"
    old = _snapshot_file(tmp_path, b"o" * 200_000)
    path.write_bytes(old)
    new = _snapshot_file(tmp_path, b"new snapshot")
    write = _GatedWrite(new)
    snapshots = _snapshots(path, write, [])
    chunk = snapshots.getTransmissionData("follower")  # a transfer of the old one begins
    assert chunk == (old[:65536], True, False)

    snapshots.serialize((None, ("last",), ("prev",), set()), 7)
    write.gate.set()
    assert snapshots.wait(WAIT_TIMEOUT)
    # Replaced, but kept whole while the transfer may still read it.
    assert path.read_bytes() == new
    assert snapshots.getTransmissionData("follower") == (old[65536:131072], False, False)
    assert [p.name for p in tmp_path.iterdir() if RETIRED_MARK in p.name]

    assert snapshots.checkSerializing() == (SERIALIZER_STATE.SUCCESS, 7)
    # The transfer starts over from the new file, and the old one is freed.
    assert snapshots.getTransmissionData("follower") == (new, True, False)
    assert wait_idle(WAIT_TIMEOUT)
    assert not [p.name for p in tmp_path.iterdir() if RETIRED_MARK in p.name]
