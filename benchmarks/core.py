"""Shared pieces of ``python -m benchmarks run``: workloads, statistics, processes.

Every system under test is a :class:`System`: it starts its servers for real on
loopback, hands out *appenders* (one per producer: an ``async`` function that appends one
item and returns only once the system acknowledged it as committed or replicated, by its
own definition; or a :class:`BatchingAppender`, whose awaitable completes when the batch
holding the item was acknowledged) and stops everything it started, by pid. The workloads
below are the same for every system, so the figures of one run can be compared with each
other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import importlib.metadata
import inspect
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

#: One acknowledged append of one item.
Appender = Callable[[bytes], Awaitable[None]]
#: Appends several items in this order; returns once every one is acknowledged.
Publisher = Callable[[list[bytes]], Awaitable[None]]


class BatchingAppender:
    """An :data:`Appender` for a system that acknowledges items in batches.

    Calling it hands one item over at once and returns, without waiting, an awaitable for
    the item's acknowledgement. The items handed over go out together, as one call of
    ``publish``, as soon as ``max_items`` of them are waiting or the producer gives control
    back to the event loop (it awaits), whichever comes first. The awaitable (one future,
    shared by the items of a batch) completes when the batch's ``publish`` returned, or
    fails with its error. A producer that awaits each item before handing over the next
    therefore sends batches of one.
    """

    def __init__(self, publish: Publisher, max_items: int) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        self._publish = publish
        self.max_items = max_items
        self._items: list[bytes] = []
        self._batch: asyncio.Future[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def __call__(self, item: bytes) -> asyncio.Future[None]:
        batch = self._batch
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._batch = loop.create_future()
            # Runs once the producer yields to the event loop: whatever it handed over
            # until then goes out, so an item never waits for others that may not come.
            loop.call_soon(self._flush, batch)
        self._items.append(item)
        if len(self._items) >= self.max_items:
            self._flush(batch)
        return batch

    def _flush(self, batch: asyncio.Future[None]) -> None:
        if batch is not self._batch:
            return  # already sent (it filled up before the producer yielded)
        items, self._items, self._batch = self._items, [], None
        task = asyncio.get_running_loop().create_task(self._send(items, batch))
        # The event loop keeps only weak references to tasks.
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, items: list[bytes], batch: asyncio.Future[None]) -> None:
        try:
            await self._publish(items)
        except asyncio.CancelledError:
            batch.cancel()
            raise
        except Exception as exc:
            if not batch.done():
                batch.set_exception(exc)
        else:
            if not batch.done():
                batch.set_result(None)

    def cancel(self) -> None:
        """Drop the items not sent yet and cancel the batches being sent (their items'
        awaitables are cancelled): for closing a phase that failed."""
        if self._batch is not None:
            self._batch.cancel()
        self._items, self._batch = [], None
        for task in self._sending:
            task.cancel()


#: Appends each producer makes before a timed phase (connecting, finding the leader).
WARMUP_APPENDS = 5
#: No single phase may run longer than its planned time plus this much.
PHASE_GRACE_S = 60.0


def say(message: str) -> None:
    """Progress goes to stderr, so that stdout carries only the final table."""
    print(message, file=sys.stderr, flush=True)


class Skipped(Exception):
    """The system cannot run here (not installed, would not start); the message says why."""


#: Every workload ``--workloads`` knows, in the order a run measures them.
WORKLOADS = ("throughput", "paced", "fanout", "failover", "hang", "recovery", "futures")


@dataclass(frozen=True)
class Config:
    """Sizes of one run. ``--quick`` and ``--full`` pick one of :data:`PROFILES`."""

    profile: str
    producers: tuple[int, ...]
    #: Item sizes in bytes; the throughput and paced phases run once for each.
    item_sizes: tuple[int, ...]
    #: Seconds each throughput phase runs (every producer stops at this time) ...
    throughput_s: float
    #: ... or after this many acknowledged appends in all, whichever comes first.
    throughput_max_items: int
    #: Paced single-producer latency: this many appends, one every ``paced_interval_s``,
    #: for at most ``paced_max_s`` seconds (pysyncobj with batching takes 0.1 s an append).
    paced_items: int
    paced_interval_s: float
    paced_max_s: float
    #: Seconds one append may take before the phase is declared failed.
    op_timeout_s: float = 30.0
    #: True: all producers share one client (connection) of the system, as coroutines,
    #: each with one append in flight. False: one client per producer (not for Dask).
    shared_client: bool = True
    #: Fan-out: for each count, that many subscribers follow one new channel from its
    #: start while one producer appends ``fanout_rate`` items/s for ``fanout_s`` seconds,
    #: in batches of ``fanout_batch`` (one acknowledgement each) ...
    fanout_subscribers: tuple[int, ...] = (1, 10, 50)
    fanout_rate: float = 1000.0
    fanout_s: float = 2.0
    fanout_batch: int = 10
    #: ... after which the subscribers have this long to see the last item.
    fanout_drain_s: float = 10.0
    #: Workloads to run (``--workloads``), from :data:`WORKLOADS`.
    workloads: tuple[str, ...] = WORKLOADS
    #: Failover and hang: rounds (one SIGKILL or SIGSTOP of the leader each); producers,
    #: each with its own client and one append in flight, at most ``failover_rate``
    #: appends/s each; seconds of steady load before the fault and after every producer
    #: was acknowledged again; a round gives up this long after the fault; an append
    #: unanswered after ``failover_op_timeout_s`` has an unknown outcome.
    failover_rounds: int = 1
    failover_producers: int = 4
    failover_rate: float = 200.0
    failover_before_s: float = 1.0
    failover_after_s: float = 1.0
    failover_limit_s: float = 30.0
    failover_op_timeout_s: float = 1.0
    #: Recovery: 16 B items loaded before the restarts.
    recovery_items: int = 100_000
    #: Futures: Dask futures appended and read back per system.
    futures_items: int = 1_000

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILES = {
    "quick": Config(
        profile="quick",
        producers=(1, 8, 64),
        item_sizes=(16,),
        throughput_s=1.5,
        throughput_max_items=300_000,
        paced_items=100,
        paced_interval_s=0.01,
        paced_max_s=3.0,
        fanout_rate=1000.0,
        fanout_s=1.0,
        fanout_batch=10,
        failover_rounds=1,
        recovery_items=100_000,
        futures_items=1_000,
    ),
    "full": Config(
        profile="full",
        producers=(1, 8, 64),
        item_sizes=(16, 256, 4096),
        throughput_s=10.0,
        throughput_max_items=2_000_000,
        paced_items=1_000,
        paced_interval_s=0.005,
        paced_max_s=20.0,
        fanout_rate=10_000.0,
        fanout_s=3.0,
        fanout_batch=100,
        failover_rounds=3,
        failover_before_s=2.0,
        failover_after_s=2.0,
        recovery_items=1_000_000,
        futures_items=10_000,
    ),
}


class Unsupported(Exception):
    """The system cannot run this workload; the message says why."""


class System:
    """One system under test. Subclasses fill in the methods; the runner calls them as
    ``start()``, then ``open_appenders``/``close_appenders`` once per phase (and
    ``open_fanout``/``close_appenders`` once per fan-out phase), then ``count()`` and
    ``stop()`` (always, in a ``finally``)."""

    name = "?"
    #: What an acknowledged append means for this system (replication, durability).
    guarantees = ""
    #: Why the fan-out workload is not measured on this system (if it is not).
    no_fanout = "fan-out is not implemented for this system"
    #: Why the failover, recovery and futures workloads are not measured (if they are not).
    no_failover = "failover is not implemented for this system"
    no_hang = "the hang workload is not implemented for this system"
    no_recovery = "recovery is not implemented for this system"
    no_futures = "only raftchan and Dask Queue hold Dask futures"
    #: How the failover producers' clients find the new leader (for the report).
    failover_client = ""
    #: Throughput workload: items each producer hands to its appender before it waits for
    #: their acknowledgements. 1 (one append in flight per producer) but for a system whose
    #: appenders acknowledge items in batches (:class:`BatchingAppender`).
    window = 1

    def start(self, workdir: Path) -> None:
        raise NotImplementedError

    async def open_appenders(self, n: int, shared: bool) -> list[Appender]:
        raise NotImplementedError

    async def close_appenders(self) -> None:
        raise NotImplementedError

    async def open_fanout(
        self, topic: str, subscribers: int
    ) -> tuple[Publisher, list[AsyncIterator[bytes]]]:
        """A publisher to a new channel/stream named after ``topic`` and ``subscribers``
        iterators that each follow it from its first item (each with its own connection,
        as separate readers would have). Closed by :meth:`close_appenders`."""
        raise Unsupported(self.no_fanout)

    async def count(self) -> int | None:
        """Items the system holds after the run (``None``: cannot tell)."""
        return None

    # -- failover (see benchmarks/failover.py) ------------------------------------------

    async def open_failover(self, n: int, op_timeout: float) -> list[Appender]:
        """``n`` appenders to the failover channel (stream, prefix), one client each, that
        keep working across a leader change as far as the client does it by itself.
        Closed by :meth:`close_appenders`."""
        raise Unsupported(self.no_failover)

    async def failover_leader(self) -> int:
        """Index of the server to kill: the one leading the failover channel now."""
        raise Unsupported(self.no_failover)

    def server_name(self, i: int) -> str:
        return f"server {i}"

    def kill_server(self, i: int) -> None:
        """SIGKILL server ``i`` (by pid) and reap it."""
        raise Unsupported(self.no_failover)

    async def restart_server(self, i: int) -> None:
        """Start server ``i`` again on its data and wait until the cluster is whole."""
        raise Unsupported(self.no_failover)

    def can_hang(self) -> bool:
        """Whether the hang workload can run: :meth:`freeze_server` and
        :meth:`thaw_server` are implemented."""
        return type(self).freeze_server is not System.freeze_server

    def freeze_server(self, i: int) -> None:
        """SIGSTOP server ``i`` (by pid): its sockets stay open and it answers nothing."""
        raise Unsupported(self.no_hang)

    async def thaw_server(self, i: int) -> None:
        """SIGCONT server ``i`` after :meth:`freeze_server` and wait until the cluster is
        whole again."""
        raise Unsupported(self.no_hang)

    async def failover_stored(self) -> list[bytes]:
        """Every item of the failover channel, as stored (duplicates included)."""
        raise Unsupported(self.no_failover)

    # -- recovery and futures (benchmarks/recovery.py, benchmarks/futures.py) -----------

    async def recovery(self, cfg: Config, workdir: Path) -> dict[str, Any]:
        raise Unsupported(self.no_recovery)

    async def futures(self, cfg: Config, workdir: Path) -> dict[str, Any]:
        raise Unsupported(self.no_futures)

    def stop(self) -> None:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        return {}

    def settings(self) -> dict[str, Any]:
        return {}


class ServerSystem(System):
    """A system whose servers are a binary from the distribution, driven through a client
    from PyPI: skipped with the install line when either is missing."""

    #: The server binary looked up on PATH, and the Debian package that brings it.
    binary_name = ""
    apt_package = ""
    #: The client's distribution on PyPI and the module it is imported as.
    client_package = ""
    client_module = ""

    def __init__(self) -> None:
        self.procs: list[Process] = []
        self.binary = shutil.which(self.binary_name) or ""
        #: Client objects opened for the current phase, closed by :meth:`close_appenders`.
        self.clients: list[Any] = []

    def require(self) -> None:
        """Raise :class:`Skipped`, saying how to install it, if the server or the client is
        missing."""
        if not self.binary:
            raise Skipped(
                f"{self.binary_name} is not installed (apt-get install {self.apt_package})"
            )
        try:
            importlib.import_module(self.client_module)
        except ImportError as exc:
            raise Skipped(
                f"{self.client_package} is not installed (pip install -e '.[bench]')"
            ) from exc

    async def close_appenders(self) -> None:
        clients, self.clients = self.clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                await self.close_client(client)

    async def close_client(self, client: Any) -> None:
        await client.close()

    def stop(self) -> None:
        stop_all(self.procs)

    def kill_server(self, i: int) -> None:
        self.procs[i].kill()

    def can_hang(self) -> bool:
        return type(self).server_rejoined is not ServerSystem.server_rejoined

    def freeze_server(self, i: int) -> None:
        self.procs[i].signal(signal.SIGSTOP)

    async def thaw_server(self, i: int) -> None:
        self.procs[i].signal(signal.SIGCONT)
        await self.server_rejoined(i)

    async def restart_server(self, i: int) -> None:
        await self.restart_process(i, self.server_port(i))
        await self.server_rejoined(i)

    def server_port(self, i: int) -> int:
        """The port clients reach server ``i`` on (for a restart)."""
        raise Unsupported(self.no_failover)

    async def server_rejoined(self, i: int) -> None:
        """Until server ``i``, restarted or continued, serves again as part of the cluster
        (the cluster whole: the next round starts from three servers)."""
        raise Unsupported(self.no_failover)

    def server_name(self, i: int) -> str:
        return self.procs[i].name

    async def restart_process(self, i: int, port: int) -> None:
        """Start server ``i`` again (same command, data and port) and wait until it
        accepts connections."""
        self.procs[i] = self.procs[i].restart()
        await wait_tcp("127.0.0.1", port, 30.0, self.procs[i])

    def versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[self.client_package] = importlib.metadata.version(self.client_package)
        if self.binary:
            out[self.binary_name] = binary_version(self.binary)
        return out


# ---------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: always a value that was really observed."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


#: Percentiles kept of every latency sample, for the CDF plots (the samples themselves
#: would make a run's JSON megabytes long).
CDF_PERCENTILES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99, 99.5, 99.9, 100)


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    ms = sorted(s * 1000.0 for s in seconds)
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "p999_ms": round(percentile(ms, 99.9), 3),
        "max_ms": round(max(ms), 3) if ms else float("nan"),
        "cdf_ms": [[q, round(percentile(ms, q), 3)] for q in CDF_PERCENTILES] if ms else [],
    }


# ---------------------------------------------------------------------------------------
# Workloads


async def throughput(
    appenders: list[Appender], cfg: Config, item_bytes: int, window: int = 1
) -> dict[str, Any]:
    """Closed loop: each producer hands ``window`` items to its appender, waits until every
    one of them was acknowledged and only then hands over the next ones, so
    ``len(appenders) * window`` appends are in flight (``window`` is 1 for every system
    that acknowledges one item per call). An item's latency runs from the moment its
    producer started handing over its round of ``window`` items until the item's
    acknowledgement. Items per second over the wall time from the start until the last
    producer's last acknowledgement."""
    payload = b"x" * item_bytes
    await asyncio.gather(*(_warm(a, payload) for a in appenders))
    latencies: list[float] = []
    per_producer = max(1, cfg.throughput_max_items // len(appenders))
    started = time.perf_counter()
    stop_at = started + cfg.throughput_s

    async def producer(append: Appender) -> None:
        clock = time.perf_counter
        record = latencies.append
        for _ in range(per_producer):
            begin = clock()
            if begin >= stop_at:
                return
            await append(payload)
            record(clock() - begin)

    async def windowed_producer(append: Appender) -> None:
        # Every item of a round is handed over (the appender is called) before the first
        # is awaited, so that a batching appender can send them together; each item's
        # acknowledgement is then taken in turn, and an item is counted as acknowledged
        # when the producer sees that it was.
        clock = time.perf_counter
        record = latencies.append
        left = per_producer
        while left > 0:
            begin = clock()
            if begin >= stop_at:
                return
            acks = [append(payload) for _ in range(min(window, left))]
            left -= len(acks)
            try:
                for ack in acks:
                    await ack
                    record(clock() - begin)
            finally:
                for ack in acks:
                    if inspect.iscoroutine(ack):
                        ack.close()  # never awaited if an earlier one failed

    run = producer if window == 1 else windowed_producer
    await asyncio.wait_for(
        asyncio.gather(*(run(a) for a in appenders)),
        cfg.throughput_s + PHASE_GRACE_S,
    )
    wall = time.perf_counter() - started
    return {
        "producers": len(appenders),
        "window": window,
        "item_bytes": item_bytes,
        "items": len(latencies),
        "seconds": round(wall, 3),
        "items_per_s": round(len(latencies) / wall, 1),
        **latency_summary(latencies),
    }


async def paced(append: Appender, cfg: Config, item_bytes: int) -> dict[str, Any]:
    """One producer, one append every ``paced_interval_s`` (never two outstanding): the
    latency of an acknowledgement at low load."""
    payload = b"x" * item_bytes
    await _warm(append, payload)
    latencies: list[float] = []
    deadline = time.perf_counter() + cfg.paced_max_s
    next_at = time.perf_counter()
    for _ in range(cfg.paced_items):
        now = time.perf_counter()
        if now >= deadline:
            break
        if next_at > now:
            await asyncio.sleep(next_at - now)
        begin = time.perf_counter()
        await asyncio.wait_for(append(payload), cfg.op_timeout_s)
        latencies.append(time.perf_counter() - begin)
        next_at = begin + cfg.paced_interval_s
    return {
        "item_bytes": item_bytes,
        "items": len(latencies),
        "interval_ms": cfg.paced_interval_s * 1000.0,
        **latency_summary(latencies),
    }


#: Sequence number of the marker item a fan-out phase starts with (not a measured item).
FANOUT_MARK = 2**63 - 1
#: ... and of the marker it ends with, once the measured items are in (or given up on).
FANOUT_END = 2**63 - 2
#: Seconds the subscribers of a fan-out phase may take to see the first marker, and the
#: end marker.
FANOUT_READY_S = 30.0
FANOUT_END_S = 5.0
#: A fan-out producer that falls behind its pace stops after this many times the planned
#: duration, so that a slow system cannot stretch the run.
FANOUT_OVERRUN = 2.0


def fanout_item(seq: int, size: int) -> bytes:
    """A fan-out item: its sequence number (8 bytes, big-endian), padded to ``size``."""
    return seq.to_bytes(8, "big") + b"x" * max(0, size - 8)


def fanout_seq(item: bytes) -> int:
    return int.from_bytes(item[:8], "big")


async def fanout(
    publish: Publisher, subscriptions: list[AsyncIterator[bytes]], cfg: Config, item_bytes: int
) -> dict[str, Any]:
    """One producer publishes ``cfg.fanout_rate`` items/s (batches of ``cfg.fanout_batch``,
    each awaited before the next) while every subscriber follows the channel. Delivery lag
    of an item to a subscriber: from the moment its batch was acknowledged to the moment the
    subscriber got it (0 if it got it before the acknowledgement came back).

    Bounded in time: a producer that cannot keep the pace stops after
    ``FANOUT_OVERRUN * cfg.fanout_s`` (the items it published are the phase's items), and
    the subscribers have ``cfg.fanout_drain_s`` after that to see the last one."""
    clock = time.perf_counter
    planned = max(cfg.fanout_batch, int(cfg.fanout_rate * cfg.fanout_s))
    planned -= planned % cfg.fanout_batch
    seen: list[tuple[list[int], list[float]]] = [([], []) for _ in subscriptions]
    ready = [asyncio.Event() for _ in subscriptions]

    async def follow(k: int, subscription: AsyncIterator[bytes]) -> None:
        seqs, times = seen[k]
        async for item in subscription:
            t = clock()
            seq = fanout_seq(item)
            if seq == FANOUT_MARK:
                ready[k].set()
                continue
            if seq == FANOUT_END:
                return
            seqs.append(seq)
            times.append(t)

    tasks = [asyncio.create_task(follow(k, s)) for k, s in enumerate(subscriptions)]
    try:
        # The marker: every subscriber is connected and following before the clock starts.
        await asyncio.wait_for(publish([FANOUT_MARK.to_bytes(8, "big")]), cfg.op_timeout_s)
        await asyncio.wait_for(
            asyncio.gather(*(e.wait() for e in ready)), FANOUT_READY_S + cfg.op_timeout_s
        )
        acked_at: list[float] = []
        sent_at: list[float] = []
        batch_latencies: list[float] = []
        interval = cfg.fanout_batch / cfg.fanout_rate
        started = next_at = clock()
        stop_at = started + FANOUT_OVERRUN * cfg.fanout_s
        for first in range(0, planned, cfg.fanout_batch):
            now = clock()
            if now >= stop_at:
                break
            if next_at > now:
                await asyncio.sleep(next_at - now)
            begin = clock()
            items = [fanout_item(seq, item_bytes) for seq in range(first, first + cfg.fanout_batch)]
            await asyncio.wait_for(publish(items), cfg.op_timeout_s)
            end = clock()
            batch_latencies.append(end - begin)
            acked_at += [end] * cfg.fanout_batch
            sent_at += [begin] * cfg.fanout_batch
            # A fixed schedule: a late batch does not push back the ones after it.
            next_at = started + (first // cfg.fanout_batch + 1) * interval
        published = clock()
        total = len(acked_at)
        while clock() < published + cfg.fanout_drain_s:
            if all(len(seqs) >= total for seqs, _ in seen):
                break
            await asyncio.sleep(0.01)
        drained = clock()
        # The end marker lets every subscriber leave its iteration between two items:
        # cancelling a read in the middle is something not every client survives (a
        # redis-py XREAD BLOCK was seen to hang on it).
        await asyncio.wait_for(publish([FANOUT_END.to_bytes(8, "big")]), cfg.op_timeout_s)
        await asyncio.wait(tasks, timeout=FANOUT_END_S)
    finally:
        for task in tasks:
            task.cancel()
        # Bounded: a read that ignores its cancellation ends when the caller closes the
        # subscribers' clients.
        await asyncio.wait(tasks, timeout=FANOUT_END_S)
    return {
        "subscribers": len(subscriptions),
        "item_bytes": item_bytes,
        "items": total,
        "items_planned": planned,
        "rate_target": cfg.fanout_rate,
        "batch": cfg.fanout_batch,
        "publish_items_per_s": round(total / (published - started), 1),
        "publish_p99_ms": latency_summary(batch_latencies)["p99_ms"],
        **delivery_summary(seen, acked_at, sent_at, started),
        "drain_s": round(drained - published, 3),
    }


def delivery_summary(
    seen: Sequence[tuple[Sequence[int], Sequence[float]]],
    acked_at: Sequence[float],
    sent_at: Sequence[float],
    started: float,
) -> dict[str, Any]:
    """Lag percentiles over every (subscriber, item) delivery, after the acknowledgement
    (0 when the subscriber was first) and after the append; whether each subscriber saw
    every item exactly once and in order; the slowest subscriber's items/s."""
    total = len(acked_at)
    lags: list[float] = []
    end_to_end: list[float] = []
    early = 0
    in_order = 0
    slowest = math.inf
    for seqs, times in seen:
        if list(seqs) == list(range(total)):
            in_order += 1
        for seq, t in zip(seqs, times, strict=True):
            after_ack = t - acked_at[seq] if 0 <= seq < total else math.nan
            if after_ack < 0:
                early += 1
            lags.append(max(0.0, after_ack))
            end_to_end.append(t - sent_at[seq] if 0 <= seq < total else math.nan)
        if times:
            slowest = min(slowest, len(times) / max(times[-1] - started, 1e-9))
    lag = latency_summary(lags)
    from_append = latency_summary(end_to_end)
    return {
        "lag_p50_ms": lag["p50_ms"],
        "lag_p99_ms": lag["p99_ms"],
        "lag_max_ms": lag["max_ms"],
        "append_to_seen_p50_ms": from_append["p50_ms"],
        "append_to_seen_p99_ms": from_append["p99_ms"],
        "seen_before_ack": round(early / len(lags), 4) if lags else 0.0,
        "every_item_in_order": in_order == len(seen),
        "subscribers_complete": in_order,
        "slowest_subscriber_items_per_s": round(slowest, 1) if slowest < math.inf else 0.0,
    }


async def _warm(append: Appender, payload: bytes) -> None:
    for _ in range(WARMUP_APPENDS):
        await asyncio.wait_for(append(payload), PHASE_GRACE_S)


# ---------------------------------------------------------------------------------------
# Processes


class Process:
    """A server process the harness started; stopped by its pid, never by name."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._env = env
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process if it is still running."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signum)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL (a crash: no clean shutdown) and reap."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout)

    def restart(self) -> Process:
        """The same command again (same data, ports and log), as a new :class:`Process`;
        this one must have ended."""
        if self.alive():
            raise RuntimeError(f"{self.name} (pid {self.pid}) is still running")
        self._log.close()
        return Process(self.name, self.argv, self.log_path, self._env)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; always reaped."""
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGTERM)
                    # A stopped process (the hang workload) acts on SIGTERM only once continued.
                    os.kill(self.popen.pid, signal.SIGCONT)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.popen.pid, signal.SIGKILL)
                    self.popen.wait(timeout)
        finally:
            self._log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def binary_version(binary: str, *args: str) -> str:
    """What ``binary --version`` (or ``args``) prints, first line; empty if it cannot run."""
    if not binary:
        return ""
    try:
        out = subprocess.run(
            [binary, *(args or ("--version",))], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def stop_all(processes: Sequence[Process]) -> None:
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.stop()


async def wait_tcp(host: str, port: int, timeout: float, proc: Process | None = None) -> None:
    """Until something accepts connections at ``host:port`` (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise Skipped(f"{proc.name} exited at start: {proc.tail(5)}")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() >= deadline:
                raise Skipped(f"nothing listens on {host}:{port} after {timeout:.0f} s") from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
