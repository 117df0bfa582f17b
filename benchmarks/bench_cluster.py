"""Measure raftchan on a real local 3-node cluster: throughput, commit latency, failover.

Three figures, each from real node processes started by :class:`cluster.LocalCluster`
with the nodes' default Raft timing and the journal fsynced (the node default), because
those are what a user gets; test timing would flatter the failover figure:

1. group commit: several clients append to one channel at once, then flush;
   items per second from the first append until every flush has returned;
2. one client: items per second when it appends many items and flushes once, and the
   latency of append-then-flush done one item at a time (p50 / p99);
3. failover: one client appends and flushes in a loop while the leader is SIGKILLed;
   seconds from the kill until an append made after it is committed.

Prints a JSON summary and a table; ``--json-out`` also writes the JSON to a file. This is
a benchmark, not a test: it checks only that every appended item was stored exactly once,
so that a figure never counts items that were lost. Run ``python
benchmarks/bench_cluster.py --help`` for the options, and see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

import raftchan
from cluster.harness import LocalCluster
from raftchan.config import RaftTuning

NODES = 3

#: Full-size defaults; ``--quick`` swaps in :data:`QUICK` for a smoke run of a few seconds.
DEFAULTS = {"items": 20_000, "clients": 8, "rounds": 3, "latency_items": 1_000}
QUICK = {"items": 2_000, "clients": 4, "rounds": 1, "latency_items": 50}

#: A fresh cluster may take this long to start its processes and elect a leader.
READY_TIMEOUT = 60.0
#: Appends each client makes and flushes before a timed phase, so that connecting,
#: finding the leader and opening a session are not part of the figure.
WARMUP_ITEMS = 10
#: During failover the loop must first commit this many appends with the leader alive,
#: so that the kill lands on a client in steady state.
FAILOVER_WARMUP_OPS = 20
#: The kill lands at a random point within this many seconds after warm-up, so that it
#: does not always hit the same moment of an append-flush cycle.
KILL_JITTER = 0.05
#: Bounds one failover round: waiting for the first commit after the kill, and the loop.
FAILOVER_LIMIT = 90.0
#: Bounds the appends of one failover round's loop in count (it stops on time first).
FAILOVER_MAX_OPS = 1_000_000
#: In the asyncio phase, a client yields to the event loop after this many appends, so
#: that senders and the other clients run while it appends, as separate programs would.
YIELD_EVERY = 64

#: For scale only; NOT measured by this script (earlier measurements recorded in the
#: project's design notes: 3 nodes or one scheduler, all on loopback).
REFERENCE = {
    "pysyncobj_commands_per_s": "about 7,000 (plain pysyncobj, 1,000 commands in flight, "
    "submitted on the leader, journal on)",
    "pysyncobj_failover_s": "about 1.0 median (SIGKILL of the leader to the next commit, "
    "default timeouts)",
    "dask_queue_items_per_s": "1,050-1,650 (distributed.Queue put/get between two clients "
    "through one scheduler)",
}


def say(message: str) -> None:
    """Progress goes to stderr so that stdout carries only the summary."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Measuring helpers


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile: always a latency that was really observed,
    which is what a reader of "p99" expects (no interpolation between two samples)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


class CpuMeter:
    """CPU seconds used by this process and by each node over one phase.

    On a machine with few cores the clients and the three nodes compete for them. A
    phase whose CPU total nears wall time times the core count was bound by CPU, not by
    Raft round trips or fsync, and its figure says more about the machine than about
    raftchan; the JSON keeps these numbers so a reader can tell which it was.
    """

    def __init__(self, cluster: LocalCluster) -> None:
        self._cluster = cluster
        self._start_self = 0.0
        self._start_nodes: dict[str, float | None] = {}

    def _nodes(self) -> dict[str, float | None]:
        used: dict[str, float | None] = {}
        for node in self._cluster.nodes:
            used[node.spec.name] = None
            if node.pid is None or not node.running:
                continue
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(node.pid).cpu_times()
                used[node.spec.name] = times.user + times.system
        return used

    def start(self) -> CpuMeter:
        self._start_self = time.process_time()
        self._start_nodes = self._nodes()
        return self

    def result(self, wall: float) -> dict[str, Any]:
        client = time.process_time() - self._start_self
        nodes: dict[str, float | None] = {}
        for name, end in self._nodes().items():
            begin = self._start_nodes.get(name)
            nodes[name] = None if end is None or begin is None else round(end - begin, 3)
        total = client + sum(v for v in nodes.values() if v is not None)
        cores = os.cpu_count() or 1
        return {
            "client_s": round(client, 3),
            "nodes_s": nodes,
            # 1.0 means every core was busy for the whole phase.
            "busy_fraction": round(total / (wall * cores), 3) if wall > 0 else None,
        }


