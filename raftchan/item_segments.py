"""Snapshots that write only the items added since the last one: segment files.

A snapshot used to hold the whole state, and every snapshot wrote all of it again. A
state that grows is then written over and over (with snapshots due once the log holds
half the last one, each item about three times on each node), and every node's disk and
CPU went to it while appends waited: 4 KiB items at 64 producers did about 22% fewer
appends per second with snapshots than with none.

Items are only ever appended to a channel; trimming and deleting drop them, nothing
changes one. So a node keeps the items its earlier snapshots wrote in *segment files*
beside the snapshot (``raft.snapshot.seg-<n>``, never changed once written), and each
snapshot writes one new segment with the items added since, plus the snapshot file
itself with everything else (channel fields, sessions, members) and, for each channel,
the *runs* of segments that hold its items: ``[segment, offset, length, count, start]``,
``length`` bytes at ``offset`` of the segment's table entry ``segment``, one msgpack
array of ``count`` items, the first with absolute index ``start``. Items of a run below
the channel's first retained index are skipped when it is loaded.

Space comes back as runs stop holding retained items: a segment no run refers to any
more is removed once the snapshot that dropped it is in place. When less than half of a
segment's bytes are still referred to (a deleted channel, items trimmed away), the
channels with runs in it are written whole into the new segment, and at most
:data:`MAX_SEGMENTS` are kept (beyond that every channel is written whole again).

A snapshot received from the leader has its segments embedded in its own file (see
raftchan.snapshot): after installing it a node writes every channel whole in its next
snapshot, and its own segment files are removed.

:class:`SegmentBook` keeps this node's record (in pysyncobj's thread):
:meth:`~SegmentBook.capture` takes what a snapshot needs, :meth:`Capture.write` writes
it (on the writer's thread), :meth:`~SegmentBook.adopt` records it once it is in place.
:func:`load_state` reads a snapshot's state, runs resolved.
"""

from __future__ import annotations

import contextlib
import os
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from raftchan import retired_files
from raftchan import snapshot as snapshot_module
from raftchan.packing import packb_in_pieces
from raftchan.snapshot import Entry, Segment, Snapshot, SnapshotCorrupt, fsync_directory
from raftchan.state import SNAPSHOT_VERSION, Channel, ChannelState

__all__ = [
    "MAX_SEGMENTS",
    "RUNS_VERSION",
    "SEGMENT_MARK",
    "Capture",
    "Run",
    "SegmentBook",
    "load_state",
]

#: A segment file is named ``<snapshot file name><SEGMENT_MARK><number>``.
SEGMENT_MARK = ".seg-"
#: Segments a snapshot may refer to before every channel is written whole again.
MAX_SEGMENTS = 32
#: The ``"v"`` of a snapshot state whose channels hold runs instead of items.
RUNS_VERSION = 3


@dataclass(frozen=True)
class Run:
    """``count`` items, the first with index ``start``, encoded as one msgpack array in
    ``length`` bytes at ``offset`` of segment file ``segment``."""

    segment: str
    offset: int
    length: int
    count: int
    start: int

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass
class _Held:
    """A channel's items this node holds in segments: indexes ``runs[0].start`` (or
    ``end`` when there are none) to ``end``."""

    #: Weak: a deleted channel's items must not stay in memory until the next snapshot.
    channel: weakref.ref[Channel]
    runs: list[Run]
    end: int


