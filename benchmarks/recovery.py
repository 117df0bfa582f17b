"""Recovery: how long a raftchan node takes to serve again with many items in its log,
and how much memory the nodes hold per million small items.

On a fresh 3-node cluster (default Raft timing and fsync, default compaction) one client
loads ``cfg.recovery_items`` items of 16 B. Then:

- **follower restart**: one follower is stopped (SIGTERM) and started again; timed from
  the start of its process until it *serves*: its status says ``ready`` and a read
  through it (a poll, which any node answers from its own state) returns the channel's
  full length;
- **cluster restart**: all three are stopped and started together; timed from the
  start until the cluster serves (a linearizable length read through the leader returns
  the full length) and until every node serves as above;
- **memory**: resident set size (``VmRSS`` from ``/proc``) of each node when empty,
  after the load, and after each restart; the growth per million items.

Everything it starts it stops, in a ``finally``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path
from typing import Any

import raftchan
from cluster.harness import LocalCluster, receive_message
from raftchan import protocol
from raftchan.config import split_address

from .core import Config, say

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
        growth = _growth(empty, loaded)
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
    result = {
        "items": items,
        "item_bytes": ITEM_BYTES,
        "load_items_per_s": round(rate, 1),
        "data_dir_mb": _mb(list(data)),
        "rss_empty_mb": _mb(empty),
        "rss_loaded_mb": _mb(loaded),
        "rss_growth_mb_per_million": [per_million(g, items) for g in growth],
        "follower": cluster.names[follower],
        "follower_restart_s": round(follower_s, 3),
        "follower_rss_after_restart_mb": _mb([follower_rss])[0],
        "cluster_restart_serves_s": round(cluster_s, 3),
        "cluster_restart_all_nodes_s": round(max(every.values()), 3),
        "rss_after_cluster_restart_mb": _mb(restarted),
        "rss_restart_growth_mb_per_million": [
            per_million(g, items) for g in _growth(empty, restarted)
        ],
    }
    say(
        f"    follower serves after {follower_s:.2f} s, cluster after {cluster_s:.2f} s "
        f"(every node {max(every.values()):.2f} s); RSS after load {_mb(loaded)} MB"
    )
    return result


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
