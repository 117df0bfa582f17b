"""NATS JetStream: three ``nats-server`` processes in a cluster, an R3 file stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cluster.ports import free_ports

from .core import Appender, Process, Publisher, ServerSystem, Skipped, say, wait_tcp

HOST = "127.0.0.1"
STREAM = "BENCH"
SUBJECT = "bench.items"
FAILOVER_STREAM = "FAILOVER"
FAILOVER_SUBJECT = "failover.items"
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

    no_recovery = "the peers' restarts are not part of this harness yet (raftchan only)"
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
        self.ports, routes = ports[:3], ports[3:]
        base = workdir / "nats"
        for i in range(3):
            others = ", ".join(f"nats-route://{HOST}:{p}" for j, p in enumerate(routes) if j != i)
            conf = base / f"n{i + 1}.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(
                f'server_name: "n{i + 1}"\n'
                f"listen: {HOST}:{self.ports[i]}\n"
                f'jetstream {{ store_dir: "{base / f"n{i + 1}"}" }}\n'
                f'cluster {{ name: "bench"\n listen: {HOST}:{routes[i]}\n'
                f" routes: [{others}] }}\n"
            )
            self.procs.append(
                Process(f"nats n{i + 1}", [self.binary, "-c", str(conf)], base / f"n{i + 1}.log")
            )
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

    async def _stream_cluster(self) -> Any:
        import nats

        nc = await nats.connect(self._urls())
        try:
            return (await nc.jetstream().stream_info(FAILOVER_STREAM)).cluster
        finally:
            await nc.close()

    async def failover_leader(self) -> int:
        # The stream's leader, not JetStream's meta leader: it is the one that orders and
        # acknowledges the stream's messages. Servers are named n1..n3.
        leader = (await self._stream_cluster()).leader
        return int(leader.removeprefix("n")) - 1

    async def restart_server(self, i: int) -> None:
        await self.restart_process(i, self.ports[i])
        deadline = time.monotonic() + REPLICAS_TIMEOUT_S
        while True:
            try:
                info = await self._stream_cluster()
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

    def settings(self) -> dict[str, Any]:
        return {
            "servers": 3,
            "replicas": 3,
            "storage": "file",
            "sync_interval": "server default (2 min)",
        }


async def _expected_error(exc: Exception) -> None:
    pass


async def _add_r3_stream(js: Any, name: str, subject: str) -> None:
    """A file-backed stream with 3 replicas (``add_stream`` of an identical one: no-op)."""
    from nats.js.api import StorageType, StreamConfig

    await js.add_stream(
        StreamConfig(name=name, subjects=[subject], num_replicas=3, storage=StorageType.FILE)
    )


async def _payloads(sub: Any) -> AsyncIterator[bytes]:
    async for msg in sub.messages:
        yield msg.data
