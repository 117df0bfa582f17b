"""etcd: a 3-member cluster of ``etcd`` processes (Debian's ``etcd-server``), through aetcd.

An append is one ``Put`` of the item to a new key under a prefix (the keys carry a counter,
the order is etcd's revision); reading the channel back is a range read of that prefix.
The client is aetcd, an asyncio gRPC client for the etcd v3 API, released in 2026 and
working with Python 3.11 and the etcd 3.4 Debian ships (checked by this harness). Of the
other clients on PyPI, etcd3 and etcd3-py have had no release since 2020 and 2019, and
etcd3gw (HTTP gateway) is synchronous, which the asyncio producers here cannot share.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cluster.ports import free_ports

from .core import Appender, Config, Process, Publisher, ServerSystem, Skipped, say, wait_tcp
from .recovery import PeerCluster, measure_peer_recovery, recovery_item

HOST = "127.0.0.1"
PREFIX = b"/bench/items/"
FAILOVER_PREFIX = b"/bench/failover/"
READY_TIMEOUT_S = 60.0
#: Seconds one request may take (the harness's own limit per append).
OP_TIMEOUT_S = 30
RECOVERY_PREFIX = b"/bench/recovery/"
#: Puts per transaction while loading the recovery keys (etcd's default limit
#: ``--max-txn-ops``), and transactions in flight.
TXN_OPS = 128
LOAD_WRITERS = 8
#: Seconds one check of a member's serving state may take.
PROBE_TIMEOUT_S = 1.0


class Etcd(ServerSystem):
    name = "etcd"
    guarantees = (
        "3 members (Raft); a Put returns once a majority has the entry in its write-ahead "
        "log, fsynced (etcd always fsyncs its WAL before acknowledging), and the leader "
        "applied it."
    )
    failover_client = (
        "one aetcd client per producer, connected to the leader at first (aetcd takes one "
        "endpoint); a Put that fails or times out is not retried, and the producer's next "
        "Put goes to the next member (a follower forwards it to the leader)"
    )
    binary_name, apt_package = "etcd", "etcd-server"
    client_package = client_module = "aetcd"

    def __init__(self) -> None:
        super().__init__()
        self.client_ports: list[int] = []
        self.leader_port: int | None = None
        self.keys = itertools.count()
        #: Clients of failed members being closed in the background.
        self._closing: set[asyncio.Future[Any]] = set()

    def start(self, workdir: Path) -> None:
        self.require()
        ports = free_ports(6, HOST)
        self.client_ports = ports[:3]
        self.procs.extend(_launch(self.binary, workdir / "etcd", self.client_ports, ports[3:]))
        say(f"  etcd: 3 members started (pids {[p.pid for p in self.procs]})")
        asyncio.run(self._find_leader())

    def _client(self, port: int) -> Any:
        import aetcd

        return aetcd.Client(host=HOST, port=port, timeout=OP_TIMEOUT_S)

    async def _find_leader(self) -> None:
        for port, proc in zip(self.client_ports, self.procs, strict=True):
            await wait_tcp(HOST, port, 30.0, proc)
        # Appends go to the leader, as they do on pysyncobj; a follower would forward
        # each one.
        self.leader_port = await _leader_port(self.client_ports)
        say(f"  etcd: leader serves on port {self.leader_port}")

    async def open_appenders(self, n: int, shared: bool) -> list[Appender]:
        assert self.leader_port is not None
        appenders: list[Appender] = []
        client: Any = None
        for _ in range(n):
            if client is None or not shared:
                # One client is one gRPC channel (HTTP/2): a shared client's producers
                # multiplex their requests over it.
                client = self._client(self.leader_port)
                self.clients.append(client)

            async def append(item: bytes, client: Any = client) -> None:
                await client.put(PREFIX + b"%016d" % next(self.keys), item)

            appenders.append(append)
        return appenders

    async def open_fanout(
        self, topic: str, subscribers: int
    ) -> tuple[Publisher, list[AsyncIterator[bytes]]]:
        assert self.leader_port is not None
        prefix = b"/bench/fanout/" + topic.encode() + b"/"
        writer = self._client(self.leader_port)
        self.clients.append(writer)
        keys = itertools.count()

        async def publish(items: list[bytes]) -> None:
            # One transaction of puts: one revision, its events in the order of the puts
            # (etcd allows 128 operations in a transaction by default).
            puts = [writer.transactions.put(prefix + b"%016d" % next(keys), i) for i in items]
            await writer.transaction(compare=[], success=puts, failure=[])

        # Watchers spread over the three members, as readers of a cluster would be.
        ports = itertools.cycle(self.client_ports)
        return publish, [self._watch(next(ports), prefix) for _ in range(subscribers)]

    async def _watch(self, port: int, prefix: bytes) -> AsyncIterator[bytes]:
        """Every put under ``prefix`` from the first revision on, through a watch."""
        client = self._client(port)
        self.clients.append(client)
        events = await client.watch_prefix(prefix, start_revision=1)
        async for event in events:
            yield event.kv.value

    async def open_failover(self, n: int, op_timeout: float) -> list[Appender]:
        assert self.leader_port is not None
        ports = self.client_ports
        appenders: list[Appender] = []
        for _ in range(n):
            # The producer's own endpoint and client; the list is shared so that close
            # finds the client in use last.
            slot = [ports.index(self.leader_port), self._client(self.leader_port)]
            self.clients.append(slot)

            async def append(item: bytes, slot: list[Any] = slot) -> None:
                try:
                    # The key is the item's identity (producer, sequence): unique per append.
                    await slot[1].put(FAILOVER_PREFIX + item[:8].hex().encode(), item)
                except BaseException:
                    # Whatever went wrong (the member died, a timeout), try the next one.
                    old = slot[1]
                    slot[0] = (slot[0] + 1) % len(ports)
                    slot[1] = self._client(ports[slot[0]])
                    closing = asyncio.ensure_future(old.close())
                    self._closing.add(closing)
                    closing.add_done_callback(self._closing.discard)
                    raise

            appenders.append(append)
        return appenders

    async def close_client(self, client: Any) -> None:
        await (client[1] if isinstance(client, list) else client).close()

    async def failover_leader(self) -> int:
        for port, proc in zip(self.client_ports, self.procs, strict=True):
            if not proc.alive():
                continue
            client = self._client(port)
            try:
                status = await client.status()
                leader_port = int(status.leader.client_urls[0].rsplit(":", 1)[1])
                self.leader_port = leader_port
                return self.client_ports.index(leader_port)
            except Exception:  # ask the next member
                continue
            finally:
                await client.close()
        raise RuntimeError("no etcd member names a leader")

    def server_port(self, i: int) -> int:
        return self.client_ports[i]

    async def server_rejoined(self, i: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        client = self._client(self.client_ports[i])
        try:
            while True:
                try:
                    # A linearizable read through the restarted member: it has a leader
                    # and caught up with its commit index.
                    await client.get(FAILOVER_PREFIX)
                    break
                except Exception as exc:
                    if time.monotonic() >= deadline:
                        raise RuntimeError(f"etcd member {i + 1} does not serve: {exc}") from exc
                    await asyncio.sleep(0.2)
        finally:
            await client.close()
        await self.failover_leader()  # the throughput phases' appends go to the leader

    async def failover_stored(self) -> list[bytes]:
        assert self.leader_port is not None
        client = self._client(self.leader_port)
        try:
            return [kv.value for kv in await client.get_prefix(FAILOVER_PREFIX)]
        finally:
            await client.close()

    async def count(self) -> int | None:
        assert self.leader_port is not None
        return await _count(self.leader_port, PREFIX, OP_TIMEOUT_S)

    async def recovery(self, cfg: Config, workdir: Path) -> dict[str, Any]:
        """The recovery figures (:func:`measure_peer_recovery`) on three members of its
        own."""
        cluster = EtcdRecovery(self.binary, workdir / "etcd-recovery")
        return await measure_peer_recovery(cluster, cfg)

    def settings(self) -> dict[str, Any]:
        return {
            "members": 3,
            "append": "Put to a new key under a prefix",
            "client": "aetcd (gRPC), connected to the leader",
            "settings": "etcd defaults (WAL fsynced on every commit)",
        }


def _client(port: int, timeout: float = OP_TIMEOUT_S) -> Any:
    import aetcd

    return aetcd.Client(host=HOST, port=port, timeout=timeout)


def _launch(
    binary: str, base: Path, client_ports: list[int], peer_ports: list[int]
) -> list[Process]:
    """Three ``etcd`` members named e1..e3 in one new cluster, data in ``base/e<i>``.
    Started again on its data, a member ignores the ``--initial-*`` flags."""
    members = ",".join(f"e{i + 1}=http://{HOST}:{p}" for i, p in enumerate(peer_ports))
    procs: list[Process] = []
    for i in range(3):
        client_url = f"http://{HOST}:{client_ports[i]}"
        peer_url = f"http://{HOST}:{peer_ports[i]}"
        argv = [
            binary,
            "--name",
            f"e{i + 1}",
            "--data-dir",
            str(base / f"e{i + 1}"),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            members,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "bench",
        ]
        procs.append(Process(f"etcd e{i + 1}", argv, base / f"e{i + 1}.log"))
    return procs


async def _leader_port(ports: list[int]) -> int:
    """The client port of the member that leads now, as the members report it (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for port in ports:
            client = _client(port)
            try:
                status = await client.status()
                if status.leader is not None and status.leader.client_urls:
                    return int(status.leader.client_urls[0].rsplit(":", 1)[1])
            except Exception as exc:  # not elected yet, or not listening yet
                last_error = exc
            finally:
                await client.close()
        await asyncio.sleep(0.2)
    raise Skipped(f"no etcd leader within {READY_TIMEOUT_S:.0f} s: {last_error}")


async def _count(port: int, prefix: bytes, timeout: float, serializable: bool = False) -> int:
    """Keys under ``prefix``, counted by the member at ``port`` (a ``count_only`` range
    read; linearizable unless ``serializable``)."""
    from aetcd import rpc, utils

    client = _client(port, timeout)
    try:
        await client.connect()
        request = rpc.RangeRequest(
            key=prefix,
            range_end=utils.prefix_range_end(prefix),
            count_only=True,
            serializable=serializable,
        )
        response = await client.kvstub.Range(request, timeout=timeout)
        return int(response.count)
    finally:
        await client.close()


class EtcdRecovery(PeerCluster):
    """The recovery workload's keys on three members of its own."""

    serving = (
        "a member serves when a linearizable count of the prefix through it (it has a "
        "leader and applied everything committed) answers the full count; the cluster "
        "serves when that count through any member does"
    )

    def launch(self) -> None:
        ports = free_ports(6, HOST)
        self.ports = ports[:3]
        self.procs = _launch(self.binary, self.base, self.ports, ports[3:])
        self.names = [f"e{i + 1}" for i in range(3)]
        self.data_dirs = [self.base / name for name in self.names]
        say(f"    etcd: 3 members started (pids {[p.pid for p in self.procs]})")

    async def ready(self) -> None:
        for port, proc in zip(self.ports, self.procs, strict=True):
            await wait_tcp(HOST, port, 30.0, proc)
        await _leader_port(self.ports)

    async def load(self, items: int) -> None:
        client = _client(await _leader_port(self.ports))
        batches = iter(range(0, items, TXN_OPS))

        async def writer() -> None:
            # The writers share one iterator of batches: each takes the next one free.
            for first in batches:
                puts = [
                    client.transactions.put(RECOVERY_PREFIX + b"%08d" % seq, recovery_item(seq))
                    for seq in range(first, min(items, first + TXN_OPS))
                ]
                await client.transaction(compare=[], success=puts, failure=[])

        try:
            await asyncio.gather(*(writer() for _ in range(LOAD_WRITERS)))
        finally:
            await client.close()
        stored = await _count(self.ports[0], RECOVERY_PREFIX, OP_TIMEOUT_S)
        if stored != items:
            raise RuntimeError(f"put {items} keys, the prefix holds {stored}")

    async def leaders(self) -> set[int]:
        return {self.ports.index(await _leader_port(self.ports))}

    async def serves(self, i: int, items: int) -> bool:
        try:
            return await _count(self.ports[i], RECOVERY_PREFIX, PROBE_TIMEOUT_S) == items
        except Exception:  # not up yet, no leader yet, or the read timed out
            return False

    async def cluster_serves(self, items: int) -> bool:
        for i in range(len(self.ports)):
            if await self.serves(i, items):
                return True
        return False
