"""Tests of the history format (cluster.history) and the checkers (cluster.checker).

The checker is what every fault test trusts, so it is tested from both sides: histories
that are linearizable by construction (a sequential model run by concurrent simulated
clients, each operation taking effect at a point inside its own interval) must pass, and
histories with one injected bug of each kind a replicated log is known to have (lost,
duplicated, reordered, stale, future, accepted after stop) must fail, both the search and
the direct check that names that bug. On small histories the search is compared with a
brute-force enumeration of every order, and the index-based decision with the search.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cluster.checker import (
    acknowledged_appends_present,
    check_all,
    check_linearizable,
    identical_prefixes,
    index_linearizability,
    iterations_monotonic,
    longest_contents,
    no_duplicates,
    reads_consistent,
    reads_fresh,
    refused_appends_absent,
    stop_respected,
    stored_values_appended,
)
from cluster.history import STOPPED, History, Iteration, Operation, Recorder, freeze

#: Deterministic Hypothesis runs for CI: no wall-clock deadline, the same examples every
#: time, nothing remembered between runs.
CI = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Process ids of the sequential probe clients that run after all others (final reads,
#: final stops, injected operations).
PROBE = 1000


# ---------------------------------------------------------------------------------------
# Building histories


def op(
    process: int,
    kind: str,
    invoke: float,
    complete: float | None,
    result: Any = None,
    *,
    value: Any = None,
    outcome: str = "ok",
    channel: str = "c",
) -> Operation:
    """A terse constructor for hand-written scenarios."""
    return Operation(process, kind, channel, value, invoke, complete, outcome, result)


def append(
    process: int, value: Any, invoke: float, complete: float | None, index: Any, **kw: Any
) -> Operation:
    return op(process, "append", invoke, complete, index, value=value, **kw)


def read(process: int, invoke: float, complete: float, values: Sequence[Any], start: int = 0):
    return op(process, "read", invoke, complete, (start, tuple(values)))


def verdict(*ops: Operation) -> str:
    return check_linearizable(History(ops), time_limit=10).verdict


@dataclass
class _Client:
    process: int
    kind: str
    channel: str
    value: Any
    invoke: float
    applied: bool = False
    result: Any = None


@dataclass(frozen=True)
class Simulated:
    """A history that is linearizable by construction, and the model's final contents."""

    history: History
    final: dict[str, list[Any]]
    probes: dict[str, int]  # channel -> position of its final read in the history


