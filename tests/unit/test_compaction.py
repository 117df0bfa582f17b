"""The compaction policy: when a log is due for a snapshot, by entries, bytes and time."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from raftchan.compaction import RETRY_FIRST_S, RETRY_MAX_S, CompactionPolicy


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(path: Path, clock: FakeClock | None = None, **overrides: float) -> CompactionPolicy:
    settings: dict[str, float] = {
        "min_entries": 10,
        "min_time": 300.0,
        "growth": 0.5,
        "min_bytes": 1_000_000,
    }
    settings.update(overrides)
    return CompactionPolicy(str(path), clock=clock or FakeClock(), **settings)  # type: ignore[arg-type]


def snapshot_of(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "raft.snapshot"
    path.write_bytes(b"s" * size)
    return path


def test_without_a_snapshot_the_entry_count_decides(tmp_path: Path) -> None:
    compaction = policy(tmp_path / "raft.snapshot")
    assert compaction.snapshot_bytes == 0
    assert not compaction.due(entries=10, log_bytes=500)
    assert compaction.due(entries=11, log_bytes=500)


@pytest.mark.parametrize(
    ("snapshot_bytes", "entries", "least_log_bytes"),
    [
        # Many entries wait for their share of the snapshot.
        (1000, 5000, 500),
        # A few large entries are due by their bytes,
        (1000, 3, 1_000_000),
        # and those too wait for the share.
        (4_000_000, 3, 2_000_000),
    ],
)
def test_the_log_is_due_from_its_least_size_on(
    tmp_path: Path, snapshot_bytes: int, entries: int, least_log_bytes: int
) -> None:
    compaction = policy(snapshot_of(tmp_path, snapshot_bytes))
    assert not compaction.due(entries=entries, log_bytes=least_log_bytes - 1)
    assert compaction.due(entries=entries, log_bytes=least_log_bytes)


def test_time_since_the_last_snapshot_counts_from_its_change(tmp_path: Path) -> None:
    clock = FakeClock()
    compaction = policy(snapshot_of(tmp_path, 1000), clock)
    clock.now += 299
    compaction.snapshot_changed()
    clock.now += 299.9
    assert not compaction.due(entries=1, log_bytes=600)
    clock.now += 0.1
    assert compaction.due(entries=1, log_bytes=600)
    # Whatever the log holds: the state may have shrunk far below the snapshot (deleted
    # channels, trimmed items), and a trickle of entries must not pile up for ever.
    assert compaction.due(entries=1, log_bytes=1)


def test_the_size_is_read_again_only_once_the_snapshot_changed(tmp_path: Path) -> None:
    path = snapshot_of(tmp_path, 1000)
    compaction = policy(path)
    assert not compaction.due(entries=100, log_bytes=499)
    path.write_bytes(b"s" * 100)
    # Cached: pysyncobj's thread asks on every tick, and the file is stat'ed again only
    # when the replica says it was replaced.
    assert not compaction.due(entries=100, log_bytes=499)
    compaction.snapshot_changed()
    assert compaction.snapshot_bytes == 100
    assert compaction.due(entries=100, log_bytes=50)


def test_growth_zero_leaves_entries_and_time(tmp_path: Path) -> None:
    compaction = policy(snapshot_of(tmp_path, 10_000), growth=0)
    assert compaction.due(entries=11, log_bytes=0)
    assert not compaction.due(entries=10, log_bytes=0)


@pytest.mark.parametrize("name", ["min_entries", "min_time", "growth", "min_bytes"])
@pytest.mark.parametrize("value", [-1, math.nan, math.inf])
def test_a_setting_below_zero_is_refused(tmp_path: Path, name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        policy(tmp_path / "raft.snapshot", **{name: value})


def test_a_failed_snapshot_backs_off_doubling_until_one_is_written(tmp_path: Path) -> None:
    clock = FakeClock()
    compaction = policy(snapshot_of(tmp_path, 1000), clock)
    assert compaction.due(entries=100, log_bytes=600)
    # A full disk: every tick would write the whole state again.
    delays = []
    for _ in range(9):
        compaction.snapshot_failed()
        start = clock.now
        while not compaction.due(entries=100, log_bytes=600):
            clock.now += 0.25
        delays.append(clock.now - start)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, RETRY_MAX_S, RETRY_MAX_S, RETRY_MAX_S]
    assert delays[0] == RETRY_FIRST_S
    # A snapshot written ends the back-off (and the next failure waits the first delay).
    compaction.snapshot_changed()
    clock.now += compaction.min_time
    assert compaction.due(entries=100, log_bytes=600)
    compaction.snapshot_failed()
    assert not compaction.due(entries=100, log_bytes=600)
    clock.now += RETRY_FIRST_S
    assert compaction.due(entries=100, log_bytes=600)


def test_a_factor_scales_every_threshold(tmp_path: Path) -> None:
    # The leader's rule (raftchan.snapshot_turns): twice each threshold.
    clock = FakeClock()
    compaction = policy(snapshot_of(tmp_path, 4_000_000), clock)
    # Twice the share of the snapshot (and twice min_bytes),
    assert compaction.due(entries=3, log_bytes=2_000_000)
    assert not compaction.due(entries=3, log_bytes=3_999_999, factor=2)
    assert compaction.due(entries=3, log_bytes=4_000_000, factor=2)
    # twice the entries,
    (tmp_path / "small").mkdir()
    small = policy(snapshot_of(tmp_path / "small", 10), clock)
    assert small.due(entries=11, log_bytes=100)
    assert not small.due(entries=20, log_bytes=100, factor=2)
    assert small.due(entries=21, log_bytes=100, factor=2)
    # and twice the time.
    clock.now += 300
    assert small.due(entries=0, log_bytes=0)
    assert not small.due(entries=0, log_bytes=0, factor=2)
    clock.now += 300
    assert small.due(entries=0, log_bytes=0, factor=2)


def test_by_time_false_leaves_the_time_rule_out(tmp_path: Path) -> None:
    clock = FakeClock()
    compaction = policy(snapshot_of(tmp_path, 1000), clock)
    clock.now += 300
    assert compaction.due(entries=0, log_bytes=0)
    assert not compaction.due(entries=0, log_bytes=0, by_time=False)
    assert compaction.due(entries=11, log_bytes=500, by_time=False)
