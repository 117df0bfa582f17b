"""Histories of channel operations, as clients record them against a real cluster.

A history is what the checker (:mod:`cluster.checker`) judges: for every operation, who
issued it, when it was invoked, when (and whether) it completed, and what it returned.
The format is deliberately plain (frozen dataclasses of JSON-able values) so that a
failing history can be written to a file, attached to a bug report and replayed through
the checker without a cluster.

Clients record through a :class:`Recorder`::

    recorder = Recorder()
    op_id = recorder.invoke(process, "append", "chan", value)
    try:
        index = client_append(...)
    except Timeout:
        recorder.complete(op_id, "unknown")      # may or may not have happened
    else:
        recorder.complete(op_id, "ok", index)
    ...
    history = recorder.history()                 # never-completed operations: unknown

Values are restricted to JSON scalars and (nested) tuples of them, because a history must
survive a round trip through a JSON file unchanged: lists are turned into tuples on the
way in (msgpack hands lists back) so that values stay hashable and compare equal after
reloading.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

#: The operation kinds the channel model knows.
KINDS = frozenset({"append", "read", "len", "stop"})

#: ``ok``: it happened, and ``result`` says what it returned. ``fail``: it definitely did
#: not happen (refused before anything was sent). ``unknown``: it may or may not have
#: happened (timeout, leader changed, connection lost), possibly after the client gave up.
OUTCOMES = frozenset({"ok", "fail", "unknown"})

#: The result of an acknowledged append that the cluster refused because the channel is
#: stopped (an ``ok`` outcome: the refusal itself is a definite answer).
STOPPED = "stopped"

#: Version of the JSON layout written by :meth:`History.to_json`.
FORMAT_VERSION = 1

_SCALARS = (str, int, float, bool, type(None))


def freeze(value: Any) -> Any:
    """``value`` with every list turned into a tuple, recursively.

    Values read back from the cluster (msgpack) or from a JSON file come as lists; the
    checker needs hashable values that compare equal to what was appended. Anything but
    JSON scalars and lists/tuples of them is refused, since it could not be saved and
    replayed faithfully.
    """
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    raise TypeError(
        f"history values must be JSON scalars or lists/tuples of them, not {type(value).__name__}"
    )


def _thaw(value: Any) -> Any:
    """The JSON-ready form of a frozen value (tuples as lists)."""
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value


def short(value: Any, limit: int = 6) -> str:
    """A bounded ``repr`` for messages: long tuples show their ends and their length."""
    if isinstance(value, tuple) and len(value) > limit:
        head = ", ".join(repr(item) for item in value[: limit // 2])
        tail = ", ".join(repr(item) for item in value[-(limit // 2) :])
        return f"({head}, ... {len(value) - limit} more ..., {tail})"
    return repr(value)


@dataclass(frozen=True)
class Operation:
    """One client operation on one channel, from invocation to its (possibly unknown) end.

    ``value`` is the appended value (unique across the history) for appends and ``None``
    otherwise. ``result`` for an ``ok`` outcome: append -> the index it got, or
    :data:`STOPPED` when refused because the channel is stopped; read -> ``(start,
    values)``, the items at indexes ``start, start + 1, ...`` up to the end of the channel
    at the moment the read took effect; len -> the length; stop -> ``None``. For ``fail``
    and ``unknown`` outcomes ``result`` is ``None``.

    ``complete`` is ``None`` exactly when nothing is known about when the operation ended
    (an ``unknown`` outcome); the checker treats an unknown operation as outstanding for
    ever whatever ``complete`` says, since a retry may still apply it later.

    Construction validates the fields, so a recorder bug shows up where it happens rather
    than as a baffling verdict from the checker.
    """

    process: int
    kind: str
    channel: str
    value: Any
    invoke: float
    complete: float | None
    outcome: str
    result: Any

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown operation kind {self.kind!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")
        value = freeze(self.value)
        if self.kind != "append" and value is not None:
            raise ValueError(f"a {self.kind} carries no value, got {value!r}")
        object.__setattr__(self, "value", value)
        if self.outcome != "unknown":
            if self.complete is None:
                raise ValueError(f"an operation with outcome {self.outcome!r} needs a completion")
            if self.complete < self.invoke:
                raise ValueError(f"completed at {self.complete} before invoked at {self.invoke}")
        result = freeze(self.result)
        if self.outcome != "ok":
            if result is not None:
                raise ValueError(f"an operation with outcome {self.outcome!r} has no result")
        else:
            _check_result(self.kind, result)
        object.__setattr__(self, "result", result)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def describe(self) -> str:
        """One line for a report: who, what, what came back, when."""
        call = f"append({self.value!r})" if self.kind == "append" else f"{self.kind}()"
        if self.outcome != "ok":
            answer = self.outcome
        elif self.kind == "read":
            start, values = self.result
            answer = f"from {start}: {short(values)}"
        elif self.kind == "stop":
            answer = "ok"
        else:
            answer = repr(self.result)
        end = "?" if self.complete is None or self.outcome == "unknown" else f"{self.complete:.6f}"
        return f"p{self.process} {self.channel!r} {call} -> {answer}  [{self.invoke:.6f}, {end}]"


def _check_result(kind: str, result: Any) -> None:
    """Refuse an ``ok`` result that does not have the shape its kind returns."""
    if kind == "append":
        valid = result == STOPPED or _is_count(result)
    elif kind == "read":
        valid = (
            isinstance(result, tuple)
            and len(result) == 2
            and _is_count(result[0])
            and isinstance(result[1], tuple)
        )
    elif kind == "len":
        valid = _is_count(result)
    else:
        valid = result is None
    if not valid:
        raise ValueError(f"invalid result for an acknowledged {kind}: {result!r}")


def _is_count(value: Any) -> bool:
    """An index or a length: a non-negative int (and not a bool, which is an int too)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Iteration:
    """What one reader's ``for item in chan`` saw: ``(index, value)`` pairs in order.

    ``start`` is the index the iteration began at (the first retained item when it
    started). ``ended`` is true when the iterator finished by itself (it saw the stop
    marker), false when the test cut it off; only an iteration that ended must have seen
    the channel to its end.
    """

    process: int
    channel: str
    start: int
    items: tuple[tuple[int, Any], ...]
    ended: bool

    def __post_init__(self) -> None:
        items = freeze(self.items)
        for pair in items:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], int)):
                raise ValueError(f"an iteration item must be (index, value), got {pair!r}")
        object.__setattr__(self, "items", items)