def simulate(
    choose: Callable[[int], int],
    *,
    operations: int,
    processes: int,
    channels: Sequence[str] = ("a", "b"),
    unknown: bool = True,
    stops: int = 1,
    final_stop: bool = False,
    final_reads: bool = True,
) -> Simulated:
    """Run a sequential channel model under concurrent simulated clients.

    Each step, ``choose`` picks a client to advance: an idle one invokes an operation, an
    invoked one either takes effect now (the model applies it: its linearization point),
    fails without effect, or gives up (unknown; an append or stop may still take effect
    later, or never), and one that took effect completes, or loses its answer (unknown).
    Every event gets its own tick, so each linearization point lies strictly inside its
    operation's interval. ``choose(n)`` returns an int in ``range(n)``; Hypothesis or a
    seeded ``random`` drives it. Operations are appends, reads and lens in the ratio
    20:12:7, plus ``stops`` stops in that many (a stop ends the appending for good, so
    long histories want few).
    """
    clock = itertools.count(1)
    values: dict[str, list[Any]] = {channel: [] for channel in channels}
    stopped = dict.fromkeys(channels, False)
    ops: list[Operation] = []
    clients: list[_Client | None] = [None] * processes
    orphans: list[_Client] = []
    started = 0

    def tick() -> float:
        return float(next(clock))

    def apply(client: _Client) -> None:
        client.applied = True
        stored = values[client.channel]
        if client.kind == "append":
            if stopped[client.channel]:
                client.result = STOPPED
            else:
                client.result = len(stored)
                stored.append(client.value)
        elif client.kind == "read":
            start = choose(len(stored) + 1) if choose(4) == 0 else 0
            client.result = (start, tuple(stored[start:]))
        elif client.kind == "len":
            client.result = len(stored)
        else:
            stopped[client.channel] = True
        tick()

    def finish(client: _Client, outcome: str) -> None:
        ops.append(
            Operation(
                client.process,
                client.kind,
                client.channel,
                client.value,
                client.invoke,
                None if outcome == "unknown" else tick(),
                outcome,
                client.result if outcome == "ok" else None,
            )
        )

    while True:
        movable = [p for p, c in enumerate(clients) if c is not None or started < operations]
        if not movable:
            break
        if orphans and choose(6) == 0:
            apply(orphans.pop(choose(len(orphans))))
            continue
        p = movable[choose(len(movable))]
        client = clients[p]
        if client is None:
            roll = choose(39 + stops)
            kind = (
                "append" if roll < 20 else "read" if roll < 32 else "len" if roll < 39 else "stop"
            )
            channel = channels[choose(len(channels))]
            value = (p, started) if kind == "append" else None
            clients[p] = _Client(p, kind, channel, value, tick())
            started += 1
        elif not client.applied:
            roll = choose(12)
            if roll == 0 and unknown:
                finish(client, "unknown")
                if client.kind in ("append", "stop"):
                    orphans.append(client)
                clients[p] = None
            elif roll == 1:
                finish(client, "fail")
                clients[p] = None
            else:
                apply(client)
        else:
            finish(client, "unknown" if choose(12) == 0 and unknown else "ok")
            clients[p] = None
    for orphan in orphans:
        if choose(2):
            apply(orphan)
    probe = itertools.count(PROBE)
    if final_stop:
        for channel in channels:
            stop = _Client(next(probe), "stop", channel, None, tick())
            apply(stop)
            finish(stop, "ok")
    probes: dict[str, int] = {}
    if final_reads:
        for channel in channels:
            reader = _Client(next(probe), "read", channel, None, tick())
            reader.applied = True
            reader.result = (0, tuple(values[channel]))
            tick()
            probes[channel] = len(ops)
            finish(reader, "ok")
    return Simulated(History(ops), values, probes)


@st.composite
def histories(
    draw: st.DrawFn,
    operations: st.SearchStrategy[int] | None = None,
    processes: st.SearchStrategy[int] | None = None,
    **options: Any,
) -> Simulated:
    """Linearizable histories of up to 40 operations by up to 4 clients (by default)."""

    def choose(n: int) -> int:
        return draw(st.integers(0, n - 1)) if n > 1 else 0

    return simulate(
        choose,
        operations=draw(st.integers(0, 40) if operations is None else operations),
        processes=draw(st.integers(1, 4) if processes is None else processes),
        **options,
    )


def seeded(seed: int, **options: Any) -> Simulated:
    rng = random.Random(seed)
    return simulate(rng.randrange, **options)


def with_op(history: History, position: int, new: Operation) -> History:
    ops = list(history)
    ops[position] = new
    return History(ops, history.iterations)


def appended(sim: Simulated) -> list[Operation]:
    """The acknowledged appends that got an index."""
    return [o for o in sim.history if o.kind == "append" and o.ok and o.result != STOPPED]


# ---------------------------------------------------------------------------------------
# A brute-force oracle, written independently of the checker


def brute_force_linearizable(history: History) -> bool:
    """Try every order of every subset of operations that keeps all acknowledged ones
    (memoized on the placed set and the state); only for a handful of operations."""
    return all(_brute_force_channel(ops) for ops in history.by_channel().values())


def _model_step(o: Operation, values: tuple[Any, ...], stopped: bool) -> Any:
    """The state after ``o``, or None when ``o`` cannot take effect in this state."""
    if o.kind == "append":
        if o.ok and o.result == STOPPED:
            return (values, stopped) if stopped else None
        if stopped:
            return None if o.ok else (values, stopped)  # an unknown append refused
        if o.ok and o.result != len(values):
            return None
        return values + (o.value,), stopped
    if o.kind == "read":
        start, expected = o.result
        return (values, stopped) if values[start:] == expected else None
    if o.kind == "len":
        return (values, stopped) if len(values) == o.result else None
    return values, True