# ---------------------------------------------------------------------------------------
# 1. Group commit: many clients at once


def bench_group_commit(
    cluster: LocalCluster, items: int, clients: int, timeout: float
) -> dict[str, Any]:
    """Many clients appending at once is what group commit is for: the leader packs every
    append waiting in a tick into one Raft command, so the figure should exceed what one
    Raft command per append allows."""
    return asyncio.run(_group_commit(cluster, items, clients, timeout))


async def _group_commit(
    cluster: LocalCluster, items: int, clients: int, timeout: float
) -> dict[str, Any]:
    # AsyncClients on one event loop rather than blocking clients in threads: each
    # blocking client brings an event-loop thread of its own, and on a small machine
    # those threads would take CPU from the nodes being measured.
    name = "bench-group-commit"
    opened = [raftchan.AsyncClient(cluster.addresses) for _ in range(clients)]
    try:
        chans = [await client.channel(name) for client in opened]
        for c, chan in enumerate(chans):
            chan.extend({"warmup": c, "i": k} for k in range(WARMUP_ITEMS))
        await asyncio.gather(*(chan.flush(timeout) for chan in chans))

        async def one_client(c: int, chan: raftchan.AsyncChannel) -> None:
            for count, n in enumerate(range(c, items, clients), start=1):
                chan.append({"i": n})
                if count % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            await chan.flush(timeout)

        meter = CpuMeter(cluster).start()
        started = time.perf_counter()
        await asyncio.gather(*(one_client(c, chan) for c, chan in enumerate(chans)))
        wall = time.perf_counter() - started
        cpu = meter.result(wall)

        stored = await chans[0].len(timeout)
        expected = items + clients * WARMUP_ITEMS
    finally:
        await asyncio.gather(*(client.close() for client in opened), return_exceptions=True)
    return {
        "clients": clients,
        "items": items,
        "seconds": round(wall, 4),
        "items_per_s": round(rate(items, wall), 1),
        "stored_exactly_once": stored == expected,
        "stored": stored,
        "expected": expected,
        "cpu": cpu,
    }


# ---------------------------------------------------------------------------------------
# 2. One client


def bench_one_client(cluster: LocalCluster, items: int, timeout: float) -> dict[str, Any]:
    """One blocking client appending many items and flushing once: how far pipelining
    and batching inside a single client go without help from other clients."""
    with raftchan.Client(cluster.addresses) as client:
        chan = client.channel("bench-one-client")
        chan.extend({"warmup": k} for k in range(WARMUP_ITEMS))
        chan.flush(timeout)

        meter = CpuMeter(cluster).start()
        started = time.perf_counter()
        for n in range(items):
            chan.append({"i": n})
        appended = time.perf_counter()
        chan.flush(timeout)
        wall = time.perf_counter() - started
        cpu = meter.result(wall)

        stored = len(chan)
    expected = items + WARMUP_ITEMS
    return {
        "items": items,
        "seconds": round(wall, 4),
        "items_per_s": round(rate(items, wall), 1),
        # How long the append calls alone took: the client-side cost of encoding and
        # queueing, which the caller pays even before any flush.
        "append_calls_s": round(appended - started, 4),
        "stored_exactly_once": stored == expected,
        "stored": stored,
        "expected": expected,
        "cpu": cpu,
    }


