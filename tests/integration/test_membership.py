"""Membership changes against real node processes: grow and shrink under writes, then a
crash of every node, and the refusals that must change nothing.

The growth test writes numbered items from a client the whole time, adds two nodes (each
started with a data folder of its own), removes two of the original nodes, and demands
that every acknowledged item is on every current member's own replica, once and in order.
Then every node is SIGKILLed and restarted with its original command line (whose
``--peers`` is now out of date): each must report the membership the log says, elect a
leader among the current members, and take writes again.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import raftchan
from cluster.faultrun import contents_of_every_node
from cluster.fixtures import started_cluster
from cluster.harness import COMPACTION_BY_ENTRIES_ALONE, FAST_TUNING, LocalCluster
from cluster.ports import free_ports
from cluster.writer import Writer
from raftchan.errors import MembershipError
from raftchan.replica import SNAPSHOT_FILE
from raftchan.snapshot import read_snapshot_meta

# Bounds on failures, not expected durations: the machine may be shared and slow.
READY_TIMEOUT = 90.0
FLUSH_TIMEOUT = 90.0
CLIENT_TIMEOUT = 60.0
MEMBER_TIMEOUT = 120.0
CONVERGE_TIMEOUT = 90.0


def active(cluster: LocalCluster) -> list[int]:
    return [i for i in range(cluster.size) if i not in cluster.retired]


def leader_index(cluster: LocalCluster) -> int:
    return cluster.wait_leader(timeout=READY_TIMEOUT)


def remove_a_follower(client: raftchan.Client, cluster: LocalCluster, among: Sequence[int]) -> int:
    """Remove one node of ``among`` that does not lead; returns its index.

    The leader may move between choosing and asking, and a leader refuses to remove
    itself (MembershipError naming the reason "leader"): then choose again.
    """
    deadline = time.monotonic() + MEMBER_TIMEOUT
    while True:
        leader = leader_index(cluster)
        victim = next(i for i in among if i != leader and i not in cluster.retired)
        try:
            client.remove_member(cluster.raft_addresses[victim], timeout=MEMBER_TIMEOUT)
            return victim
        except MembershipError as exc:
            if exc.details.get("reason") != "leader" or time.monotonic() > deadline:
                raise


def wait_members_everywhere(
    cluster: LocalCluster, expected: list[str], timeout: float = CONVERGE_TIMEOUT
) -> None:
    """Wait until every active node reports ``expected`` as its members (status field)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = cluster.status()
        seen = {cluster.names[i]: statuses[i].get("members") for i in active(cluster)}
        if all(members == expected for members in seen.values()):
            return
        assert time.monotonic() < deadline, f"members not {expected} everywhere: {seen}"
        time.sleep(0.2)


def assert_every_replica(cluster: LocalCluster, channel: str, count: int) -> None:
    """Every active node's own replica holds exactly items 0 .. count-1, in order."""
    contents = contents_of_every_node(cluster, [channel], active(cluster))
    for name, channels in contents.items():
        data = channels[channel]
        if data != list(range(count)):
            missing = sorted(set(range(count)) - set(data))
            raise AssertionError(
                f"{name}: {len(data)} items, expected {count}; missing {missing[:20]}, "
                f"repeated {len(data) - len(set(data))}, in order: {data == sorted(data)}"
            )


#: A snapshot whenever a node's log holds more than 2 entries: membership then lives in
#: snapshots as much as in journals, and the added nodes catch up by installing one.
FREQUENT_COMPACTION = ["--compaction-min-entries", "2", *COMPACTION_BY_ENTRIES_ALONE]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("extra_args", [[], FREQUENT_COMPACTION], ids=["journal", "snapshots"])
def test_grow_to_five_and_shrink_to_three_under_writes_then_restart_all(
    request: pytest.FixtureRequest, tmp_path: Path, extra_args: list[str]
) -> None:
    with started_cluster(request, tmp_path / "cluster", extra_args=extra_args) as cluster:
        grow_shrink_and_restart(cluster)
        if extra_args:
            snapshots = [
                read_snapshot_meta(cluster.nodes[i].spec.data_dir / SNAPSHOT_FILE)
                for i in active(cluster)
            ]
            assert all(snapshots), "a node never compacted: the snapshot path went untested"
            expected = sorted(cluster.raft_addresses[i] for i in active(cluster))
            # Written after the last change: they hold the final membership.
            assert [sorted(s.node_ids) for s in snapshots if s] == [expected] * 3


