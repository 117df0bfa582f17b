"""Futures: Dask futures handed from one client to another, through raftchan or a
``distributed.Queue``.

Each system gets a Dask cluster of its own: one ``dask scheduler`` process and two
``dask worker`` processes (two threads each) on loopback. A writer client submits
``cfg.futures_items`` small tasks (``operator.add(i, 1)``) and waits until they are done;
then the clock runs for

- **append**: the writer hands every future over and waits until all are acknowledged
  (raftchan: ``extend`` + one ``flush``, the nodes pinning the keys on the scheduler;
  Queue: one ``put`` per future, 64 in flight, the scheduler holding them);
- **read + gather**: a second Dask client reads them back (raftchan: ``read`` of the
  channel with its own raftchan client; Queue: ``get(batch=n)``) and gathers their
  results from the workers.

The results are checked (each ``i + 1`` once). What is not timed: submitting the tasks
and running them.
"""

from __future__ import annotations

import asyncio
import operator
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cluster.ports import free_ports

from .core import Process, say, stop_all, wait_tcp

HOST = "127.0.0.1"
WORKERS = 2
THREADS_PER_WORKER = 2
#: Futures put into a Queue at once (it has no batch put).
QUEUE_IN_FLIGHT = 64
READY_TIMEOUT_S = 60.0
OP_TIMEOUT_S = 120.0

#: Hands the futures over: (writer's Dask client, futures) -> None once acknowledged.
Handover = Callable[[Any, list[Any]], Awaitable[None]]
#: Reads ``n`` futures back with the reader's Dask client.
Takeover = Callable[[Any, int], Awaitable[list[Any]]]


def scheduler_process(port: int, log_path: Path) -> Process:
    """A ``dask scheduler`` process on loopback ``port``, without a dashboard."""
    argv = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    return Process(
        "dask-scheduler", [*argv, "--host", HOST, "--port", str(port), "--no-dashboard"], log_path
    )


class DaskProcesses:
    """A scheduler and :data:`WORKERS` worker processes, stopped by pid."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Process] = []
        self.address = ""

    async def start(self) -> str:
        (port,) = free_ports(1, HOST)
        self.address = f"tcp://{HOST}:{port}"
        self.procs.append(scheduler_process(port, self.workdir / "scheduler.log"))
        await wait_tcp(HOST, port, READY_TIMEOUT_S, self.procs[0])
        for k in range(WORKERS):
            self.procs.append(
                Process(
                    f"dask-worker{k + 1}",
                    [
                        sys.executable,
                        "-m",
                        "distributed.cli.dask_worker",
                        self.address,
                        "--host",
                        HOST,
                        "--nthreads",
                        str(THREADS_PER_WORKER),
                        "--no-dashboard",
                        "--local-directory",
                        str(self.workdir / f"w{k + 1}"),
                    ],  # fmt: skip
                    self.workdir / f"worker{k + 1}.log",
                )
            )
        return self.address

    def stop(self) -> None:
        stop_all(self.procs)


async def measure_futures(
    name: str, items: int, address: str, handover: Handover, takeover: Takeover
) -> dict[str, Any]:
    """Time ``handover`` and ``takeover`` + gather of ``items`` finished futures."""
    from distributed import Client

    writer = await Client(address, asynchronous=True)
    reader = await Client(address, asynchronous=True)
    try:
        await asyncio.wait_for(writer.wait_for_workers(WORKERS), READY_TIMEOUT_S)
        futures = writer.map(operator.add, range(items), [1] * items, pure=False)
        await writer.gather(futures)  # every task done before the clock starts
        say(f"  {name}: futures, {items:,} finished futures handed over and read back ...")
        started = time.perf_counter()
        await asyncio.wait_for(handover(writer, futures), OP_TIMEOUT_S)
        appended = time.perf_counter()
        got = await asyncio.wait_for(takeover(reader, items), OP_TIMEOUT_S)
        results = await asyncio.wait_for(reader.gather(got), OP_TIMEOUT_S)
        gathered = time.perf_counter()
    finally:
        for client in (reader, writer):
            await client.close()
    correct = sorted(results) == list(range(1, items + 1))
    figures = {
        "items": items,
        "append_items_per_s": round(items / (appended - started), 1),
        "read_gather_items_per_s": round(items / (gathered - appended), 1),
        "append_s": round(appended - started, 3),
        "read_gather_s": round(gathered - appended, 3),
        "results_correct": correct,
        "dask_cluster": f"1 scheduler + {WORKERS} worker processes x {THREADS_PER_WORKER} threads",
    }
    say(
        f"    append {figures['append_items_per_s']:,.0f}/s, read+gather "
        f"{figures['read_gather_items_per_s']:,.0f}/s, results correct: {correct}"
    )
    return figures


async def queue_futures(items: int, workdir: Path) -> dict[str, Any]:
    """The futures workload through a ``distributed.Queue`` (two clients, one scheduler)."""
    from distributed import Queue

    dask = DaskProcesses(workdir / "dask-futures")
    try:
        address = await dask.start()

        async def handover(client: Any, futures: list[Any]) -> None:
            queue = Queue("futures", client=client)
            pending = iter(futures)

            async def putter() -> None:
                for future in pending:
                    await queue.put(future)

            await asyncio.gather(*(putter() for _ in range(QUEUE_IN_FLIGHT)))

        async def takeover(client: Any, n: int) -> list[Any]:
            return list(await Queue("futures", client=client).get(batch=n))

        return await measure_futures("dask-queue", items, address, handover, takeover)
    finally:
        dask.stop()