def bench_sequential(cluster: LocalCluster, items: int, timeout: float) -> dict[str, Any]:
    """append-then-flush one item at a time: the commit latency a caller waits for when
    it needs each item durable before going on (one Raft round trip plus the fsyncs).

    Stops early, and says so, if the whole run exceeds ``timeout`` seconds.
    """
    latencies: list[float] = []
    with raftchan.Client(cluster.addresses) as client:
        chan = client.channel("bench-sequential")
        chan.extend({"warmup": k} for k in range(WARMUP_ITEMS))
        chan.flush(timeout)

        meter = CpuMeter(cluster).start()
        started = time.perf_counter()
        deadline = started + timeout
        for n in range(items):
            begin = time.perf_counter()
            chan.append({"i": n})
            chan.flush(timeout)
            end = time.perf_counter()
            latencies.append(end - begin)
            if end >= deadline:
                break
        wall = time.perf_counter() - started
        cpu = meter.result(wall)

        stored = len(chan)
    done = len(latencies)
    ms = [x * 1000.0 for x in latencies]
    return {
        "items": done,
        "stopped_early": done < items,
        "seconds": round(wall, 4),
        "ops_per_s": round(rate(done, wall), 1),
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "max_ms": round(max(ms), 3),
        "stored_exactly_once": stored == done + WARMUP_ITEMS,
        "stored": stored,
        "expected": done + WARMUP_ITEMS,
        "cpu": cpu,
    }


# ---------------------------------------------------------------------------------------
# 3. Failover


@dataclass
class _Op:
    started: float
    ended: float
    ok: bool
    error: str | None = None


