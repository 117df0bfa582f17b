"""Shared fixtures: a real 3-node cluster per test, and its node logs in every failure report."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from cluster.harness import LocalCluster

#: How long a fresh cluster may take to start its processes and elect a leader.
CLUSTER_READY_TIMEOUT = 60.0

_CLUSTER_KEY = pytest.StashKey[LocalCluster]()


@pytest.fixture(name="cluster")
def cluster_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """A running 3-node cluster with fast Raft timing, leader elected; closed afterwards."""
    local = LocalCluster(3, base_dir=tmp_path / "cluster")
    request.node.stash[_CLUSTER_KEY] = local
    try:
        local.start()
        local.wait_ready(timeout=CLUSTER_READY_TIMEOUT)
        yield local
    finally:
        local.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach every node's log tail to the report of a failed test that used a cluster."""
    report = yield
    local = item.stash.get(_CLUSTER_KEY, None)
    if local is not None and report.failed:
        report.sections.append(("raftchan node logs", local.log_tails()))
    return report
