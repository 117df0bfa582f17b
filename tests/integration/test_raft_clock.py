"""Nodes on a host whose CLOCK_MONOTONIC has drifted away from CLOCK_MONOTONIC_RAW.

pysyncobj keeps its election deadlines on CLOCK_MONOTONIC_RAW, while Python's
``time.monotonic()`` reads CLOCK_MONOTONIC, which NTP slews: the two drift apart with
uptime. The nodes here start with a hook that runs ``time.monotonic()`` 1000 s ahead, as
on a host up for a long while. A node comparing its own clock with pysyncobj's deadlines
would report that it never hears its leader, and its early election after the leader's
death would come no earlier than the ordinary election timeout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import raftchan
from cluster.fixtures import started_cluster
from cluster.harness import FAST_TUNING, LocalCluster
from raftchan.config import RaftTuning

#: How far ahead of pysyncobj's clock the nodes' time.monotonic() runs.
CLOCK_AHEAD_S = 1000.0
#: A long election timeout: a new leader sooner than this after the old one's death can
#: only come from the early election of followers that saw its connection close.
SLOW_ELECTIONS = RaftTuning(
    min_timeout=5.0,
    max_timeout=6.0,
    append_entries_period=FAST_TUNING.append_entries_period,
    leader_fallback_timeout=FAST_TUNING.leader_fallback_timeout,
    connection_retry=FAST_TUNING.connection_retry,
)
#: Bounds each wait for the cluster to reach an awaited state.
WAIT_TIMEOUT = 30.0

# Leaves a file named after the process, so the test can see that every node loaded it.
_HOOK = f"""\
import os
import pathlib
import time

_monotonic = time.monotonic
time.monotonic = lambda: _monotonic() + {CLOCK_AHEAD_S!r}
(pathlib.Path(__file__).parent / f"loaded-{{os.getpid()}}").touch()
"""


def _drifted_clock_env(hook_dir: Path) -> dict[str, str]:
    """Node environment loading a ``sitecustomize`` that moves ``time.monotonic`` ahead."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(_HOOK)
    source_root = Path(list(raftchan.__path__)[0]).resolve().parent
    return {"PYTHONPATH": os.pathsep.join([str(hook_dir), str(source_root)])}


@pytest.fixture(name="drifted")
def drifted_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """A running 3-node cluster with the clock hook (checked loaded) and slow elections."""
    hook_dir = tmp_path / "hook"
    with started_cluster(
        request, tmp_path / "cluster", tuning=SLOW_ELECTIONS, env=_drifted_clock_env(hook_dir)
    ) as local:
        for node in local.nodes:
            assert (hook_dir / f"loaded-{node.pid}").exists(), f"{node.spec.name} has no hook"
        yield local


def test_followers_know_their_live_leader(drifted: LocalCluster) -> None:
    leader = drifted.wait_leader(WAIT_TIMEOUT)
    deadline = time.monotonic() + WAIT_TIMEOUT
    statuses = drifted.status()
    while not all(status.get("leader_known") for status in statuses):
        assert time.monotonic() < deadline, statuses
        time.sleep(0.2)
        statuses = drifted.status()
    assert statuses[leader]["role"] == "leader"


def test_followers_of_a_killed_leader_stand_before_their_election_timeout(
    drifted: LocalCluster,
) -> None:
    old = drifted.wait_leader(WAIT_TIMEOUT)
    old_term = drifted.status()[old]["term"]
    drifted.kill(old)
    killed_at = time.monotonic()
    survivors = [i for i in range(drifted.size) if i != old]
    while not any(drifted.status()[i].get("term", 0) > old_term for i in survivors):
        assert time.monotonic() - killed_at < WAIT_TIMEOUT, drifted.status()
        time.sleep(0.02)
    stood_after = time.monotonic() - killed_at
    # Not a speed target: with an election timeout of 5-6 s, a follower standing sooner
    # can only be the early election on its leader's closed connection.
    assert stood_after < SLOW_ELECTIONS.min_timeout, stood_after
    assert drifted.wait_leader(WAIT_TIMEOUT) in survivors
