"""``python -m benchmarks run [--quick|--full] [--systems a,b,...]``.

Starts each system for real on loopback, one after the other, runs the same workloads on
each (append throughput with 1/8/64 producers, paced single-producer latency, fan-out,
failover after a kill and after a hang of the leader, recovery, Dask futures;
``--workloads`` picks some), stops what it started by pid, writes
``benchmarks/results/<time>-<profile>.json`` and a Markdown table beside it, and prints
the table.
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
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import report
from .core import (
    PROFILES,
    WORKLOADS,
    Appender,
    Config,
    Skipped,
    System,
    Unsupported,
    fanout,
    paced,
    say,
    throughput,
)
from .failover import HANG, run_failover

RESULTS = Path(__file__).resolve().parent / "results"
#: Every system ``--systems`` knows, in the order a run measures them.
SYSTEM_NAMES = (
    "raftchan",
    "raftchan-nofsync",
    "dask-queue",
    "pysyncobj",
    "pysyncobj-batched",
    "nats",
    "redis",
    "redis-r3",
    "redis-r3-batch",
    "etcd",
)


def _systems() -> dict[str, Callable[[], System]]:
    from .peer_dask import DaskQueue
    from .peer_etcd import Etcd
    from .peer_nats import NatsJetStream
    from .peer_pysyncobj import BatchedPysyncobj, PlainPysyncobj
    from .peer_raftchan import Raftchan, RaftchanNoFsync
    from .peer_redis import BatchedRedisStreams, RedisStreams, ReplicatedRedisStreams

    return {
        "raftchan": Raftchan,
        "raftchan-nofsync": RaftchanNoFsync,
        "dask-queue": DaskQueue,
        "pysyncobj": PlainPysyncobj,
        "pysyncobj-batched": BatchedPysyncobj,
        "nats": NatsJetStream,
        "redis": RedisStreams,
        "redis-r3": ReplicatedRedisStreams,
        "redis-r3-batch": BatchedRedisStreams,
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


async def _phases(system: System, cfg: Config, result: dict[str, Any], workdir: Path) -> None:
    chosen = set(cfg.workloads)
    if chosen & {"throughput", "paced"}:
        await _append_phases(system, cfg, result)
    if "fanout" in chosen:
        await _fanout_phases(system, cfg, result)
    size = cfg.item_sizes[0]
    workloads: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("failover", lambda: run_failover(system, cfg, size)),
        ("hang", lambda: run_failover(system, cfg, size, HANG)),
        ("recovery", lambda: system.recovery(cfg, workdir)),
        ("futures", lambda: system.futures(cfg, workdir)),
    ]
    for key, measure in workloads:
        if key in chosen:
            await _workload(system, key, measure, result)


async def _workload(
    system: System,
    key: str,
    measure: Callable[[], Awaitable[dict[str, Any]]],
    result: dict[str, Any],
) -> None:
    """One of the failover, hang, recovery and futures workloads: its figures under ``key``, or
    why the system cannot run it under ``<key>_unsupported``, or its error."""
    say(f"  {system.name}: {key} ...")
    try:
        result[key] = await measure()
    except Unsupported as exc:
        result[f"{key}_unsupported"] = str(exc)
        say(f"    not measured: {exc}")
    except Exception as exc:  # the other workloads' figures stand
        result[key] = {"error": f"{type(exc).__name__}: {exc}"}
        say(f"    ERROR: {result[key]['error']}")


async def _append_phases(system: System, cfg: Config, result: dict[str, Any]) -> None:
    acked = 0

    async def count(ack: Awaitable[None]) -> None:
        nonlocal acked
        await ack
        acked += 1

    def counted(append: Appender) -> Appender:
        def wrapped(item: bytes) -> Awaitable[None]:
            # The appender is called now, not when the producer awaits the result: one
            # that takes the item over on the call (a BatchingAppender) must get it then.
            return count(append(item))

        return wrapped

    for size in cfg.item_sizes:
        for n in cfg.producers if "throughput" in cfg.workloads else ():
            in_flight = f", {system.window} items in flight each" if system.window > 1 else ""
            say(
                f"  {system.name}: throughput, {n} producer(s){in_flight}, {size} B, "
                f"{cfg.throughput_s:g} s ..."
            )
            appenders = [counted(a) for a in await system.open_appenders(n, cfg.shared_client)]
            try:
                figures = await throughput(appenders, cfg, size, system.window)
            finally:
                await system.close_appenders()
            result["throughput"].append(figures)
            say(
                f"    {figures['items_per_s']:,.0f} items/s, p50 {figures['p50_ms']} ms, "
                f"p99 {figures['p99_ms']} ms ({figures['items']} items)"
            )
        if "paced" not in cfg.workloads:
            continue
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


async def _fanout_phases(system: System, cfg: Config, result: dict[str, Any]) -> None:
    size = cfg.item_sizes[0]
    for n in cfg.fanout_subscribers:
        say(
            f"  {system.name}: fan-out, {n} subscriber(s), {cfg.fanout_rate:,.0f} items/s "
            f"for {cfg.fanout_s:g} s ..."
        )
        try:
            publish, subscriptions = await system.open_fanout(f"fanout{n}", n)
            figures = await fanout(publish, subscriptions, cfg, size)
        except Unsupported as exc:
            result["fanout_unsupported"] = str(exc)
            say(f"    not measured: {exc}")
            return
        except Exception as exc:  # the other phases' figures stand
            result["fanout"].append({"subscribers": n, "error": f"{type(exc).__name__}: {exc}"})
            say(f"    ERROR: {result['fanout'][-1]['error']}")
            continue
        finally:
            await system.close_appenders()
        result["fanout"].append(figures)
        say(
            f"    lag p50 {figures['lag_p50_ms']} ms, p99 {figures['lag_p99_ms']} ms; published "
            f"{figures['publish_items_per_s']:,.0f}/s; every item in order: "
            f"{figures['every_item_in_order']}"
        )


def run_system(system: System, cfg: Config, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": system.name,
        "guarantees": system.guarantees,
        "throughput": [],
        "paced": [],
        "fanout": [],
    }
    started = time.monotonic()
    say(f"== {system.name}")
    try:
        system.start(workdir)
        asyncio.run(_phases(system, cfg, result, workdir))
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


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM's default ends the process at once; raising instead runs the ``finally``
    # blocks that stop every server this run started.
    raise SystemExit(128 + signum)


def cmd_run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
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
    if args.subscribers is not None:
        try:
            counts = tuple(int(x) for x in args.subscribers.split(",") if x.strip())
        except ValueError:
            counts = (-1,)
        if any(n < 1 for n in counts):
            say(f"--subscribers takes subscriber counts, at least 1 each: {args.subscribers!r}")
            return 2
        cfg = dataclasses.replace(cfg, fanout_subscribers=counts)
    if args.fanout_rate is not None:
        if args.fanout_rate < cfg.fanout_batch:
            say(f"--fanout-rate must be at least {cfg.fanout_batch} items/s")
            return 2
        cfg = dataclasses.replace(cfg, fanout_rate=args.fanout_rate)
    if args.workloads is not None:
        chosen = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
        unknown_workloads = [w for w in chosen if w not in WORKLOADS]
        if not chosen or unknown_workloads:
            say(f"--workloads takes some of {', '.join(WORKLOADS)}: {args.workloads!r}")
            return 2
        cfg = dataclasses.replace(cfg, workloads=chosen)
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
    _plot(run, json_path)
    print(table)
    failed = [s["name"] for s in run["systems"] if _failed(s)]
    if failed:
        say(f"problems in: {', '.join(failed)} (see the report)")
    return 1 if failed else 0


def _failed(s: dict[str, Any]) -> bool:
    """An error anywhere, or a check that did not hold (stored = acknowledged, no lost or
    duplicated acknowledged append, correct futures results)."""
    return bool(
        s.get("error")
        or s.get("verified") is False
        or any("error" in f for f in s.get("fanout", []))
        or any("error" in s.get(key, {}) for key in ("failover", "hang", "recovery", "futures"))
        or s.get("failover", {}).get("verified") is False
        or s.get("hang", {}).get("verified") is False
        or s.get("futures", {}).get("results_correct") is False
    )


def _plot(run: dict[str, Any], json_path: Path) -> None:
    try:
        from .plots import write_plots

        paths = write_plots(run, json_path.with_suffix(""))
    except ImportError as exc:
        say(f"plots skipped: {exc} (pip install -e '.[bench]' brings matplotlib)")
        return
    say(f"wrote {len(paths)} plots: {', '.join(p.name for p in paths)}")


def cmd_plot(args: argparse.Namespace) -> int:
    json_path = Path(args.results)
    _plot(json.loads(json_path.read_text()), json_path)
    return 0


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
    run.add_argument(
        "--subscribers",
        help="fan-out subscriber counts, comma-separated (default 1,10,50; empty: no fan-out)",
    )
    run.add_argument(
        "--fanout-rate",
        type=float,
        help="items/s the fan-out producer appends (default 1,000 with --quick, 10,000 "
        "with --full)",
    )
    run.add_argument(
        "--workloads",
        help=f"comma-separated, from: {','.join(WORKLOADS)} (default: all)",
    )
    run.add_argument("--out", help="folder for the JSON and Markdown (benchmarks/results)")
    run.add_argument(
        "--client-per-producer",
        action="store_true",
        help="one client (connection) per producer instead of one shared client",
    )
    run.add_argument("--keep", action="store_true", help="keep node data and logs")
    plot = sub.add_parser("plot", help="(re)draw the PNG plots of a results JSON file")
    plot.add_argument("results", help="a benchmarks/results/*.json file")
    args = parser.parse_args(argv)
    return cmd_plot(args) if args.command == "plot" else cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
