"""raftchan: three ``raftchan node`` processes through :class:`cluster.LocalCluster`."""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import raftchan
from cluster.harness import LocalCluster

from .core import Appender, Config, Publisher, Skipped, System, Unsupported, say
from .futures import DaskProcesses, measure_futures
from .recovery import measure_recovery

CHANNEL = "bench"
FAILOVER_CHANNEL = "failover"
FUTURES_CHANNEL = "futures"
READY_TIMEOUT_S = 60.0
FLUSH_TIMEOUT_S = 30.0


class Raftchan(System):
    name = "raftchan"
    guarantees = (
        "3 nodes; an append is acknowledged (flush returns) once a Raft majority (2 of 3) "
        "has it in its journal, fsynced (node default: fsync always), and the leader applied it."
    )

    failover_client = (
        "one AsyncClient per producer, all three node addresses; append + flush, the client "
        "follows the leader hints and re-sends unanswered appends in its session (the "
        "nodes drop a re-sent copy)"
    )

    def __init__(self) -> None:
        self.cluster: LocalCluster | None = None
        self.clients: list[raftchan.AsyncClient] = []

    #: More ``raftchan node`` arguments (none: the node defaults).
    node_args: tuple[str, ...] = ()

    def start(self, workdir: Path) -> None:
        # Default Raft timing and the default fsync policy: what a deployment gets.
        self.cluster = LocalCluster(
            3, workdir / self.name, tuning=None, extra_args=list(self.node_args)
        )
        self.cluster.start()
        try:
            self.cluster.wait_ready(READY_TIMEOUT_S)
        except Exception as exc:
            say(self.cluster.log_tails(10))
            raise Skipped(f"the cluster did not become ready: {exc}") from exc
        pids = [node.pid for node in self.cluster.nodes]
        say(f"  raftchan: 3 nodes ready (pids {pids})")

    async def open_appenders(self, n: int, shared: bool) -> list[Appender]:
        return await self._appenders(n, shared, CHANNEL, FLUSH_TIMEOUT_S)

    async def _appenders(
        self, n: int, shared: bool, channel: str, timeout: float
    ) -> list[Appender]:
        assert self.cluster is not None
        appenders: list[Appender] = []
        chan: raftchan.AsyncChannel | None = None
        for _ in range(n):
            if chan is None or not shared:
                # Shared: one client for all producers (a flush returns once every append
                # the client made before it is committed). Otherwise one client each, as
                # separate programs would have.
                client = raftchan.AsyncClient(self.cluster.addresses)
                self.clients.append(client)
                chan = await client.channel(channel)

            async def append(item: bytes, chan: raftchan.AsyncChannel = chan) -> None:
                chan.append(item)
                await chan.flush(timeout)

            appenders.append(append)
        return appenders

    async def open_fanout(
        self, topic: str, subscribers: int
    ) -> tuple[Publisher, list[AsyncIterator[bytes]]]:
        assert self.cluster is not None
        client = raftchan.AsyncClient(self.cluster.addresses)
        self.clients.append(client)
        chan = await client.channel(topic)

        async def publish(items: list[bytes]) -> None:
            chan.extend(items)
            await chan.flush(FLUSH_TIMEOUT_S)

        subs: list[AsyncIterator[bytes]] = []
        for _ in range(subscribers):
            # One client per subscriber, as separate reading programs would have.
            reader = raftchan.AsyncClient(self.cluster.addresses)
            self.clients.append(reader)
            subs.append((await reader.channel(topic)).iterate())
        return publish, subs

    async def close_appenders(self) -> None:
        clients, self.clients = self.clients, []
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    async def count(self) -> int | None:
        assert self.cluster is not None
        client = raftchan.AsyncClient(self.cluster.addresses)
        try:
            chan = await client.channel(CHANNEL)
            return await chan.len(FLUSH_TIMEOUT_S)
        finally:
            await client.close()

    # -- failover ------------------------------------------------------------------------

    async def open_failover(self, n: int, op_timeout: float) -> list[Appender]:
        return await self._appenders(n, False, FAILOVER_CHANNEL, op_timeout)

    async def failover_leader(self) -> int:
        assert self.cluster is not None
        return await asyncio.to_thread(self.cluster.wait_leader, READY_TIMEOUT_S)

    def server_name(self, i: int) -> str:
        assert self.cluster is not None
        return self.cluster.names[i]

    def kill_server(self, i: int) -> None:
        assert self.cluster is not None
        self.cluster.kill(i)

    async def restart_server(self, i: int) -> None:
        assert self.cluster is not None
        self.cluster.restart(i)
        await asyncio.to_thread(self.cluster.wait_ready, READY_TIMEOUT_S)

    def freeze_server(self, i: int) -> None:
        assert self.cluster is not None
        self.cluster.pause(i)

    async def thaw_server(self, i: int) -> None:
        assert self.cluster is not None
        self.cluster.resume(i)
        await asyncio.to_thread(self.cluster.wait_ready, READY_TIMEOUT_S)

    async def failover_stored(self) -> list[bytes]:
        assert self.cluster is not None
        async with raftchan.AsyncClient(self.cluster.addresses) as client:
            chan = await client.channel(FAILOVER_CHANNEL)
            return list(await chan.read(timeout=FLUSH_TIMEOUT_S))

    # -- recovery and futures ----------------------------------------------------------

    async def recovery(self, cfg: Config, workdir: Path) -> dict[str, Any]:
        # A cluster of its own: memory per item needs nodes holding only these items.
        return await asyncio.to_thread(measure_recovery, cfg, workdir)

    async def futures(self, cfg: Config, workdir: Path) -> dict[str, Any]:
        dask = DaskProcesses(workdir / "raftchan-futures-dask")
        cluster: LocalCluster | None = None
        opened: list[raftchan.AsyncClient] = []
        try:
            address = await dask.start()
            # Nodes that keep this scheduler's futures (--dask-scheduler): a cluster of
            # its own, the throughput cluster runs without.
            cluster = LocalCluster(
                3,
                workdir / "raftchan-futures",
                tuning=None,
                extra_args=["--dask-scheduler", address],
                log_level="WARNING",
            )
            cluster.start()
            await asyncio.to_thread(cluster.wait_ready, READY_TIMEOUT_S)
            addresses = cluster.addresses

            async def channel(dask_client: Any) -> raftchan.AsyncChannel:
                client = raftchan.AsyncClient(addresses, dask_client=dask_client, timeout=120.0)
                opened.append(client)
                return await client.channel(FUTURES_CHANNEL)

            async def handover(dask_client: Any, futures: list[Any]) -> None:
                chan = await channel(dask_client)
                chan.extend(futures)
                await chan.flush()

            async def takeover(dask_client: Any, n: int) -> list[Any]:
                return await (await channel(dask_client)).read()

            return await measure_futures(self.name, cfg.futures_items, address, handover, takeover)
        finally:
            await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)
            if cluster is not None:
                cluster.close()
            dask.stop()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster.close()

    def versions(self) -> dict[str, str]:
        return {
            "raftchan": importlib.metadata.version("raftchan"),
            "pysyncobj": importlib.metadata.version("pysyncobj"),
        }

    def settings(self) -> dict[str, Any]:
        return {"nodes": 3, "tuning": "node defaults", "fsync": "always (node default)"}