def _brute_force_channel(ops: list[Operation]) -> bool:
    kept = [o for o in ops if o.outcome != "fail" and (o.ok or o.kind in ("append", "stop"))]
    required = frozenset(i for i, o in enumerate(kept) if o.ok)
    seen: set[tuple[frozenset[int], tuple[Any, ...], bool]] = set()

    def search(done: frozenset[int], values: tuple[Any, ...], stopped: bool) -> bool:
        if required <= done:
            return True
        if (done, values, stopped) in seen:
            return False
        seen.add((done, values, stopped))
        for i, o in enumerate(kept):
            if i in done:
                continue
            if any(j not in done and (kept[j].complete or 0) < o.invoke for j in required):
                continue  # an acknowledged operation that completed before o began
            after = _model_step(o, values, stopped)
            if after is not None and search(done | {i}, *after):
                return True
        return False

    return search(frozenset(), (), False)


def replays(ops: Sequence[Operation]) -> bool:
    """Whether ``ops``, applied one after another, are each legal in the model."""
    values: tuple[Any, ...] = ()
    stopped = False
    for o in ops:
        if o.kind == "append":
            if not o.ok:
                values = values if stopped else values + (o.value,)
            elif o.result == STOPPED:
                if not stopped:
                    return False
            elif stopped or o.result != len(values):
                return False
            else:
                values += (o.value,)
        elif o.kind == "read":
            if values[o.result[0] :] != o.result[1]:
                return False
        elif o.kind == "len":
            if len(values) != o.result:
                return False
        else:
            stopped = True
    return True


# ---------------------------------------------------------------------------------------
# History format


def test_operation_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="kind"):
        op(1, "write", 0, 1)
    with pytest.raises(ValueError, match="completion"):
        op(1, "len", 0, None, 3)
    with pytest.raises(ValueError, match="before invoked"):
        op(1, "len", 2, 1, 3)
    with pytest.raises(ValueError, match="invalid result"):
        op(1, "read", 0, 1, (0, 5))
    with pytest.raises(ValueError, match="invalid result"):
        append(1, "x", 0, 1, -1)
    with pytest.raises(ValueError, match="no result"):
        append(1, "x", 0, None, 3, outcome="unknown")
    with pytest.raises(ValueError, match="carries no value"):
        op(1, "read", 0, 1, (0, ()), value="x")
    with pytest.raises(TypeError, match="JSON scalars"):
        append(1, {"x": 1}, 0, 1, 0)


def test_values_are_frozen_so_that_reads_compare_equal_to_appends() -> None:
    a = append(1, [1, [2, "x"]], 0, 1, 0)
    r = op(2, "read", 2, 3, [0, [[1, [2, "x"]]]])
    assert a.value == (1, (2, "x"))
    assert r.result == (0, ((1, (2, "x")),))
    assert freeze([1, [2]]) == (1, (2,))


def test_by_channel_splits_in_history_order() -> None:
    ops = [
        append(1, "a1", 0, 1, 0, channel="a"),
        append(2, "b1", 0, 1, 0, channel="b"),
        append(1, "a2", 2, 3, 1, channel="a"),
    ]
    history = History(ops)
    assert history.by_channel() == {"a": [ops[0], ops[2]], "b": [ops[1]]}
    assert history.channels() == ["a", "b"]
    assert len(history) == 3 and history[1] is ops[1] and list(history) == ops


@settings(CI, max_examples=25)
@given(histories())
def test_json_round_trip_keeps_every_value(tmp_path_factory: Any, sim: Simulated) -> None:
    history = History(
        sim.history,
        [Iteration(7, "a", 0, tuple(enumerate(sim.final["a"])), True)],
    )
    path = Path(tmp_path_factory.mktemp("history")) / "history.json"
    history.to_json(path)
    again = History.from_json(path)
    assert again == history
    assert all(isinstance(o.value, tuple) for o in again if o.kind == "append")


