"""Shared pieces of ``python -m benchmarks run``: workloads, statistics, processes.

Every system under test is a :class:`System`: it starts its servers for real on
loopback, hands out *appenders* (one per producer: an ``async`` function that appends one
item and returns only once the system acknowledged it as committed or replicated, by its
own definition) and stops everything it started, by pid. The workloads below are the same
for every system, so the figures of one run can be compared with each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

#: One acknowledged append of one item.
Appender = Callable[[bytes], Awaitable[None]]

#: Appends each producer makes before a timed phase (connecting, finding the leader).
WARMUP_APPENDS = 5
#: No single phase may run longer than its planned time plus this much.
PHASE_GRACE_S = 60.0


def say(message: str) -> None:
    """Progress goes to stderr, so that stdout carries only the final table."""
    print(message, file=sys.stderr, flush=True)


class Skipped(Exception):
    """The system cannot run here (not installed, would not start); the message says why."""


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
    #: Paced single-producer latency: this many appends, one every ``paced_interval_s``.
    paced_items: int
    paced_interval_s: float
    #: Seconds one append may take before the phase is declared failed.
    op_timeout_s: float = 30.0
    #: True: all producers share one client (connection) of the system, as coroutines,
    #: each with one append in flight. False: one client per producer (not for Dask).
    shared_client: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "producers": list(self.producers),
            "item_sizes": list(self.item_sizes),
            "throughput_s": self.throughput_s,
            "throughput_max_items": self.throughput_max_items,
            "paced_items": self.paced_items,
            "paced_interval_s": self.paced_interval_s,
            "op_timeout_s": self.op_timeout_s,
            "shared_client": self.shared_client,
        }


PROFILES = {
    "quick": Config(
        profile="quick",
        producers=(1, 8, 64),
        item_sizes=(16,),
        throughput_s=3.0,
        throughput_max_items=300_000,
        paced_items=200,
        paced_interval_s=0.01,
    ),
    "full": Config(
        profile="full",
        producers=(1, 8, 64),
        item_sizes=(16, 256, 4096),
        throughput_s=10.0,
        throughput_max_items=2_000_000,
        paced_items=1_000,
        paced_interval_s=0.005,
    ),
}


class System:
    """One system under test. Subclasses fill in the methods; the runner calls them as
    ``start()``, then ``open_appenders``/``close_appenders`` once per phase, then
    ``count()`` and ``stop()`` (always, in a ``finally``)."""

    name = "?"
    #: What an acknowledged append means for this system (replication, durability).
    guarantees = ""

    def start(self, workdir: Path) -> None:
        raise NotImplementedError

    async def open_appenders(self, n: int, shared: bool) -> list[Appender]:
        raise NotImplementedError

    async def close_appenders(self) -> None:
        raise NotImplementedError

    async def count(self) -> int | None:
        """Items the system holds after the run (``None``: cannot tell)."""
        return None

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


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000.0 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "p999_ms": round(percentile(ms, 99.9), 3),
        "max_ms": round(max(ms), 3) if ms else float("nan"),
    }


# ---------------------------------------------------------------------------------------
# Workloads


async def throughput(appenders: list[Appender], cfg: Config, item_bytes: int) -> dict[str, Any]:
    """Closed loop: each producer keeps exactly one acknowledged append outstanding, so
    ``len(appenders)`` is the number of appends in flight. Items per second over the wall
    time from the start until the last producer's last acknowledgement."""
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

    await asyncio.wait_for(
        asyncio.gather(*(producer(a) for a in appenders)),
        cfg.throughput_s + PHASE_GRACE_S,
    )
    wall = time.perf_counter() - started
    return {
        "producers": len(appenders),
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
    deadline = time.perf_counter() + cfg.paced_items * cfg.paced_interval_s + PHASE_GRACE_S
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

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; always reaped."""
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGTERM)
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