@dataclass
class _Writer:
    """The client loop of a failover round: append one item, flush, repeat.

    Runs in a thread so that the main thread can kill the leader at any moment of a
    cycle, as a crash would. Records when each cycle began and when its flush returned.
    """

    chan: raftchan.Channel
    round_no: int
    flush_timeout: float
    ops: list[_Op] = field(default_factory=list)
    appended: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        deadline = time.perf_counter() + FAILOVER_LIMIT
        for n in range(FAILOVER_MAX_OPS):
            if self.stop.is_set() or time.perf_counter() >= deadline:
                return
            begin = time.perf_counter()
            try:
                self.chan.append({"round": self.round_no, "i": n})
                self.appended += 1
                self.chan.flush(self.flush_timeout)
            except raftchan.RaftchanError as exc:
                # A flush that timed out leaves its appends queued and retried; the next
                # cycle's flush covers them, so the loop simply goes on.
                op = _Op(begin, time.perf_counter(), False, f"{type(exc).__name__}: {exc}")
            else:
                op = _Op(begin, time.perf_counter(), True)
            with self.changed:
                self.ops.append(op)
                self.changed.notify_all()

    def wait_for(self, condition: Callable[[list[_Op]], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: condition(self.ops), timeout)


def bench_failover(cluster: LocalCluster, rounds: int, timeout: float) -> dict[str, Any]:
    """SIGKILL of the leader while a client writes: how long the client's appends stall.

    The figure covers everything a user waits through: the followers noticing the
    silence (election timeout), the election, the client finding the new leader (its
    retry backoff included) and the commit of the retried or next append.
    """
    results = []
    with raftchan.Client(cluster.addresses) as client:
        chan = client.channel("bench-failover")
        appended = 0
        for round_no in range(1, rounds + 1):
            say(f"   round {round_no}/{rounds}")
            results.append(_failover_round(cluster, chan, round_no, timeout))
            appended += results[-1].pop("appended")
        chan.flush(timeout)
        stored = len(chan)
    measured = [r["failover_s"] for r in results if r["failover_s"] is not None]
    return {
        "rounds": results,
        "median_s": round(statistics.median(measured), 4) if measured else None,
        "min_s": round(min(measured), 4) if measured else None,
        "max_s": round(max(measured), 4) if measured else None,
        # Appends retried across a leader change must not be stored twice (nor lost).
        "stored_exactly_once": stored == appended,
        "stored": stored,
        "expected": appended,
    }


def _failover_round(
    cluster: LocalCluster, chan: raftchan.Channel, round_no: int, timeout: float
) -> dict[str, Any]:
    leader = cluster.wait_leader(timeout=READY_TIMEOUT)
    writer = _Writer(chan, round_no, flush_timeout=timeout)
    thread = threading.Thread(target=writer.run, name=f"failover-writer-{round_no}", daemon=True)
    thread.start()
    try:
        if not writer.wait_for(
            lambda ops: sum(op.ok for op in ops) >= FAILOVER_WARMUP_OPS, READY_TIMEOUT
        ):
            raise RuntimeError("the writer did not commit its warm-up appends in time")
        time.sleep(random.uniform(0.0, KILL_JITTER))
        killed_at = time.perf_counter()
        cluster.kill(leader)
        reaped_at = time.perf_counter()
        # When the nodes agree on a new leader, seen from outside by polling their status
        # (every 0.1 s): the part of the stall that is Raft's, before the client's own.
        cluster.wait_leader(timeout=FAILOVER_LIMIT)
        agreed_at = time.perf_counter()

        def fresh_commit(ops: list[_Op]) -> bool:
            return any(op.ok and op.started >= killed_at for op in ops)

        recovered = writer.wait_for(fresh_commit, FAILOVER_LIMIT)
    finally:
        writer.stop.set()
        thread.join(timeout=timeout + 10.0)
    if thread.is_alive():
        raise RuntimeError("the failover writer did not stop")

    after = [op for op in writer.ops if op.ended >= killed_at]
    fresh = [op.ended for op in after if op.ok and op.started >= killed_at]
    returned = [op.ended for op in after if op.ok]
    new_leader = cluster.wait_leader(timeout=READY_TIMEOUT)
    cluster.restart(leader)
    cluster.wait_ready(timeout=READY_TIMEOUT)
    return {
        "killed": cluster.names[leader],
        "new_leader": cluster.names[new_leader],
        # Kill to the commit of the first append MADE after the kill. Conservative by at
        # most one commit latency, and immune to a reply already on the wire at the kill.
        "failover_s": round(min(fresh) - killed_at, 4) if recovered and fresh else None,
        # Kill to the first flush that returned at all: usually the append in flight at
        # the kill; near zero if its reply was already sent when the leader died.
        "first_return_s": round(min(returned) - killed_at, 4) if returned else None,
        "leader_agreed_s": round(agreed_at - killed_at, 4),
        "kill_and_reap_s": round(reaped_at - killed_at, 4),
        "failed_flushes": [op.error for op in after if not op.ok],
        "appended": writer.appended,
    }


# ---------------------------------------------------------------------------------------
# Running it all


def environment() -> dict[str, Any]:
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "raftchan": raftchan.__version__,
        "pysyncobj": importlib.metadata.version("pysyncobj"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
    }


def ensure_whole(cluster: LocalCluster) -> None:
    """Start any node that is down and wait for a leader, so that a phase that failed
    midway does not leave the next one measuring a two-node cluster."""
    cluster.start()
    cluster.wait_ready(timeout=READY_TIMEOUT)


def run_phase(
    title: str,
    key: str,
    measure: Callable[[], dict[str, Any]],
    cluster: LocalCluster,
    summary: dict[str, Any],
) -> None:
    """Run one phase and store its result under ``key``; on failure store the error and go
    on: one broken figure should not cost the others, but it must show (in the summary,
    the node log tails and the exit code)."""
    say(f"-- {title}")
    try:
        ensure_whole(cluster)
        summary[key] = measure()
    except Exception as exc:
        summary[key] = {"error": f"{type(exc).__name__}: {exc}"}
        say(f"   FAILED: {type(exc).__name__}: {exc}")
        say(cluster.log_tails())


def run(args: argparse.Namespace, base_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "benchmark": "raftchan local cluster",
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "settings": {
            "nodes": NODES,
            "items": args.items,
            "clients": args.clients,
            "rounds": args.rounds,
            "latency_items": args.latency_items,
            "timeout_s": args.timeout,
            "quick": args.quick,
            "fsync": "always (node default)",
            "raft_tuning": "node defaults",
            "raft_tuning_values": dataclasses.asdict(RaftTuning()),
        },
        "reference_not_measured_here": REFERENCE,
    }
    cluster = LocalCluster(NODES, base_dir=base_dir, tuning=None)
    try:
        say(f"starting {NODES} nodes")
        cluster.start()
        cluster.wait_ready(timeout=READY_TIMEOUT)

        phases: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
            (
                "group commit",
                "group_commit",
                lambda: bench_group_commit(cluster, args.items, args.clients, args.timeout),
            ),
            (
                "one client, append all then flush",
                "one_client",
                lambda: bench_one_client(cluster, args.items, args.timeout),
            ),
            (
                "one client, append+flush per item",
                "sequential",
                lambda: bench_sequential(cluster, args.latency_items, args.timeout),
            ),
            (
                "failover after SIGKILL of the leader",
                "failover",
                lambda: bench_failover(cluster, args.rounds, args.timeout),
            ),
        ]
        for title, key, measure in phases:
            run_phase(title, key, measure, cluster, summary)
    finally:
        cluster.close()
    return summary