def test_recorder_records_outcomes_and_pending_operations_as_unknown() -> None:
    times = iter(range(1, 100))
    recorder = Recorder(clock=lambda: float(next(times)))
    a = recorder.invoke(1, "append", "c", [1, 0])
    b = recorder.invoke(2, "read", "c")
    recorder.complete(a, "ok", 0)
    c = recorder.invoke(1, "append", "c", (1, 1))
    recorder.complete(b, "ok", (0, [[1, 0]]))
    recorder.complete(c, "unknown")
    recorder.invoke(3, "stop", "c")
    recorder.record_iteration(4, "c", 0, [(0, [1, 0])], ended=False)
    history = recorder.history()
    assert [(o.kind, o.outcome, o.result) for o in history] == [
        ("append", "ok", 0),
        ("read", "ok", (0, ((1, 0),))),
        ("append", "unknown", None),
        ("stop", "unknown", None),
    ]
    assert history[0].value == (1, 0) and history[0].complete == 3.0
    assert history[2].complete is None and history[3].complete is None
    assert history.iterations == [Iteration(4, "c", 0, ((0, (1, 0)),), False)]
    with pytest.raises(ValueError, match="twice"):
        recorder.complete(a, "ok", 0)
    with pytest.raises(ValueError, match="still pending"):
        recorder.invoke(3, "len", "c")


