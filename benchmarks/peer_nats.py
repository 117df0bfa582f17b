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
READY_TIMEOUT_S = 60.0


class NatsJetStream(ServerSystem):
    name = "nats-js-r3"
    guarantees = (
        "3 servers, file-backed stream with 3 replicas; publish returns once the stream "
        "leader and a majority stored the message. JetStream fsyncs every 2 minutes by "
        "default (sync_interval), so an acknowledged message lives in the page cache of "
        "2 of 3 servers until then."
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
        from nats.js.api import StorageType, StreamConfig

        for port, proc in zip(self.ports, self.procs, strict=True):
            await wait_tcp(HOST, port, 30.0, proc)
        nc = await nats.connect(self._urls())
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                try:
                    await js.add_stream(
                        StreamConfig(
                            name=STREAM,
                            subjects=[SUBJECT],
                            num_replicas=3,
                            storage=StorageType.FILE,
                        )
                    )
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
        from nats.js.api import StorageType, StreamConfig

        subject = f"fanout.{topic}"
        nc = await nats.connect(self._urls())
        self.clients.append(nc)
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=f"FANOUT_{topic}".upper(),
                subjects=[subject],
                num_replicas=3,
                storage=StorageType.FILE,
            )
        )

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


async def _payloads(sub: Any) -> AsyncIterator[bytes]:
    async for msg in sub.messages:
        yield msg.data
