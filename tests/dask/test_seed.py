"""The worker_client() example of the old Dask Channels documentation, run as written.

Only two things differ from the old docs: the one-line opt-in ``raftchan.dask.install()``
(and the raftchan address in ``$RAFTCHAN_ADDRESS``), and ``random_number`` in place of
``random.random``, which ``submit(..., pure=False)`` would pickle with its generator state,
returning the same number every time. The emitters sleep a little per item so the test
does not flood the machine; they end, like every loop here, when the channels are stopped.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterator

import distributed
import pytest
from distributed import worker_client

import raftchan
import raftchan.dask
from cluster.harness import LocalCluster

#: Sums the test reads before it stops the channels.
SUMS = 20
#: Seconds every task may take to end after the channels are stopped.
END_BOUND = 15.0


def random_number() -> float:
    import random

    return random.random()


def emit(name: str) -> None:
    with worker_client() as c:
        chan = c.channel(name)
        while True:
            future = c.submit(random_number, pure=False)
            chan.append(future)
            time.sleep(0.02)


def combine() -> None:
    with worker_client() as c:
        a_chan = c.channel("a")
        b_chan = c.channel("b")
        out_chan = c.channel("adds")
        for a, b in zip(a_chan, b_chan):  # noqa: B905 - the old docs, as written
            future = c.submit(operator.add, a, b)
            out_chan.append(future)


@pytest.fixture(name="installed")
def installed_fixture(
    rc_cluster: LocalCluster, dask_client: distributed.Client, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    monkeypatch.setenv("RAFTCHAN_ADDRESS", rc_cluster.addresses)
    raftchan.dask.install(dask_client)  # here and on the workers (in this process here)
    try:
        yield
    finally:
        raftchan.dask.uninstall()


@pytest.mark.usefixtures("installed")
def test_the_old_docs_worker_client_example_runs_and_stop_ends_every_loop(
    dask_client: distributed.Client,
) -> None:
    client = dask_client
    emitters = (client.submit(emit, "a"), client.submit(emit, "b"))
    combiner = client.submit(combine)
    chan = client.channel("adds")

    sums = []
    for future in chan:
        sums.append(future.result(timeout=30))
        if len(sums) == SUMS:
            break

    for name in ("a", "b", "adds"):
        client.channel(name).stop()
    # The emitters end when their next append meets the stopped channel; the combiner
    # when its iterations end (or its last append meets the stopped 'adds'). A task still
    # running at the bound makes wait() raise TimeoutError.
    distributed.wait([*emitters, combiner], timeout=END_BOUND)
    for task in (*emitters, combiner):
        if task.status == "error":
            assert isinstance(task.exception(), raftchan.ChannelStopped)

    a_values = [f.result(timeout=30) for f in client.channel("a").read(0, SUMS)]
    b_values = [f.result(timeout=30) for f in client.channel("b").read(0, SUMS)]
    assert sums == [a + b for a, b in zip(a_values, b_values, strict=True)]
    assert len(set(a_values)) == SUMS  # really random: pure=False with a fresh draw each time