def test_recorder_is_thread_safe() -> None:
    recorder = Recorder()

    def client(process: int) -> None:
        for n in range(200):
            op_id = recorder.invoke(process, "append", "c", (process, n))
            recorder.complete(op_id, "fail")

    threads = [threading.Thread(target=client, args=(p,)) for p in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = recorder.history()
    assert len(history) == 1600
    assert len({o.value for o in history}) == 1600
    assert all(o.outcome == "fail" and o.complete is not None for o in history)


# ---------------------------------------------------------------------------------------
# Linearizability: hand-written scenarios


def test_empty_and_sequential_histories_pass() -> None:
    assert verdict() == "ok"
    assert (
        verdict(
            append(1, "x", 0, 1, 0),
            append(1, "y", 2, 3, 1),
            read(2, 4, 5, ["x", "y"]),
            read(2, 6, 7, ["y"], start=1),
            op(2, "len", 8, 9, 2),
            op(1, "stop", 10, 11),
            append(1, "z", 12, 13, STOPPED),
        )
        == "ok"
    )


def test_concurrent_appends_may_take_either_order() -> None:
    assert verdict(append(1, "x", 0, 10, 1), append(2, "y", 1, 9, 0)) == "ok"
    # ... but not against real time: x completed before y began.
    assert verdict(append(1, "x", 0, 1, 1), append(2, "y", 2, 3, 0)) == "violation"


def test_unknown_appends_may_or_may_not_have_happened() -> None:
    lost = append(1, "x", 0, None, None, outcome="unknown")
    assert verdict(lost, read(2, 5, 6, [])) == "ok"
    assert verdict(lost, read(2, 5, 6, ["x"])) == "ok"
    # An unknown append may take effect long after its client gave up, and fill a gap.
    assert verdict(lost, append(2, "y", 8, 9, 1), read(2, 10, 11, ["x", "y"])) == "ok"
    # But not before it was invoked.
    assert verdict(read(2, 0, 1, ["x"]), replace(lost, invoke=2)) == "violation"


def test_failed_operations_never_happened() -> None:
    failed = append(1, "x", 0, 1, None, outcome="fail")
    assert verdict(failed, read(2, 2, 3, [])) == "ok"
    assert verdict(failed, read(2, 2, 3, ["x"])) == "violation"


def test_lost_acknowledged_append_fails() -> None:
    history = History([append(1, "x", 0, 1, 0), append(1, "y", 2, 3, 1), read(2, 4, 5, ["y"])])
    result = check_linearizable(history)
    assert result.verdict == "violation" and not result.ok
    channel = result.channels["c"]
    assert channel.prefix and channel.unplaced
    assert "longest linearizable prefix" in result.explanation
    assert "p2 'c' read() -> from 0: ('y',)" in result.explanation
    assert acknowledged_appends_present(history, {"c": ["y"]}) == [
        "lost: p1 'c' append('x') -> 0  [0.000000, 1.000000] was acknowledged at index 0, "
        "but the value is not stored (1 values)",
        "moved: p1 'c' append('y') -> 1  [2.000000, 3.000000] was acknowledged at index 1, "
        "but the value is stored at [0]",
    ]


def test_duplicated_value_fails() -> None:
    history = History([append(1, "x", 0, 1, 0), read(2, 2, 3, ["x", "x"])])
    assert check_linearizable(history).verdict == "violation"
    assert no_duplicates({"c": ["x", "x"]}) == [
        "duplicate: channel 'c' stores 'x' at indexes [0, 1]"
    ]


def test_swapped_indexes_fail() -> None:
    history = History([append(1, "x", 0, 1, 1), append(2, "y", 0, 1, 0), read(3, 2, 3, ["x", "y"])])
    assert check_linearizable(history).verdict == "violation"
    assert len(acknowledged_appends_present(history, {"c": ["x", "y"]})) == 2


def test_stale_read_fails() -> None:
    history = History([append(1, "x", 0, 1, 0), read(2, 2, 3, [])])
    assert check_linearizable(history).verdict == "violation"
    [problem] = reads_fresh(history)
    assert problem.startswith("stale:")


def test_future_read_fails() -> None:
    history = History([read(2, 0, 1, ["x"]), append(1, "x", 2, 3, 0)])
    assert check_linearizable(history).verdict == "violation"
    assert [p.split(":")[0] for p in reads_fresh(history)] == ["future", "future"]


def test_append_accepted_after_completed_stop_fails() -> None:
    history = History([op(1, "stop", 0, 1), append(2, "x", 2, 3, 0)])
    assert check_linearizable(history).verdict == "violation"
    [problem] = stop_respected(history)
    assert problem.startswith("append after stop:")
    # Concurrent with the stop, either answer is fine.
    assert verdict(op(1, "stop", 0, 3), append(2, "x", 1, 2, 0)) == "ok"
    assert verdict(op(1, "stop", 0, 3), append(2, "x", 1, 2, STOPPED)) == "ok"
    assert verdict(append(2, "x", 0, 1, STOPPED), op(1, "stop", 2, 3)) == "violation"


def test_time_limit_gives_unknown_not_a_pass() -> None:
    sim = seeded(1, operations=3000, processes=3, channels=("a", "b"))
    result = check_linearizable(sim.history, time_limit=0.0)
    assert result.verdict == "unknown" and not result.ok
    assert "time" in result.explanation


# ---------------------------------------------------------------------------------------
# Linearizability: generated histories


@settings(CI, max_examples=150)
@given(histories())
def test_linearizable_histories_pass(sim: Simulated) -> None:
    history = sim.history
    result = check_linearizable(history, time_limit=10)
    assert result.verdict == "ok", result.explanation
    assert all(problems in ([], None) for problems in index_linearizability(history).values())
    report = check_all(history, sim.final, per_node_contents={"n1": sim.final, "n2": {}})
    assert report.ok, str(report)
    # The witness order replays in the model and keeps every acknowledged operation.
    for channel, channel_result in result.channels.items():
        ops = channel_result.linearization
        assert {o for o in history if o.channel == channel and o.ok} <= set(ops)
        assert replays(ops)


@settings(CI, max_examples=40)
@given(histories(final_stop=True, processes=st.integers(2, 4)))
def test_linearizable_histories_with_stops_pass(sim: Simulated) -> None:
    assert check_linearizable(sim.history, time_limit=10).verdict == "ok"
    assert stop_respected(sim.history) == []


@settings(CI, max_examples=40)
@given(histories(), st.data())
def test_injected_lost_append_fails(sim: Simulated, data: st.DataObject) -> None:
    victims = appended(sim)
    assume(victims)
    victim = data.draw(st.sampled_from(victims))
    channel = victim.channel
    final = {c: [v for v in values if v != victim.value] for c, values in sim.final.items()}
    probe = sim.probes[channel]
    history = with_op(sim.history, probe, replace(sim.history[probe], result=(0, final[channel])))
    assert check_linearizable(history, time_limit=10).verdict == "violation"
    assert acknowledged_appends_present(history, final)
    assert not check_all(history, final).ok


@settings(CI, max_examples=40)
@given(histories(), st.data())
def test_injected_duplicate_fails(sim: Simulated, data: st.DataObject) -> None:
    stored = [(c, v) for c, values in sim.final.items() for v in values]
    assume(stored)
    channel, value = data.draw(st.sampled_from(stored))
    final = {**sim.final, channel: [*sim.final[channel], value]}
    probe = sim.probes[channel]
    history = with_op(sim.history, probe, replace(sim.history[probe], result=(0, final[channel])))
    assert check_linearizable(history, time_limit=10).verdict == "violation"
    assert no_duplicates(final)


@settings(CI, max_examples=40)
@given(histories(processes=st.integers(2, 4)), st.data())
def test_injected_swapped_indexes_fail(sim: Simulated, data: st.DataObject) -> None:
    pairs = [(a, b) for a, b in itertools.combinations(appended(sim), 2) if a.channel == b.channel]
    assume(pairs)
    a, b = data.draw(st.sampled_from(pairs))
    ops = [
        replace(o, result=b.result) if o is a else replace(o, result=a.result) if o is b else o
        for o in sim.history
    ]
    history = History(ops)
    assert check_linearizable(history, time_limit=10).verdict == "violation"
    assert acknowledged_appends_present(history, sim.final)


@settings(CI, max_examples=40)
@given(histories(), st.data())
def test_injected_stale_read_fails(sim: Simulated, data: st.DataObject) -> None:
    # Any read invoked after an acknowledged append completed, returning less than it.
    pairs = [
        (position, a)
        for position, r in enumerate(sim.history)
        if r.kind == "read" and r.ok
        for a in appended(sim)
        if a.channel == r.channel and (a.complete or 0) < r.invoke and r.result[0] <= a.result
    ]
    assume(pairs)
    position, victim = data.draw(st.sampled_from(pairs))
    stale = sim.history[position]
    start, values = stale.result
    truncated = replace(stale, result=(start, values[: victim.result - start]))
    history = with_op(sim.history, position, truncated)
    assert check_linearizable(history, time_limit=10).verdict == "violation"
    assert any(p.startswith("stale:") for p in reads_fresh(history))


@settings(CI, max_examples=40)
@given(histories(operations=st.integers(10, 40), processes=st.integers(2, 4)), st.data())
def test_injected_future_read_fails(sim: Simulated, data: st.DataObject) -> None:
    # A read that saw a value whose append began only after the read had completed.
    pairs = [
        (position, a)
        for position, r in enumerate(sim.history)
        if r.kind == "read" and r.ok
        for a in sim.history
        if a.kind == "append"
        and a.outcome != "fail"
        and a.result != STOPPED
        and a.channel == r.channel
        and a.invoke > (r.complete or 0)
    ]
    assume(pairs)
    position, victim = data.draw(st.sampled_from(pairs))
    early = sim.history[position]
    start, values = early.result
    history = with_op(
        sim.history, position, replace(early, result=(start, (*values, victim.value)))
    )
    assert check_linearizable(history, time_limit=10).verdict == "violation"
    assert any(p.startswith("future:") for p in reads_fresh(history))


@settings(CI, max_examples=30)
@given(histories(final_stop=True, final_reads=False), st.sampled_from(["a", "b"]))
def test_injected_append_after_stop_fails(sim: Simulated, channel: str) -> None:
    last = max(o.complete or o.invoke for o in sim.history)
    index = len(sim.final[channel])
    late = append(PROBE + 10, "late", last + 1, last + 2, index, channel=channel)
    history = History([*sim.history, late])
    final = {**sim.final, channel: [*sim.final[channel], "late"]}
    assert check_linearizable(history, time_limit=10).verdict == "violation"
    assert stop_respected(history)
    assert not check_all(history, final).ok


# ---------------------------------------------------------------------------------------
# The search, the index decision and the fast checks agree on small histories


@st.composite
def mutated_histories(draw: st.DrawFn, size: int = 6, processes: int = 3) -> History:
    """Small single-channel histories, linearizable or not: a generated one with up to
    three random corruptions of results, outcomes and timing."""
    sim = draw(
        histories(
            operations=st.integers(1, size),
            processes=st.integers(1, processes),
            channels=("a",),
            final_reads=draw(st.booleans()),
            stops=8,
        )
    )
    ops = list(sim.history)
    horizon = int(max(o.complete or o.invoke for o in ops)) + 2
    values = [o.value for o in ops if o.kind == "append"] + [("bogus",)]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(ops) - 1))
        o = ops[i]
        choice = draw(st.integers(0, 3))
        if choice == 0:
            begin = draw(st.integers(0, 2 * horizon)) / 2
            end = begin + draw(st.integers(0, 2 * horizon)) / 2
            o = replace(o, invoke=begin, complete=None if o.complete is None else end)
        elif choice == 1 and o.ok:
            o = replace(o, outcome="unknown", complete=None, result=None)
        elif o.ok and o.kind == "append":
            shift = draw(st.sampled_from([-1, 1, STOPPED]))
            if o.result == STOPPED:
                o = replace(o, result=draw(st.integers(0, 3)))
            else:
                o = replace(o, result=STOPPED if shift == STOPPED else max(0, o.result + shift))
        elif o.ok and o.kind == "len":
            o = replace(o, result=max(0, o.result + draw(st.sampled_from([-1, 1]))))
        elif o.ok and o.kind == "read":
            start, seen = o.result
            at = draw(st.integers(0, len(seen)))
            how = draw(st.integers(0, 2))
            if how == 0 and seen:
                seen = seen[: min(at, len(seen) - 1)] + seen[min(at, len(seen) - 1) + 1 :]
            elif how == 1:
                seen = seen[:at] + (draw(st.sampled_from(values)),) + seen[at:]
            else:
                start = max(0, start + draw(st.sampled_from([-1, 1])))
            o = replace(o, result=(start, seen))
        ops[i] = o
    return History(ops)


