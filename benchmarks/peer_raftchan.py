"""raftchan: three ``raftchan node`` processes through :class:`cluster.LocalCluster`."""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import raftchan
from cluster.harness import LocalCluster

from .core import Appender, Publisher, Skipped, System, say

CHANNEL = "bench"
READY_TIMEOUT_S = 60.0
FLUSH_TIMEOUT_S = 30.0


class Raftchan(System):
    name = "raftchan"
    guarantees = (
        "3 nodes; an append is acknowledged (flush returns) once a Raft majority (2 of 3) "
        "has it in its journal, fsynced (node default: fsync always), and the leader applied it."
    )

    def __init__(self) -> None:
        self.cluster: LocalCluster | None = None
        self.clients: list[raftchan.AsyncClient] = []

    def start(self, workdir: Path) -> None:
        # Default Raft timing and the default fsync policy: what a deployment gets.
        self.cluster = LocalCluster(3, workdir / "raftchan", tuning=None)
        self.cluster.start()
        try:
            self.cluster.wait_ready(READY_TIMEOUT_S)
        except Exception as exc:
            say(self.cluster.log_tails(10))
            raise Skipped(f"the cluster did not become ready: {exc}") from exc
        pids = [node.pid for node in self.cluster.nodes]
        say(f"  raftchan: 3 nodes ready (pids {pids})")

    async def open_appenders(self, n: int, shared: bool) -> list[Appender]:
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
                chan = await client.channel(CHANNEL)

            async def append(item: bytes, chan: raftchan.AsyncChannel = chan) -> None:
                chan.append(item)
                await chan.flush(FLUSH_TIMEOUT_S)

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
