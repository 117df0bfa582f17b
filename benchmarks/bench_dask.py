"""Measure Dask futures in raftchan channels on a real Dask cluster and a real 3-node cluster.

Figures:

1. append+flush throughput, items per second, of one client appending ``--items`` items
   and flushing once: plain data items versus Dask futures of finished tasks (the futures
   are created before the clock starts; what is timed is encoding, the writer's pin, the
   commit and the leader's pin confirmation);
2. end-to-end lag of a finished future: from ``append`` in the writer to ``.result()``
   returning in a reader iterating the channel with its own Dask client (appends paced
   ``--pace`` seconds apart so that the figure is latency, not queueing);
3. re-assert: time a new leader takes to re-pin ``--repin`` keys after the old leader is
   SIGKILLed (as logged and reported in the node's status).

The Dask scheduler and two workers run in this process (TCP); the raftchan nodes run
with the nodes' default Raft timing and fsync. Prints one JSON document. Run
``python benchmarks/bench_dask.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import distributed

import raftchan
from cluster.harness import LocalCluster


def inc(x: int) -> int:
    return x + 1


def throughput(rc: raftchan.Client, name: str, items: list[Any]) -> float:
    chan = rc.channel(name)
    started = time.perf_counter()
    chan.extend(items)
    chan.flush()
    return len(items) / (time.perf_counter() - started)


def lag(
    addresses: str, dask: distributed.LocalCluster, count: int, pace: float
) -> dict[str, float]:
    """Milliseconds from append to the reader's Future.result() for finished futures."""
    seen: dict[int, float] = {}
    ready = threading.Event()

    def read() -> None:
        with (
            distributed.Client(dask, set_as_default=False) as dc,
            raftchan.Client(addresses, dask_client=dc, poll_wait=1.0) as reader,
        ):
            chan = reader.channel("lag")
            ready.set()
            for index, future in enumerate(chan):
                future.result(timeout=30)
                seen[index] = time.perf_counter()
                if index == count - 1:
                    return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    ready.wait(30)
    sent: dict[int, float] = {}
    with (
        distributed.Client(dask, set_as_default=False) as dc,
        raftchan.Client(addresses, dask_client=dc) as writer,
    ):
        chan = writer.channel("lag")
        futures = [dc.submit(inc, i, pure=False) for i in range(count)]
        dc.gather(futures)
        time.sleep(0.5)  # the reader's first poll is in place
        for index, future in enumerate(futures):
            sent[index] = time.perf_counter()
            chan.append(future)
            time.sleep(pace)
        chan.flush()
        thread.join(60)
    lags = sorted(seen[i] - sent[i] for i in seen)
    return {
        "count": len(lags),
        "p50_ms": 1000 * statistics.median(lags),
        "p95_ms": 1000 * lags[int(0.95 * (len(lags) - 1))],
        "max_ms": 1000 * lags[-1],
    }


def reassert(cluster: LocalCluster, rc: raftchan.Client, dc: distributed.Client, n: int) -> Any:
    chan = rc.channel("repin")
    futures = dc.scatter(list(range(n)))
    chan.extend(futures)
    chan.flush()
    del futures
    old = cluster.leader()
    assert old is not None
    cluster.kill(old)
    killed = time.perf_counter()
    new = cluster.wait_leader(60)
    while True:
        status = cluster.status()[new]
        # Every key of every channel is re-asserted, not only this channel's.
        if status.get("dask_ready") and status.get("dask_reassert_keys", 0) >= n:
            return {
                "keys": status["dask_reassert_keys"],
                "reassert_s": status["dask_reassert_seconds"],
                "kill_to_reasserted_s": time.perf_counter() - killed,
            }
        if time.perf_counter() - killed > 120:
            raise TimeoutError(status)
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000, help="items per throughput run")
    parser.add_argument("--lag-items", type=int, default=200, help="futures in the lag run")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between lag appends")
    parser.add_argument("--repin", type=int, default=10_000, help="keys re-asserted")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory() as tmp,
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=False,
            protocol="tcp",
            dashboard_address=None,
        ) as dask,
    ):
        cluster = LocalCluster(
            3,
            base_dir=Path(tmp) / "cluster",
            tuning=None,
            extra_args=["--dask-scheduler", dask.scheduler_address],
            log_level="WARNING",
        )
        with cluster:
            cluster.start()
            cluster.wait_ready(60)
            result: dict[str, Any] = {"items": args.items}
            with (
                distributed.Client(dask, set_as_default=False) as dc,
                raftchan.Client(cluster.addresses, dask_client=dc, timeout=120) as rc,
            ):
                data = [{"x": i} for i in range(args.items)]
                result["data_items_per_s"] = throughput(rc, "data", data)
                futures = dc.map(inc, range(args.items), pure=False)
                dc.gather(futures)
                result["future_items_per_s"] = throughput(rc, "futures", futures)
                del futures
                result["lag"] = lag(cluster.addresses, dask, args.lag_items, args.pace)
                result["reassert"] = reassert(cluster, rc, dc, args.repin)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