@settings(CI, max_examples=400)
@given(mutated_histories())
def test_search_agrees_with_brute_force(history: History) -> None:
    expected = brute_force_linearizable(history)
    result = check_linearizable(history, time_limit=10)
    assert result.verdict == ("ok" if expected else "violation"), result.explanation


@settings(CI, max_examples=400)
@given(mutated_histories())
def test_fast_checks_agree_with_search(history: History) -> None:
    linearizable = check_linearizable(history, time_limit=10).verdict == "ok"
    # Exact wherever the indexes decide it.
    for problems in index_linearizability(history).values():
        if problems is not None:
            assert (problems == []) == linearizable, problems
    # Sound: a direct check never flags a linearizable history.
    if reads_fresh(history) or stop_respected(history):
        assert not linearizable


@settings(CI, max_examples=60)
@given(histories(operations=st.integers(0, 12), processes=st.integers(1, 3)))
def test_direct_checks_pass_the_true_final_contents(sim: Simulated) -> None:
    history = sim.history
    assert acknowledged_appends_present(history, sim.final) == []
    assert refused_appends_absent(history, sim.final) == []
    assert stored_values_appended(history, sim.final) == []
    assert no_duplicates(sim.final) == []
    assert reads_consistent(history, sim.final) == []
    assert reads_fresh(history) == []
    assert stop_respected(history) == []


