"""``python -m benchmarks run [--quick|--full] [--systems a,b,...]``.

Starts each system for real on loopback, one after the other, runs the same workloads on
each (append throughput with 1/8/64 producers, paced single-producer latency), stops what
it started by pid, writes ``benchmarks/results/<time>-<profile>.json`` and a Markdown
table beside it, and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import report
from .core import PROFILES, Appender, Config, Skipped, System, paced, say, throughput

RESULTS = Path(__file__).resolve().parent / "results"
#: Every system ``--systems`` knows, in the order a run measures them.
SYSTEM_NAMES = (
    "raftchan",
    "dask-queue",
    "pysyncobj",
    "pysyncobj-batched",
    "nats",
    "redis",
    "redis-r3",
    "etcd",
)


def _systems() -> dict[str, Callable[[], System]]:
    from .peer_dask import DaskQueue
    from .peer_etcd import Etcd
    from .peer_nats import NatsJetStream
    from .peer_pysyncobj import BatchedPysyncobj, PlainPysyncobj
    from .peer_raftchan import Raftchan
    from .peer_redis import RedisStreams, ReplicatedRedisStreams

    return {
        "raftchan": Raftchan,
        "dask-queue": DaskQueue,
        "pysyncobj": PlainPysyncobj,
        "pysyncobj-batched": BatchedPysyncobj,
        "nats": NatsJetStream,
        "redis": RedisStreams,
        "redis-r3": ReplicatedRedisStreams,
        "etcd": Etcd,
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


async def _phases(system: System, cfg: Config, result: dict[str, Any]) -> None:
    acked = 0

    def counted(append: Appender) -> Appender:
        async def wrapped(item: bytes) -> None:
            nonlocal acked
            await append(item)
            acked += 1

        return wrapped

    for size in cfg.item_sizes:
        for n in cfg.producers:
            say(
                f"  {system.name}: throughput, {n} producer(s), {size} B, "
                f"{cfg.throughput_s:g} s ..."
            )
            appenders = [counted(a) for a in await system.open_appenders(n, cfg.shared_client)]
            try:
                figures = await throughput(appenders, cfg, size)
            finally:
                await system.close_appenders()
            result["throughput"].append(figures)
            say(
                f"    {figures['items_per_s']:,.0f} items/s, p50 {figures['p50_ms']} ms, "
                f"p99 {figures['p99_ms']} ms ({figures['items']} items)"
            )
        say(
            f"  {system.name}: paced latency, {size} B, {cfg.paced_items} appends "
            f"every {cfg.paced_interval_s * 1000:g} ms ..."
        )
        (append,) = await system.open_appenders(1, True)
        try:
            figures = await paced(counted(append), cfg, size)
        finally:
            await system.close_appenders()
        result["paced"].append(figures)
        say(f"    p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms")
    stored = await system.count()
    result["acked"] = acked
    result["stored"] = stored
    # Every acknowledged append must be there (a figure must not count lost items); more
    # than acknowledged would be duplicates.
    result["verified"] = stored == acked
    if not result["verified"]:
        say(f"  {system.name}: WARNING stored {stored} items, {acked} were acknowledged")


def run_system(system: System, cfg: Config, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": system.name,
        "guarantees": system.guarantees,
        "throughput": [],
        "paced": [],
    }
    started = time.monotonic()
    say(f"== {system.name}")
    try:
        system.start(workdir)
        asyncio.run(_phases(system, cfg, result))
    except Skipped as exc:
        result["skipped"] = str(exc)
        say(f"  {system.name}: SKIPPED: {exc}")
    except Exception as exc:  # a failed system must not stop the others
        result["error"] = f"{type(exc).__name__}: {exc}"
        say(f"  {system.name}: ERROR: {result['error']}")
    finally:
        system.stop()
        result["versions"] = system.versions()
        result["settings"] = system.settings()
        result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def cmd_run(args: argparse.Namespace) -> int:
    cfg = PROFILES["full" if args.full else "quick"]
    if args.client_per_producer:
        cfg = dataclasses.replace(cfg, shared_client=False)
    if args.sizes:
        try:
            sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 8:
            say(f"--sizes takes item sizes in bytes, at least 8 each: {args.sizes!r}")
            return 2
        cfg = dataclasses.replace(cfg, item_sizes=sizes)
    available = _systems()
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        say(f"unknown systems {unknown}; known: {', '.join(available)}")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="raftchan-bench-"))
    run: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": cfg.as_dict(),
        "harness_versions": {"raftchan": importlib.metadata.version("raftchan")},
        "systems": [],
    }
    say(f"benchmark run ({cfg.profile}): {', '.join(names)}; work dir {workdir}")
    try:
        for name in names:
            run["systems"].append(run_system(available[name](), cfg, workdir))
    finally:
        if args.keep:
            say(f"node data and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    table = report.markdown(run)
    run["markdown"] = table
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = run["started"].replace(":", "").replace("-", "").replace("+0000", "Z")
    json_path = out_dir / f"{stamp}-{cfg.profile}.json"
    json_path.write_text(json.dumps(run, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(f"# Benchmark run {run['started']} ({cfg.profile})\n\n{table}")
    say(f"wrote {json_path} and {md_path.name}")
    print(table)
    failed = any(
        s.get("error") or (not s.get("skipped") and not s.get("verified")) for s in run["systems"]
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmarks and write the results")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about 2 minutes (the default)")
    size.add_argument("--full", action="store_true", help="longer phases, more samples")
    run.add_argument(
        "--systems", default=",".join(SYSTEM_NAMES), help="comma-separated, from: %(default)s"
    )
    run.add_argument(
        "--sizes",
        help="item sizes in bytes, comma-separated (default: 16 with --quick, "
        "16,256,4096 with --full)",
    )
    run.add_argument("--out", help="folder for the JSON and Markdown (benchmarks/results)")
    run.add_argument(
        "--client-per-producer",
        action="store_true",
        help="one client (connection) per producer instead of one shared client",
    )
    run.add_argument("--keep", action="store_true", help="keep node data and logs")
    args = parser.parse_args(argv)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