def grow_shrink_and_restart(cluster: LocalCluster) -> None:
    originals = [0, 1, 2]
    with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
        chan = client.channel("membership")
        # The short pause between flushes leaves the small machine's CPU to the nodes.
        writer = Writer(chan, batch=5, pause=0.01)
        writer.start()
        try:
            writer.wait_acked(50, FLUSH_TIMEOUT)
            for _ in range(2):
                new = cluster.add_node()
                raft = cluster.raft_addresses[new]
                members = client.add_member(
                    raft, cluster.client_addresses[new], cluster.names[new], MEMBER_TIMEOUT
                )
                assert raft in members
                writer.wait_acked(writer.appended + 50, FLUSH_TIMEOUT)
            assert len(client.members()["members"]) == 5
            for _ in range(2):
                victim = remove_a_follower(client, cluster, originals)
                cluster.retire(victim)
                writer.wait_acked(writer.appended + 50, FLUSH_TIMEOUT)
        finally:
            writer.finish()
        print(f"{writer.appended} items written while the membership changed")
        expected = sorted(cluster.raft_addresses[i] for i in active(cluster))
        assert len(expected) == 3
        listed = client.members()
        assert sorted(m["raft_address"] for m in listed["members"]) == expected
        assert not listed["change_pending"]
        wait_members_everywhere(cluster, expected)
        assert_every_replica(cluster, "membership", writer.appended)
        count = writer.appended

    # Every node crashes and restarts with its first command line: --peers names the
    # removed nodes (and the added ones name originals); the log must win.
    cluster.kill_all()
    cluster.restart_all()
    leader = cluster.wait_ready(timeout=READY_TIMEOUT)
    assert leader in active(cluster)
    wait_members_everywhere(cluster, expected)
    addresses = ",".join(cluster.client_addresses[i] for i in active(cluster))
    with raftchan.Client(addresses, timeout=CLIENT_TIMEOUT) as client:
        chan = client.channel("membership")
        chan.extend(range(count, count + 10))
        chan.flush(timeout=FLUSH_TIMEOUT)
        assert list(chan.data) == list(range(count + 10))
    assert_every_replica(cluster, "membership", count + 10)


def test_bad_membership_requests_change_nothing(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Adding a member, removing a stranger or the leader, an unparsable address, a second
    change while one is in flight, and a removal down to one member are each refused by
    name; the membership is what the accepted changes made it, and writes go on."""
    # A leader that keeps its majority only with the node it is adding would otherwise
    # step down after 2 s: keep it, so that the change stays in flight under its eyes.
    tuning = dataclasses.replace(FAST_TUNING, leader_fallback_timeout=120.0)
    with (
        started_cluster(request, tmp_path / "cluster", tuning=tuning) as cluster,
        raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client,
    ):
        before = sorted(cluster.raft_addresses)
        leader = leader_index(cluster)
        follower, other = (i for i in range(cluster.size) if i != leader)
        with pytest.raises(raftchan.MemberExists):
            client.add_member(cluster.raft_addresses[follower], cluster.client_addresses[follower])
        with pytest.raises(raftchan.MemberNotFound):
            client.remove_member("127.0.0.1:1")
        with pytest.raises(raftchan.RequestInvalid):
            client.add_member("not-an-address", "127.0.0.1:2")
        with pytest.raises(MembershipError) as refused:
            client.remove_member(cluster.raft_addresses[leader])
        assert refused.value.details["reason"] == "leader"
        assert sorted(m["raft_address"] for m in client.members()["members"]) == before

        # With one follower paused, adding a node that is not running cannot commit
        # (3 of 4 needed, 2 answer): the change stays in flight, and a second is refused.
        ghost, ghost_client = (f"127.0.0.1:{port}" for port in free_ports(2, "127.0.0.1"))
        cluster.pause(other)
        try:
            outcome: list[BaseException | None] = []

            def add_ghost() -> None:
                try:
                    client.add_member(ghost, ghost_client, None, 10.0)
                    outcome.append(None)
                except raftchan.RaftchanError as exc:  # Timeout while it cannot commit
                    outcome.append(exc)

            first = threading.Thread(target=add_ghost, daemon=True)
            first.start()
            wait_until(lambda: ghost in (cluster.status()[leader].get("members") or []))
            with pytest.raises(raftchan.MembershipChangeInProgress):
                client.remove_member(cluster.raft_addresses[follower], timeout=30.0)
        finally:
            cluster.resume(other)
        first.join(60.0)
        assert outcome, "the first change never answered"
        wait_until(lambda: not client.members()["change_pending"])
        assert ghost in [m["raft_address"] for m in client.members()["members"]]
        client.remove_member(ghost, timeout=MEMBER_TIMEOUT)

        # Down to two members is allowed; down to one is not.
        leader = leader_index(cluster)
        follower = next(i for i in range(cluster.size) if i != leader)
        client.remove_member(cluster.raft_addresses[follower], timeout=MEMBER_TIMEOUT)
        cluster.retire(follower)
        remaining = sorted(a for i, a in enumerate(cluster.raft_addresses) if i != follower)
        last_follower = next(
            a for a in remaining if a != cluster.raft_addresses[leader_index(cluster)]
        )
        with pytest.raises(MembershipError) as too_few:
            client.remove_member(last_follower)
        assert too_few.value.details["reason"] == "too_few_members"
        assert sorted(m["raft_address"] for m in client.members()["members"]) == remaining
        chan = client.channel("still-works")
        chan.put(1)
        assert list(chan.data) == [1]


def wait_until(condition: Callable[[], bool], timeout: float = CONVERGE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not so within {timeout} s"
        time.sleep(0.1)
