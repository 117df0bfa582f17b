"""Nodes write their snapshots in turn (raftchan.snapshot_turns), on real nodes.

Every node reaches the compaction threshold at the same entry; writing all at once, they
stalled every commit that needed one of them. Here, with a snapshot due every few
entries, the followers' writes never overlap, and the leader writes fewer than either
follower (it waits for twice the threshold).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import raftchan
from cluster.fixtures import started_cluster
from cluster.harness import COMPACTION_BY_ENTRIES_ALONE, FAST_TUNING, LocalCluster

#: Bounds each client call.
TIMEOUT = 60.0
#: A snapshot is due on a follower after this many entries; the test appends many more.
MIN_ENTRIES = 10
APPENDS = 160
#: Large enough that each write takes a while (the state grows to about 10 MB): tens of
#: milliseconds here.
ITEM_BYTES = 64 * 1024
#: The pause between appends: a snapshot falls due on a follower every MIN_ENTRIES
#: appends, far apart enough for both to write theirs in turn. A follower that waits for
#: its turn until its log is twice as large writes it anyway (raftchan.snapshot_turns).
PAUSE_S = 0.02
#: Election timeouts far above any stall a snapshot write causes here, so that one leader
#: leads throughout: which node wrote as leader is then known.
CALM_TUNING = dataclasses.replace(
    FAST_TUNING, min_timeout=2.0, max_timeout=4.0, leader_fallback_timeout=8.0
)
#: How a node logs a snapshot it wrote in its turn (raftchan.replica): its end and its
#: duration. A follower that waited for a turn until its log was twice as large writes
#: "(no turn)": that is allowed to overlap (a busy host makes it happen).
WRITTEN_IN_TURN = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*snapshot written in (\d+\.\d+) s \(turn\)",
    re.M,
)


@pytest.fixture(name="compacting")
def compacting_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    args = ["--compaction-min-entries", str(MIN_ENTRIES), *COMPACTION_BY_ENTRIES_ALONE]
    with started_cluster(
        request, tmp_path / "cluster", tuning=CALM_TUNING, extra_args=args
    ) as local:
        yield local


def _writes(log: str) -> list[tuple[datetime, datetime]]:
    """(start, end) of each snapshot a node's log says it wrote."""
    spans = []
    for stamp, seconds in WRITTEN_IN_TURN.findall(log):
        end = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
        spans.append((end - timedelta(seconds=float(seconds)), end))
    return spans


def test_followers_write_in_turn_and_the_leader_less_often(compacting: LocalCluster) -> None:
    leader = compacting.wait_leader()
    term = compacting.status()[leader]["term"]
    with raftchan.Client(compacting.addresses, timeout=TIMEOUT) as client:
        chan = client.channel("turns")
        for _ in range(APPENDS):
            chan.append(os.urandom(ITEM_BYTES))
            chan.flush()  # one entry each
            time.sleep(PAUSE_S)
    statuses = compacting.status()
    # With CALM_TUNING an election here means a node went silent for seconds.
    assert [s["term"] for s in statuses] == [term] * 3, statuses
    followers = [i for i in range(3) if i != leader]
    written = [s["snapshots_written"] for s in statuses]
    assert all(written[i] >= 3 for i in followers), written
    assert written[leader] < min(written[i] for i in followers), written

    logs = list(compacting.logs().values())
    first, second = (_writes(logs[i]) for i in followers)
    assert len(first) >= 3 and len(second) >= 3, (first, second)
    overlaps = [(a, b) for a in first for b in second if a[0] < b[1] and b[0] < a[1]]
    assert not overlaps, overlaps
