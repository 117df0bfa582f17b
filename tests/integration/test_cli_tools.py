"""The operator tools (status, append, tail, member) as subprocesses against a real cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from cluster.harness import LocalCluster

#: Bounds one command, including its connects and retries.
COMMAND_TIMEOUT = 60.0


def raftchan_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raftchan", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def status_json(cluster: LocalCluster) -> dict[str, Any]:
    done = raftchan_cli("status", "--json", "--address", cluster.addresses)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_status_json_names_the_leader_and_marks_unreachable_nodes(cluster: LocalCluster) -> None:
    leader = cluster.leader()
    assert leader is not None
    status = status_json(cluster)
    assert status["leader"] == cluster.client_addresses[leader]
    nodes = status["nodes"]
    assert [node["client_address"] for node in nodes] == cluster.client_addresses
    assert sorted(node["role"] for node in nodes) == ["follower", "follower", "leader"]
    for node in nodes:
        assert {"name", "role", "term", "commit_index", "applied_index"} <= node.keys()

    follower = (leader + 1) % cluster.size
    cluster.kill(follower)
    nodes = status_json(cluster)["nodes"]
    assert nodes[follower]["role"] == "unreachable"
    assert [n["role"] for i, n in enumerate(nodes) if i != follower].count("leader") == 1


def test_append_then_tail_prints_the_items_as_json(cluster: LocalCluster) -> None:
    done = raftchan_cli("append", "--address", cluster.addresses, "notes", "one", "two")
    assert done.returncode == 0, done.stderr
    done = raftchan_cli(
        "append", "--address", cluster.addresses, "--json-values", "notes", '{"x": 1}', "[2, 3]"
    )
    assert done.returncode == 0, done.stderr

    done = raftchan_cli("tail", "--address", cluster.addresses, "notes")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        "one",
        "two",
        {"x": 1},
        [2, 3],
    ]
    done = raftchan_cli("tail", "--address", cluster.addresses, "--from", "2", "notes")
    assert [json.loads(line) for line in done.stdout.splitlines()] == [{"x": 1}, [2, 3]]


def test_member_list_shows_every_node_and_remove_refusals_exit_1(cluster: LocalCluster) -> None:
    done = raftchan_cli("member", "list", "--json", "--address", cluster.addresses)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert set(listed) == {"members", "leader", "change_pending"}, listed
    text = json.dumps(listed)
    for raft_address in cluster.raft_addresses:
        assert raft_address in text, f"{raft_address} missing from {listed}"

    leader = cluster.leader()
    assert leader is not None
    done = raftchan_cli(
        "member", "remove", "--address", cluster.addresses, cluster.raft_addresses[leader]
    )
    assert done.returncode == 1
    assert "MembershipError" in done.stderr and "leader" in done.stderr
    done = raftchan_cli("member", "remove", "--address", cluster.addresses, "127.0.0.1:1")
    assert done.returncode == 1
    assert "MemberNotFound" in done.stderr
    # Nothing changed.
    again = json.loads(
        raftchan_cli("member", "list", "--json", "--address", cluster.addresses).stdout
    )
    assert again == listed


def test_tail_of_a_missing_channel_fails_and_creates_nothing(cluster: LocalCluster) -> None:
    done = raftchan_cli("tail", "--address", cluster.addresses, "no-such-channel")
    assert done.returncode == 1
    assert "ChannelNotFound" in done.stderr, done.stderr
    # Reading it did not create it: a second tail fails the same way.
    again = raftchan_cli("tail", "--address", cluster.addresses, "no-such-channel")
    assert again.returncode == 1 and "ChannelNotFound" in again.stderr, again.stderr


def test_operator_tools_wait_no_longer_than_their_timeout_and_say_why() -> None:
    dead = "127.0.0.1:1"  # nothing listens on port 1 here: every dial is refused
    for command in (["append", "c", "v"], ["tail", "c"], ["member", "list"]):
        done = raftchan_cli(*command, "--address", dead, "--timeout", "1")
        # Without --timeout each took the client's default 30 s; COMMAND_TIMEOUT bounds it.
        assert done.returncode == 1, (command, done.stderr)
        assert "NoLeader" in done.stderr, (command, done.stderr)
    done = raftchan_cli("status", "--address", dead, "--timeout", "1")
    assert done.returncode == 1
    assert f"{dead}: " in done.stdout and "refused" in done.stdout.lower(), done.stdout
