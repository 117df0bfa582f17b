"""The cluster harness against real node processes: it can break a cluster and mend it."""

from __future__ import annotations

import re
import time
from pathlib import Path

import raftchan
from cluster.faultrun import leaders_per_term
from cluster.harness import LocalCluster, agreed_leader

FAILOVER_TIMEOUT = 30.0
LEADER_TERM = re.compile(r"-> leader \(term (\d+)\)")
READY_TIMEOUT = 60.0


def assert_all_reachable(cluster: LocalCluster) -> None:
    roles = [entry["role"] for entry in cluster.status()]
    assert "unreachable" not in roles, roles
    assert roles.count("leader") == 1, roles


def test_leader_killed_then_replaced_then_restarted(cluster: LocalCluster) -> None:
    old = cluster.leader()
    assert old is not None

    cluster.kill(old)
    assert not cluster.is_running(old)
    new = cluster.wait_leader(timeout=FAILOVER_TIMEOUT)
    assert new != old

    cluster.restart(old)
    cluster.wait_ready(timeout=READY_TIMEOUT)
    assert_all_reachable(cluster)
    # Two elections, two terms, one leader each: the logs show it and the check agrees.
    terms = [int(term) for log in cluster.logs().values() for term in LEADER_TERM.findall(log)]
    assert len(set(terms)) >= 2, terms
    assert leaders_per_term(cluster) == []


def test_paused_leader_is_replaced_and_rejoins(cluster: LocalCluster) -> None:
    old = cluster.leader()
    assert old is not None

    cluster.pause(old)
    try:
        new = cluster.wait_leader(timeout=FAILOVER_TIMEOUT)
        assert new != old
    finally:
        cluster.resume(old)

    deadline = time.monotonic() + READY_TIMEOUT
    while cluster.status()[old]["role"] != "follower":
        assert time.monotonic() < deadline, "the resumed node did not rejoin as a follower"
        time.sleep(0.1)
    assert_all_reachable(cluster)


def test_whole_cluster_killed_and_restarted(cluster: LocalCluster) -> None:
    cluster.kill_all()
    assert not any(cluster.is_running(i) for i in range(cluster.size))

    cluster.restart_all()
    cluster.wait_ready(timeout=READY_TIMEOUT)
    assert_all_reachable(cluster)


def test_close_reaps_every_node(cluster: LocalCluster) -> None:
    cluster.close()

    assert not any(cluster.is_running(i) for i in range(cluster.size))
    cluster.close()  # a second close (the fixture's) finds nothing to do


def test_agreed_leader_needs_a_majority_and_a_live_claim() -> None:
    def view(*nodes: tuple[str, str | None]) -> list[dict[str, object]]:
        """Statuses of nodes h:1, h:2, ... given as (role, leader named)."""
        return [
            {"client_address": f"h:{i}", "role": role, "leader": leader}
            for i, (role, leader) in enumerate(nodes, start=1)
        ]

    lead, follow = ("leader", "h:1"), ("follower", "h:1")
    assert agreed_leader(view(lead, follow, follow), 3) == "h:1"
    assert agreed_leader(view(lead, follow, ("unreachable", None)), 3) == "h:1"
    # One vote only: the others know no leader yet.
    assert agreed_leader(view(lead, ("candidate", None), ("follower", None)), 3) is None
    # The followers still name a leader that is gone.
    assert agreed_leader(view(("unreachable", None), follow, follow), 3) is None


def test_partition_cuts_raft_traffic_and_heal_restores_it(tmp_path: Path) -> None:
    local = LocalCluster(3, base_dir=tmp_path / "cluster", fault_injection=True)
    try:
        local.start()
        old = local.wait_ready(timeout=READY_TIMEOUT)
        local.isolate(old)
        # The majority elects another leader; the isolated node cannot win any election.
        deadline = time.monotonic() + FAILOVER_TIMEOUT
        while True:
            statuses = local.status()
            others = [statuses[i] for i in range(3) if i != old]
            leaders = [s["client_address"] for s in others if s["role"] == "leader"]
            if leaders and all(s["leader"] == leaders[0] for s in others):
                break
            assert time.monotonic() < deadline, _roles_of(statuses)
            time.sleep(0.1)
        # Writes commit on the majority side while the isolated node hears nothing of them.
        with raftchan.Client(leaders[0], timeout=30.0) as client:
            assert client.channel("cut").put("while cut") == 0
        isolated_position = local.status()[old]["position"]
        majority_position = max(local.status()[i]["position"] for i in range(3) if i != old)
        assert isolated_position < majority_position

        local.heal()
        deadline = time.monotonic() + READY_TIMEOUT
        while len({s["position"] for s in local.status()}) != 1:
            assert time.monotonic() < deadline, "the healed node did not catch up"
            time.sleep(0.1)
        assert_all_reachable(local)
    finally:
        local.close()


def _roles_of(statuses: list[dict[str, object]]) -> str:
    return ", ".join(f"{s.get('client_address')}={s.get('role')}" for s in statuses)
