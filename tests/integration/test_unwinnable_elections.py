"""A node that cannot win an election does not hold one (pre-vote, raftchan.pre_vote).

Without pre-vote, a node that stopped hearing its leader raised its term and asked for
votes. Where the leader could not hear it but another follower could, that follower took
the higher term and turned the leader's heartbeats away, and the leader stepped down: one
cut link took the whole cluster through election after election. A node cut off from
every peer came back with a higher term and unseated the leader the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import raftchan
from cluster.fixtures import started_cluster
from cluster.harness import LocalCluster
from raftchan.config import RaftTuning

#: The nodes' own election timing (0.3-0.6 s).
DEFAULTS = RaftTuning()
#: How long a link stays cut: several election timeouts of the node that lost its leader.
CUT_S = 5 * DEFAULTS.max_timeout
#: Bounds each wait for the cluster to reach an awaited state.
WAIT_TIMEOUT = 60.0
#: What a node logs when it stands for election.
STOOD_LINE = "raft role follower -> candidate"


@pytest.fixture(name="local")
def local_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """A running 3-node cluster on the nodes' default timing, with partitions enabled."""
    with started_cluster(request, tmp_path / "cluster", tuning=None, fault_injection=True) as local:
        yield local


def _since_start(local: LocalCluster, i: int) -> str:
    log = local.logs()[local.names[i]]
    return log[log.rindex("harness: start") :]


def _wait_until_all_applied(local: LocalCluster) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while len({status.get("position") for status in local.status()}) != 1:
        assert time.monotonic() < deadline, "the nodes did not reach the same position"
        time.sleep(0.05)


def test_a_follower_cut_off_from_its_leader_alone_does_not_unseat_it(
    local: LocalCluster,
) -> None:
    leader = local.wait_leader(WAIT_TIMEOUT)
    cut, bridge = (leader + 1) % local.size, (leader + 2) % local.size
    term = local.status()[leader]["term"]

    local.cut_links([(leader, cut)])
    # The majority (leader and bridge) goes on committing meanwhile.
    with raftchan.Client(local.client_addresses[leader], timeout=WAIT_TIMEOUT) as client:
        chan = client.channel("one-link-cut")
        end = time.monotonic() + CUT_S
        n = 0
        while time.monotonic() < end:
            chan.append(n)
            chan.flush()
            n += 1
            time.sleep(0.01)
    statuses = local.status()
    local.heal()

    assert statuses[leader]["role"] == "leader", statuses
    assert [status["term"] for status in statuses] == [term] * local.size, statuses
    assert STOOD_LINE not in _since_start(local, cut)
    assert STOOD_LINE not in _since_start(local, bridge)
    _wait_until_all_applied(local)
    after = local.status()
    assert after[leader]["role"] == "leader" and after[cut]["term"] == term, after


def test_a_follower_cut_off_from_everyone_comes_back_without_an_election(
    local: LocalCluster,
) -> None:
    leader = local.wait_leader(WAIT_TIMEOUT)
    cut = (leader + 1) % local.size
    term = local.status()[leader]["term"]

    local.isolate(cut)
    time.sleep(CUT_S)
    assert local.status()[cut]["term"] == term  # it asked; nobody answered; it waited
    local.heal()
    with raftchan.Client(local.client_addresses[leader], timeout=WAIT_TIMEOUT) as client:
        client.channel("after-the-cut").put("healed")
    _wait_until_all_applied(local)

    statuses = local.status()
    assert statuses[leader]["role"] == "leader", statuses
    assert [status["term"] for status in statuses] == [term] * local.size, statuses
    assert STOOD_LINE not in _since_start(local, cut)
