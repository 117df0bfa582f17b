"""Dask ``distributed.Queue`` between two clients through a real scheduler process."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
from pathlib import Path
from typing import Any

from cluster.ports import free_ports

from .core import Appender, Config, Process, System, say, stop_all, wait_tcp
from .futures import queue_futures, scheduler_process

HOST = "127.0.0.1"
QUEUE = "bench"


class DaskQueue(System):
    name = "dask-queue"
    guarantees = (
        "One scheduler process, nothing replicated or written to disk: put returns once "
        "the scheduler holds the item in memory; it is gone if the scheduler dies."
    )
    no_failover = "one scheduler, nothing replicated: there is nothing to fail over to"
    no_recovery = "nothing is written to disk: a restarted scheduler starts empty"
    no_fanout = (
        "a distributed.Queue hands each item to one reader, so it cannot fan out "
        "(Dask's Pub/Sub has no acknowledgement and is not measured)"
    )

    def __init__(self) -> None:
        self.procs: list[Process] = []
        self.address = ""
        self.producer: Any = None
        self.consumer: Any = None
        self.consumer_task: asyncio.Task[None] | None = None
        self.consumed = 0
        self.put = 0
        self._stop_consumer = False

    def start(self, workdir: Path) -> None:
        (port,) = free_ports(1, HOST)
        self.address = f"tcp://{HOST}:{port}"
        self.procs.append(scheduler_process(port, workdir / "dask" / "scheduler.log"))
        asyncio.run(wait_tcp(HOST, port, 60.0, self.procs[0]))
        say(f"  dask-queue: scheduler ready at {self.address} (pid {self.procs[0].pid})")

    async def _clients(self) -> None:
        from distributed import Client, Queue

        if self.producer is None:
            self.producer = await Client(self.address, asynchronous=True)
            self.consumer = await Client(self.address, asynchronous=True)
            self._stop_consumer = False
            queue = Queue(QUEUE, client=self.consumer)
            self.consumer_task = asyncio.create_task(self._consume(queue))

    async def _consume(self, queue: Any) -> None:
        # The second client drains the queue as a reader would, so that it does not grow
        # without bound; ``batch=True`` takes whatever is there without waiting.
        while not self._stop_consumer:
            got = await queue.get(batch=True)
            self.consumed += len(got)
            if not got:
                await asyncio.sleep(0.005)

    async def open_appenders(self, n: int, shared: bool) -> list[Appender]:
        from distributed import Queue

        await self._clients()
        queue = Queue(QUEUE, client=self.producer)

        async def append(item: bytes) -> None:
            await queue.put(item)
            self.put += 1

        return [append] * n

    async def close_appenders(self) -> None:
        pass

    async def count(self) -> int | None:
        # Wait (bounded) for the consumer to catch up, then stop and close both clients.
        for _ in range(200):
            if self.consumed >= self.put:
                break
            await asyncio.sleep(0.05)
        self._stop_consumer = True
        if self.consumer_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer_task, 10.0)
        for client in (self.producer, self.consumer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        self.producer = self.consumer = None
        return self.consumed

    async def futures(self, cfg: Config, workdir: Path) -> dict[str, Any]:
        # A scheduler with workers of its own, like raftchan's futures workload has.
        return await queue_futures(cfg.futures_items, workdir)

    def stop(self) -> None:
        stop_all(self.procs)

    def versions(self) -> dict[str, str]:
        return {
            "distributed": importlib.metadata.version("distributed"),
            "dask": importlib.metadata.version("dask"),
        }

    def settings(self) -> dict[str, Any]:
        return {
            "scheduler": "separate process",
            "clients": 2,
            "producers": "coroutines of one asynchronous client",
            "reader": "second client, get(batch=True)",
        }