@dataclass
class Capture:
    """What one snapshot writes, taken in pysyncobj's thread; :meth:`write` writes it."""

    last_entry: Entry
    prev_entry: Entry
    node_ids: list[str]
    #: The state's fields, each channel's items only from its new run's start.
    fields: dict[str, Any]
    #: Per channel: the object, the runs kept, where the new items start, and the end.
    channels: dict[str, tuple[Channel, list[Run], int, int]]
    segments: dict[str, Segment]
    new_segment: str
    generation: int
    #: Filled in by :meth:`write`: every channel's runs, the segment table, new bytes.
    runs: dict[str, list[Run]] = field(default_factory=dict)
    table: list[Segment] = field(default_factory=list)
    new_bytes: int = 0

    def write(self, path: str) -> None:
        """Write the new segment (if any item is new), then the snapshot at ``path``,
        each synced. On failure the new segment is removed again."""
        directory = os.path.dirname(os.path.abspath(path))
        segment_path = os.path.join(directory, self.new_segment)
        new_runs: dict[str, Run] = {}
        try:
            if any(fields[3] for fields in self.fields["channels"].values()):
                new_runs = self._write_segment(segment_path)
            self._write_snapshot(path, new_runs)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(segment_path)
            raise

    def _write_segment(self, segment_path: str) -> dict[str, Run]:
        runs: dict[str, Run] = {}
        crc = offset = 0
        with open(segment_path, "wb") as f:
            for name, fields in self.fields["channels"].items():
                items = fields[3]
                if not items:
                    continue
                crc, length = snapshot_module.write_synced(f, packb_in_pieces(items), crc)
                start = self.channels[name][2]
                runs[name] = Run(self.new_segment, offset, length, len(items), start)
                offset += length
            f.flush()
            os.fdatasync(f.fileno())
        # The segment's name on disk before a snapshot that needs it is renamed into place.
        fsync_directory(os.path.dirname(segment_path))
        self.new_bytes = offset
        self.segments = {**self.segments, self.new_segment: Segment(self.new_segment, offset, crc)}
        return runs

    def _write_snapshot(self, path: str, new_runs: dict[str, Run]) -> None:
        used: dict[str, int] = {}
        channels: dict[str, Any] = {}
        for name, fields in self.fields["channels"].items():
            runs = list(self.channels[name][1])
            if name in new_runs:
                runs.append(new_runs[name])
            self.runs[name] = runs
            refs = []
            for run in runs:
                index = used.setdefault(run.segment, len(used))
                refs.append([index, run.offset, run.length, run.count, run.start])
            channels[name] = [*fields[:3], refs, *fields[4:]]
        self.table = [self.segments[name] for name in used]
        state = {**self.fields, "v": RUNS_VERSION, "channels": channels}
        snapshot_module.write_snapshot(
            path,
            self.last_entry,
            self.prev_entry,
            self.node_ids,
            packb_in_pieces(state),
            self.table,
        )


class SegmentBook:
    """This node's record of which items its snapshot holds in which segment files."""

    def __init__(self, snapshot_path: str) -> None:
        self._directory = os.path.dirname(os.path.abspath(snapshot_path))
        self._prefix = os.path.basename(snapshot_path) + SEGMENT_MARK
        self._held: dict[str, _Held] = {}
        #: The segments the snapshot in place refers to.
        self._segments: dict[str, Segment] = {}
        #: Counts :meth:`forget` calls: a capture taken before one is not adopted.
        self._generation = 0
        self._next_number = 1 + max(self._numbers_on_disk().values(), default=0)

    def capture(
        self,
        state: ChannelState,
        last_entry: Entry,
        prev_entry: Entry,
        node_ids: list[str],
    ) -> Capture:
        """What a snapshot of ``state`` writes. Call where nothing changes ``state``."""
        kept: dict[str, list[Run]] = {}
        live: dict[str, int] = {}
        for name, channel in state.channels.items():
            held = self._held.get(name)
            if held is None or held.channel() is not channel:
                continue  # new, or deleted and opened again: written whole
            runs = [run for run in held.runs if run.end > channel.first]
            kept[name] = runs
            for run in runs:
                # Only the share of the run still retained counts as used: a channel
                # trimmed down (a smaller maxlen) must not keep its old run alive whole.
                retained = run.end - max(run.start, channel.first)
                used = run.length * retained // run.count
                live[run.segment] = live.get(run.segment, 0) + used
        if len(live) >= MAX_SEGMENTS:
            sparse = set(live)
        else:
            sparse = {
                name
                for name, used in live.items()
                if name not in self._segments or 2 * used < self._segments[name].size
            }
        items_from: dict[str, int] = {}
        for name, runs in kept.items():
            if not any(run.segment in sparse for run in runs):
                items_from[name] = self._held[name].end
        channels = {}
        for name, channel in state.channels.items():
            start = max(items_from.get(name, channel.first), channel.first)
            runs = kept[name] if name in items_from else []
            channels[name] = (channel, runs, start, channel.next)
        number = self._next_number
        self._next_number += 1
        return Capture(
            last_entry=last_entry,
            prev_entry=prev_entry,
            node_ids=node_ids,
            fields=state.snapshot_fields(items_from),
            channels=channels,
            segments=dict(self._segments),
            new_segment=f"{self._prefix}{number}",
            generation=self._generation,
        )

    def adopt(self, capture: Capture) -> None:
        """``capture`` was written and is the snapshot in place now; segments no longer
        referred to are removed (gradually, see raftchan.retired_files). A capture taken
        before :meth:`forget` is ignored."""
        if capture.generation != self._generation:
            return
        self._held = {
            name: _Held(weakref.ref(channel), capture.runs.get(name, []), end)
            for name, (channel, _runs, _start, end) in capture.channels.items()
        }
        self._segments = {segment.name: segment for segment in capture.table}
        self.remove_unused()

    def restart(self, snapshot: Snapshot, runs: dict[str, list[Run]], state: ChannelState) -> None:
        """The node started from ``snapshot`` (its state ``state``, its channels' ``runs``
        from :func:`load_state`): its own segments carry on from there."""
        self._held = {}
        self._segments = {}
        if snapshot.embedded_at is None:
            self._segments = {segment.name: segment for segment in snapshot.segments}
            for name, channel in state.channels.items():
                channel_runs = runs.get(name, [])
                end = channel_runs[-1].end if channel_runs else channel.first
                if end == channel.next:
                    self._held[name] = _Held(weakref.ref(channel), channel_runs, end)
        self.remove_unused()

    def forget(self) -> None:
        """A snapshot from elsewhere (embedded segments) replaced this node's: its own
        segments are no longer used, and every channel is written whole next time."""
        self._generation += 1
        self._held = {}
        self._segments = {}
        self.remove_unused()

    def remove_unused(self) -> None:
        """Remove the segment files in the folder that the snapshot in place does not
        refer to (older ones, and a write cut short by a crash)."""
        for name in self._numbers_on_disk():
            if name not in self._segments:
                retired_files.remove_gradually(os.path.join(self._directory, name))

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    def _numbers_on_disk(self) -> dict[str, int]:
        pattern = re.compile(re.escape(self._prefix) + r"([0-9]+)")
        found = {}
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self._directory):
                match = pattern.fullmatch(name)
                if match:
                    found[name] = int(match.group(1))
        return found


