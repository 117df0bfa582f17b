"""Recovery: how long a server takes to serve again with many items in its log, and how
much memory the servers hold per million small items.

raftchan (:func:`measure_recovery`): on a fresh 3-node cluster (default Raft timing and
fsync, default compaction) one client loads ``cfg.recovery_items`` items of 16 B. Then:

- **follower restart**: one follower is stopped (SIGTERM) and started again; timed from
  the start of its process until it *serves*: its status says ``ready`` and a read
  through it (a poll, which any node answers from its own state) returns the channel's
  full length;
- **cluster restart**: all three are stopped and started together; timed from the
  start until the cluster serves (a linearizable length read through the leader returns
  the full length) and until every node serves as above;
- **memory**: resident set size (``VmRSS`` from ``/proc``) of each node when empty,
  after the load, and after each restart; the growth per million items.

The peers (:func:`measure_peer_recovery`, with a :class:`PeerCluster` each peer module
defines) go through the same steps on three servers of their own; what *serves* means
for each is in its ``serving`` text, and a restarted server is one that leads nothing.

Everything it starts it stops, in a ``finally``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import raftchan
from cluster.harness import LocalCluster, receive_message
from raftchan import protocol
from raftchan.config import split_address

from .core import Config, Process, say, stop_all

CHANNEL = "recovery"
ITEM_BYTES = 16
#: Items per append+flush while loading (bounds the client's queue).
LOAD_CHUNK = 10_000
#: How often the serving checks ask, and how long they may take in all.
POLL_S = 0.02
SERVE_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 120.0


def rss_bytes(pid: int | None) -> int | None:
    """Resident set size of process ``pid`` (``VmRSS`` in ``/proc/<pid>/status``)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def per_million(grown: int | None, items: int) -> float | None:
    """Megabytes (10^6 bytes) per million items for ``grown`` bytes over ``items``."""
    if grown is None or items <= 0:
        return None
    return round(grown / items, 3)  # bytes per item = MB per million items


def node_serves(address: str, length: int, min_position: int, timeout: float = 1.0) -> bool:
    """True if the node at client ``address`` says it is ready and a poll through it (served
    from its own state once it has applied ``min_position``) ends at ``length`` items."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(protocol.encode_frame(protocol.hello_request()))
            protocol.check_hello(receive_message(sock))
            sock.sendall(protocol.encode_frame(protocol.Status(1).to_wire()))
            status = receive_message(sock)
            if protocol.response_error(status) is not None or not status.get("ready"):
                return False
            poll = protocol.Poll(2, CHANNEL, max(0, length - 1), min_position, 0.0)
            sock.sendall(protocol.encode_frame(poll.to_wire()))
            answer = receive_message(sock)
    except (OSError, raftchan.RaftchanError):
        return False
    return protocol.response_error(answer) is None and answer.get("next") == length


def _rss_all(cluster: LocalCluster) -> list[int | None]:
    return [rss_bytes(node.pid) if node.running else None for node in cluster.nodes]


def _mb(values: list[int | None]) -> list[float | None]:
    return [None if v is None else round(v / 1e6, 1) for v in values]


def _wait_serving(
    cluster: LocalCluster, nodes: list[int], length: int, position: int, started: float
) -> dict[int, float]:
    """Seconds from ``started`` until each of ``nodes`` serves (bounded)."""
    served: dict[int, float] = {}
    deadline = started + SERVE_TIMEOUT_S
    while len(served) < len(nodes):
        for i in nodes:
            if i not in served and node_serves(cluster.client_addresses[i], length, position):
                served[i] = time.perf_counter() - started
        if time.perf_counter() >= deadline:
            raise TimeoutError(f"nodes {sorted(set(nodes) - set(served))} not serving")
        time.sleep(POLL_S)
    return served


def _load(cluster: LocalCluster, items: int) -> tuple[float, int]:
    """Append ``items`` items; returns items/s and the leader's state position after."""
    with raftchan.Client(cluster.addresses, timeout=120.0) as client:
        chan = client.channel(CHANNEL)
        started = time.perf_counter()
        for first in range(0, items, LOAD_CHUNK):
            chan.extend(
                seq.to_bytes(8, "big") + b"r" * (ITEM_BYTES - 8)
                for seq in range(first, min(items, first + LOAD_CHUNK))
            )
            chan.flush()
        rate = items / (time.perf_counter() - started)
        length = len(chan)
    if length != items:
        raise RuntimeError(f"loaded {items} items, the channel holds {length}")
    leader = cluster.wait_leader(READY_TIMEOUT_S)
    return rate, int(cluster.status()[leader]["position"])


def _growth(before: list[int | None], after: list[int | None]) -> list[int | None]:
    return [None if a is None or b is None else b - a for a, b in zip(before, after, strict=True)]


def _data_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


#: What "serves" means in raftchan's figures (for the report).
RAFTCHAN_SERVING = (
    "a node serves when its status says ready and a poll through it, answered from its "
    "own state once it applied everything committed before the restart, ends at the full "
    "length; the cluster serves when a linearizable length read through the leader does"
)


