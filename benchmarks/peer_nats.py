"""NATS JetStream: three ``nats-server`` processes in a cluster, an R3 file stream."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cluster.ports import free_ports

from .core import Appender, Config, Process, Publisher, ServerSystem, Skipped, say, wait_tcp
from .recovery import PeerCluster, measure_peer_recovery, recovery_item

HOST = "127.0.0.1"
STREAM = "BENCH"
SUBJECT = "bench.items"
FAILOVER_STREAM = "FAILOVER"
FAILOVER_SUBJECT = "failover.items"
RECOVERY_STREAM = "RECOVERY"
RECOVERY_SUBJECT = "recovery.items"
#: Messages published before their acks are awaited, while loading the recovery stream.
LOAD_CHUNK = 10_000
#: Seconds one check of a server's serving state may take.
PROBE_TIMEOUT_S = 1.0
#: Reading the failover stream back ends once no message came for this long.
DRAIN_QUIET_S = 1.0
#: Seconds the failover stream may take to have every replica current again.
REPLICAS_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 60.0


class NatsJetStream(ServerSystem):
    name = "nats-js-r3"
    guarantees = (
        "3 servers, file-backed stream with 3 replicas; publish returns once the stream "
        "leader and a majority stored the message. JetStream fsyncs every 2 minutes by "
        "default (sync_interval), so an acknowledged message lives in the page cache of "
        "2 of 3 servers until then."
    )

    failover_client = (
        "one nats-py connection per producer, all three server URLs (nats-py reconnects to "
        "another server by itself); js.publish awaits the PubAck; a publish that fails "
        "(no responders while the stream elects a leader, timeout) is not retried"
    )

    binary_name = apt_package = "nats-server"
    client_package, client_module = "nats-py", "nats"

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[int] = []

    def start(self, workdir: Path) -> None:
        self.require()
        ports = free_ports(6, HOST)
        self.ports = ports[:3]
        self.procs.extend(_launch(self.binary, workdir / "nats", self.ports, ports[3:]))
        say(f"  nats: 3 servers started (pids {[p.pid for p in self.procs]})")
        asyncio.run(self._create_stream())

    async def _create_stream(self) -> None:
        import nats

        for port, proc in zip(self.ports, self.procs, strict=True):
            await wait_tcp(HOST, port, 30.0, proc)
        nc = await nats.connect(self._urls())
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                try:
                    await _add_r3_stream(js, STREAM, SUBJECT)
                    break
                except Exception as exc:  # the meta leader may not be elected yet
                    if time.monotonic() >= deadline:
                        raise Skipped(f"JetStream stream not created: {exc}") from exc
                    await asyncio.sleep(0.5)
            await js.publish(SUBJECT, b"ready", timeout=30.0)
        finally:
            await nc.close()
        say("  nats: R3 stream ready")

    def _urls(self) -> list[str]:
        return [f"nats://{HOST}:{p}" for p in self.ports]

    async def open_appenders(self, n: int, shared: bool) -> list[Appender]:
        import nats

        appenders: list[Appender] = []
        js: Any = None
        for _ in range(n):
            if js is None or not shared:
                nc = await nats.connect(self._urls())
                self.clients.append(nc)
                js = nc.jetstream()

            async def append(item: bytes, js: Any = js) -> None:
                await js.publish(SUBJECT, item, timeout=30.0)

            appenders.append(append)
        return appenders

    async def open_fanout(
        self, topic: str, subscribers: int
    ) -> tuple[Publisher, list[AsyncIterator[bytes]]]:
        import nats

        subject = f"fanout.{topic}"
        nc = await nats.connect(self._urls())
        self.clients.append(nc)
        js = nc.jetstream()
        await _add_r3_stream(js, f"FANOUT_{topic}".upper(), subject)

        async def publish(items: list[bytes]) -> None:
            # publish_async writes each message at once, in this order, and hands back a
            # future of its PubAck: the batch is acknowledged when every future is.
            acks = [await js.publish_async(subject, item) for item in items]
            await asyncio.gather(*acks)

        subs: list[AsyncIterator[bytes]] = []
        for _ in range(subscribers):
            reader = await nats.connect(self._urls())
            self.clients.append(reader)
            # An ordered push consumer: every message from the stream's first, in order.
            sub = await reader.jetstream().subscribe(subject, ordered_consumer=True)
            subs.append(_payloads(sub))
        return publish, subs

    async def open_failover(self, n: int, op_timeout: float) -> list[Appender]:
        import nats

        appenders: list[Appender] = []
        for k in range(n):
            # The killed server's connection errors are expected: not printed.
            nc = await nats.connect(self._urls(), error_cb=_expected_error)
            self.clients.append(nc)
            js = nc.jetstream()
            if k == 0:
                # The same config again is a no-op.
                await _add_r3_stream(js, FAILOVER_STREAM, FAILOVER_SUBJECT)

            async def append(item: bytes, js: Any = js) -> None:
                await js.publish(FAILOVER_SUBJECT, item, timeout=op_timeout)

            appenders.append(append)
        return appenders

    async def _stream_cluster(self, meta_leader: bool = False) -> Any:
        """The failover stream's cluster info; with ``meta_leader``, only once JetStream
        has a meta leader as well (it creates consumers: a server that was stopped may
        have led it, and the check of what was stored needs a consumer)."""
        import nats

        nc = await nats.connect(self._urls())
        try:
            js = nc.jetstream()
            if meta_leader:
                await js.account_info()
            return (await js.stream_info(FAILOVER_STREAM)).cluster
        finally:
            await nc.close()

    async def failover_leader(self) -> int:
        # The stream's leader, not JetStream's meta leader: it is the one that orders and
        # acknowledges the stream's messages. Servers are named n1..n3.
        leader = (await self._stream_cluster()).leader
        return int(leader.removeprefix("n")) - 1

    def server_port(self, i: int) -> int:
        return self.ports[i]

    async def server_rejoined(self, i: int) -> None:
        deadline = time.monotonic() + REPLICAS_TIMEOUT_S
        while True:
            try:
                info = await self._stream_cluster(meta_leader=True)
                peers = info.replicas or []
                if info.leader and len(peers) == 2 and all(p.current for p in peers):
                    return
            except Exception as exc:  # no stream leader yet, or the server reconnecting
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"stream {FAILOVER_STREAM} not whole: {exc}") from exc
            if time.monotonic() >= deadline:
                raise RuntimeError(f"stream {FAILOVER_STREAM} replicas not current")
            await asyncio.sleep(0.2)

    async def failover_stored(self) -> list[bytes]:
        import nats

        nc = await nats.connect(self._urls())
        try:
            js = nc.jetstream()
            total = int((await js.stream_info(FAILOVER_STREAM)).state.messages)
            sub = await js.subscribe(FAILOVER_SUBJECT, ordered_consumer=True)
            items: list[bytes] = []
            deadline = time.monotonic() + 60.0
            while len(items) < total and time.monotonic() < deadline:
                msg = await sub.next_msg(timeout=10.0)
                items.append(msg.data)
            # The count may be stale: a server continued after SIGSTOP (the hang workload)
            # can answer the info as the stream's leader before it learns that it is no
            # longer. Read on until nothing more comes.
            while time.monotonic() < deadline:
                try:
                    msg = await sub.next_msg(timeout=DRAIN_QUIET_S)
                except nats.errors.TimeoutError:
                    break
                items.append(msg.data)
            await sub.unsubscribe()
            return items
        finally:
            await nc.close()

    async def count(self) -> int | None:
        import nats

        nc = await nats.connect(self._urls())
        try:
            info = await nc.jetstream().stream_info(STREAM)
            return int(info.state.messages) - 1  # the "ready" message
        finally:
            await nc.close()

    async def recovery(self, cfg: Config, workdir: Path) -> dict[str, Any]:
        """The recovery figures (:func:`measure_peer_recovery`) on three servers of its own."""
        cluster = NatsRecovery(self.binary, workdir / "nats-recovery")
        return await measure_peer_recovery(cluster, cfg)

    def settings(self) -> dict[str, Any]:
        return {
            "servers": 3,
            "replicas": 3,
            "storage": "file",
            "sync_interval": "server default (2 min)",
        }


async def _expected_error(exc: Exception) -> None:
    pass


def _launch(
    binary: str,
    base: Path,
    client_ports: list[int],
    route_ports: list[int],
    http_ports: list[int] | None = None,
) -> list[Process]:
    """Three ``nats-server`` processes named n1..n3 in one cluster, JetStream on, data in
    ``base/n<i>``; with ``http_ports``, each also serves its monitoring endpoints."""
    procs: list[Process] = []
    for i in range(3):
        others = ", ".join(f"nats-route://{HOST}:{p}" for j, p in enumerate(route_ports) if j != i)
        monitor = f"http: {HOST}:{http_ports[i]}\n" if http_ports else ""
        conf = base / f"n{i + 1}.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f'server_name: "n{i + 1}"\n'
            f"listen: {HOST}:{client_ports[i]}\n"
            f"{monitor}"
            f'jetstream {{ store_dir: "{base / f"n{i + 1}"}" }}\n'
            f'cluster {{ name: "bench"\n listen: {HOST}:{route_ports[i]}\n'
            f" routes: [{others}] }}\n"
        )
        procs.append(Process(f"nats n{i + 1}", [binary, "-c", str(conf)], base / f"n{i + 1}.log"))
    return procs


class NatsRecovery(PeerCluster):
    """The recovery workload's R3 file stream on three servers of its own."""

    serving = (
        "a server serves when its own copy of the stream (its /jsz monitoring endpoint) "
        "holds every message and follows a stream leader, and a stream info request sent "
        "through it is answered, naming that server as leader or as a current replica; the "
        "cluster serves when a stream info request through any server answers the full "
        "count"
    )

    def __init__(self, binary: str, base: Path) -> None:
        super().__init__(binary, base)
        self.http_ports: list[int] = []

    def launch(self) -> None:
        ports = free_ports(9, HOST)
        self.ports, self.http_ports = ports[:3], ports[6:]
        self.procs = _launch(self.binary, self.base, self.ports, ports[3:6], self.http_ports)
        self.names = [f"n{i + 1}" for i in range(3)]
        self.data_dirs = [self.base / name for name in self.names]
        say(f"    nats: 3 servers started (pids {[p.pid for p in self.procs]})")

    def _urls(self) -> list[str]:
        return [f"nats://{HOST}:{p}" for p in self.ports]

    async def ready(self) -> None:
        import nats

        for port, proc in zip(self.ports, self.procs, strict=True):
            await wait_tcp(HOST, port, 30.0, proc)
        nc = await nats.connect(self._urls(), error_cb=_expected_error)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                try:
                    await _add_r3_stream(nc.jetstream(), RECOVERY_STREAM, RECOVERY_SUBJECT)
                    return
                except Exception as exc:  # the meta leader may not be elected yet
                    if time.monotonic() >= deadline:
                        raise RuntimeError(f"JetStream stream not created: {exc}") from exc
                    await asyncio.sleep(0.5)
        finally:
            await nc.close()

    async def load(self, items: int) -> None:
        import nats

        nc = await nats.connect(self._urls(), error_cb=_expected_error)
        try:
            # Two chunks in flight: the next chunk goes out while the acks of the one
            # before come back, so the client never waits with an empty pipe.
            js = nc.jetstream(timeout=60.0, publish_async_max_pending=2 * LOAD_CHUNK)
            pending: list[asyncio.Future[Any]] = []
            for first in range(0, items, LOAD_CHUNK):
                chunk = [
                    await js.publish_async(RECOVERY_SUBJECT, recovery_item(seq))
                    for seq in range(first, min(items, first + LOAD_CHUNK))
                ]
                await asyncio.wait_for(asyncio.gather(*pending), 60.0)
                pending = chunk
            await asyncio.wait_for(asyncio.gather(*pending), 60.0)
            stored = int((await js.stream_info(RECOVERY_STREAM)).state.messages)
        finally:
            await nc.close()
        if stored != items:
            raise RuntimeError(f"published {items} messages, the stream holds {stored}")

    async def _info(self, urls: list[str]) -> Any:
        """Stream info, asked through one of ``urls`` (the stream leader answers)."""
        import nats

        nc = await nats.connect(
            urls,
            error_cb=_expected_error,
            allow_reconnect=False,
            connect_timeout=PROBE_TIMEOUT_S,
            max_reconnect_attempts=0,
        )
        try:
            return await nc.jetstream(timeout=PROBE_TIMEOUT_S).stream_info(RECOVERY_STREAM)
        finally:
            await nc.close()

    def _monitor(self, i: int) -> dict[str, Any]:
        url = f"http://{HOST}:{self.http_ports[i]}/jsz?accounts=true&streams=true"
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as answer:
            return dict(json.load(answer))

    def _local_stream(self, i: int) -> dict[str, Any]:
        """Server ``i``'s own view of the stream: its copy's state and the leader its
        replica follows (empty: the server has no copy yet)."""
        for account in self._monitor(i).get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                if stream.get("name") == RECOVERY_STREAM:
                    return dict(stream)
        return {}

    async def leaders(self) -> set[int]:
        # The stream's leader and JetStream's meta leader: with three servers at least
        # one server leads neither.
        info = await self._info(self._urls())
        meta = (await asyncio.to_thread(self._monitor, 0))["meta_cluster"]["leader"]
        return {self.names.index(info.cluster.leader), self.names.index(meta)}

    async def serves(self, i: int, items: int) -> bool:
        name = self.names[i]
        try:
            # The server's own copy is on disk before the server has rejoined the
            # cluster: it serves once its replica also follows a leader again (the leader
            # named in its own view) and a stream info request sent through it names it
            # as that leader or as a current replica.
            local = await asyncio.to_thread(self._local_stream, i)
            if local.get("state", {}).get("messages") != items:
                return False
            if not (local.get("cluster") or {}).get("leader"):
                return False
            cluster = (await self._info([self._urls()[i]])).cluster
        except Exception:  # not up yet, no stream leader yet
            return False
        if cluster is None:
            return False
        if cluster.leader == name:
            return True
        return any(p.name == name and p.current for p in cluster.replicas or [])

    async def cluster_serves(self, items: int) -> bool:
        try:
            info = await self._info(self._urls())
        except Exception:  # no server up yet, no stream leader yet
            return False
        return int(info.state.messages) == items


async def _add_r3_stream(js: Any, name: str, subject: str) -> None:
    """A file-backed stream with 3 replicas (``add_stream`` of an identical one: no-op)."""
    from nats.js.api import StorageType, StreamConfig

    await js.add_stream(
        StreamConfig(name=name, subjects=[subject], num_replicas=3, storage=StorageType.FILE)
    )


async def _payloads(sub: Any) -> AsyncIterator[bytes]:
    async for msg in sub.messages:
        yield msg.data