# ---------------------------------------------------------------------------------------
# Direct checks: scenarios


def test_refused_and_failed_appends_must_not_be_stored() -> None:
    history = History([append(1, "x", 0, 1, None, outcome="fail"), append(2, "y", 0, 1, STOPPED)])
    assert len(refused_appends_absent(history, {"c": ["x", "y"]})) == 2
    assert refused_appends_absent(history, {"c": []}) == []


def test_stored_values_must_come_from_appends() -> None:
    history = History([append(1, "x", 0, 1, 0)])
    assert stored_values_appended(history, {"c": ["x", "w"]}) == [
        "phantom: channel 'c' stores 'w' at index 1, which no append to it wrote"
    ]


def test_reads_consistent_with_final_contents() -> None:
    history = History([read(1, 0, 1, ["x", "z"]), op(2, "len", 0, 1, 3)])
    problems = reads_consistent(history, {"c": ["x", "y"]})
    assert problems[0].startswith("inconsistent read:") and "'z' at index 1" in problems[0]
    assert problems[1].startswith("read beyond the end:")
    assert reads_consistent(history, {"c": ["x", "z", "w"]}) == []


def test_identical_prefixes_allow_lag_but_not_divergence() -> None:
    assert identical_prefixes({"n1": {"c": [1, 2, 3]}, "n2": {"c": [1, 2]}, "n3": {}}) == []
    assert identical_prefixes({"n1": {"c": [1, 2, 3]}, "n2": {"c": [1, 9]}}) == [
        "diverged: channel 'c' holds 9 at index 1 on node n2 but 2 on node n1"
    ]
    assert longest_contents({"n1": {"c": [1]}, "n2": {"c": [1, 2]}}) == {"c": [1, 2]}


