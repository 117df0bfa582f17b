"""Fixtures for tests with a real Dask scheduler and workers and a real 3-node raftchan cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import distributed
import pytest

from cluster.fixtures import started_cluster
from cluster.harness import LocalCluster


@pytest.fixture(name="dask_cluster", scope="module")
def dask_cluster_fixture() -> Iterator[distributed.LocalCluster]:
    """A Dask scheduler with two workers of two threads, in this process, over TCP.

    In-process workers run the test's own functions without pickling them by value; TCP
    (not inproc) lets the raftchan nodes and helper processes reach the scheduler.
    """
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        dashboard_address=None,
    ) as local:
        yield local


@pytest.fixture(name="dask_client")
def dask_client_fixture(dask_cluster: distributed.LocalCluster) -> Iterator[distributed.Client]:
    with distributed.Client(dask_cluster, set_as_default=False) as client:
        yield client


@pytest.fixture(name="rc_cluster")
def rc_cluster_fixture(
    request: pytest.FixtureRequest, tmp_path: Path, dask_cluster: distributed.LocalCluster
) -> Iterator[LocalCluster]:
    """A running 3-node raftchan cluster whose nodes keep futures on ``dask_cluster``."""
    extra_args = ["--dask-scheduler", dask_cluster.scheduler_address]
    with started_cluster(request, tmp_path / "cluster", extra_args=extra_args) as local:
        yield local
