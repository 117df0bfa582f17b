"""The opt-in ``raftchan.dask.install(client)`` on workers in processes of their own."""

from __future__ import annotations

from collections.abc import Iterator

import dask.config
import distributed
import pytest

import raftchan
import raftchan.dask
from cluster.harness import LocalCluster

OP_TIMEOUT = 60.0


@pytest.fixture(name="no_address")
def no_address_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Neither $RAFTCHAN_ADDRESS nor the Dask config key here, nor (inherited) on workers."""
    monkeypatch.delenv("RAFTCHAN_ADDRESS", raising=False)
    saved = dask.config.get("raftchan.address", None)
    dask.config.set({"raftchan.address": None})
    try:
        yield
    finally:
        dask.config.set({"raftchan.address": saved})
        raftchan.dask.uninstall()


@pytest.mark.usefixtures("no_address")
def test_install_hands_the_cluster_address_to_workers_that_lack_it(
    rc_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as workers,
        distributed.Client(workers, set_as_default=False) as dask_client,
    ):
        # Without an address anywhere: refused here, before any task could fail on it.
        with pytest.raises(raftchan.ConfigError, match="no cluster address"):
            raftchan.dask.install(dask_client)

        raftchan.dask.install(dask_client, address=rc_cluster.addresses)

        def append_in_a_task() -> int:  # defined here: sent to the worker by value
            with distributed.worker_client() as client:
                return int(client.channel("from-a-worker").put("appended in a task"))

        assert dask_client.submit(append_in_a_task).result(timeout=OP_TIMEOUT) == 0
        # The address given to install() wins over the environment here too.
        monkeypatch.setenv("RAFTCHAN_ADDRESS", "127.0.0.1:1")  # nothing listens there
        assert list(dask_client.channel("from-a-worker").data) == ["appended in a task"]
    with raftchan.Client(rc_cluster.addresses, timeout=OP_TIMEOUT) as rc:
        assert list(rc.channel("from-a-worker").data) == ["appended in a task"]
