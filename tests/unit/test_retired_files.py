"""Replaced files are kept under a retired name and freed a step at a time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raftchan import retired_files
from raftchan.retired_files import (
    RETIRED_MARK,
    remove_gradually,
    remove_leftovers,
    replace,
    shrink_and_remove,
    wait_idle,
)

#: Bounds each wait for the background removal.
WAIT_S = 10.0


def retired_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if RETIRED_MARK in p.name)


def test_the_replaced_file_is_kept_until_its_removal_is_asked_for(tmp_path: Path) -> None:
    dst, src = tmp_path / "raft.snapshot", tmp_path / "raft.snapshot.tmp"
    dst.write_bytes(b"old" * 1000)
    src.write_bytes(b"new")
    retired = replace(str(src), str(dst))
    assert dst.read_bytes() == b"new"
    assert not src.exists()
    assert retired is not None
    # A transfer still reading the old snapshot reads it whole until then.
    assert Path(retired).read_bytes() == b"old" * 1000
    remove_gradually(retired)
    assert wait_idle(WAIT_S)
    assert retired_in(tmp_path) == []


def test_nothing_is_kept_when_there_was_no_file(tmp_path: Path) -> None:
    src = tmp_path / "new"
    src.write_bytes(b"new")
    assert replace(str(src), str(tmp_path / "raft.journal")) is None
    assert (tmp_path / "raft.journal").read_bytes() == b"new"
    remove_gradually(None)  # ignored
    assert wait_idle(WAIT_S)


def test_without_hard_links_the_old_file_goes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError("this file system has no hard links")

    monkeypatch.setattr(retired_files.os, "link", no_links)
    (tmp_path / "dst").write_bytes(b"old")
    (tmp_path / "src").write_bytes(b"new")
    assert replace(str(tmp_path / "src"), str(tmp_path / "dst")) is None
    assert (tmp_path / "dst").read_bytes() == b"new"
    assert retired_in(tmp_path) == []


def test_a_file_is_shrunk_a_step_at_a_time_then_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big"
    path.write_bytes(os.urandom(10_000))
    sizes: list[int] = []
    real_truncate = os.ftruncate

    def recording_truncate(fd: int, length: int) -> None:
        sizes.append(length)
        real_truncate(fd, length)

    monkeypatch.setattr(retired_files.os, "ftruncate", recording_truncate)
    shrink_and_remove(str(path), step=4096, pause=0)
    assert sizes == [5904, 1808, 0]
    assert not path.exists()
    shrink_and_remove(str(path), step=4096, pause=0)  # gone already: no error


def test_leftovers_of_a_crash_are_removed_and_nothing_else(tmp_path: Path) -> None:
    snapshot = tmp_path / "raft.snapshot"
    snapshot.write_bytes(b"current")
    for name in (f"raft.snapshot{RETIRED_MARK}17-3", f"raft.snapshot{RETIRED_MARK}17-4"):
        (tmp_path / name).write_bytes(b"old" * 1000)
    (tmp_path / f"raft.journal{RETIRED_MARK}17-5").write_bytes(b"old journal")
    assert remove_leftovers(str(snapshot)) == 2
    assert wait_idle(WAIT_S)
    assert retired_in(tmp_path) == [f"raft.journal{RETIRED_MARK}17-5"]
    assert snapshot.read_bytes() == b"current"
    assert remove_leftovers(str(tmp_path / "missing-dir" / "raft.snapshot")) == 0


def test_a_retired_name_on_the_live_file_only_loses_that_name(tmp_path: Path) -> None:
    # A crash between replace()'s link and its rename leaves the retired name on the
    # live file: at the next start it must not be emptied.
    journal = tmp_path / "raft.journal"
    journal.write_bytes(b"acknowledged entries" * 1000)
    os.link(journal, tmp_path / f"raft.journal{RETIRED_MARK}17-1")
    assert remove_leftovers(str(journal)) == 1
    assert wait_idle(WAIT_S)
    assert retired_in(tmp_path) == []
    assert journal.read_bytes() == b"acknowledged entries" * 1000


def test_a_failed_rename_leaves_no_retired_name(tmp_path: Path) -> None:
    (tmp_path / "dst").write_bytes(b"live")
    with pytest.raises(FileNotFoundError):
        replace(str(tmp_path / "no-such-src"), str(tmp_path / "dst"))
    assert (tmp_path / "dst").read_bytes() == b"live"
    assert retired_in(tmp_path) == []
