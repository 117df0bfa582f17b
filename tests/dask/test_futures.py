"""Dask futures in channels, on a real Dask scheduler with workers and a real 3-node cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import distributed
import pytest

import raftchan
from cluster.harness import LocalCluster
from raftchan.dask import pin_name

#: Seconds any single client operation may take on a loaded test machine.
OP_TIMEOUT = 60.0
#: Seconds a helper process may run.
PROCESS_TIMEOUT = 90.0
#: The bound the issue sets on noticing a lost key: far below any "hang".
LOST_BOUND = 10.0

REPO_ROOT = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent(
    """
    import sys, time
    import distributed, raftchan

    def slow_square(x):
        import time
        time.sleep(0.3)
        return x * x

    address, scheduler, channel, count = sys.argv[1:5]
    with distributed.Client(scheduler) as dask, raftchan.Client(
        address, dask_client=dask, timeout=60
    ) as client:
        chan = client.channel(channel)
        print("started", flush=True)
        for i in range(int(count)):
            chan.append(dask.submit(slow_square, i, pure=False))
            time.sleep(0.02)
        chan.flush()
        print("flushed", flush=True)
    """
)

READER = textwrap.dedent(
    """
    import json, sys
    import distributed, raftchan

    address, scheduler, channel = sys.argv[1:4]
    with distributed.Client(scheduler) as dask, raftchan.Client(
        address, dask_client=dask, timeout=60
    ) as client:
        items = client.channel(channel).data
        print(json.dumps([f.result(timeout=30) for f in items]), flush=True)
    """
)


def helper_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def inc(x: int) -> int:
    return x + 1


def release_behind_the_channels_back(client: distributed.Client, key: str, channel: str) -> None:
    """Make the channel's pseudo-client stop desiring ``key``, as a restarted scheduler would.

    Sent on ``client``'s own batched stream, after the pin the writer sent there when it
    appended: the scheduler handles one stream in order. A release sent any other way (an
    RPC such as ``run_on_scheduler``) can overtake that pin, which still sits in the
    client's 10 ms send buffer when the leader's confirmation answers a fast flush, and the
    late pin then keeps the key alive for good.
    """
    client._send_to_scheduler(
        {"op": "client-releases-keys", "keys": [key], "client": pin_name(channel)}
    )


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_futures_and_data_round_trip_to_another_dask_client(
    rc_cluster: LocalCluster,
    dask_cluster: distributed.LocalCluster,
    dask_client: distributed.Client,
) -> None:
    with raftchan.Client(rc_cluster.addresses, dask_client=dask_client, timeout=OP_TIMEOUT) as rc:
        chan = rc.channel("results")
        future = dask_client.submit(inc, 1)
        chan.append(future)
        chan.append({"x": 123})
        chan.append([dask_client.submit(inc, 10), "nested"])
        chan.flush()
        del future
    with (
        distributed.Client(dask_cluster, set_as_default=False) as other,
        raftchan.Client(rc_cluster.addresses, dask_client=other, timeout=OP_TIMEOUT) as reader,
    ):
        first, data, nested = reader.channel("results").data
        assert isinstance(first, distributed.Future) and first.client is other
        assert first.result(timeout=OP_TIMEOUT) == 2
        assert data == {"x": 123}
        assert nested[0].result(timeout=OP_TIMEOUT) == 11 and nested[1] == "nested"


@pytest.mark.parametrize("kill", ["after_exit", "during_write"])
def test_fire_and_forget_survives_the_writer_and_a_leader_kill(
    rc_cluster: LocalCluster, dask_cluster: distributed.LocalCluster, kill: str
) -> None:
    count = 10
    args = [rc_cluster.addresses, dask_cluster.scheduler_address, "fire"]
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, *args, str(count)],
        stdout=subprocess.PIPE,
        text=True,
        env=helper_env(),
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "started"
        if kill == "during_write":
            time.sleep(0.1)
            leader = rc_cluster.leader()
            assert leader is not None
            rc_cluster.kill(leader)
        out, _ = writer.communicate(timeout=PROCESS_TIMEOUT)
        assert writer.returncode == 0 and "flushed" in out
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    if kill == "after_exit":
        leader = rc_cluster.leader()
        assert leader is not None
        rc_cluster.kill(leader)
    rc_cluster.wait_leader(timeout=OP_TIMEOUT)
    # The writer's Dask client is gone: only the channel's pin keeps these keys.
    reader = subprocess.run(
        [sys.executable, "-c", READER, *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=helper_env(),
    )
    assert reader.returncode == 0, reader.stderr[-3000:]
    assert json.loads(reader.stdout) == [i * i for i in range(count)]


def test_maxlen_trimming_releases_the_trimmed_keys_only(
    rc_cluster: LocalCluster,
    dask_cluster: distributed.LocalCluster,
    dask_client: distributed.Client,
) -> None:
    with raftchan.Client(rc_cluster.addresses, dask_client=dask_client, timeout=OP_TIMEOUT) as rc:
        chan = rc.channel("trim", maxlen=3)
        futures = [dask_client.submit(inc, i, pure=False) for i in range(10)]
        keys = [f.key for f in futures]
        for future in futures:
            chan.append(future)
        chan.flush()
        del futures, future  # only the channel holds them now
        tasks = dask_cluster.scheduler.tasks
        wait_for(
            lambda: [k for k in keys if k in tasks] == keys[-3:],
            LOST_BOUND,
            "the scheduler to forget the 7 trimmed keys",
        )
        time.sleep(0.5)  # and not to forget the retained ones a little later
        assert [k for k in keys if k in tasks] == keys[-3:]
        assert [f.result(timeout=OP_TIMEOUT) for f in chan.data] == [8, 9, 10]
        chan.stop()
        chan.delete()
        wait_for(
            lambda: not [k for k in keys if k in tasks],
            LOST_BOUND,
            "the scheduler to forget the keys of the deleted channel",
        )


def test_a_lost_key_raises_future_lost_without_waiting_out_the_timeout(
    rc_cluster: LocalCluster,
    dask_cluster: distributed.LocalCluster,
    dask_client: distributed.Client,
) -> None:
    with raftchan.Client(rc_cluster.addresses, dask_client=dask_client, timeout=OP_TIMEOUT) as rc:
        chan = rc.channel("lost")
        future = dask_client.submit(inc, 1, pure=False)
        key = future.key
        chan.append(future)
        chan.flush()
        # The data goes away behind the channel's back, as when the scheduler restarts.
        release_behind_the_channels_back(dask_client, key, "lost")
        del future
        wait_for(lambda: key not in dask_cluster.scheduler.tasks, LOST_BOUND, "the key to go")

    with (
        distributed.Client(dask_cluster, set_as_default=False) as other,
        raftchan.Client(rc_cluster.addresses, dask_client=other, timeout=OP_TIMEOUT) as reader,
    ):
        [lost] = reader.channel("lost").data
        # A wait for the lost data would end in a timeout error, not FutureLost.
        with pytest.raises(raftchan.FutureLost, match=key):
            lost.result(timeout=LOST_BOUND)


def test_appending_a_key_the_scheduler_does_not_know_fails_flush_with_future_lost(
    rc_cluster: LocalCluster, dask_client: distributed.Client
) -> None:
    with raftchan.Client(rc_cluster.addresses, dask_client=dask_client, timeout=OP_TIMEOUT) as rc:
        chan = rc.channel("ghosts")
        chan.append(distributed.Future("raftchan-test-no-such-key", dask_client))
        chan.append("after")
        # A flush that waited for the key would end in Timeout, not FutureLost.
        with pytest.raises(raftchan.FutureLost, match="no-such-key"):
            chan.flush(timeout=LOST_BOUND)
        assert len(chan) == 2  # stored all the same, marked lost
        ghost, after = chan.data
        assert after == "after"
        with pytest.raises(raftchan.FutureLost):
            ghost.result(timeout=OP_TIMEOUT)


def test_a_cluster_without_a_dask_scheduler_refuses_futures(
    tmp_path: Path, dask_client: distributed.Client
) -> None:
    with LocalCluster(3, base_dir=tmp_path / "plain") as plain:
        plain.start()
        plain.wait_ready(timeout=60)
        with raftchan.Client(plain.addresses, dask_client=dask_client, timeout=OP_TIMEOUT) as rc:
            chan = rc.channel("c")
            chan.append(dask_client.submit(inc, 1))
            with pytest.raises(raftchan.RequestInvalid, match="dask-scheduler"):
                chan.flush()
            chan.append("data is fine")
            chan.flush()
            assert list(chan.data) == ["data is fine"]


def test_async_clients_on_one_loop(
    rc_cluster: LocalCluster, dask_cluster: distributed.LocalCluster
) -> None:
    import asyncio

    async def main() -> list[Any]:
        async with (
            distributed.Client(
                dask_cluster.scheduler_address, asynchronous=True, set_as_default=False
            ) as dask,
            raftchan.AsyncClient(rc_cluster.addresses, dask_client=dask, timeout=OP_TIMEOUT) as rc,
        ):
            chan = await rc.channel("async")
            chan.append(dask.submit(inc, 41))
            chan.append("data")
            await chan.flush()
            future, data = await chan.data()
            return [await future, data]

    assert asyncio.run(main()) == [42, "data"]


def test_scheduler_side_release_skips_names_the_scheduler_does_not_know(
    dask_cluster: distributed.LocalCluster, dask_client: distributed.Client
) -> None:
    from raftchan import _scheduler_ops

    future = dask_client.submit(inc, 5, pure=False)
    future.result(timeout=OP_TIMEOUT)
    name = pin_name("scheduler-ops")
    # Releasing under an unknown name would raise KeyError on the scheduler and close the
    # connection (cancelling this client's futures); it must be a no-op instead.
    released = dask_client.run_on_scheduler(
        _scheduler_ops.release, {pin_name("never-used"): [future.key]}
    )
    assert released == 0 and future.status == "finished"
    missing = dask_client.run_on_scheduler(
        _scheduler_ops.pin, {name: [future.key, "no-such-key"]}, 0.1
    )
    assert missing == {name: ["no-such-key"]}
    assert dask_client.run_on_scheduler(_scheduler_ops.release, {name: [future.key]}) == 1
    assert future.result(timeout=OP_TIMEOUT) == 6


def test_a_new_leader_releases_pins_no_item_references(
    rc_cluster: LocalCluster,
    dask_cluster: distributed.LocalCluster,
    dask_client: distributed.Client,
) -> None:
    with raftchan.Client(rc_cluster.addresses, dask_client=dask_client, timeout=OP_TIMEOUT) as rc:
        chan = rc.channel("orphans")
        kept = dask_client.submit(inc, 1, pure=False)
        chan.append(kept)
        chan.flush()
        # A writer that pinned a key and died before its append reached the cluster (or a
        # leader that died before sending a release) leaves a pin no item references.
        orphan = dask_client.submit(inc, 2, pure=False)
        orphan.result(timeout=OP_TIMEOUT)  # known to the scheduler before the pin below
        orphan_key, kept_key = orphan.key, kept.key
        dask_client.run_on_scheduler(_desire_on_scheduler, [orphan_key], pin_name("orphans"))
        del orphan, kept
        tasks = dask_cluster.scheduler.tasks
        time.sleep(0.5)
        assert orphan_key in tasks
        leader = rc_cluster.leader()
        assert leader is not None
        rc_cluster.kill(leader)
        rc_cluster.wait_leader(timeout=OP_TIMEOUT)
        wait_for(lambda: orphan_key not in tasks, LOST_BOUND, "the orphan pin to be released")
        assert kept_key in tasks
        [item] = chan.data
        assert item.result(timeout=OP_TIMEOUT) == 2


def _desire_on_scheduler(keys: list[str], name: str, dask_scheduler: Any = None) -> None:
    dask_scheduler.client_desires_keys(keys=keys, client=name)


def test_futures_read_on_their_dask_clients_loop_come_back_finished(
    rc_cluster: LocalCluster, dask_cluster: distributed.LocalCluster
) -> None:
    # A reader gets the futures of keys in memory finished, not pending until the
    # scheduler's report on each key arrives (a gather of many then waited for those).
    import asyncio

    async def main() -> tuple[list[str], list[int]]:
        async with (
            distributed.Client(
                dask_cluster.scheduler_address, asynchronous=True, set_as_default=False
            ) as writer,
            distributed.Client(
                dask_cluster.scheduler_address, asynchronous=True, set_as_default=False
            ) as reader,
            raftchan.AsyncClient(rc_cluster.addresses, dask_client=writer, timeout=OP_TIMEOUT) as w,
            raftchan.AsyncClient(rc_cluster.addresses, dask_client=reader, timeout=OP_TIMEOUT) as r,
        ):
            futures = writer.map(inc, range(50), pure=False)
            await writer.gather(futures)
            chan = await w.channel("finished")
            chan.extend(futures)
            await chan.flush()
            got = await (await r.channel("finished")).read()
            statuses = [future.status for future in got]
            return statuses, await reader.gather(got)

    statuses, results = asyncio.run(main())
    assert statuses == ["finished"] * 50
    assert results == list(range(1, 51))


def test_a_future_of_a_dask_client_still_starting_is_appended(
    rc_cluster: LocalCluster, dask_cluster: distributed.LocalCluster
) -> None:
    # Inside a task, worker_client() can hand out the client another task's thread is
    # still starting (it is the default client before it has connected). That client
    # queues its messages until it connects, the pin after the submission, so its futures
    # must be accepted, not refused as those of a closed client.
    import asyncio

    async def main() -> tuple[str, list[Any]]:
        async with (
            distributed.Client(
                dask_cluster.scheduler_address, asynchronous=True, set_as_default=False
            ) as reader,
            raftchan.AsyncClient(
                rc_cluster.addresses, dask_client=reader, timeout=OP_TIMEOUT
            ) as rc,
        ):
            chan = await rc.channel("starting")
            starting = distributed.Client(
                dask_cluster.scheduler_address, asynchronous=True, set_as_default=False
            )
            status = starting.status
            chan.append(starting.submit(inc, 41, pure=False))
            async with starting:
                await chan.flush()
                [future] = await chan.data()
                return status, [await future]

    assert asyncio.run(main()) == ("newly-created", [42])
