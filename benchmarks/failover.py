"""Failover: take the leader out under steady load, then check every append's outcome.

A few producers, each with its own client, append at a steady pace (one append in flight
each, at most ``cfg.failover_rate`` a second). After ``cfg.failover_before_s`` the server
leading the channel (raftchan's Raft leader, the NATS stream's leader, etcd's leader) is
taken out in one of two ways (:class:`Fault`):

- ``failover`` (:data:`KILL`): SIGKILL. Its sockets close, so every client and peer learns
  at once that it is gone. Restarted on its data after the round.
- ``hang`` (:data:`HANG`): SIGSTOP. It keeps its sockets open and answers nothing, while
  its host's kernel goes on taking the bytes sent to it: a hung process (a stall on its
  disk, a deadlock, a paused virtual machine). Clients and peers must notice the silence
  themselves. (A host that lost power or was cut off looks the same, except that nothing
  takes the bytes either.) Continued (SIGCONT) after the round; it must find out it is
  no longer the leader.

Figures of a round:

- ``failover_s``: from the fault to the acknowledgement of the first append *started
  after* it (conservative by at most one append's latency; a reply already on the wire at
  the fault cannot fake it); ``first_ack_s``: to the first acknowledgement at all;
  ``all_producers_s``: until every producer had such an acknowledgement (``None`` if one
  never had: its client stayed with the lost server for the whole round);
- ``timeline``: acknowledged appends per ``BUCKET_S`` from ``TIMELINE_BEFORE_S`` before the
  fault, by the time each acknowledgement arrived.

Every item carries its producer and sequence number, so once all rounds are over (the
server brought back) the items stored are compared with the appends made
(:func:`check_outcomes`): acknowledged but missing (lost), stored more than once
(duplicates), and appends whose acknowledgement never came (an error or a timeout: the
outcome is unknown to the producer) split by whether they ended up stored. Both faults
append to the same channel; each checks only the items of its own producers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .core import Appender, Config, System, Unsupported, say

#: Width of one bucket of the failover timeline, seconds.
BUCKET_S = 0.05
#: The timeline starts this long before the kill.
TIMELINE_BEFORE_S = 1.0
#: A producer whose append failed waits this long before its next one (a bounded loop,
#: not a spin against a server that refuses at once).
ERROR_PAUSE_S = 0.05
#: Bytes of an item that identify it: producer (2) and sequence number (6).
KEY_BYTES = 8


@dataclass(frozen=True)
class Fault:
    """One way of taking the leader out: the workload's name (its result key), what the
    report calls the server taken out, the signal, how table titles name it, and the
    first producer number of its items (so that two workloads appending to one channel
    check only their own items)."""

    key: str
    verb: str
    signal: str
    title: str
    first_producer: int

    def owns(self, item: bytes) -> bool:
        producer = int.from_bytes(item[:2], "big")
        return self.first_producer <= producer < self.first_producer + PRODUCER_RANGE


#: Producer numbers one fault's items may use: round * 100 + producer, rounds from 1.
PRODUCER_RANGE = 30_000
KILL = Fault("failover", "killed", "SIGKILL", "SIGKILL", 0)
HANG = Fault("hang", "hung", "SIGSTOP", "SIGSTOP (a hung process)", PRODUCER_RANGE)
FAULTS = {fault.key: fault for fault in (KILL, HANG)}


def failover_item(producer: int, seq: int, size: int) -> bytes:
    """An item naming its producer and sequence number, padded to ``size`` bytes."""
    return producer.to_bytes(2, "big") + seq.to_bytes(6, "big") + b"x" * max(0, size - KEY_BYTES)


def item_key(item: bytes) -> bytes:
    return bytes(item[:KEY_BYTES])


@dataclass(frozen=True)
class Attempt:
    """One append: its item's key, when it started and ended, and whether it was
    acknowledged (else the producer saw an error or a timeout: outcome unknown)."""

    key: bytes
    started: float
    ended: float
    acked: bool
    error: str | None = None


def check_outcomes(attempts: Iterable[Attempt], stored: Iterable[bytes]) -> dict[str, int]:
    """Compare the appends made with the items stored (each item at most once expected).

    ``acked_lost`` (acknowledged, not stored) and ``duplicates`` (copies beyond the first)
    must be 0; ``unknown_stored`` + ``unknown_not_stored`` = ``unknown``, the appends whose
    acknowledgement never came; ``unexpected`` counts stored items nobody appended.
    """
    counts = Counter(item_key(item) for item in stored)
    acked: set[bytes] = set()
    unknown: set[bytes] = set()
    for attempt in attempts:
        (acked if attempt.acked else unknown).add(attempt.key)
    unknown -= acked  # an item is appended once; defensive only
    made = acked | unknown
    return {
        "appends": len(made),
        "acked": len(acked),
        "acked_lost": sum(1 for key in acked if counts[key] == 0),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "unknown": len(unknown),
        "unknown_stored": sum(1 for key in unknown if counts[key] > 0),
        "unknown_not_stored": sum(1 for key in unknown if counts[key] == 0),
        "stored": sum(counts.values()),
        "unexpected": sum(n for key, n in counts.items() if key not in made),
    }


def timeline(times: Iterable[float], origin: float, before_s: float, after_s: float) -> list[int]:
    """Counts of ``times`` per :data:`BUCKET_S` bucket from ``origin - before_s`` to
    ``origin + after_s`` (bucket k covers ``[start + k*BUCKET_S, start + (k+1)*BUCKET_S)``);
    only whole buckets (a last, partial one would look like a drop), times outside left out."""
    start = origin - before_s
    buckets = [0] * max(0, math.floor(round((before_s + after_s) / BUCKET_S, 9)))
    for t in times:
        k = math.floor(round((t - start) / BUCKET_S, 9))
        if 0 <= k < len(buckets):
            buckets[k] += 1
    return buckets


async def run_failover(
    system: System, cfg: Config, item_bytes: int, fault: Fault = KILL
) -> dict[str, Any]:
    """``cfg.failover_rounds`` rounds of ``fault``, then the outcome check of every append
    they made."""
    if type(system).open_failover is System.open_failover:
        raise Unsupported(system.no_failover)
    if fault is HANG and not system.can_hang():
        raise Unsupported(system.no_hang)
    # Producer numbers (2 bytes in each item): round * 100 + producer within the fault's
    # range, so that rounds and faults never share one.
    if cfg.failover_producers > 100 or (cfg.failover_rounds + 1) * 100 > PRODUCER_RANGE:
        raise ValueError(
            f"at most 100 producers and {PRODUCER_RANGE // 100 - 1} rounds "
            f"(got {cfg.failover_producers} and {cfg.failover_rounds})"
        )
    attempts: list[Attempt] = []
    rounds: list[dict[str, Any]] = []
    for round_no in range(1, cfg.failover_rounds + 1):
        say(f"  {system.name}: {fault.key} round {round_no}/{cfg.failover_rounds} ...")
        figures = await _round(system, cfg, round_no, item_bytes, attempts, fault)
        rounds.append(figures)
        say(
            f"    {fault.verb} {figures['killed']}: next acknowledged append after "
            f"{_seconds(figures['failover_s'])} s, every producer after "
            f"{_seconds(figures['all_producers_s'])} s, {figures['unknown']} unknown"
        )
    stored = [item for item in await system.failover_stored() if fault.owns(item)]
    outcomes = check_outcomes(attempts, stored)
    measured = [r["failover_s"] for r in rounds if r["failover_s"] is not None]
    median = round(statistics.median(measured), 3) if measured else None
    result: dict[str, Any] = {
        "rounds": rounds,
        "median_s": median,
        "min_s": min(measured) if measured else None,
        "max_s": max(measured) if measured else None,
        "producers": cfg.failover_producers,
        "rate_per_producer": cfg.failover_rate,
        "op_timeout_s": cfg.failover_op_timeout_s,
        "item_bytes": item_bytes,
        "fault": fault.signal,
        "bucket_s": BUCKET_S,
        "timeline_before_s": TIMELINE_BEFORE_S,
        "client": system.failover_client,
        **outcomes,
        # Every round recovered, and no acknowledged append was lost or stored twice.
        "verified": (
            len(measured) == len(rounds)
            and outcomes["acked_lost"] == 0
            and outcomes["duplicates"] == 0
            and outcomes["unexpected"] == 0
        ),
    }
    say(
        f"    median {_seconds(median)} s; {outcomes['acked']} acknowledged, "
        f"{outcomes['acked_lost']} lost, {outcomes['duplicates']} duplicates, "
        f"{outcomes['unknown']} unknown ({outcomes['unknown_stored']} stored)"
    )
    return result


async def _round(
    system: System,
    cfg: Config,
    round_no: int,
    item_bytes: int,
    attempts: list[Attempt],
    fault: Fault,
) -> dict[str, Any]:
    clock = time.perf_counter
    mine: list[Attempt] = []
    stop = asyncio.Event()
    fresh_ack = asyncio.Event()
    every_producer_acked = asyncio.Event()
    #: Per producer, when its first append started after the fault was acknowledged.
    first_fresh: dict[int, float] = {}
    killed_at = math.inf

    async def producer(p: int, append: Appender) -> None:
        interval = 1.0 / cfg.failover_rate
        next_at = clock()
        # Bounded in count as well as by ``stop``: the round's own time limit ends it.
        for seq in range(int(cfg.failover_rate * (cfg.failover_limit_s * 3 + 60))):
            if stop.is_set():
                return
            now = clock()
            if next_at > now:
                await asyncio.sleep(next_at - now)
            item = failover_item(fault.first_producer + round_no * 100 + p, seq, item_bytes)
            begin = clock()
            try:
                await asyncio.wait_for(append(item), cfg.failover_op_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # timeout or error: the outcome is unknown
                mine.append(Attempt(item_key(item), begin, clock(), False, type(exc).__name__))
                await asyncio.sleep(ERROR_PAUSE_S)
            else:
                end = clock()
                mine.append(Attempt(item_key(item), begin, end, True))
                if begin >= killed_at:
                    fresh_ack.set()
                    first_fresh.setdefault(p, end)
                    if len(first_fresh) == len(appenders):
                        every_producer_acked.set()
            # No catching up after a stall: the pace restarts from now.
            next_at = max(begin + interval, clock())

    appenders = await system.open_failover(cfg.failover_producers, cfg.failover_op_timeout_s)
    tasks = [asyncio.create_task(producer(p, a)) for p, a in enumerate(appenders)]
    victim: int | None = None
    try:
        await asyncio.sleep(cfg.failover_before_s)
        if not any(a.acked for a in mine):
            raise RuntimeError(f"no append acknowledged in {cfg.failover_before_s:g} s of load")
        victim = await system.failover_leader()
        killed_at = clock()
        if fault is HANG:
            system.freeze_server(victim)
        else:
            system.kill_server(victim)
        recovered = True
        try:
            await asyncio.wait_for(fresh_ack.wait(), cfg.failover_limit_s)
        except asyncio.TimeoutError:
            recovered = False
        if recovered:
            # A producer whose client stays with the lost server recovers later, or not
            # before the round ends (all_producers_s is then None).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    every_producer_acked.wait(), killed_at + cfg.failover_limit_s - clock()
                )
            await asyncio.sleep(cfg.failover_after_s)
        stop.set()
        await asyncio.wait(tasks, timeout=cfg.failover_op_timeout_s + 5.0)
    finally:
        try:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=5.0)
            await system.close_appenders()
        finally:
            attempts += mine
            # Whatever happened above: the next round (or the next system) needs it back.
            if victim is not None and fault is HANG:
                await system.thaw_server(victim)
            elif victim is not None:
                await system.restart_server(victim)
    after = [a for a in mine if a.ended >= killed_at]
    fresh = [a.ended for a in after if a.acked and a.started >= killed_at]
    any_ack = [a.ended for a in after if a.acked]
    unknown = [a for a in mine if not a.acked]
    return {
        "killed": None if victim is None else system.server_name(victim),
        "failover_s": round(min(fresh) - killed_at, 3) if fresh else None,
        "first_ack_s": round(min(any_ack) - killed_at, 3) if any_ack else None,
        "all_producers_s": (
            round(max(first_fresh.values()) - killed_at, 3)
            if len(first_fresh) == len(appenders)
            else None
        ),
        "appends": len(mine),
        "acked": sum(a.acked for a in mine),
        "unknown": len(unknown),
        "errors": dict(Counter(a.error for a in unknown if a.error)),
        "timeline": timeline(
            (a.ended for a in mine if a.acked),
            killed_at,
            TIMELINE_BEFORE_S,
            (max(a.ended for a in mine) - killed_at) if after else 0.0,
        ),
    }


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f}"


def median_round(rounds: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The round whose failover time is the median (the lower one of two), for the
    timeline plot; ``None`` if no round recovered."""
    measured = sorted((r for r in rounds if r.get("failover_s") is not None), key=_failover_s)
    return measured[(len(measured) - 1) // 2] if measured else None


def _failover_s(r: dict[str, Any]) -> float:
    return float(r["failover_s"])
