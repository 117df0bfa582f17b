"""A large state is not rewritten for a handful of small appends (raftchan.compaction).

Every snapshot writes the whole state. pysyncobj takes one whenever the log holds more
than ``--compaction-min-entries`` entries, so a node with much retained data wrote all
of it again for every few small appends. Real nodes here: after a state of a few MB,
many small appends (far more entries than the minimum) leave the snapshot alone, and
once the log holds half the state's size, the followers write a new snapshot (the
leader once it holds the whole state's size: raftchan.snapshot_turns). With
``--compaction-growth 0`` the small appends are enough, as before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import raftchan
from cluster.fixtures import started_cluster
from cluster.harness import COMPACTION_BY_ENTRIES_ALONE, LocalCluster
from raftchan.compaction import DEFAULT_GROWTH
from raftchan.retired_files import RETIRED_MARK
from raftchan.snapshot_turns import UNCOORDINATED_FACTOR

#: Bounds each wait for the cluster to reach an awaited state.
WAIT_TIMEOUT = 60.0
#: A snapshot is due, by entries, after this many; the tests append far more.
MIN_ENTRIES = 5
#: The state: items of ITEM_BYTES until a snapshot holds at least MIN_STATE_BYTES (a few
#: snapshots on the way, each half as large again as the one before).
ITEM_BYTES = 64 * 1024
MIN_STATE_BYTES = 2 * 1024 * 1024
MAX_BIG_ITEMS = 200
#: The by-bytes cluster's log size that makes a snapshot due.
BYTES_TRIGGER = 1024 * 1024
#: Far more log than the small appends add (a few KB in all).
HEADROOM_BYTES = 4 * ITEM_BYTES
#: How long the loaded nodes are given to finish (or start and finish) their snapshots.
SETTLE_S = 2.0
#: Small appends, one log entry each: 8x the entry trigger, a few KB in all.
SMALL_APPENDS = 8 * MIN_ENTRIES
#: How long the nodes are given to start a snapshot they should not start: many ticks,
#: and more than writing the whole state takes.
QUIET_S = 1.5


def _cluster(request: pytest.FixtureRequest, path: Path, *args: str) -> Any:
    return started_cluster(
        request, path, extra_args=["--compaction-min-entries", str(MIN_ENTRIES), *args]
    )


@pytest.fixture(name="gated")
def gated_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """Three nodes with frequent compactions by entries and the default growth."""
    with _cluster(request, tmp_path / "cluster") as local:
        yield local


@pytest.fixture(name="ungated")
def ungated_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """The same with ``--compaction-growth 0``: compactions by entries alone."""
    with _cluster(request, tmp_path / "cluster", *COMPACTION_BY_ENTRIES_ALONE) as local:
        yield local


@pytest.fixture(name="by_bytes")
def by_bytes_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """Compactions by entries only after very many, and by bytes after BYTES_TRIGGER."""
    args = ["--compaction-min-entries", "100000", "--compaction-min-bytes", str(BYTES_TRIGGER)]
    with started_cluster(request, tmp_path / "cluster", extra_args=args) as local:
        yield local


def _wait_for(local: LocalCluster, what: str, probe: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {local.status()}"
        time.sleep(0.05)


def _gate_bytes(status: dict[str, Any], growth: float) -> float:
    """The log size from which ``status``'s node is due for a snapshot: a follower at
    ``growth`` times its snapshot's size, the leader at twice that (see
    raftchan.snapshot_turns)."""
    factor = UNCOORDINATED_FACTOR if status["role"] == "leader" else 1.0
    return growth * status["snapshot_bytes"] * factor


def _settled(status: dict[str, Any], growth: float) -> bool:
    """Whether ``status``'s node writes no snapshot, is not about to, and stays clear of
    its gate for HEADROOM_BYTES more of log. The leader may want one: it waits for twice
    the gate anyway."""
    if status["snapshot_wish"] == "writing":
        return False
    if status["role"] != "leader" and status["snapshot_wish"] != "idle":
        return False
    return not growth or status["log_bytes"] + HEADROOM_BYTES <= _gate_bytes(status, growth)


def _load_big_state(local: LocalCluster, growth: float) -> list[int]:
    """Append large items, one entry each, until every node holds a snapshot of at least
    MIN_STATE_BYTES and, appends paused, settles (above) within SETTLE_S; returns each
    node's snapshot size. What the test appends next then decides alone whether a gate
    opens."""
    with raftchan.Client(local.addresses, timeout=WAIT_TIMEOUT) as client:
        chan = client.channel("big")
        for _ in range(MAX_BIG_ITEMS):
            if min(s["snapshot_bytes"] for s in local.status()) >= MIN_STATE_BYTES:
                deadline = time.monotonic() + SETTLE_S
                while time.monotonic() < deadline:
                    statuses = local.status()
                    if all(_settled(s, growth) for s in statuses):
                        return [s["snapshot_bytes"] for s in statuses]
                    time.sleep(0.05)
            chan.append(os.urandom(ITEM_BYTES))
            chan.flush()
    raise AssertionError(
        f"no snapshot of {MIN_STATE_BYTES} bytes after {MAX_BIG_ITEMS} items: {local.status()}"
    )


def _append_small(local: LocalCluster, count: int) -> None:
    with raftchan.Client(local.addresses, timeout=WAIT_TIMEOUT) as client:
        chan = client.channel("small")
        for i in range(count):
            chan.append(i)
            chan.flush()  # one log entry each
        position = client.status()[0]["position"]
    _wait_for(
        local,
        "every node to apply the small appends",
        lambda: all(s["position"] >= position for s in local.status()),
    )


def test_small_appends_leave_a_large_snapshot_alone(gated: LocalCluster) -> None:
    before = _load_big_state(gated, DEFAULT_GROWTH)
    _append_small(gated, SMALL_APPENDS)
    time.sleep(QUIET_S)
    statuses = gated.status()
    assert [s["snapshot_bytes"] for s in statuses] == before
    # The log kept the small appends, more entries than pysyncobj's own trigger.
    assert all(s["log_entries"] > SMALL_APPENDS for s in statuses), statuses
    assert all(s["log_bytes"] < _gate_bytes(s, DEFAULT_GROWTH) for s in statuses), statuses

    # The state's size appended opens every gate (the followers' at half of it, the
    # leader's at all of it): every node writes a new snapshot.
    _append_big(gated, max(before))
    _wait_for(
        gated,
        "a new snapshot on every node",
        lambda: all(
            s["snapshot_bytes"] > size for s, size in zip(gated.status(), before, strict=True)
        ),
    )


def _append_big(local: LocalCluster, total_bytes: int) -> None:
    """Append at least ``total_bytes`` in items of ITEM_BYTES, one entry each."""
    with raftchan.Client(local.addresses, timeout=WAIT_TIMEOUT) as client:
        chan = client.channel("big")
        for _ in range(total_bytes // ITEM_BYTES + 2):
            chan.append(os.urandom(ITEM_BYTES))
            chan.flush()


def test_without_growth_small_appends_rewrite_the_snapshot(ungated: LocalCluster) -> None:
    before = _load_big_state(ungated, 0.0)
    _append_small(ungated, SMALL_APPENDS)
    _wait_for(
        ungated,
        "a new snapshot on every node",
        lambda: all(
            s["snapshot_bytes"] != size for s, size in zip(ungated.status(), before, strict=True)
        ),
    )
    # Each snapshot and journal replaced on the way was freed in the background: no
    # retired copy is left (see raftchan.retired_files), and every node freed some.
    _wait_for(
        ungated,
        "the replaced snapshots and journals to be freed",
        lambda: (
            not any(
                RETIRED_MARK in path.name
                for node in ungated.nodes
                for path in node.spec.data_dir.iterdir()
            )
        ),
    )
    freed = [s["retired_files_removed"] for s in ungated.status()]
    assert min(freed) > 0, freed


def test_a_few_large_entries_are_compacted_by_their_bytes(by_bytes: LocalCluster) -> None:
    # pysyncobj counted entries only: a log of large batches was never trimmed (in the
    # benchmark, 4,000 entries held 493 MB).
    # The leader's trigger is twice the followers' (raftchan.snapshot_turns).
    entries = int(UNCOORDINATED_FACTOR * BYTES_TRIGGER) // ITEM_BYTES + 2
    with raftchan.Client(by_bytes.addresses, timeout=WAIT_TIMEOUT) as client:
        chan = client.channel("big")
        for _ in range(entries):
            chan.append(os.urandom(ITEM_BYTES))
            chan.flush()

    def snapshotted() -> list[dict[str, Any]] | None:
        statuses = by_bytes.status()
        return statuses if all(s["snapshot_bytes"] > 0 for s in statuses) else None

    statuses = _wait_for(by_bytes, "a snapshot on every node", snapshotted)
    assert all(s["log_entries"] < entries for s in statuses), statuses