def _figures(
    items: int,
    rate: float,
    data: list[int],
    empty: list[int | None],
    loaded: list[int | None],
    follower: str,
    follower_s: float,
    follower_rss: int | None,
    cluster_s: float,
    every_s: float,
    restarted: list[int | None],
    serving: str,
) -> dict[str, Any]:
    """One system's recovery figures, under the keys the report reads (the same for every
    system): sizes in MB (10^6 bytes), times in seconds; also prints their summary line."""
    say(
        f"    {follower} serves after {follower_s:.2f} s, cluster after {cluster_s:.2f} s "
        f"(every server {every_s:.2f} s); RSS after load {_mb(loaded)} MB"
    )
    return {
        "items": items,
        "item_bytes": ITEM_BYTES,
        "load_items_per_s": round(rate, 1),
        "load_s": round(items / rate, 2) if rate else None,
        "data_dir_mb": _mb(list(data)),
        "rss_empty_mb": _mb(empty),
        "rss_loaded_mb": _mb(loaded),
        "rss_growth_mb_per_million": [per_million(g, items) for g in _growth(empty, loaded)],
        "follower": follower,
        "follower_restart_s": round(follower_s, 3),
        "follower_rss_after_restart_mb": _mb([follower_rss])[0],
        "cluster_restart_serves_s": round(cluster_s, 3),
        "cluster_restart_all_nodes_s": round(every_s, 3),
        "rss_after_cluster_restart_mb": _mb(restarted),
        "rss_restart_growth_mb_per_million": [
            per_million(g, items) for g in _growth(empty, restarted)
        ],
        "serving": serving,
    }


def measure_recovery(cfg: Config, workdir: Path) -> dict[str, Any]:
    """The recovery figures (see the module's docstring) on a cluster of its own."""
    items = cfg.recovery_items
    cluster = LocalCluster(3, workdir / "raftchan-recovery", tuning=None, log_level="WARNING")
    try:
        cluster.start()
        cluster.wait_ready(READY_TIMEOUT_S)
        time.sleep(0.5)  # let the nodes settle after start-up before the baseline
        empty = _rss_all(cluster)
        say(f"    loading {items:,} items of {ITEM_BYTES} B ...")
        rate, position = _load(cluster, items)
        loaded = _rss_all(cluster)
        data = [_data_bytes(node.spec.data_dir) for node in cluster.nodes]

        leader = cluster.wait_leader(READY_TIMEOUT_S)
        follower = next(i for i in range(cluster.size) if i != leader)
        say(f"    restarting follower {cluster.names[follower]} ...")
        cluster.terminate(follower)
        started = time.perf_counter()
        cluster.restart(follower)
        follower_s = _wait_serving(cluster, [follower], items, position, started)[follower]
        follower_rss = rss_bytes(cluster.nodes[follower].pid)

        say("    restarting the whole cluster ...")
        cluster.stop()
        started = time.perf_counter()
        cluster.start()
        cluster_s = _cluster_serves(cluster, items, started)
        every = _wait_serving(cluster, list(range(cluster.size)), items, position, started)
        restarted = _rss_all(cluster)
    except Exception:
        say(cluster.log_tails(10))
        raise
    finally:
        with contextlib.suppress(Exception):
            cluster.close()
    return _figures(
        items,
        rate,
        data,
        empty,
        loaded,
        cluster.names[follower],
        follower_s,
        follower_rss,
        cluster_s,
        max(every.values()),
        restarted,
        RAFTCHAN_SERVING,
    )


def _cluster_serves(cluster: LocalCluster, items: int, started: float) -> float:
    """Seconds from ``started`` until a linearizable length read returns ``items``."""
    deadline = started + SERVE_TIMEOUT_S
    with raftchan.Client(cluster.addresses, timeout=2.0) as client:
        while True:
            with contextlib.suppress(raftchan.RaftchanError, OSError):
                if len(client.channel(CHANNEL)) == items:
                    return time.perf_counter() - started
            if time.perf_counter() >= deadline:
                raise TimeoutError(f"the cluster did not serve {items} items")
            time.sleep(POLL_S)


def recovery_item(seq: int) -> bytes:
    """Item ``seq`` of the load: its number (8 bytes, big-endian), padded to 16 B."""
    return seq.to_bytes(8, "big") + b"r" * (ITEM_BYTES - 8)


