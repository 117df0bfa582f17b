"""Fixtures of the multi-host tests: hosts as Linux network namespaces on a private bridge,
and a raftchan cluster with one node in each.

Where network namespaces cannot be made (no root, no ``ip``, permission denied), every
test here is skipped, and the reason is printed at the end of the run. It is found by
creating a namespace, not by guessing.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.fixtures import started_cluster
from cluster.harness import LocalCluster
from cluster.netns import Host, VirtualNetwork, namespaces_unavailable

#: Client port of node i is BASE_PORT + i, its Raft port BASE_PORT + 100 + i, as with
#: ``raftchan up``. Each node has an address of its own, so nothing else competes for them.
BASE_PORT = 7101
#: Label of the client's host; the node hosts are labelled with the node names (n1, ...).
CLIENT_HOST = "cl"
NODE_NAMES = ("n1", "n2", "n3")

_SKIP_REASON = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def namespaces_available(pytestconfig: pytest.Config) -> None:
    """Skip (once, for every test here) where network namespaces cannot be created."""
    reason = namespaces_unavailable()
    if reason is not None:
        pytestconfig.stash[_SKIP_REASON] = reason
        pytest.skip(f"network namespaces unavailable: {reason}")


@pytest.fixture
def network(namespaces_available: None) -> Iterator[VirtualNetwork]:
    """A fresh bridge with a host per node (labelled n1, n2, n3) and a client host
    (:data:`CLIENT_HOST`); all removed afterwards, even when the test fails (the cluster,
    a later fixture, is closed first)."""
    network = VirtualNetwork()
    try:
        network.create()
        for label in (*NODE_NAMES, CLIENT_HOST):
            network.add_host(label)
        yield network
    finally:
        network.destroy()


@pytest.fixture
def client_host(network: VirtualNetwork) -> Host:
    """The host the test's client runs in: on the bridge, but none of the nodes'."""
    return network.host(CLIENT_HOST)


@pytest.fixture
def ns_cluster(
    request: pytest.FixtureRequest, network: VirtualNetwork, tmp_path: Path
) -> Iterator[LocalCluster]:
    """A running 3-node cluster, node nK in host nK, each bound to its host's address and
    sharing a cluster secret (the addresses are not loopback); closed afterwards."""
    node_hosts = [network.host(name) for name in NODE_NAMES]
    secret = tmp_path / "cluster.secret"
    # Readable by the owner only, as a real deployment's secret file would be.
    descriptor = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))
    with started_cluster(
        request,
        tmp_path / "cluster",
        hosts=[host.address for host in node_hosts],
        base_port=BASE_PORT,
        node_prefixes=[host.prefix() for host in node_hosts],
        extra_args=["--cluster-secret-file", str(secret)],
    ) as local:
        yield local


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Say why the multi-host tests were skipped, even in a quiet run."""
    reason = config.stash.get(_SKIP_REASON, None)
    if reason is not None:
        terminalreporter.write_line(
            f"multihost tests skipped: network namespaces unavailable: {reason}", yellow=True
        )
