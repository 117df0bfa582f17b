"""Many futures in one channel: a new leader re-asserts every key, and how long that takes."""

from __future__ import annotations

import time

import distributed
import pytest

import raftchan
from cluster.harness import LocalCluster

COUNT = 10_000
#: Bounds the whole re-assert after a leader change, election included.
REPIN_BOUND = 60.0


@pytest.mark.slow
def test_a_new_leader_re_asserts_ten_thousand_keys(
    rc_cluster: LocalCluster,
    dask_cluster: distributed.LocalCluster,
    dask_client: distributed.Client,
    record_property: pytest.RecordProperty,
) -> None:
    with raftchan.Client(rc_cluster.addresses, dask_client=dask_client, timeout=120) as rc:
        chan = rc.channel("many")
        futures = dask_client.scatter(list(range(COUNT)))
        started = time.perf_counter()
        chan.extend(futures)
        chan.flush()
        appended = time.perf_counter() - started
        keys = {f.key for f in futures}
        del futures
        old = rc_cluster.leader()
        assert old is not None
        rc_cluster.kill(old)
        killed = time.perf_counter()
        new = rc_cluster.wait_leader(timeout=REPIN_BOUND)
        deadline = killed + REPIN_BOUND
        while True:
            status = rc_cluster.status()[new]
            if status.get("dask_ready") and status.get("dask_reassert_keys") == COUNT:
                break
            assert time.perf_counter() < deadline, status
            time.sleep(0.1)
        ready = time.perf_counter() - killed
        repin = status["dask_reassert_seconds"]
        record_property("append_flush_seconds", appended)
        record_property("reassert_seconds", repin)
        record_property("kill_to_reasserted_seconds", ready)
        print(
            f"\n{COUNT} futures: append+flush {appended:.2f} s; new leader re-asserted them in "
            f"{repin:.3f} s; kill to re-asserted {ready:.2f} s"
        )
        assert keys <= set(dask_cluster.scheduler.tasks)
        values = dask_client.gather(list(chan.read(COUNT - 5, COUNT)))
        assert values == list(range(COUNT - 5, COUNT))