def failures(summary: dict[str, Any]) -> list[str]:
    """Phases that failed or stored a different number of items than were appended."""
    bad = []
    for key in ("group_commit", "one_client", "sequential", "failover"):
        result = summary.get(key)
        if result is None:
            bad.append(f"{key}: not run")
        elif "error" in result:
            bad.append(f"{key}: {result['error']}")
        elif not result.get("stored_exactly_once", True):
            bad.append(f"{key}: stored {result['stored']} items, expected {result['expected']}")
        if key == "failover" and result is not None and "rounds" in result:
            stuck = [r["killed"] for r in result["rounds"] if r["failover_s"] is None]
            if stuck:
                bad.append(
                    f"failover: no commit within {FAILOVER_LIMIT:.0f} s after killing {stuck}"
                )
    return bad


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f}"


def table(summary: dict[str, Any]) -> str:
    env, settings = summary["environment"], summary["settings"]
    lines = [
        f"raftchan {env['raftchan']} (pysyncobj {env['pysyncobj']}), Python {env['python']}, "
        f"{env['cpu_count']} CPUs; {settings['nodes']} local nodes, journal fsync on, "
        "default Raft timing",
        "",
        f"{'figure':<46} {'value':>16}  detail",
        f"{'-' * 46} {'-' * 16}  {'-' * 34}",
    ]

    def row(label: str, key: str, render: Callable[[dict[str, Any]], tuple[str, str]]) -> None:
        result = summary.get(key)
        if result is None or "error" in result:
            value, detail = "FAILED", (result or {}).get("error", "not run")
        else:
            value, detail = render(result)
        lines.append(f"{label:<46} {value:>16}  {detail}")

    row(
        f"group commit, {settings['clients']} clients, one channel",
        "group_commit",
        lambda r: (
            f"{r['items_per_s']:,.0f} items/s",
            f"{r['items']:,} items in {r['seconds']:.2f} s, busy {r['cpu']['busy_fraction']}",
        ),
    )
    row(
        "one client, append all then flush",
        "one_client",
        lambda r: (
            f"{r['items_per_s']:,.0f} items/s",
            f"{r['items']:,} items in {r['seconds']:.2f} s, busy {r['cpu']['busy_fraction']}",
        ),
    )
    row(
        "one client, append+flush per item",
        "sequential",
        lambda r: (
            f"{r['ops_per_s']:,.0f} ops/s",
            f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms over {r['items']:,}"
            + (" (stopped early)" if r["stopped_early"] else ""),
        ),
    )
    row(
        "failover, leader SIGKILL to next commit",
        "failover",
        lambda r: (
            "n/a" if r["median_s"] is None else f"{r['median_s']:.2f} s median",
            "rounds (leader agreed after): "
            + ", ".join(
                f"{_seconds(x['failover_s'])} ({_seconds(x['leader_agreed_s'])})"
                for x in r["rounds"]
            ),
        ),
    )
    lines += ["", "for scale (not measured here):"]
    lines += [f"  {key}: {text}" for key, text in REFERENCE.items()]
    bad = failures(summary)
    if bad:
        lines += ["", "PROBLEMS:"] + [f"  {line}" for line in bad]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure raftchan on a real local 3-node cluster "
        "(default Raft timing, journal fsync on).",
    )
    parser.add_argument("--items", type=int, help=f"items per throughput run ({DEFAULTS['items']})")
    parser.add_argument(
        "--clients", type=int, help=f"clients in the group-commit run ({DEFAULTS['clients']})"
    )
    parser.add_argument("--rounds", type=int, help=f"failover rounds ({DEFAULTS['rounds']})")
    parser.add_argument(
        "--latency-items",
        type=int,
        help=f"append+flush cycles for the latency run ({DEFAULTS['latency_items']})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke run; sizes given explicitly still apply",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds any one flush, and the whole latency run, may take (120)",
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON summary here")
    parser.add_argument(
        "--base-dir",
        type=Path,
        help="keep node data and logs here (default: a temporary directory, removed "
        "after a run without problems)",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULTS
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("items", "clients", "rounds", "latency_items"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_dir = args.base_dir or Path(tempfile.mkdtemp(prefix="raftchan-bench-"))
    summary = run(args, base_dir)
    text = json.dumps(summary, indent=2)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    print(text)
    print()
    print(table(summary))
    bad = failures(summary)
    if bad:
        say(f"node data and logs kept in {base_dir}")
    elif args.base_dir is None:
        shutil.rmtree(base_dir, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