def test_iterations_are_gapless_correct_and_complete() -> None:
    final = {"c": ["a", "b", "c"]}

    def check(items: list[tuple[int, Any]], ended: bool = False, start: int = 0) -> list[str]:
        return iterations_monotonic([Iteration(1, "c", start, tuple(items), ended)], final, {"c"})

    assert check([(0, "a"), (1, "b")]) == []
    assert check([(1, "b"), (2, "c")], ended=True, start=1) == []
    assert check([(0, "a"), (2, "c")])[0].startswith("skipped:")
    assert check([(0, "a"), (1, "b"), (0, "a")])[0].startswith("went back:")
    assert check([(0, "a"), (1, "x")])[0].startswith("wrong item:")
    assert check([(0, "a"), (1, "b")], ended=True)[0].startswith("ended early:")
    assert check([(2, "c")], start=1) == ["skipped: p1 iterating 'c' from 1 got index 2 first"]
    assert check([(0, "a")], start=1)[0].startswith("went back:")
    unstopped = iterations_monotonic([Iteration(1, "c", 0, (), True)], {"c": []}, set())
    assert unstopped[0].startswith("ended without stop:")


def test_check_all_reports_each_broken_invariant_by_name() -> None:
    history = History(
        [append(1, "x", 0, 1, 0), append(1, "y", 2, 3, 1), read(2, 4, 5, ["x", "y"])],
        [Iteration(3, "c", 0, ((0, "x"), (1, "y")), False)],
    )
    good = check_all(history, per_node_contents={"n1": {"c": ["x", "y"]}, "n2": {"c": ["x"]}})
    assert good.ok and good.verdict == "ok", str(good)
    bad = check_all(history, per_node_contents={"n1": {"c": ["x", "y"]}, "n2": {"c": ["y"]}})
    assert bad.verdict == "violation"
    assert bad.violations["identical_prefixes"] and not bad.violations["reads_consistent"]
    assert "identical_prefixes: 1 violations" in str(bad)


# ---------------------------------------------------------------------------------------
# Scale


@pytest.mark.parametrize("seed", [1, 2])
def test_search_scales_to_thousands_of_operations(seed: int) -> None:
    """2,000 operations per channel, 5 concurrent clients, some unknown outcomes."""
    sim = seeded(seed, operations=4000, processes=5, channels=("a", "b"), stops=0)
    assert sum(1 for o in sim.history if o.outcome == "unknown") > 50
    result = check_linearizable(sim.history, time_limit=60)
    assert result.verdict == "ok", result.explanation
    for channel in result.channels.values():
        assert channel.operations > 1500
        assert channel.states < 2 * channel.operations  # memoized: no blow-up


def test_violation_in_a_long_history_is_found_and_located() -> None:
    sim = seeded(3, operations=2000, processes=5, channels=("a",), stops=0)
    probe = sim.probes["a"]
    start, values = sim.history[probe].result
    # The final read misses one value in the middle: an acknowledged append was lost.
    victim = next(o for o in appended(sim) if o.result > len(values) // 2)
    lost = tuple(v for v in values if v != victim.value)
    history = with_op(sim.history, probe, replace(sim.history[probe], result=(0, lost)))
    result = check_linearizable(history, time_limit=60)
    assert result.verdict == "violation"
    assert result.channels["a"].unplaced
    # The direct evidence names the read that lost the value.
    problems = index_linearizability(history)["a"] or []
    assert problems and all(history[probe].describe() in problem for problem in problems)
    assert problems[0] in result.explanation
