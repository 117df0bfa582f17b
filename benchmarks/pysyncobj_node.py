"""One plain pysyncobj node for the benchmark: one replicated command per append.

Run as ``python -m benchmarks.pysyncobj_node SELF PEER PEER --client-port P --dir D``.
The Raft state is a list of the appended items (what ``ReplList.append`` does), with the
journal and the dump file on. The Raft options are the ones raftchan's own replica passes
to pysyncobj (same timing, each command sent at once), so that the difference between the
two is raftchan's group commit and server, not the tuning.

Clients speak a minimal framing over TCP, pipelined (replies come in request order): a
4-byte big-endian length and the item. The node replies ``b"+"`` once the command is
applied on this node (it must be the leader, so the command is committed by a majority),
``b"-"`` and a reason if it failed. An empty frame asks for the status: ``b"L"`` or
``b"F"`` (leader or not) and the item count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import struct
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

LENGTH = struct.Struct(">I")


class Log(SyncObj):
    def __init__(self, self_addr: str, peers: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_addr, peers, conf)
        self.items: list[bytes] = []

    @replicated
    def append(self, item: bytes) -> int:
        self.items.append(item)
        return len(self.items)


def make_conf(data_dir: str, bind: str, batch: bool = False) -> SyncObjConf:
    return SyncObjConf(
        journalFile=os.path.join(data_dir, "journal"),
        fullDumpFile=os.path.join(data_dir, "dump"),
        appendEntriesUseBatch=batch,
        appendEntriesPeriod=0.1,
        raftMinTimeout=0.4,
        raftMaxTimeout=1.4,
        logCompactionMinEntries=5000,
        logCompactionMinTime=300,
        dynamicMembershipChange=False,
        bindAddress=bind,
    )


async def serve(log: Log, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Requests are pipelined: read them as they come, answer in the order they came.
        replies: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue()
        replier = asyncio.create_task(_reply_in_order(replies, writer))
        try:
            while True:
                (size,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
                done: asyncio.Future[bytes] = loop.create_future()
                replies.put_nowait(done)
                if size == 0:
                    role = b"L" if log._isLeader() else b"F"
                    done.set_result(role + str(len(log.items)).encode())
                    continue
                item = await reader.readexactly(size)

                def callback(result: Any, error: Any, done: asyncio.Future[bytes] = done) -> None:
                    reply = b"+" if error == FAIL_REASON.SUCCESS else b"-" + str(error).encode()
                    loop.call_soon_threadsafe(_settle, done, reply)

                log.append(item, callback=callback)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            replies.put_nowait(None)
            await replier
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


async def _reply_in_order(
    replies: asyncio.Queue[asyncio.Future[bytes] | None], writer: asyncio.StreamWriter
) -> None:
    while True:
        done = await replies.get()
        if done is None:
            return
        reply = await done
        writer.write(reply + b"\n")


def _settle(done: asyncio.Future[bytes], reply: bytes) -> None:
    if not done.done():
        done.set_result(reply)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("self_addr")
    parser.add_argument("peers", nargs="+")
    parser.add_argument("--client-port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument(
        "--batch",
        action="store_true",
        help="pysyncobj's default: send appends every 0.1 s, not at once",
    )
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    host = args.self_addr.rsplit(":", 1)[0]
    log = Log(args.self_addr, args.peers, make_conf(args.dir, args.self_addr, args.batch))
    try:
        asyncio.run(serve(log, host, args.client_port))
    finally:
        log.destroy()


if __name__ == "__main__":
    main()
