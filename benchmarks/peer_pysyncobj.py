"""Plain pysyncobj: three node processes of :mod:`benchmarks.pysyncobj_node`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import sys
import time
from pathlib import Path
from typing import Any

from cluster.ports import free_ports

from .core import Appender, Process, Skipped, System, say, stop_all, wait_tcp
from .pysyncobj_node import LENGTH

HOST = "127.0.0.1"
LEADER_TIMEOUT_S = 60.0


class _Conn:
    """One pipelined connection: requests go out at once, replies come back in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError("the node closed the connection")
                self.pending.popleft().set_result(line.rstrip(b"\n"))
        except Exception as exc:
            while self.pending:
                fut = self.pending.popleft()
                if not fut.done():
                    fut.set_exception(exc)

    async def request(self, payload: bytes) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        self.writer.write(LENGTH.pack(len(payload)) + payload)
        return await fut

    def close(self) -> None:
        self.task.cancel()
        self.writer.close()


class PlainPysyncobj(System):
    name = "pysyncobj"
    guarantees = (
        "3 nodes, journal and dump on, one Raft command per append; acknowledged once "
        "applied on the leader (committed by a majority). pysyncobj writes its journal "
        "through mmap without fsync: a killed process keeps the data, an OS crash may not."
    )

    no_fanout = "pysyncobj has no subscriptions (nor has the benchmark's thin server)"
    no_failover = (
        "the benchmark's thin server sends every append to the leader found "
        "at start and has no leader discovery or retry (pysyncobj has no client); the "
        "design notes' figure, about 1.0 s median, comes from another script"
    )
    no_recovery = "the peers' restarts are not part of this harness yet (raftchan only)"

    #: False: each command is sent to the followers at once (the option raftchan's replica
    #: sets). True: pysyncobj's default, commands wait for the next 0.1 s send period.
    batch = False

    def __init__(self) -> None:
        self.procs: list[Process] = []
        self.client_ports: list[int] = []
        self.leader_port: int | None = None
        self.conns: list[_Conn] = []

    def start(self, workdir: Path) -> None:
        ports = free_ports(6, HOST)
        raft = [f"{HOST}:{p}" for p in ports[:3]]
        self.client_ports = ports[3:]
        for i in range(3):
            others = [a for j, a in enumerate(raft) if j != i]
            folder = workdir / self.name
            argv = [
                sys.executable,
                "-m",
                "benchmarks.pysyncobj_node",
                raft[i],
                *others,
                "--client-port",
                str(self.client_ports[i]),
                "--dir",
                str(folder / f"n{i + 1}"),
            ]
            if self.batch:
                argv.append("--batch")
            self.procs.append(Process(f"{self.name} n{i + 1}", argv, folder / f"n{i + 1}.log"))
        say(f"  {self.name}: 3 nodes started (pids {[p.pid for p in self.procs]})")
        asyncio.run(self._find_leader())

    async def _find_leader(self) -> None:
        for port, proc in zip(self.client_ports, self.procs, strict=True):
            await wait_tcp(HOST, port, 30.0, proc)
        deadline = time.monotonic() + LEADER_TIMEOUT_S
        while time.monotonic() < deadline:
            for port in self.client_ports:
                status = await self._status(port)
                if status.startswith(b"L"):
                    self.leader_port = port
                    say(f"  {self.name}: leader serves on port {port}")
                    return
            await asyncio.sleep(0.2)
        raise Skipped("no pysyncobj leader within 60 s")

    async def _status(self, port: int) -> bytes:
        try:
            conn = _Conn(*await asyncio.open_connection(HOST, port))
        except OSError:
            return b""
        try:
            return await asyncio.wait_for(conn.request(b""), 5.0)
        finally:
            conn.close()

    async def open_appenders(self, n: int, shared: bool) -> list[Appender]:
        assert self.leader_port is not None
        appenders: list[Appender] = []
        conn: _Conn | None = None
        for _ in range(n):
            if conn is None or not shared:
                conn = _Conn(*await asyncio.open_connection(HOST, self.leader_port))
                self.conns.append(conn)

            async def append(item: bytes, conn: _Conn = conn) -> None:
                reply = await conn.request(item)
                if reply != b"+":
                    raise RuntimeError(f"pysyncobj append failed: {reply!r}")

            appenders.append(append)
        return appenders

    async def close_appenders(self) -> None:
        conns, self.conns = self.conns, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    async def count(self) -> int | None:
        assert self.leader_port is not None
        status = await self._status(self.leader_port)
        return int(status[1:]) if status[:1] == b"L" else None

    def stop(self) -> None:
        stop_all(self.procs)

    def versions(self) -> dict[str, str]:
        return {"pysyncobj": importlib.metadata.version("pysyncobj")}

    def settings(self) -> dict[str, Any]:
        return {
            "nodes": 3,
            "journal": True,
            "dump": True,
            "appendEntriesUseBatch": self.batch,
            "raft_timeouts_s": [0.4, 1.4],
            "submitted_on": "leader",
            "client": "pipelined TCP to a thin server in each node (asyncio, own thread)",
        }


class BatchedPysyncobj(PlainPysyncobj):
    name = "pysyncobj-batched"
    guarantees = (
        PlainPysyncobj.guarantees
        + " pysyncobj's default sending: appends wait for the next 0.1 s send period."
    )
    batch = True
