"""The channel state machine: the one place that decides what a channel is.

Every node applies the same commands in the same order and must end in the same state,
so this module is pure: no clock, no randomness, no I/O, no threads. :meth:`ChannelState.apply`
never raises on any input (an exception inside pysyncobj's apply loop halts every node);
bad commands yield error results and change nothing.

A command is the msgpack encoding of::

    {"v": 1, "lim": [max_channels, max_sessions], "ops": [op, ...]}

The leader's group commit puts every operation that arrived in one tick into one command.
The limits travel inside the command, so nodes configured differently still agree. An
empty ``ops`` list is a read barrier: applying it proves the leader still led when the
entry committed. Operations:

- ``["open", channel, maxlen]`` create if missing; set maxlen (``None`` = unbounded).
- ``["append", channel, session, seq, [item, ...]]`` append items with sequence numbers
  ``seq, seq+1, ...``; items already applied for that session answer their first index.
  An append refused by the channel (``channel_not_found``, ``channel_stopped``) still
  consumes its sequence numbers, so the session's next append is not a gap; a retry of a
  refused range answers the same refusal again, never a silent duplicate.
- ``["stop", channel]`` set the stop marker (idempotent).
- ``["delete", channel]`` remove the channel and its items.
- ``["end_session", session]`` forget a session's de-duplication record.
- ``["node", name, raft_address, client_address]`` record a node's client address, so any
  node can point a client at the leader.

Results (one per op) are dicts: ``{"ok": True, ...}`` or
``{"ok": False, "code": CODE, "message": STR, "details": {...}}`` with codes from
:mod:`raftchan.errors`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

COMMAND_VERSION = 1
SNAPSHOT_VERSION = 1

#: How many recent append ranges (applied or refused) a session remembers with their
#: outcome. A retry of an older range is still recognised as a repeat (by its sequence
#: number), but answers ``None`` for its indexes.
SESSION_RANGES = 64

Result = dict[str, Any]


def ok(**fields: Any) -> Result:
    return {"ok": True, **fields}


def error(code: str, message: str, **details: Any) -> Result:
    return {"ok": False, "code": code, "message": message, "details": details}


@dataclass
class Channel:
    """One channel's retained items, by absolute index.

    ``items[offset:]`` are the retained items; the first of them has index ``first``.
    Trimming advances ``offset`` and compacts the list only when half of it is dead, so
    trimming one item per append stays O(1) amortised.
    """

    maxlen: int | None = None
    stopped: bool = False
    first: int = 0
    items: list[bytes] = field(default_factory=list)
    offset: int = 0

    @property
    def next(self) -> int:
        return self.first + len(self.items) - self.offset

    def __len__(self) -> int:
        return len(self.items) - self.offset

    def slice(self, start: int, end: int) -> list[bytes]:
        """Items with indexes in ``[start, end)``, clamped to what is retained."""
        start = max(start, self.first)
        end = min(end, self.next)
        if end <= start:
            return []
        base = self.offset - self.first
        return self.items[start + base : end + base]

    def extend(self, items: list[bytes]) -> int:
        """Append items, trim to maxlen; return the index of the first appended."""
        index = self.next
        self.items.extend(items)
        self.trim()
        return index

    def trim(self) -> int:
        """Drop the oldest items beyond maxlen; return how many were dropped."""
        if self.maxlen is None or len(self) <= self.maxlen:
            return 0
        dropped = len(self) - self.maxlen
        self.offset += dropped
        self.first += dropped
        if self.offset > len(self.items) // 2:
            del self.items[: self.offset]
            self.offset = 0
        return dropped


@dataclass
class Session:
    """What the state remembers of one client session for de-duplication.

    ``last_seq`` is the highest sequence number decided (applied or refused); ``ranges``
    the most recent appends as ``(first_seq, count, channel, first_index, refused)`` where
    ``refused`` is ``None`` for applied items and the refusal code otherwise (then
    ``first_index`` is ``None``).
    """

    last_seq: int = 0
    ranges: deque[tuple[int, int, str, int | None, str | None]] = field(
        default_factory=lambda: deque(maxlen=SESSION_RANGES)
    )

    def indexes_of(self, seq: int, count: int) -> list[int | None]:
        """Indexes of already-applied items ``seq .. seq+count-1`` (``None`` if forgotten)."""
        found: list[int | None] = [None] * count
        for first_seq, n, _channel, first_index, refused in self.ranges:
            if refused is not None or first_index is None:
                continue
            lo = max(first_seq, seq)
            hi = min(first_seq + n, seq + count)
            for s in range(lo, hi):
                found[s - seq] = first_index + (s - first_seq)
        return found

    def refusal_in(self, seq: int, count: int) -> tuple[str, str] | None:
        """``(code, channel)`` of the earliest remembered refusal among ``seq .. seq+count-1``."""
        for first_seq, n, channel, _first_index, refused in self.ranges:
            if refused is not None and first_seq < seq + count and seq < first_seq + n:
                return refused, channel
        return None

    def refuse(self, seq: int, count: int, channel: str, code: str) -> None:
        """Record ``seq .. seq+count-1`` as refused with ``code`` (they are decided now)."""
        self.last_seq = max(self.last_seq, seq + count - 1)
        if self.ranges:
            last = self.ranges[-1]
            if last[4] == code and last[2] == channel and last[0] + last[1] == seq:
                # A client hammering a stopped channel should not push out applied ranges.
                self.ranges[-1] = (last[0], last[1] + count, channel, None, code)
                return
        self.ranges.append((seq, count, channel, None, code))


@dataclass(frozen=True)
class NodeRecord:
    name: str
    raft_address: str
    client_address: str


class ChannelState:
    """All channels, sessions and node records of a cluster; see the module docstring."""

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}
        self.sessions: OrderedDict[bytes, Session] = OrderedDict()
        self.nodes: dict[str, NodeRecord] = {}
        #: Number of commands applied so far; equal on every node at the same log point.
        self.position = 0
        self._ops: dict[str, Callable[..., Result]] = {
            "open": self._open,
            "append": self._append,
            "stop": self._stop,
            "delete": self._delete,
            "end_session": self._end_session,
            "node": self._node,
        }
        self._limits = (10_000, 10_000)

    # -- commands ------------------------------------------------------------------------

    def apply(self, command: bytes) -> list[Result]:
        """Apply one encoded command; return one result per op (never raises)."""
        self.position += 1
        try:
            decoded = msgpack.unpackb(command, raw=False)
        except Exception:
            return [error("invalid_request", "command is not valid msgpack")]
        if not isinstance(decoded, dict) or decoded.get("v") != COMMAND_VERSION:
            return [error("invalid_request", "command has an unknown version")]
        ops = decoded.get("ops")
        limits = decoded.get("lim")
        if not isinstance(ops, list):
            return [error("invalid_request", "command has no list of ops")]
        if (
            isinstance(limits, list)
            and len(limits) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in limits)
        ):
            self._limits = (limits[0], limits[1])
        return [self._apply_op(op) for op in ops]

    def _apply_op(self, op: Any) -> Result:
        if not isinstance(op, list) or not op or not isinstance(op[0], str):
            return error("invalid_request", "op must be a list starting with its name")
        handler = self._ops.get(op[0])
        if handler is None:
            return error("invalid_request", f"unknown op {op[0]!r}")
        try:
            return handler(*op[1:])
        except TypeError:
            # Wrong arity or argument types: every node fails the same way, before mutating.
            return error("invalid_request", f"malformed {op[0]!r} op")

    def _open(self, name: str, maxlen: int | None) -> Result:
        if not _is_name(name) or not _is_maxlen(maxlen):
            return error("invalid_request", "open needs a channel name and a maxlen")
        channel = self.channels.get(name)
        if channel is None:
            if len(self.channels) >= self._limits[0]:
                return error(
                    "limit_exceeded",
                    f"the cluster already holds max_channels={self._limits[0]} channels",
                    limit="max_channels",
                    size=len(self.channels) + 1,
                )
            channel = self.channels[name] = Channel(maxlen=maxlen)
        else:
            channel.maxlen = maxlen
            channel.trim()
        return ok(**self.info(name))

    def _append(self, name: str, session_id: bytes, seq: int, items: list[bytes]) -> Result:
        if (
            not _is_name(name)
            or not isinstance(session_id, bytes)
            or not _is_count(seq)
            or seq < 1
            or not isinstance(items, list)
            or not items
            or not all(isinstance(item, bytes) for item in items)
        ):
            return error("invalid_request", "malformed append op")
        session = self.sessions.get(session_id)
        if session is None:
            if seq != 1:
                # The session was forgotten (LRU) or never existed: we cannot tell whether
                # these items were applied before, so refuse rather than risk a duplicate.
                return error(
                    "commit_unknown",
                    "session unknown to the cluster (expired); outcome of earlier appends "
                    "cannot be determined",
                    session_expired=True,
                )
            session = Session()
        count = len(items)
        if seq + count - 1 <= session.last_seq:
            # A retry of a decided range: answer what was decided, change nothing.
            self._touch(session_id, session)
            refused = session.refusal_in(seq, count)
            if refused is not None:
                return _refusal(*refused)
            return ok(indexes=session.indexes_of(seq, count), duplicate=True)
        if seq > session.last_seq + 1:
            # An earlier append of this session is missing: applying this one would reorder.
            return error(
                "commit_unknown",
                f"sequence gap: expected {session.last_seq + 1}, got {seq}",
                expected=session.last_seq + 1,
            )
        skip = session.last_seq + 1 - seq
        channel = self.channels.get(name)
        # A refused append consumes its sequence numbers: the client moves on to seq+count,
        # which must not then look like a gap. If the already-decided prefix of a retry was
        # refused, the whole request gets that same answer.
        refused = session.refusal_in(seq, skip) if skip else None
        if refused is not None or channel is None or channel.stopped:
            if refused is None:
                refused = ("channel_not_found" if channel is None else "channel_stopped", name)
            session.refuse(seq + skip, count - skip, name, refused[0])
            self._touch(session_id, session)
            return _refusal(*refused)
        indexes = session.indexes_of(seq, skip) if skip else []
        first_index = channel.extend(items[skip:])
        applied = count - skip
        session.last_seq = seq + count - 1
        session.ranges.append((seq + skip, applied, name, first_index, None))
        self._touch(session_id, session)
        indexes.extend(range(first_index, first_index + applied))
        return ok(indexes=indexes, duplicate=False)

    def _touch(self, session_id: bytes, session: Session) -> None:
        self.sessions[session_id] = session
        self.sessions.move_to_end(session_id)
        while len(self.sessions) > self._limits[1]:
            self.sessions.popitem(last=False)

    def _stop(self, name: str) -> Result:
        if not _is_name(name):
            return error("invalid_request", "stop needs a channel name")
        channel = self.channels.get(name)
        if channel is None:
            return error("channel_not_found", f"channel {name!r} does not exist", channel=name)
        channel.stopped = True
        return ok(**self.info(name))

    def _delete(self, name: str) -> Result:
        if not _is_name(name):
            return error("invalid_request", "delete needs a channel name")
        if self.channels.pop(name, None) is None:
            return error("channel_not_found", f"channel {name!r} does not exist", channel=name)
        return ok()

    def _end_session(self, session_id: bytes) -> Result:
        if not isinstance(session_id, bytes):
            return error("invalid_request", "end_session needs a session id")
        self.sessions.pop(session_id, None)
        return ok()

    def _node(self, name: str, raft_address: str, client_address: str) -> Result:
        if not all(isinstance(x, str) and x for x in (name, raft_address, client_address)):
            return error("invalid_request", "node needs name, raft and client addresses")
        self.nodes[raft_address] = NodeRecord(name, raft_address, client_address)
        return ok()

    # -- queries (callers hold the replica's state lock) -------------------------------------

    def info(self, name: str) -> dict[str, Any]:
        """ChannelInfo fields of an existing channel (KeyError if missing)."""
        channel = self.channels[name]
        return {
            "channel": name,
            "first": channel.first,
            "next": channel.next,
            "stopped": channel.stopped,
            "maxlen": channel.maxlen,
            "position": self.position,
        }

    def read(self, name: str, start: int | None, end: int | None, limit: int) -> Result:
        """ReadResult fields for ``[start, end)``, at most ``limit`` items.

        Errors: ``channel_not_found``; ``trimmed_gap`` when ``start`` is below the oldest
        retained index (the reader would silently skip items otherwise).
        """
        channel = self.channels.get(name)
        if channel is None:
            return error("channel_not_found", f"channel {name!r} does not exist", channel=name)
        if start is None:
            start = channel.first
        elif start < channel.first:
            return error(
                "trimmed_gap",
                f"items {start}..{channel.first - 1} of channel {name!r} were trimmed "
                f"(maxlen={channel.maxlen}); the oldest retained index is {channel.first}",
                channel=name,
                requested=start,
                first=channel.first,
            )
        stop = channel.next if end is None else min(end, channel.next)
        stop = min(stop, start + limit)
        return ok(
            channel=name,
            first=start,
            items=channel.slice(start, stop),
            next=channel.next,
            stopped=channel.stopped,
            position=self.position,
        )

    # -- snapshots ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state as msgpack bytes (the snapshot payload)."""
        return msgpack.packb(
            {
                "v": SNAPSHOT_VERSION,
                "position": self.position,
                "limits": list(self._limits),
                "channels": {
                    name: [c.maxlen, c.stopped, c.first, c.items[c.offset :]]
                    for name, c in self.channels.items()
                },
                "sessions": [
                    [sid, s.last_seq, [list(r) for r in s.ranges]]
                    for sid, s in self.sessions.items()
                ],
                "nodes": [[n.name, n.raft_address, n.client_address] for n in self.nodes.values()],
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ChannelState:
        """Rebuild a state from :meth:`to_bytes` output (ValueError if it is not one)."""
        decoded = msgpack.unpackb(data, raw=False)
        if not isinstance(decoded, dict) or decoded.get("v") != SNAPSHOT_VERSION:
            raise ValueError("not a raftchan state snapshot of a known version")
        state = cls()
        state.position = decoded["position"]
        state._limits = tuple(decoded["limits"])
        for name, (maxlen, stopped, first, items) in decoded["channels"].items():
            state.channels[name] = Channel(maxlen=maxlen, stopped=stopped, first=first, items=items)
        for sid, last_seq, ranges in decoded["sessions"]:
            session = Session(last_seq=last_seq)
            for r in ranges:
                # Four-field ranges (applied only) predate refused ranges.
                first_seq, count, channel, first_index, *refused = r
                session.ranges.append(
                    (first_seq, count, channel, first_index, refused[0] if refused else None)
                )
            state.sessions[sid] = session
        for name, raft_address, client_address in decoded["nodes"]:
            state.nodes[raft_address] = NodeRecord(name, raft_address, client_address)
        return state


def encode_command(ops: list[list[Any]], max_channels: int, max_sessions: int) -> bytes:
    """Encode ops as one command (the leader's group commit calls this once per tick)."""
    return msgpack.packb(
        {"v": COMMAND_VERSION, "lim": [max_channels, max_sessions], "ops": ops},
        use_bin_type=True,
    )


def _refusal(code: str, name: str) -> Result:
    """The error result of an append the channel's rules turned down."""
    if code == "channel_stopped":
        return error(code, f"channel {name!r} is stopped", channel=name)
    return error(code, f"channel {name!r} does not exist", channel=name)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_maxlen(value: Any) -> bool:
    return value is None or (_is_count(value) and value > 0)
