"""Pytest support for tests that run real clusters: start one, and report its logs.

:func:`started_cluster` records the cluster on the running test, and the test suite's
``pytest_runtest_makereport`` hook appends every node's log tail to the report of a failed
test through :func:`attach_logs`. One module holds the key, so every conftest that starts
clusters shares it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cluster.harness import LocalCluster

#: How long a fresh cluster may take to start its processes and elect a leader.
CLUSTER_READY_TIMEOUT = 60.0

_CLUSTER_KEY = pytest.StashKey[LocalCluster]()


@contextmanager
def started_cluster(
    request: pytest.FixtureRequest, base_dir: Path, **options: Any
) -> Iterator[LocalCluster]:
    """A running 3-node cluster (``options`` go to LocalCluster), leader elected, whose
    node logs go into the test's failure report; closed afterwards."""
    local = LocalCluster(3, base_dir=base_dir, **options)
    request.node.stash[_CLUSTER_KEY] = local
    try:
        local.start()
        local.wait_ready(timeout=CLUSTER_READY_TIMEOUT)
        yield local
    finally:
        local.close()


def attach_logs(item: pytest.Item, report: pytest.TestReport) -> None:
    """Append every node's log tail to a failed test's report, if the test ran a cluster."""
    local = item.stash.get(_CLUSTER_KEY, None)
    if local is not None and report.failed:
        report.sections.append(("raftchan node logs", local.log_tails()))
