"""Redis Streams: one ``redis-server``; a primary with two replicas and ``WAIT 2`` after
every append; and a primary with two replicas, in memory only, that acknowledges pipelines
of up to 100 appends with one ``WAIT 1``.

The first two run every server with ``appendonly yes`` and ``appendfsync always``: Redis
writes and fsyncs its append-only file before it answers a write, which is the durable
setting comparable to raftchan's fsynced journal. An append is one ``XADD`` to one stream
key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cluster.ports import free_ports

from .core import (
    Appender,
    BatchingAppender,
    Process,
    Publisher,
    ServerSystem,
    Skipped,
    say,
    wait_tcp,
)

HOST = "127.0.0.1"
STREAM = "bench"
READY_TIMEOUT_S = 30.0
#: Milliseconds ``WAIT`` may block before it returns with fewer replicas than asked.
WAIT_TIMEOUT_MS = 10_000
#: Seconds one command may wait for its reply (the harness's own limit per append).
OP_TIMEOUT_S = 30.0
#: Persistence settings of each server; the replicated sets add ``replicaof``.
DURABLE = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")
#: Neither an append-only file nor RDB snapshots: the data lives in memory only.
MEMORY_ONLY = ("--appendonly", "no", "--save", "")


class RedisStreams(ServerSystem):
    """A single server: the speed reference (nothing replicated)."""

    name = "redis"
    guarantees = (
        "1 server, appendonly yes + appendfsync always: XADD returns once the entry is "
        "in the append-only file, fsynced. Nothing is replicated: a lost disk or machine "
        "loses the stream, and it is unavailable while the server is down."
    )
    #: Replicas started beside the primary.
    replicas = 0
    #: Replicas that must acknowledge each pipeline of XADDs (``WAIT n``) before its
    #: items count (0: no WAIT).
    wait_replicas = 0
    #: Each server's persistence settings.
    persistence: tuple[str, ...] = DURABLE
    no_failover = "one server: there is nothing to fail over to"
    no_recovery = "the peers' restarts are not part of this harness yet (raftchan only)"

    binary_name, apt_package = "redis-server", "redis-server"
    client_package = client_module = "redis"

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[int] = []
        self.batchers: list[BatchingAppender] = []

    def start(self, workdir: Path) -> None:
        self.require()
        self.ports = free_ports(1 + self.replicas, HOST)
        base = workdir / self.name
        for i, port in enumerate(self.ports):
            role = "primary" if i == 0 else f"replica{i}"
            folder = base / role
            folder.mkdir(parents=True, exist_ok=True)
            argv = [
                self.binary,
                "--bind",
                HOST,
                "--port",
                str(port),
                "--dir",
                str(folder),
                "--daemonize",
                "no",
                *self.persistence,
            ]
            if i > 0:
                argv += ["--replicaof", HOST, str(self.ports[0])]
            self.procs.append(Process(f"{self.name} {role}", argv, base / f"{role}.log"))
        say(
            f"  {self.name}: {len(self.procs)} server(s) started "
            f"(pids {[p.pid for p in self.procs]})"
        )
        asyncio.run(self._wait_ready())

    async def _wait_ready(self) -> None:
        for port, proc in zip(self.ports, self.procs, strict=True):
            await wait_tcp(HOST, port, READY_TIMEOUT_S, proc)
        client = self._client()
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                info = await client.info("replication")
                if int(info.get("connected_slaves", 0)) >= self.replicas:
                    break
                if time.monotonic() >= deadline:
                    raise Skipped(
                        f"only {info.get('connected_slaves')} of {self.replicas} "
                        f"replicas connected after {READY_TIMEOUT_S:.0f} s"
                    )
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()
        say(f"  {self.name}: ready on port {self.ports[0]}")

    def _client(self) -> Any:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # redis-py retries a command after a timeout or a broken connection (10 times, 5 s
        # socket timeout, by default): a retried XADD whose first try was applied appends
        # the item twice. The harness counts every acknowledged append exactly once, so an
        # append either succeeds once or fails the phase.
        return redis.asyncio.Redis(
            host=HOST, port=self.ports[0], retry=Retry(NoBackoff(), 0), socket_timeout=OP_TIMEOUT_S
        )

    async def open_appenders(self, n: int, shared: bool) -> list[Appender]:
        appenders: list[Appender] = []
        client: Any = None
        for _ in range(n):
            if client is None or not shared:
                # One Redis object is one connection pool: concurrent producers of a shared
                # client each take a pooled connection, as one program's coroutines would.
                client = self._client()
                self.clients.append(client)
            appenders.append(self._appender(client))
        return appenders

    def _appender(self, client: Any) -> Appender:
        if self.window > 1:
            # Up to ``window`` items a pipeline: the producer's items handed over before it
            # awaits them (the throughput workload hands over ``window`` at a time).
            async def publish(items: list[bytes]) -> None:
                await self._xadd(client, STREAM, items)

            batcher = BatchingAppender(publish, self.window)
            self.batchers.append(batcher)
            return batcher

        async def append(item: bytes) -> None:
            await self._xadd(client, STREAM, [item])

        return append

    async def close_appenders(self) -> None:
        batchers, self.batchers = self.batchers, []
        for batcher in batchers:
            batcher.cancel()
        await super().close_appenders()

    async def _xadd(self, client: Any, key: str, items: list[bytes]) -> None:
        """XADD each item in order, then (replicated) WAIT for the replicas, all in one
        pipeline: WAIT counts the writes of its own connection."""
        async with client.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.xadd(key, {"v": item})
            if self.wait_replicas:
                pipe.wait(self.wait_replicas, WAIT_TIMEOUT_MS)
            replies = await pipe.execute()
        if self.wait_replicas and int(replies[-1]) < self.wait_replicas:
            raise RuntimeError(
                f"WAIT {self.wait_replicas}: only {replies[-1]} replicas acknowledged"
            )

    async def open_fanout(
        self, topic: str, subscribers: int
    ) -> tuple[Publisher, list[AsyncIterator[bytes]]]:
        key = f"fanout:{topic}"
        writer = self._client()
        self.clients.append(writer)

        async def publish(items: list[bytes]) -> None:
            await self._xadd(writer, key, items)

        return publish, [self._follow(key) for _ in range(subscribers)]

    async def _follow(self, key: str) -> AsyncIterator[bytes]:
        """XREAD BLOCK from the stream's first entry, on a connection of its own."""
        client = self._client()
        self.clients.append(client)
        last: bytes | str = "0-0"
        while True:
            reply = await client.xread({key: last}, count=1000, block=1000)
            streams = reply.items() if isinstance(reply, dict) else reply
            for _, entries in streams:
                for entry_id, fields in entries:
                    last = entry_id
                    yield fields[b"v"]

    async def close_client(self, client: Any) -> None:
        await client.aclose()

    async def count(self) -> int | None:
        client = self._client()
        try:
            return int(await client.xlen(STREAM))
        finally:
            await client.aclose()

    def settings(self) -> dict[str, Any]:
        durable = self.persistence == DURABLE
        return {
            "servers": 1 + self.replicas,
            "appendonly": "yes" if durable else "no",
            "appendfsync": "always" if durable else None,
            "rdb_snapshots": False,
            "wait_replicas": self.wait_replicas,
            "xadds_per_pipeline": self.window,
            "client": "redis.asyncio; one connection pool per client",
        }


