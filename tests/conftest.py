"""Shared fixtures: a real 3-node cluster per test, and its node logs in every failure report."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from cluster.fixtures import attach_logs, started_cluster
from cluster.harness import LocalCluster


@pytest.fixture(name="cluster")
def cluster_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """A running 3-node cluster with fast Raft timing, leader elected; closed afterwards."""
    with started_cluster(request, tmp_path / "cluster") as local:
        yield local


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach every node's log tail to the report of a failed test that used a cluster."""
    report = yield
    attach_logs(item, report)
    return report