class PeerCluster(abc.ABC):
    """Three servers of a peer system that the recovery workload starts for itself (not
    the ones its other workloads use), so that "empty" means empty. ``procs[i]`` is
    server ``i``'s process (the server binary itself, so its pid is the one measured)."""

    #: What "serves" means in this system's figures (for the report).
    serving = ""

    def __init__(self, binary: str, base: Path) -> None:
        #: The server binary, and the folder its servers' data and logs go in.
        self.binary = binary
        self.base = base
        #: Each server's client port, once launched.
        self.ports: list[int] = []
        self.procs: list[Process] = []
        self.names: list[str] = []
        #: Each server's data folder.
        self.data_dirs: list[Path] = []

    @abc.abstractmethod
    def launch(self) -> None:
        """Start the three server processes (fresh data) and fill ``procs``, ``names``
        and ``data_dirs``."""

    @abc.abstractmethod
    async def ready(self) -> None:
        """Wait until the cluster takes writes (leader elected, stream created)."""

    @abc.abstractmethod
    async def load(self, items: int) -> None:
        """Write items ``0 .. items - 1`` (:func:`recovery_item`); return once every one is
        acknowledged."""

    @abc.abstractmethod
    async def leaders(self) -> set[int]:
        """Indexes of the servers that lead something now (not to be restarted alone)."""

    @abc.abstractmethod
    async def serves(self, i: int, items: int) -> bool:
        """True if server ``i`` serves the ``items`` items (one bounded attempt)."""

    @abc.abstractmethod
    async def cluster_serves(self, items: int) -> bool:
        """True if a read of the cluster, through any server, returns ``items`` items."""

    def log_tails(self, lines: int) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(lines)}" for p in self.procs)


async def _poll(check: Callable[[], Awaitable[bool]], started: float, what: str) -> float:
    """Seconds from ``started`` until ``check()`` is true (bounded)."""
    deadline = started + SERVE_TIMEOUT_S
    while not await check():
        if time.perf_counter() >= deadline:
            raise TimeoutError(f"{what} after {SERVE_TIMEOUT_S:.0f} s")
        await asyncio.sleep(POLL_S)
    return time.perf_counter() - started


async def _every_serves(cluster: PeerCluster, items: int, started: float) -> float:
    """Seconds from ``started`` until each of the three servers has served (bounded)."""
    served: set[int] = set()

    async def all_served() -> bool:
        for i in range(len(cluster.procs)):
            if i not in served and await cluster.serves(i, items):
                served.add(i)
        return len(served) == len(cluster.procs)

    return await _poll(all_served, started, f"servers {cluster.names} not all serving")


def _rss_procs(cluster: PeerCluster) -> list[int | None]:
    return [rss_bytes(p.pid) if p.alive() else None for p in cluster.procs]


async def measure_peer_recovery(cluster: PeerCluster, cfg: Config) -> dict[str, Any]:
    """The recovery figures on ``cluster``'s three servers, under the same keys as
    raftchan's: load ``cfg.recovery_items`` items of 16 B (timed from the first write to
    the last acknowledgement); restart one server that leads nothing (SIGTERM, then the
    same command again), timed from its start until it serves; stop all three and start
    them together, timed until the cluster serves and until each server does; ``VmRSS`` of
    every server empty, once every server serves the load, and after the cluster restart.
    """
    items = cfg.recovery_items
    try:
        cluster.launch()
        await cluster.ready()
        await asyncio.sleep(0.5)  # let the servers settle after start-up before the baseline
        empty = _rss_procs(cluster)
        say(f"    loading {items:,} items of {ITEM_BYTES} B ...")
        started = time.perf_counter()
        await cluster.load(items)
        load_s = time.perf_counter() - started
        say(f"    loaded in {load_s:.1f} s ({items / load_s:,.0f} items/s)")
        # The followers may still be applying the tail of the load: memory and the
        # restarts count from a cluster where every server has every item.
        await _every_serves(cluster, items, time.perf_counter())
        loaded = _rss_procs(cluster)
        data = [_data_bytes(folder) for folder in cluster.data_dirs]

        leading = await cluster.leaders()
        follower = next(i for i in range(len(cluster.procs)) if i not in leading)
        say(
            f"    restarting {cluster.names[follower]} (leaders: "
            f"{sorted(cluster.names[i] for i in leading)}) ..."
        )
        cluster.procs[follower].stop()
        started = time.perf_counter()
        cluster.procs[follower] = cluster.procs[follower].restart()
        follower_s = await _poll(
            lambda: cluster.serves(follower, items),
            started,
            f"{cluster.names[follower]} not serving",
        )
        follower_rss = rss_bytes(cluster.procs[follower].pid)

        say("    restarting the whole cluster ...")
        stop_all(cluster.procs)
        started = time.perf_counter()
        cluster.procs[:] = [p.restart() for p in cluster.procs]
        cluster_s = await _poll(
            lambda: cluster.cluster_serves(items), started, f"the cluster not serving {items}"
        )
        every_s = await _every_serves(cluster, items, started)
        restarted = _rss_procs(cluster)
    except Exception:
        say(cluster.log_tails(10))
        raise
    finally:
        stop_all(cluster.procs)
    return _figures(
        items,
        items / load_s,
        data,
        empty,
        loaded,
        cluster.names[follower],
        follower_s,
        follower_rss,
        cluster_s,
        every_s,
        restarted,
        cluster.serving,
    )