class History:
    """The operations (and iterations) of one run, in the order they were invoked.

    A sequence of :class:`Operation`; iterations ride along so that one file holds all a
    failing run's evidence.
    """

    def __init__(
        self, operations: Iterable[Operation] = (), iterations: Iterable[Iteration] = ()
    ) -> None:
        self.operations: list[Operation] = list(operations)
        self.iterations: list[Iteration] = list(iterations)

    def __len__(self) -> int:
        return len(self.operations)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations)

    @overload
    def __getitem__(self, index: int) -> Operation: ...

    @overload
    def __getitem__(self, index: slice) -> list[Operation]: ...

    def __getitem__(self, index: int | slice) -> Operation | list[Operation]:
        return self.operations[index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, History):
            return NotImplemented
        return self.operations == other.operations and self.iterations == other.iterations

    __hash__ = None  # type: ignore[assignment]  # mutable container

    def __repr__(self) -> str:
        return f"History({len(self.operations)} operations, {len(self.iterations)} iterations)"

    def append(self, operation: Operation) -> None:
        self.operations.append(operation)

    def channels(self) -> list[str]:
        """Every channel an operation or iteration touched, sorted."""
        names = {op.channel for op in self.operations}
        names.update(it.channel for it in self.iterations)
        return sorted(names)

    def by_channel(self) -> dict[str, list[Operation]]:
        """The operations of each channel, in history order.

        Channels are independent objects of the model, so the history is linearizable iff
        each channel's sub-history is (locality): the checker searches them one by one.
        """
        split: dict[str, list[Operation]] = {}
        for op in self.operations:
            split.setdefault(op.channel, []).append(op)
        return split

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists); :meth:`from_dict` restores it exactly."""
        return {
            "version": FORMAT_VERSION,
            "operations": [_thaw_fields(asdict(op)) for op in self.operations],
            "iterations": [_thaw_fields(asdict(it)) for it in self.iterations],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported history format version {version!r}")
        return cls(
            (Operation(**fields) for fields in data["operations"]),
            (Iteration(**fields) for fields in data.get("iterations", ())),
        )

    def to_json(self, path: str | Path) -> None:
        """Save the history so that a failing run can be replayed through the checker."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=None) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> History:
        """Load a history saved by :meth:`to_json`; values come back as tuples."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _thaw_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: _thaw(value) for key, value in fields.items()}


@dataclass
class _Pending:
    process: int
    kind: str
    channel: str
    value: Any
    invoke: float
    done: Operation | None = field(default=None)


class Recorder:
    """Thread-safe journal that concurrent test clients write their operations into.

    ``invoke`` stamps the start with ``clock`` and returns an id; ``complete`` stamps the
    end. The clock must be monotonic and shared by every client (one process), since the
    checker compares invocations and completions of different clients in real time. An
    operation still pending when :meth:`history` is taken is recorded as ``unknown``: the
    client may have been cut off while the cluster applied it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ops: list[_Pending] = []
        self._outstanding: dict[int, int] = {}  # process -> id of its pending operation
        self._iterations: list[Iteration] = []

    def invoke(self, process: int, kind: str, channel: str, value: Any = None) -> int:
        """Record the start of an operation; returns the id to pass to :meth:`complete`.

        Raises ValueError when ``process`` still has an operation pending: a process is
        sequential, and the checker relies on nothing else, but a harness that overlaps
        them has a bug worth hearing about.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown operation kind {kind!r}")
        value = freeze(value)
        with self._lock:
            if process in self._outstanding:
                raise ValueError(
                    f"process {process} invoked {kind} while operation "
                    f"{self._outstanding[process]} is still pending"
                )
            op_id = len(self._ops)
            self._ops.append(_Pending(process, kind, channel, value, self._clock()))
            self._outstanding[process] = op_id
        return op_id

    def complete(self, op_id: int, outcome: str, result: Any = None) -> None:
        """Record how operation ``op_id`` ended (see :data:`OUTCOMES`).

        An ``unknown`` outcome is stored without a completion time: the operation may yet
        take effect (a retry in flight), so only its invocation bounds it.
        """
        now = self._clock()
        with self._lock:
            pending = self._ops[op_id]
            if pending.done is not None:
                raise ValueError(f"operation {op_id} completed twice")
            pending.done = Operation(
                process=pending.process,
                kind=pending.kind,
                channel=pending.channel,
                value=pending.value,
                invoke=pending.invoke,
                complete=None if outcome == "unknown" else now,
                outcome=outcome,
                result=None if outcome != "ok" else result,
            )
            del self._outstanding[pending.process]

    def record_iteration(
        self,
        process: int,
        channel: str,
        start: int,
        items: Sequence[tuple[int, Any]],
        ended: bool,
    ) -> None:
        """Record what one reader's iteration over ``channel`` saw (see :class:`Iteration`)."""
        iteration = Iteration(process, channel, start, tuple(items), ended)
        with self._lock:
            self._iterations.append(iteration)

    def history(self) -> History:
        """A snapshot of everything recorded so far; pending operations count as unknown."""
        with self._lock:
            ops = [
                pending.done
                if pending.done is not None
                else Operation(
                    pending.process,
                    pending.kind,
                    pending.channel,
                    pending.value,
                    pending.invoke,
                    None,
                    "unknown",
                    None,
                )
                for pending in self._ops
            ]
            return History(ops, self._iterations)
