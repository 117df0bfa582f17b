"""A large state is not rewritten for a handful of small appends (raftchan.compaction).

Every snapshot writes the whole state. pysyncobj takes one whenever the log holds more
than ``--compaction-min-entries`` entries, so a node with much retained data wrote all
of it again for every few small appends. Real nodes here: after a state of a few MB,
many small appends (far more entries than the minimum) leave the snapshot alone, and
once the log holds half the state's size, a new snapshot is written. With
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
from raftchan.retired_files import RETIRED_MARK

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
#: How long the other nodes are given to compact once one did.
WAVE_S = 2.0
#: A log just trimmed by a snapshot: the snapshot's last two entries (the journal starts
#: at them) and one or two appended meanwhile.
TRIMMED_LOG_BYTES = 5 * ITEM_BYTES
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


def _load_big_state(local: LocalCluster) -> list[int]:
    """Append large items, one entry each, until every node holds a snapshot of at least
    MIN_STATE_BYTES just written, its log trimmed to the last item or two; returns each
    node's snapshot size. Ending on a compaction leaves the log far from the gate, so
    that what the test appends next decides alone whether it opens."""
    with raftchan.Client(local.addresses, timeout=WAIT_TIMEOUT) as client:
        chan = client.channel("big")
        for _ in range(MAX_BIG_ITEMS):
            statuses = local.status()
            sizes = [s["snapshot_bytes"] for s in statuses]
            if min(sizes) >= MIN_STATE_BYTES and all(
                s["log_bytes"] <= TRIMMED_LOG_BYTES for s in statuses
            ):
                return sizes
            chan.append(os.urandom(ITEM_BYTES))
            chan.flush()
            changed = zip(local.status(), sizes, strict=True)
            if any(s["snapshot_bytes"] != size for s, size in changed):
                # A compaction started somewhere: give the others a moment to follow.
                deadline = time.monotonic() + WAVE_S
                while time.monotonic() < deadline and not all(
                    s["log_bytes"] <= TRIMMED_LOG_BYTES for s in local.status()
                ):
                    time.sleep(0.05)
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
    before = _load_big_state(gated)
    _append_small(gated, SMALL_APPENDS)
    time.sleep(QUIET_S)
    statuses = gated.status()
    assert [s["snapshot_bytes"] for s in statuses] == before
    # The log kept the small appends, more entries than pysyncobj's own trigger.
    assert all(s["log_entries"] > SMALL_APPENDS for s in statuses), statuses
    assert all(s["log_bytes"] < min(before) // 2 for s in statuses), statuses

    # Half the state's size appended opens the gate: every node writes a new snapshot.
    with raftchan.Client(gated.addresses, timeout=WAIT_TIMEOUT) as client:
        chan = client.channel("big")
        for _ in range(min(before) // 2 // ITEM_BYTES + 2):
            chan.append(os.urandom(ITEM_BYTES))
            chan.flush()
    _wait_for(
        gated,
        "a new snapshot on every node",
        lambda: all(
            s["snapshot_bytes"] > size for s, size in zip(gated.status(), before, strict=True)
        ),
    )


def test_without_growth_small_appends_rewrite_the_snapshot(ungated: LocalCluster) -> None:
    before = _load_big_state(ungated)
    _append_small(ungated, SMALL_APPENDS)
    _wait_for(
        ungated,
        "a new snapshot on every node",
        lambda: all(
            s["snapshot_bytes"] != size for s, size in zip(ungated.status(), before, strict=True)
        ),
    )
    # Each snapshot and journal replaced on the way was freed in the background: no
    # retired copy is left (see raftchan.retired_files).
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


def test_a_few_large_entries_are_compacted_by_their_bytes(by_bytes: LocalCluster) -> None:
    # pysyncobj counted entries only: a log of large batches was never trimmed (in the
    # benchmark, 4,000 entries held 493 MB).
    entries = BYTES_TRIGGER // ITEM_BYTES + 2
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
