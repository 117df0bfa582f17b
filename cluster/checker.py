"""Checks of recorded channel histories: linearizability and fast direct invariants.

Everything here is pure: histories (:mod:`cluster.history`) and contents read back from
the nodes go in, verdicts and human-readable violations come out. No cluster is needed,
so a failing history saved to JSON can be replayed here at leisure.

The model (one per channel, channels being independent): the state is the tuple of
appended values plus a stopped flag, starting empty and not stopped.

========================  =====================================================
operation                 legal when (and effect)
========================  =====================================================
append ok -> index i      not stopped and ``i == len(values)``; appends the value
append ok -> "stopped"    stopped; no effect
read ok -> (start, vals)  ``values[start:] == vals``
len ok -> n               ``len(values) == n``
stop                      always; sets stopped (idempotent)
========================  =====================================================

Operations that ``fail`` never happened and are dropped. ``unknown`` operations may have
happened at any moment after their invocation, or never: an unknown append, if it
happened, appended its value; unknown reads and lens tell nothing and are dropped.

:func:`check_linearizable` is the exhaustive search (Wing & Gong's backtracking with
Lowe's memoization, as in Porcupine). The other functions are direct checks that run in
about linear time and name the broken invariant precisely; :func:`index_linearizability`
is an exact polynomial decision for histories in which every index is known, and
:func:`check_all` runs everything.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from cluster.history import STOPPED, History, Iteration, Operation, freeze, short

Verdict = Literal["ok", "violation", "unknown"]

#: Default bound on the whole linearizability search, in seconds.
DEFAULT_TIME_LIMIT = 60.0

#: How many operations of the longest linearizable prefix a violation report shows.
_PREFIX_SHOWN = 8

#: How many problems found by the index check a violation report shows.
_EVIDENCE_SHOWN = 5

Contents = Mapping[str, Sequence[Any]]


# ---------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ChannelResult:
    """The verdict on one channel's sub-history.

    ``linearization`` is a witness order for an ``ok`` verdict (unknown operations that
    need not have happened are left out). For a ``violation``, ``prefix`` is the longest
    linearizable prefix the search found and ``unplaced`` the operations that could have
    gone next, none of which fits (the one that had to go first is first). ``states``
    counts the distinct memoized states, ``steps`` the operations the search tried.
    """

    channel: str
    verdict: Verdict
    operations: int
    states: int
    elapsed: float
    explanation: str = ""
    linearization: tuple[Operation, ...] = ()
    prefix: tuple[Operation, ...] = ()
    unplaced: tuple[Operation, ...] = ()
    steps: int = 0


@dataclass(frozen=True)
class CheckResult:
    """The verdict on a whole history: ``violation`` if any channel has one, else
    ``unknown`` if any channel's search ran out of time, else ``ok``.

    ``unknown`` is not a pass: nothing was proven either way.
    """

    verdict: Verdict
    channels: dict[str, ChannelResult]
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def explanation(self) -> str:
        """Why the verdict is not ``ok`` (empty when it is)."""
        return "\n\n".join(
            result.explanation for result in self.channels.values() if result.verdict != "ok"
        )

    def __str__(self) -> str:
        head = (
            f"linearizability: {self.verdict} ({len(self.channels)} channels, {self.elapsed:.2f} s)"
        )
        return f"{head}\n{self.explanation}" if self.explanation else head


# ---------------------------------------------------------------------------------------
# Linearizability search

# Operation codes of the search; each code has its own legality rule.
_AT = 0  # append ok -> int index
_REFUSED = 1  # append ok -> "stopped"
_PINNED = 2  # unknown append whose value a read saw at exactly one index
_FREE = 3  # unknown append whose index nobody saw
_READ = 4
_LEN = 5
_STOP = 6
_APPENDS = (_AT, _PINNED, _FREE)


def _relevant(op: Operation) -> bool:
    """Whether ``op`` can constrain the search: failures never happened, and an unknown
    read or len may be left out of any linearization since it changes nothing."""
    if op.outcome == "fail":
        return False
    return op.outcome == "ok" or op.kind in ("append", "stop")


def _appends_value(op: Operation) -> bool:
    """Whether ``op`` stores its value if it takes effect (a refusal or failure does not)."""
    return (
        op.kind == "append"
        and op.outcome != "fail"
        and (op.outcome == "unknown" or op.result != STOPPED)
    )


class _ChannelSearch:
    """Wing & Gong's search over one channel's operations, with Lowe's memoization.

    The history is a doubly linked list of call and return entries in time order (calls
    before returns at equal times, so touching intervals count as concurrent: the lenient
    reading, which never invents a violation from clock granularity). The search tries,
    in order, each call that comes before the first remaining return, i.e. each operation
    invoked before the earliest completion among the pending ones; a legal one is lifted
    out of the list and the search restarts from the head; reaching a return means that
    operation can no longer be placed, so the last choice is undone.

    Unknown operations have no return entry (their completion is +infinity) and are not
    required: the search succeeds as soon as every acknowledged operation is placed, so
    an unknown operation may be placed anywhere after its invocation or never.

    The memo key is (set of placed operations, order of the placed unknown appends):
    every acknowledged append sits at its acknowledged index, so the values are a
    function of that key, and so is the stopped flag; the key is therefore exactly
    Lowe's (set, state) pair, but cheap to hash.

    Anonymous operations are left out of that set: unknown appends whose value no read
    saw (only how many of them were placed where counts, since nothing can ever observe
    which value sits there) and unknown stops (only whether one was placed counts).
    Without this, k lost appends cost k! orders; with it, k + 1 states. It is exact: the
    operations a state can still place depend on the placed acknowledged operations
    only (through the earliest pending completion), so every anonymous operation placed
    on one branch could equally have been placed on the other, and the rest of the
    search treats any two of them alike.

    Pruning that never loses a linearization:

    - a stop cannot take effect while an acknowledged append is still to be placed (that
      append would be refused for ever after), and an unknown stop is pointless once the
      channel is stopped;
    - an unknown append whose value a read saw at one index can only take effect when the
      channel has exactly that many values (values are unique);
    - an unknown append nobody saw cannot take effect at an index that an acknowledged
      append or a read claims, nor while a pending read would have to include it, nor
      while a pending len would have to count it.
    """

    def __init__(self, channel: str, operations: Sequence[Operation]) -> None:
        self.channel = channel
        ops = [op for op in operations if _relevant(op)]
        self.ops = ops
        appenders = Counter(op.value for op in ops if _appends_value(op))
        claimed: set[int] = set()
        revealed: dict[int, set[Any]] = defaultdict(set)
        seen_at: dict[Any, set[int]] = defaultdict(set)
        for op in ops:
            if op.kind == "append" and op.ok and op.result != STOPPED:
                claimed.add(op.result)
            elif op.kind == "read" and op.ok:
                start, values = op.result
                for offset, seen in enumerate(values):
                    revealed[start + offset].add(seen)
                    seen_at[seen].add(start + offset)
        self.claimed = claimed
        self.revealed = dict(revealed)

        codes: list[int] = []
        arg: list[Any] = []
        vals: list[Any] = []
        unseen: list[bool] = []
        for op in ops:
            value: Any = None
            where = seen_at.get(op.value, set()) if op.kind == "append" else set()
            if op.kind == "append":
                value = op.value
                if op.ok:
                    code, a = (_REFUSED, None) if op.result == STOPPED else (_AT, op.result)
                elif appenders[op.value] == 1 and len(where) == 1:
                    code, a = _PINNED, next(iter(where))
                else:
                    code, a = _FREE, None
            elif op.kind == "read":
                code, a = _READ, op.result[0]
                value = list(op.result[1])
            elif op.kind == "len":
                code, a = _LEN, op.result
            else:
                code, a = _STOP, None
            codes.append(code)
            arg.append(a)
            vals.append(value)
            unseen.append(not where)
        self.codes = codes
        self.arg = arg
        self.vals = vals
        self.unseen = unseen
        self.required = [op.ok for op in ops]
        self.anonymous = [
            (code == _FREE and hidden) or (code == _STOP and not op.ok)
            for code, hidden, op in zip(codes, unseen, ops, strict=True)
        ]

        # Entries: 0 is the head, len(events) + 1 the tail.
        events: list[tuple[float, int, int]] = []
        for i, op in enumerate(ops):
            events.append((op.invoke, 0, i))
            if op.ok:
                assert op.complete is not None  # validated by Operation
                events.append((op.complete, 1, i))
        events.sort()
        size = len(events) + 2
        self.entry_op = [-1] * size
        self.entry_is_call = [False] * size
        self.call_entry = [0] * len(ops)
        self.return_entry = [-1] * len(ops)
        for entry, (_, is_return, i) in enumerate(events, start=1):
            self.entry_op[entry] = i
            if is_return:
                self.return_entry[i] = entry
            else:
                self.entry_is_call[entry] = True
                self.call_entry[i] = entry
        self.next = [min(entry + 1, size - 1) for entry in range(size)]
        self.prev = [max(entry - 1, 0) for entry in range(size)]

    def run(self, deadline: float | None) -> ChannelResult:
        """Search for a linearization; ``unknown`` once ``deadline`` (monotonic) passes."""
        started = time.monotonic()
        ops, codes, arg, vals = self.ops, self.codes, self.arg, self.vals
        required, unseen, anonymous = self.required, self.unseen, self.anonymous
        claimed, revealed = self.claimed, self.revealed
        nxt, prv = list(self.next), list(self.prev)
        entry_op, entry_is_call = self.entry_op, self.entry_is_call
        call_entry, return_entry = self.call_entry, self.return_entry

        values: list[Any] = []
        stops = 0
        acked_appends_left = codes.count(_AT)
        required_left = sum(required)
        read_starts: Counter[int] = Counter(arg[i] for i, c in enumerate(codes) if c == _READ)
        len_results: Counter[int] = Counter(arg[i] for i, c in enumerate(codes) if c == _LEN)

        def free_fits(i: int) -> bool:
            """Whether the unknown append ``i``, seen by no one at one index, may take
            effect now (see the class docstring)."""
            here = len(values)
            if here in claimed:
                return False
            seen = revealed.get(here)
            if seen is not None and (len(seen) > 1 or vals[i] not in seen):
                return False
            if unseen[i] and any(n and start <= here for start, n in read_starts.items()):
                return False
            return not any(n and length <= here for length, n in len_results.items())

        bits = 0  # placed operations that are not anonymous
        order: tuple[int, ...] = ()  # placed unknown appends in order; -1: anonymous
        hidden_stops = 0  # placed unknown stops (0 or 1)
        cache: set[tuple[int, tuple[int, ...], int]] = set()
        stack: list[tuple[int, tuple[int, ...]]] = []
        path: list[int] = []
        best: list[int] = []
        steps = 0
        entry = nxt[0]
        while required_left:
            steps += 1
            if deadline is not None and not steps & 1023 and time.monotonic() > deadline:
                return ChannelResult(
                    self.channel,
                    "unknown",
                    len(ops),
                    len(cache),
                    time.monotonic() - started,
                    f"channel {self.channel!r}: no verdict; the search ran out of time after "
                    f"{len(cache)} states ({len(ops)} operations, longest prefix "
                    f"{len(best)}).",
                    steps=steps,
                )
            if entry_is_call[entry]:
                i = entry_op[entry]
                code = codes[i]
                if code in (_AT, _PINNED):
                    legal = not stops and len(values) == arg[i]
                elif code == _READ:
                    start, expected = arg[i], vals[i]
                    size = len(values)
                    if start >= size:
                        legal = not expected
                    else:
                        legal = (
                            size - start == len(expected)
                            and values[-1] == expected[-1]
                            and values[start:] == expected
                        )
                elif code == _LEN:
                    legal = len(values) == arg[i]
                elif code == _FREE:
                    legal = not stops and free_fits(i)
                elif code == _REFUSED:
                    legal = stops > 0
                else:
                    legal = not acked_appends_left and (required[i] or not stops)
                if legal:
                    new_bits, new_order, new_hidden = bits, order, hidden_stops
                    if not anonymous[i]:
                        new_bits |= 1 << i
                        if code in (_PINNED, _FREE):
                            new_order += (i,)
                    elif code == _FREE:
                        new_order += (-1,)
                    else:
                        new_hidden += 1
                    key = (new_bits, new_order, new_hidden)
                    if key not in cache:
                        cache.add(key)
                        if code in _APPENDS:
                            values.append(vals[i])
                            if code == _AT:
                                acked_appends_left -= 1
                        elif code == _READ:
                            read_starts[arg[i]] -= 1
                        elif code == _LEN:
                            len_results[arg[i]] -= 1
                        elif code == _STOP:
                            stops += 1
                        stack.append((i, order))
                        path.append(i)
                        bits, order, hidden_stops = new_bits, new_order, new_hidden
                        call = call_entry[i]
                        nxt[prv[call]] = nxt[call]
                        prv[nxt[call]] = prv[call]
                        ret = return_entry[i]
                        if ret >= 0:
                            nxt[prv[ret]] = nxt[ret]
                            prv[nxt[ret]] = prv[ret]
                            required_left -= 1
                        if len(path) > len(best):
                            best = path[:]
                        entry = nxt[0]
                        continue
                entry = nxt[entry]
            else:
                # The earliest pending completion: that operation cannot be placed any
                # more on this branch, so undo the last choice and try the next one.
                if not stack:
                    return self._violation(best, len(cache), steps, time.monotonic() - started)
                i, order = stack.pop()
                path.pop()
                code = codes[i]
                if not anonymous[i]:
                    bits ^= 1 << i
                elif code == _STOP:
                    hidden_stops -= 1
                if code in _APPENDS:
                    values.pop()
                    if code == _AT:
                        acked_appends_left += 1
                elif code == _READ:
                    read_starts[arg[i]] += 1
                elif code == _LEN:
                    len_results[arg[i]] += 1
                elif code == _STOP:
                    stops -= 1
                ret = return_entry[i]
                if ret >= 0:
                    nxt[prv[ret]] = ret
                    prv[nxt[ret]] = ret
                    required_left += 1
                call = call_entry[i]
                nxt[prv[call]] = call
                prv[nxt[call]] = call
                entry = nxt[call]
        return ChannelResult(
            self.channel,
            "ok",
            len(ops),
            len(cache),
            time.monotonic() - started,
            linearization=tuple(ops[i] for i in path),
            steps=steps,
        )

    def _violation(self, best: list[int], states: int, steps: int, elapsed: float) -> ChannelResult:
        """Describe where the search got furthest and why nothing could go next there."""
        ops = self.ops
        placed = set(best)
        values: list[Any] = []
        stopped = False
        for i in best:
            if self.codes[i] in _APPENDS:
                values.append(self.vals[i])
            elif self.codes[i] == _STOP:
                stopped = True
        pending = [i for i in range(len(ops)) if i not in placed]
        required = [i for i in pending if self.required[i]]
        first = min(required, key=lambda i: (ops[i].complete, ops[i].invoke))
        deadline = ops[first].complete
        assert deadline is not None
        candidates = [i for i in pending if ops[i].invoke <= deadline]
        candidates.sort(key=lambda i: (i != first, ops[i].invoke))
        acked_left = sum(1 for i in pending if self.codes[i] == _AT)

        lines = [
            f"channel {self.channel!r}: not linearizable ({len(ops)} operations, "
            f"{states} states searched in {elapsed:.2f} s).",
            f"The longest linearizable prefix places {len(best)} of them; it ends with:",
        ]
        if len(best) > _PREFIX_SHOWN:
            lines.append(f"    ... {len(best) - _PREFIX_SHOWN} earlier operations ...")
        lines.extend(f"    {ops[i].describe()}" for i in best[-_PREFIX_SHOWN:])
        state = "stopped" if stopped else "not stopped"
        lines.append(
            f"after which the channel holds {len(values)} values "
            f"{short(tuple(values))} and is {state}."
        )
        lines.append(
            f"Nothing can go next. This operation completed at {deadline:.6f}, so it "
            "must take effect by then:"
        )
        for i in candidates:
            reason = self._reason(i, values, stopped, acked_left, pending)
            if i == first:
                lines.append(f"  * {ops[i].describe()}\n      {reason}")
                if len(candidates) > 1:
                    lines.append("and no operation invoked before then fits first either:")
            else:
                lines.append(f"  - {ops[i].describe()}\n      {reason}")
        return ChannelResult(
            self.channel,
            "violation",
            len(ops),
            states,
            elapsed,
            "\n".join(lines),
            prefix=tuple(ops[i] for i in best),
            unplaced=tuple(ops[i] for i in candidates),
            steps=steps,
        )

    def _reason(
        self, i: int, values: list[Any], stopped: bool, acked_left: int, pending: list[int]
    ) -> str:
        """Why operation ``i`` cannot take effect in the given state (for reports only)."""
        code, a = self.codes[i], self.arg[i]
        size = len(values)
        if code in _APPENDS and stopped:
            return "the channel is already stopped here"
        if code == _AT and size != a:
            return f"acknowledged index {a}, but the channel holds {size} values here"
        if code == _PINNED and size != a:
            return f"a read saw its value at index {a}, but the channel holds {size} values here"
        if code == _READ:
            expected = tuple(self.vals[i])
            actual = tuple(values[a:])
            for offset, (saw, held) in enumerate(zip(expected, actual, strict=False)):
                if saw != held:
                    return f"it saw {saw!r} at index {a + offset}, where the channel holds {held!r}"
            if len(actual) != len(expected):
                return (
                    f"it saw {len(expected)} values from index {a}, "
                    f"the channel holds {len(actual)} there"
                )
        if code == _LEN and size != a:
            return f"the channel holds {size} values here"
        if code == _REFUSED and not stopped:
            return "refused as stopped, but no stop has taken effect here"
        if code == _STOP and acked_left:
            return f"{acked_left} acknowledged appends have still to take effect"
        if code == _FREE:
            seen = self.revealed.get(size, set())
            if size in self.claimed:
                return f"index {size} belongs to an acknowledged append"
            if seen - {self.vals[i]}:
                return f"reads saw {short(tuple(seen))} at index {size}"
            if any(self.codes[j] == _READ and self.arg[j] <= size for j in pending):
                return f"a pending read from index {size} or before would have to include it"
            if any(self.codes[j] == _LEN and self.arg[j] <= size for j in pending):
                return "a pending len would have to count it"
        return "it fits here, but no linearization of the rest follows it"


def check_linearizable(
    history: History | Iterable[Operation],
    *,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> CheckResult:
    """Decide whether ``history`` is linearizable with respect to the channel model.

    Channels are checked one by one (each is an independent object, so the history is
    linearizable iff every channel's sub-history is). ``time_limit`` (seconds, ``None``
    for no bound) bounds the whole search; channels it leaves undecided are ``unknown``,
    which is not a pass. The search is exponential in the worst case but about linear
    for linearizable histories with a handful of concurrent clients per channel.
    """
    started = time.monotonic()
    deadline = None if time_limit is None else started + time_limit
    operations = history if isinstance(history, History) else History(history)
    results: dict[str, ChannelResult] = {}
    for channel, ops in sorted(operations.by_channel().items()):
        if deadline is not None and time.monotonic() > deadline:
            results[channel] = ChannelResult(
                channel,
                "unknown",
                len(ops),
                0,
                0.0,
                f"channel {channel!r}: not checked, the time limit was spent on others.",
            )
            continue
        result = _ChannelSearch(channel, ops).run(deadline)
        if result.verdict == "violation":
            # The search reports where it got stuck, which after pruning can be some way
            # from the cause; the index check often names the cause directly.
            evidence = _index_check(channel, ops)
            if evidence:
                shown = [f"  - {problem}" for problem in evidence[:_EVIDENCE_SHOWN]]
                if len(evidence) > _EVIDENCE_SHOWN:
                    shown.append(f"  ... {len(evidence) - _EVIDENCE_SHOWN} more")
                lines = "\n".join(shown)
                result = replace(
                    result, explanation=f"{result.explanation}\nDirect evidence:\n{lines}"
                )
        results[channel] = result
    verdicts = {result.verdict for result in results.values()}
    verdict: Verdict = (
        "violation" if "violation" in verdicts else "unknown" if "unknown" in verdicts else "ok"
    )
    return CheckResult(verdict, results, time.monotonic() - started)


# ---------------------------------------------------------------------------------------
# An exact polynomial decision when every index is known


def index_linearizability(history: History | Iterable[Operation]) -> dict[str, list[str] | None]:
    """Decide linearizability per channel without search, where the indexes allow it.

    When every index up to the longest length anyone observed is known (acknowledged by
    an append or seen by a read), the order of the appends is fixed, every read and len
    falls between two known appends, and the question becomes whether each operation
    can take effect inside its own interval with the appends in index order: greedy
    earliest placement decides it exactly. Returns, per channel, the violations found
    (an empty list: linearizable) or ``None`` when an unknown append that nobody saw
    might fill a hole, which only the search in :func:`check_linearizable` can decide.
    """
    operations = history if isinstance(history, History) else History(history)
    return {
        channel: _index_check(channel, ops)
        for channel, ops in sorted(operations.by_channel().items())
    }


def _index_check(channel: str, operations: Sequence[Operation]) -> list[str] | None:
    ops = [op for op in operations if _relevant(op)]
    appenders: dict[Any, list[Operation]] = defaultdict(list)
    for op in ops:
        if _appends_value(op):
            appenders[op.value].append(op)
    if any(len(same) > 1 for same in appenders.values()):
        return None  # values are not unique: the index of a seen value is ambiguous
    not_stored = {
        op.value: op for op in operations if op.kind == "append" and not _appends_value(op)
    }

    problems: list[str] = []
    value_at: dict[int, Any] = {}
    index_of: dict[Any, int] = {}
    source: dict[int, Operation] = {}

    def place(index: int, value: Any, op: Operation) -> bool:
        """Record that ``op`` puts ``value`` at ``index``; False (and a problem) when
        that contradicts what an earlier operation said."""
        known = value_at.get(index)
        if index in value_at and known != value:
            problems.append(
                f"channel {channel!r}: index {index} holds {known!r} for {source[index].describe()}"
                f" but {value!r} for {op.describe()}"
            )
            return False
        if value in index_of and index_of[value] != index:
            problems.append(
                f"channel {channel!r}: value {value!r} is at index {index_of[value]} for "
                f"{source[index_of[value]].describe()} but at {index} for {op.describe()}"
            )
            return False
        value_at[index] = value
        index_of[value] = index
        source.setdefault(index, op)
        return True

    for op in ops:
        if op.kind == "append" and op.ok and op.result != STOPPED:
            place(op.result, op.value, op)
    for op in ops:
        if op.kind == "read" and op.ok:
            start, values = op.result
            for offset, value in enumerate(values):
                if value not in appenders:
                    other = not_stored.get(value)
                    cause = (
                        f"whose append did not happen ({other.describe()})"
                        if other is not None
                        else "that no append wrote"
                    )
                    problems.append(f"channel {channel!r}: {op.describe()} saw {value!r} {cause}")
                    break
                if not place(start + offset, value, op):
                    break  # one problem per read: the rest of it is usually shifted too
    if problems:
        return problems

    unseen = [op for op in ops if _appends_value(op) and op.value not in index_of]
    size = max(value_at) + 1 if value_at else 0
    holes = [index for index in range(size) if index not in value_at]
    lengths = [
        (op.result if op.kind == "len" else op.result[0] + len(op.result[1]), op)
        for op in ops
        if op.ok and (op.kind == "len" or (op.kind == "read" and op.result[1]))
    ]
    too_long = [(n, op) for n, op in lengths if n > size]
    if holes or too_long:
        if unseen:
            return None
        if holes:
            return [
                f"channel {channel!r}: index {holes[0]} is never filled, yet "
                f"{source[size - 1].describe()} has index {size - 1}"
            ]
        n, op = too_long[0]
        return [f"channel {channel!r}: {op.describe()} counts {n} values, only {size} stored"]

    # Each append i takes effect at t[i] in [lo[i], hi[i]], with t non-decreasing; reads
    # and lens only tighten these bounds (see the docstring of index_linearizability).
    inf = math.inf
    lo: list[float] = []
    hi: list[float] = []
    lo_why: list[Operation] = []
    hi_why: list[Operation] = []
    for index in range(size):
        op = appenders[value_at[index]][0]
        lo.append(op.invoke)
        hi.append(op.complete if op.ok and op.complete is not None else inf)
        lo_why.append(op)
        hi_why.append(op)

    def at_least(index: int, when: float, op: Operation) -> None:
        if index < size and when > lo[index]:
            lo[index], lo_why[index] = when, op

    def at_most(index: int, when: float, op: Operation) -> None:
        if index >= 0 and when < hi[index]:
            hi[index], hi_why[index] = when, op

    stops = [op for op in ops if op.kind == "stop"]
    for op in ops:
        if not op.ok:
            continue
        end = op.complete
        assert end is not None
        if op.kind == "read" and not op.result[1]:
            at_least(op.result[0], op.invoke, op)  # the channel held at most `start` values
        elif op.kind in ("read", "len"):
            n = op.result if op.kind == "len" else op.result[0] + len(op.result[1])
            at_least(n, op.invoke, op)
            at_most(n - 1, end, op)
        elif op.kind == "stop":
            at_most(size - 1, end, op)
        elif op.kind == "append" and op.result == STOPPED:
            if not any(stop.invoke <= end for stop in stops):
                return [
                    f"channel {channel!r}: {op.describe()} was refused as stopped before "
                    "any stop was invoked"
                ]
            at_most(size - 1, end, op)

    when = -inf
    forced_by: Operation | None = None
    for index in range(size):
        if lo[index] > when:
            when, forced_by = lo[index], lo_why[index]
        if when > hi[index]:
            assert forced_by is not None
            return [
                f"channel {channel!r}: the append at index {index} "
                f"({appenders[value_at[index]][0].describe()}) cannot take effect before "
                f"{when:.6f} (forced by {forced_by.describe()}) but must by {hi[index]:.6f} "
                f"(forced by {hi_why[index].describe()})"
            ]
    return []


# ---------------------------------------------------------------------------------------
# Direct checks against the contents read back after healing


def _frozen(contents: Contents) -> dict[str, tuple[Any, ...]]:
    return {channel: freeze(list(values)) for channel, values in contents.items()}


def _positions(values: Sequence[Any]) -> dict[Any, list[int]]:
    where: dict[Any, list[int]] = defaultdict(list)
    for index, value in enumerate(values):
        where[value].append(index)
    return where


def acknowledged_appends_present(
    history: Iterable[Operation], final_contents: Contents
) -> list[str]:
    """Every acknowledged append's value is stored at the index it was acknowledged with.

    ``final_contents`` maps each channel to its values as read from a node after healing.
    A miss here is a lost or moved write: the worst thing a replicated log can do.
    """
    contents = _frozen(final_contents)
    where = {channel: _positions(values) for channel, values in contents.items()}
    problems: list[str] = []
    for op in history:
        if op.kind != "append" or not op.ok or op.result == STOPPED:
            continue
        values = contents.get(op.channel, ())
        index = op.result
        if index < len(values) and values[index] == op.value:
            continue
        found = where.get(op.channel, {}).get(op.value)
        if not found:
            problems.append(
                f"lost: {op.describe()} was acknowledged at index {index}, but the value is "
                f"not stored ({len(values)} values)"
            )
        else:
            problems.append(
                f"moved: {op.describe()} was acknowledged at index {index}, but the value is "
                f"stored at {found}"
            )
    return problems


def refused_appends_absent(history: Iterable[Operation], final_contents: Contents) -> list[str]:
    """No value of an append that definitely did not happen (failed, or refused because
    the channel was stopped) is stored: the client was told it was not, and may have
    acted on that."""
    contents = _frozen(final_contents)
    where = {channel: _positions(values) for channel, values in contents.items()}
    problems: list[str] = []
    for op in history:
        if op.kind != "append" or not (op.outcome == "fail" or op.result == STOPPED):
            continue
        found = where.get(op.channel, {}).get(op.value)
        if found:
            problems.append(f"refused yet stored: {op.describe()} is stored at {found}")
    return problems


def stored_values_appended(history: Iterable[Operation], final_contents: Contents) -> list[str]:
    """Every stored value was the value of some append to that channel (no invented or
    misrouted items)."""
    appended: dict[str, set[Any]] = defaultdict(set)
    for op in history:
        if op.kind == "append":
            appended[op.channel].add(op.value)
    problems: list[str] = []
    for channel, values in _frozen(final_contents).items():
        for index, value in enumerate(values):
            if value not in appended[channel]:
                problems.append(
                    f"phantom: channel {channel!r} stores {value!r} at index {index}, "
                    "which no append to it wrote"
                )
    return problems


def no_duplicates(final_contents: Contents) -> list[str]:
    """No value is stored twice in a channel: appends carry unique values, so a repeat
    is a retry applied twice."""
    problems: list[str] = []
    for channel, values in _frozen(final_contents).items():
        for value, indexes in _positions(values).items():
            if len(indexes) > 1:
                problems.append(
                    f"duplicate: channel {channel!r} stores {value!r} at indexes {indexes}"
                )
    return problems


def identical_prefixes(per_node_contents: Mapping[str, Contents]) -> list[str]:
    """On every channel, each node's content is a prefix of the longest node's.

    A node may lag (it has not applied the newest entries yet) but must never disagree:
    one item per index on every node. A node without the channel counts as empty.
    """
    nodes = {node: _frozen(contents) for node, contents in per_node_contents.items()}
    channels = sorted({channel for contents in nodes.values() for channel in contents})
    problems: list[str] = []
    for channel in channels:
        longest_node = max(sorted(nodes), key=lambda node: len(nodes[node].get(channel, ())))
        longest = nodes[longest_node].get(channel, ())
        for node in sorted(nodes):
            values = nodes[node].get(channel, ())
            if longest[: len(values)] == values:
                continue
            index = next(i for i, (a, b) in enumerate(zip(values, longest, strict=False)) if a != b)
            problems.append(
                f"diverged: channel {channel!r} holds {values[index]!r} at index {index} on "
                f"node {node} but {longest[index]!r} on node {longest_node}"
            )
    return problems


def reads_consistent(history: Iterable[Operation], final_contents: Contents) -> list[str]:
    """Every acknowledged read (and len) agrees with the final contents: a read saw
    exactly the stored values at their stored indexes, so nothing it returned was later
    lost, reordered, or never committed."""
    contents = _frozen(final_contents)
    problems: list[str] = []
    for op in history:
        if not op.ok or op.kind not in ("read", "len"):
            continue
        values = contents.get(op.channel, ())
        if op.kind == "len":
            if op.result > len(values):
                problems.append(
                    f"read beyond the end: {op.describe()}, but only {len(values)} are stored"
                )
            continue
        start, seen = op.result
        stored = values[start : start + len(seen)]
        if stored == seen:
            continue
        offset = next(
            (i for i, (a, b) in enumerate(zip(seen, stored, strict=False)) if a != b),
            len(stored),
        )
        held = repr(stored[offset]) if offset < len(stored) else "nothing"
        problems.append(
            f"inconsistent read: {op.describe()} saw {seen[offset]!r} at index "
            f"{start + offset}, where {held} is stored"
        )
    return problems


def reads_fresh(history: Iterable[Operation]) -> list[str]:
    """Reads and lens respect real time, judged from the history alone.

    Stale: a read (or len) invoked after some operation completed must see at least as
    many values as that operation established (an acknowledged index, a read's length,
    a len). Future: a read may only see values whose appends were invoked before it
    completed, at most as many values as appends had been invoked by then, and only
    values some append wrote.
    """
    ops = list(history)
    appends: dict[str, dict[Any, float]] = defaultdict(dict)
    invokes: dict[str, list[float]] = defaultdict(list)
    known: dict[str, set[Any]] = defaultdict(set)
    for op in ops:
        if op.kind == "append":
            known[op.channel].add(op.value)
        if _appends_value(op):
            earliest = appends[op.channel].get(op.value, math.inf)
            appends[op.channel][op.value] = min(earliest, op.invoke)
            invokes[op.channel].append(op.invoke)
    for times in invokes.values():
        times.sort()

    def observed(op: Operation) -> tuple[int, int]:
        """The fewest and most values ``op`` allows the channel to have held."""
        if op.kind == "len":
            return op.result, op.result
        start, values = op.result
        if values:
            return start + len(values), start + len(values)
        return 0, start

    bounds: dict[str, list[tuple[float, int, Operation]]] = defaultdict(list)
    for op in ops:
        if not op.ok or op.complete is None:
            continue
        if op.kind == "append" and op.result != STOPPED:
            bounds[op.channel].append((op.complete, op.result + 1, op))
        elif op.kind in ("read", "len"):
            bounds[op.channel].append((op.complete, observed(op)[0], op))

    problems: list[str] = []
    readers = sorted(
        (op for op in ops if op.ok and op.kind in ("read", "len")), key=lambda op: op.invoke
    )
    by_channel: dict[str, list[Operation]] = defaultdict(list)
    for op in readers:
        by_channel[op.channel].append(op)
    for channel, channel_readers in by_channel.items():
        established = sorted(bounds[channel], key=lambda bound: bound[0])
        position = 0
        floor, floor_op = 0, None
        for op in channel_readers:
            while position < len(established) and established[position][0] < op.invoke:
                _, length, source = established[position]
                if length > floor:
                    floor, floor_op = length, source
                position += 1
            fewest, most = observed(op)
            if most < floor and floor_op is not None:
                problems.append(
                    f"stale: {op.describe()} allows at most {most} values, but "
                    f"{floor_op.describe()} had established {floor} before it was invoked"
                )
            end = op.complete
            assert end is not None
            invoked = bisect.bisect_right(invokes[channel], end)
            if fewest > invoked:
                problems.append(
                    f"future: {op.describe()} implies {fewest} values, but only {invoked} "
                    "appends had been invoked when it completed"
                )
            if op.kind != "read":
                continue
            start, values = op.result
            for offset, value in enumerate(values):
                began = appends[channel].get(value)
                if began is None:
                    why = (
                        "whose append was refused"
                        if value in known[channel]
                        else ("that no append wrote")
                    )
                    problems.append(
                        f"phantom: {op.describe()} saw {value!r} at index {start + offset} {why}"
                    )
                elif began > end:
                    problems.append(
                        f"future: {op.describe()} saw {value!r}, whose append was invoked at "
                        f"{began:.6f}, after the read completed"
                    )
    return problems


def stop_respected(history: Iterable[Operation]) -> list[str]:
    """No append is acknowledged with an index if it was invoked after a stop had
    completed, and no append is refused as stopped before any stop was invoked."""
    ops = list(history)
    stop_done: dict[str, Operation] = {}
    stop_asked: dict[str, float] = {}
    for op in ops:
        if op.kind != "stop" or op.outcome == "fail":
            continue
        stop_asked[op.channel] = min(stop_asked.get(op.channel, math.inf), op.invoke)
        if op.ok:
            assert op.complete is not None
            earliest = stop_done.get(op.channel)
            if earliest is None or op.complete < (earliest.complete or math.inf):
                stop_done[op.channel] = op
    problems: list[str] = []
    for op in ops:
        if op.kind != "append" or not op.ok:
            continue
        assert op.complete is not None
        stop = stop_done.get(op.channel)
        if op.result != STOPPED:
            if stop is not None and stop.complete is not None and op.invoke > stop.complete:
                problems.append(
                    f"append after stop: {op.describe()} was accepted although "
                    f"{stop.describe()} had completed before it was invoked"
                )
        elif op.complete < stop_asked.get(op.channel, math.inf):
            problems.append(
                f"refused before stop: {op.describe()} was refused as stopped, but no stop "
                "had been invoked by then"
            )
    return problems


def iterations_monotonic(
    iterations: Iterable[Iteration],
    final_contents: Contents,
    stopped_channels: Collection[str] | None = None,
) -> list[str]:
    """Each reader's iteration went forward one index at a time from where it began,
    saw the stored value at every index, and, if it ended by itself, saw everything to
    the end of the channel. With ``stopped_channels`` given, an iteration may only have
    ended on one of those channels."""
    contents = _frozen(final_contents)
    problems: list[str] = []
    for it in iterations:
        values = contents.get(it.channel, ())
        who = f"p{it.process} iterating {it.channel!r} from {it.start}"
        expected = it.start
        for index, value in it.items:
            if index != expected:
                kind = "went back" if index < expected else "skipped"
                after = f"after {expected - 1}" if expected > it.start else "first"
                problems.append(f"{kind}: {who} got index {index} {after}")
                break
            if index >= len(values) or values[index] != value:
                held = repr(values[index]) if index < len(values) else "nothing"
                problems.append(
                    f"wrong item: {who} got {value!r} at index {index}, where {held} is stored"
                )
                break
            expected += 1
        else:
            if it.ended and expected < len(values):
                problems.append(
                    f"ended early: {who} ended after index {expected - 1}, but the channel "
                    f"holds {len(values)} values"
                )
        if it.ended and stopped_channels is not None and it.channel not in stopped_channels:
            problems.append(f"ended without stop: {who} ended, but the channel was never stopped")
    return problems


# ---------------------------------------------------------------------------------------
# Everything at once


@dataclass(frozen=True)
class CheckReport:
    """Every check of one run: the linearizability verdict and each direct check's
    violations (by check name; an empty list means the check passed)."""

    linearizability: CheckResult
    violations: dict[str, list[str]] = field(default_factory=dict)

    @property
    def verdict(self) -> Verdict:
        if self.linearizability.verdict == "violation" or any(self.violations.values()):
            return "violation"
        return self.linearizability.verdict

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def __str__(self) -> str:
        lines = [f"verdict: {self.verdict}", str(self.linearizability)]
        for name, problems in self.violations.items():
            lines.append(f"{name}: {'ok' if not problems else f'{len(problems)} violations'}")
            lines.extend(f"  {problem}" for problem in problems[:20])
            if len(problems) > 20:
                lines.append(f"  ... {len(problems) - 20} more")
        return "\n".join(lines)


def longest_contents(per_node_contents: Mapping[str, Contents]) -> dict[str, list[Any]]:
    """The longest content of each channel across nodes (the most up-to-date node's)."""
    merged: dict[str, list[Any]] = {}
    for contents in per_node_contents.values():
        for channel, values in contents.items():
            if len(values) > len(merged.get(channel, ())):
                merged[channel] = list(values)
            else:
                merged.setdefault(channel, list(values))
    return merged


def check_all(
    history: History,
    final_contents: Contents | None = None,
    *,
    per_node_contents: Mapping[str, Contents] | None = None,
    iterations: Iterable[Iteration] | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> CheckReport:
    """Run every check that the given evidence allows, plus the linearizability search.

    ``final_contents`` defaults to the longest content per channel among
    ``per_node_contents``; checks that need contents are skipped when neither is given.
    ``iterations`` defaults to those recorded in ``history``. A channel counts as stopped
    for the iteration check when any stop on it may have happened.
    """
    if final_contents is None and per_node_contents is not None:
        final_contents = longest_contents(per_node_contents)
    if iterations is None:
        iterations = history.iterations
    stopped = {op.channel for op in history if op.kind == "stop" and op.outcome != "fail"}
    checks: dict[str, Callable[[], list[str]]] = {
        "reads_fresh": lambda: reads_fresh(history),
        "stop_respected": lambda: stop_respected(history),
        "index_linearizability": lambda: [
            problem
            for problems in index_linearizability(history).values()
            for problem in problems or ()
        ],
    }
    if final_contents is not None:
        final = final_contents
        checks.update(
            {
                "acknowledged_appends_present": lambda: acknowledged_appends_present(
                    history, final
                ),
                "refused_appends_absent": lambda: refused_appends_absent(history, final),
                "stored_values_appended": lambda: stored_values_appended(history, final),
                "no_duplicates": lambda: no_duplicates(final),
                "reads_consistent": lambda: reads_consistent(history, final),
                "iterations_monotonic": lambda: iterations_monotonic(iterations, final, stopped),
            }
        )
    if per_node_contents is not None:
        nodes = per_node_contents
        checks["identical_prefixes"] = lambda: identical_prefixes(nodes)
    violations = {name: run() for name, run in checks.items()}
    return CheckReport(check_linearizable(history, time_limit=time_limit), violations)