class RaftchanNoFsync(Raftchan):
    """raftchan with ``--fsync never``: the same nodes, journal writes left to the OS.

    Measured beside the default to show what the fsyncs cost, and to compare like with
    like against the peers that acknowledge from memory (NATS JetStream's default,
    ``redis-r3-batch``). Only the append and fan-out workloads: failover, recovery and
    futures do not depend on the fsync policy.
    """

    name = "raftchan-nofsync"
    guarantees = (
        "as raftchan, but with --fsync never: a majority has the entry in its journal "
        "file (the OS page cache), which survives killed processes, not a power loss of "
        "a majority of machines."
    )
    node_args = ("--fsync", "never")
    no_failover = no_recovery = no_futures = (
        "measured with the node default (raftchan); the fsync policy does not change it"
    )

    async def open_failover(self, n: int, op_timeout: float) -> list[Appender]:
        raise Unsupported(self.no_failover)

    async def recovery(self, cfg: Config, workdir: Path) -> dict[str, Any]:
        raise Unsupported(self.no_recovery)

    async def futures(self, cfg: Config, workdir: Path) -> dict[str, Any]:
        raise Unsupported(self.no_futures)

    def settings(self) -> dict[str, Any]:
        return {"nodes": 3, "tuning": "node defaults", "fsync": "never"}
