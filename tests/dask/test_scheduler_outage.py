"""A Dask scheduler that is not there yet: data appends go on, the keeper keeps trying."""

from __future__ import annotations

import time
from pathlib import Path

import distributed
import pytest

import raftchan
from cluster.harness import LocalCluster
from cluster.ports import free_ports

#: Seconds any single client operation may take on a loaded test machine.
OP_TIMEOUT = 60.0
#: A data append must not wait for Dask: far below the keeper's connect timeouts.
DATA_BOUND = 5.0
#: Bounds the keeper's first failed connection attempt.
RETRY_BOUND = 30.0
#: How long the test lets a future append wait for an unreachable scheduler: past the
#: leader's own bound (6 s), so the client has been told DaskUnavailable at least once.
FUTURE_WAIT = 8.0


def inc(x: int) -> int:
    return x + 1


def test_data_appends_go_on_without_the_scheduler_and_futures_work_once_it_is_up(
    tmp_path: Path, dask_client: distributed.Client
) -> None:
    [port] = free_ports(1, "127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    with LocalCluster(3, base_dir=tmp_path / "c", extra_args=["--dask-scheduler", address]) as rc:
        rc.start()
        leader = rc.wait_ready(timeout=60)
        with raftchan.Client(rc.addresses, timeout=OP_TIMEOUT) as client:
            chan = client.channel("mixed")
            chan.append("data while Dask is away")
            # Data waits for no scheduler: a flush that did would raise Timeout here.
            chan.flush(timeout=DATA_BOUND)
        status = rc.status()[leader]
        assert status["dask_connected"] is False and status["dask_ready"] is False

        # A future (of another scheduler, the only one up) waits for the leader's keeper,
        # and flush says why when its deadline passes.
        waiting = raftchan.Client(rc.addresses, dask_client=dask_client, timeout=OP_TIMEOUT)
        try:
            waiting.channel("mixed").append(dask_client.submit(inc, 0))
            with pytest.raises(raftchan.Timeout, match="DaskUnavailable"):
                waiting.flush(timeout=FUTURE_WAIT)
        finally:
            waiting.close(timeout=0.1)
        assert "retrying in" in rc.logs()[rc.names[leader]]

        with (
            _local_dask(port) as dask_cluster,
            distributed.Client(dask_cluster, set_as_default=False) as dask,
            raftchan.Client(rc.addresses, dask_client=dask, timeout=OP_TIMEOUT) as client,
        ):
            chan = client.channel("mixed")
            chan.append(dask.submit(inc, 1))
            chan.flush()  # waits for the keeper's reconnection, then its confirmation
            data, *_, future = chan.data
            assert data == "data while Dask is away"
            assert future.result(timeout=OP_TIMEOUT) == 2
        assert "keeper re-asserted" in rc.logs()[rc.names[leader]]


def _local_dask(port: int) -> distributed.LocalCluster:
    return distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        scheduler_port=port,
        dashboard_address=None,
    )


def test_a_restarted_scheduler_makes_the_keeper_mark_the_keys_lost(tmp_path: Path) -> None:
    [port] = free_ports(1, "127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    with LocalCluster(3, base_dir=tmp_path / "c", extra_args=["--dask-scheduler", address]) as rc:
        rc.start()
        rc.wait_ready(timeout=60)
        with (
            _local_dask(port) as dask_cluster,
            distributed.Client(dask_cluster, set_as_default=False) as dask,
            raftchan.Client(rc.addresses, dask_client=dask, timeout=OP_TIMEOUT) as client,
        ):
            chan = client.channel("gone")
            future = dask.submit(inc, 1)
            key = future.key
            chan.append(future)
            chan.flush()
        # A new scheduler on the same address knows none of the old keys.
        with (
            _local_dask(port) as dask_cluster,
            distributed.Client(dask_cluster, set_as_default=False) as dask,
        ):
            deadline = time.monotonic() + RETRY_BOUND
            leader = rc.leader()
            while leader is None or "(1 unknown, marked lost" not in rc.logs()[rc.names[leader]]:
                assert time.monotonic() < deadline, "the keeper did not notice the new scheduler"
                time.sleep(0.2)
                leader = rc.leader()
            with raftchan.Client(rc.addresses, dask_client=dask, timeout=OP_TIMEOUT) as client:
                [lost] = client.channel("gone").data
                with pytest.raises(raftchan.FutureLost, match=key):
                    lost.result(timeout=OP_TIMEOUT)
