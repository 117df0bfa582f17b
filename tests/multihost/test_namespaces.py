"""A raftchan cluster across three "hosts" (Linux network namespaces on a private bridge),
with a client on a fourth, while hosts are cut off the network and brought back.

Unlike the loopback tests, every node binds an address of its own, Raft traffic crosses
a real (virtual) network encrypted with a cluster secret, and a cut host's packets vanish
silently, both ways, so nodes and client must notice by their timeouts rather than from
refused connections. The client numbers its items (0, 1, 2, ...) and flushes until it
succeeds, so the expected contents are exactly the items appended: a lost item shows as
a gap, a duplicated retry as a repeat, on any node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from cluster.faultrun import contents_of_every_node, leaders_per_term
from cluster.harness import LocalCluster
from cluster.netns import Host, VirtualNetwork
from raftchan.errors import RaftchanError

pytestmark = pytest.mark.multihost

CLIENT_SCRIPT = Path(__file__).with_name("ns_client.py")
CHANNEL = "across-hosts"

# Bounds on failures, not expected durations: the machine may be small and shared.
READY_TIMEOUT = 90.0
FAILOVER_TIMEOUT = 30.0
CUT_SEEN_TIMEOUT = 30.0
ACK_TIMEOUT = 90.0
FINISH_TIMEOUT = 90.0
CONVERGE_TIMEOUT = 90.0
#: Items the client must get acknowledged while a host is cut off: a few dozen flushes.
ACKED_DURING_CUT = 200


class NamespaceClient:
    """``ns_client.py`` running in ``host``, its JSON reports read as they come.

    :attr:`acked` is the count of items acknowledged so far. Only :meth:`kill` signals the
    process, by its pid, and only while it has not been reaped.
    """

    def __init__(self, host: Host, addresses: str, log_path: Path, env: Mapping[str, str]) -> None:
        self.log_path = log_path
        self.acked = 0
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self._ended = False
        self._changed = threading.Condition()
        with log_path.open("wb") as log:
            # The child keeps its own copy of the log descriptor.
            self.process = subprocess.Popen(
                [*host.prefix(), sys.executable, str(CLIENT_SCRIPT), addresses, CHANNEL],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=dict(env),
                text=True,
                start_new_session=True,
            )
        self._reader = threading.Thread(target=self._read, name="ns-client-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        # Ends when the client exits, which it does by itself within its --max-seconds.
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._changed:
                if "acked" in message:
                    self.acked = int(message["acked"])
                elif "done" in message:
                    self.result = message
                elif "error" in message:
                    self.error = str(message["error"])
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_acked(self, count: int, timeout: float) -> None:
        """Block until at least ``count`` items are acknowledged; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.acked < count:
                self._check_alive()
                remaining = deadline - time.monotonic()
                assert remaining > 0, (
                    f"only {self.acked} of {count} items acknowledged within {timeout} s\n"
                    + self.stderr_tail()
                )
                self._changed.wait(min(remaining, 1.0))

    def finish(self, timeout: float) -> tuple[int, list[Any]]:
        """Ask the client to stop; the count of items it appended (all acknowledged) and
        the channel's contents it read back. ``timeout`` bounds the whole finish."""
        assert self.process.stdin is not None
        self.process.stdin.write("stop\n")
        self.process.stdin.close()
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.result is None:
                self._check_alive()
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"the client did not finish within {timeout} s"
                self._changed.wait(min(remaining, 1.0))
        code = self.process.wait(max(deadline - time.monotonic(), 1.0))
        assert code == 0, f"the client exited with status {code}\n{self.stderr_tail()}"
        return int(self.result["done"]), list(self.result["data"])

    def _check_alive(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the client failed: {self.error}\n{self.stderr_tail()}")
        if self._ended and self.result is None:
            raise AssertionError(
                f"the client exited ({self.process.poll()}) after {self.acked} acknowledged "
                f"items\n{self.stderr_tail()}"
            )

    def stderr_tail(self, lines: int = 30) -> str:
        """The last lines the client wrote to its standard error."""
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "client stderr:\n" + ("\n".join(text) or "(empty)")

    def kill(self) -> None:
        """SIGKILL the client's process group if it still runs, and reap it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited a moment ago
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10.0)
        self._reader.join(10.0)


def note(message: str) -> None:
    """A progress line stamped like the node logs, so a failure report lines them up."""
    now = time.time()
    print(f"{time.strftime('%H:%M:%S', time.localtime(now))},{int(now % 1 * 1000):03d} {message}")


def wait_unreachable(cluster: LocalCluster, i: int, timeout: float) -> None:
    """Wait until node ``i`` no longer answers this process: proof that its host is cut."""
    deadline = time.monotonic() + timeout
    while cluster.status()[i]["role"] != "unreachable":
        assert time.monotonic() < deadline, f"node {i} still answers {timeout} s after its cut"
        time.sleep(0.2)


def wait_settled(cluster: LocalCluster, timeout: float) -> int:
    """Wait until every node answers and all are in one term under one leader, which they
    all name; returns its index.

    A host that comes back may still hold an old term and name no leader (a cut-off
    leader learns of its successor only from it; pre-vote keeps a cut-off follower's term
    where it was). Waiting until every node names the same leader in the same term makes
    the next cut meet a settled cluster.
    """
    deadline = time.monotonic() + timeout
    while True:
        statuses = cluster.status()
        roles = [s.get("role") for s in statuses]
        if roles.count("leader") == 1 and roles.count("follower") == len(roles) - 1:
            leader = roles.index("leader")
            address = statuses[leader].get("client_address")
            named = {s.get("leader") for i, s in enumerate(statuses) if i != leader}
            if named == {address} and len({s.get("term") for s in statuses}) == 1:
                return leader
        if time.monotonic() >= deadline:
            seen = [{k: s.get(k) for k in ("name", "role", "term", "leader")} for s in statuses]
            raise AssertionError(f"the cluster did not settle within {timeout} s: {seen}")
        time.sleep(0.2)


def replicas_caught_up(
    cluster: LocalCluster, channels: Sequence[str], timeout: float
) -> dict[str, dict[str, list[Any]]]:
    """Each node's own copy of ``channels`` once every node has applied what the leader
    has; a node still catching up after a heal is asked again until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return contents_of_every_node(cluster, channels)
        except (RaftchanError, OSError) as exc:
            assert time.monotonic() < deadline, (
                f"replicas not caught up within {timeout} s: {exc!r}"
            )
            time.sleep(0.5)


def assert_items(data: Sequence[Any], count: int, where: str) -> None:
    """``data`` is exactly 0 .. count-1: nothing lost, nothing twice, in order."""
    expected = list(range(count))
    if list(data) != expected:
        missing = sorted(set(expected) - set(data))
        repeated = sorted({x for x in data if list(data).count(x) > 1})
        raise AssertionError(
            f"{where}: {len(data)} items, expected {count}; missing {missing[:20]}, "
            f"repeated {repeated[:20]}, in order: {list(data) == sorted(data)}"
        )


@pytest.mark.timeout(600)
def test_hosts_cut_off_lose_and_repeat_nothing(
    network: VirtualNetwork, client_host: Host, ns_cluster: LocalCluster, tmp_path: Path
) -> None:
    """A client on its own host streams appends while first a follower's host and then
    the leader's host are cut off the network and brought back. The majority goes on
    acknowledging during each cut, the leader's cut moves leadership to another host,
    and afterwards every acknowledged item is on every node exactly once, in order."""
    cluster = ns_cluster
    node_hosts = [network.host(name) for name in cluster.names]
    # The nodes' environment runs the very raftchan this test imported.
    client = NamespaceClient(
        client_host, cluster.addresses, tmp_path / "client.log", cluster.nodes[0].env
    )
    try:
        client.wait_acked(50, ACK_TIMEOUT)

        # A follower's host: the other two keep a majority and go on.
        leader = cluster.wait_leader(FAILOVER_TIMEOUT)
        follower = (leader + 1) % cluster.size
        network.cut(node_hosts[follower])
        note(f"cut {cluster.names[follower]} (a follower) at {client.acked} acknowledged")
        wait_unreachable(cluster, follower, CUT_SEEN_TIMEOUT)
        client.wait_acked(client.acked + ACKED_DURING_CUT, ACK_TIMEOUT)
        network.restore(node_hosts[follower])
        note(f"restored {cluster.names[follower]} at {client.acked} acknowledged")
        cluster.wait_ready(READY_TIMEOUT)
        old = wait_settled(cluster, READY_TIMEOUT)
        client.wait_acked(client.acked + 50, ACK_TIMEOUT)

        # The leader's host: the client's requests to it go unanswered, a leader is
        # elected on another host, and the client's retries land there exactly once.
        network.cut(node_hosts[old])
        note(f"cut {cluster.names[old]} (the leader) at {client.acked} acknowledged")
        new = cluster.wait_leader(FAILOVER_TIMEOUT)
        note(f"{cluster.names[new]} leads")
        assert new != old, "leadership stayed on the cut-off host"
        acked_at_failover = client.acked
        client.wait_acked(acked_at_failover + ACKED_DURING_CUT, ACK_TIMEOUT)
        network.restore(node_hosts[old])
        note(f"restored {cluster.names[old]} at {client.acked} acknowledged")
        cluster.wait_ready(READY_TIMEOUT)
        wait_settled(cluster, READY_TIMEOUT)
        client.wait_acked(client.acked + 50, ACK_TIMEOUT)

        appended, read_back = client.finish(FINISH_TIMEOUT)
    except BaseException:
        print(network.describe())
        raise
    finally:
        client.kill()

    note(f"{appended} items; leader moved from {cluster.names[old]} to {cluster.names[new]}")
    assert_items(read_back, appended, "read through the client")
    replicas = replicas_caught_up(cluster, [CHANNEL], CONVERGE_TIMEOUT)
    assert sorted(replicas) == cluster.names
    for name, channels in replicas.items():
        assert_items(channels[CHANNEL], appended, f"node {name}'s replica")
    assert leaders_per_term(cluster) == []