class ReplicatedRedisStreams(RedisStreams):
    """A primary and two replicas; each XADD is followed by ``WAIT 2`` on its connection."""

    name = "redis-r3"
    guarantees = (
        "1 primary + 2 replicas (asynchronous replication), all appendonly yes + appendfsync "
        "always. XADD and then WAIT 2 in one pipeline: acknowledged once the primary fsynced "
        "the entry and both replicas acknowledged receiving it (Redis 7.0 has no WAITAOF, "
        "so a replica's fsync is not part of the promise). No automatic failover without "
        "Sentinel, and a failover may still lose acknowledged writes."
    )
    replicas = wait_replicas = 2
    no_failover = (
        "Redis promotes no replica by itself (that takes Sentinel or a "
        "Redis Cluster, neither started here), so after the primary's SIGKILL every append "
        "fails until it is back; and since replication is asynchronous, a promoted replica "
        "may lack acknowledged writes"
    )


class BatchedRedisStreams(ReplicatedRedisStreams):
    """A primary and two replicas in memory only; each producer's items go out in
    pipelines of up to 100 XADDs followed by one ``WAIT 1``."""

    name = "redis-r3-batch"
    guarantees = (
        "1 primary + 2 replicas (asynchronous replication), in memory only (appendonly no, "
        "no RDB snapshots): nothing is written to disk or fsynced on any server. A producer "
        "sends up to 100 XADDs and one WAIT 1 in a pipeline; those items are acknowledged "
        "once that WAIT returned at least 1: the primary and at least one replica hold them "
        "in memory. The other replica may lack them. A restarted primary comes back empty "
        "(and so do replicas that resync from it); a power loss loses everything. No "
        "automatic failover without Sentinel, and since replication is asynchronous a "
        "failover may lose acknowledged writes."
    )
    wait_replicas = 1
    persistence = MEMORY_ONLY
    window = 100