def load_state(snapshot_path: str, snapshot: Snapshot) -> tuple[ChannelState, dict[str, list[Run]]]:
    """The state of a verified ``snapshot`` read from ``snapshot_path``, and each
    channel's runs (empty for a state that holds its items inline). ValueError (or
    :class:`SnapshotCorrupt`) when the state does not decode or a run does not fit."""
    decoded = msgpack.unpackb(snapshot.state, raw=False)
    runs: dict[str, list[Run]] = {}
    if isinstance(decoded, dict) and decoded.get("v") == RUNS_VERSION:
        with _SegmentReader(snapshot_path, snapshot) as reader:
            for name, fields in decoded["channels"].items():
                channel_runs = _decode_runs(fields[3], snapshot.segments, name)
                fields[3] = _items_of(channel_runs, reader, fields[2], name)
                runs[name] = channel_runs
        decoded["v"] = SNAPSHOT_VERSION
    return ChannelState.from_fields(decoded), runs


def _decode_runs(raw: Any, segments: Sequence[Segment], channel: str) -> list[Run]:
    if not isinstance(raw, list):
        raise SnapshotCorrupt(f"channel {channel!r}: its runs are not a list")
    runs: list[Run] = []
    for ref in raw:
        if (
            not isinstance(ref, list)
            or len(ref) != 5
            or not all(isinstance(n, int) and n >= 0 for n in ref)
            or ref[0] >= len(segments)
            or ref[1] + ref[2] > segments[ref[0]].size
        ):
            raise SnapshotCorrupt(f"channel {channel!r} has a malformed run: {ref!r:.200}")
        index, offset, length, count, start = ref
        if runs and runs[-1].end != start:
            raise SnapshotCorrupt(f"channel {channel!r}: its runs are not contiguous")
        runs.append(Run(segments[index].name, offset, length, count, start))
    return runs


def _items_of(runs: list[Run], reader: _SegmentReader, first: Any, channel: str) -> list[bytes]:
    items: list[bytes] = []
    for run in runs:
        decoded = msgpack.unpackb(reader.read(run), raw=False)
        if not isinstance(decoded, list) or len(decoded) != run.count:
            raise SnapshotCorrupt(f"channel {channel!r}: a run does not hold {run.count} items")
        items.extend(decoded)
    if not runs:
        return items
    if not isinstance(first, int) or not runs[0].start <= first <= runs[-1].end:
        raise SnapshotCorrupt(f"channel {channel!r}: its first index is outside its runs")
    return items[first - runs[0].start :]


class _SegmentReader:
    """Reads runs from a snapshot's segments, each file opened once."""

    def __init__(self, snapshot_path: str, snapshot: Snapshot) -> None:
        self._places = {
            segment.name: snapshot.segment_location(snapshot_path, i)
            for i, segment in enumerate(snapshot.segments)
        }
        self._fds: dict[str, int] = {}

    def read(self, run: Run) -> bytes:
        path, base = self._places[run.segment]
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, run.length, base + run.offset)
        if len(data) != run.length:
            raise SnapshotCorrupt(f"segment {run.segment!r} ends inside a run")
        return data

    def __enter__(self) -> _SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
