"""Prometheus metrics of one node, in a registry of its own.

Two kinds of figures, kept apart so that the hot path pays almost nothing:

- **Read at scrape time** (:class:`NodeSample`): role, term, commit and applied index,
  readiness, channel and session counts, waiting long polls, pinned Dask futures. The
  node hands :class:`NodeMetrics` a function that builds one sample; a custom collector
  calls it once per scrape, so nothing is updated while nobody scrapes.
- **Updated as things happen**: appends committed (a counter), group-commit batch sizes,
  submit-to-applied latency and snapshot durations (histograms). Each update is one
  ``inc`` or ``observe`` per Raft command (not per item), or per snapshot.

Metric names (all prefixed ``raftchan_``) are listed in the README. The registry is not
the process-global one, so several nodes in one process (tests) never share figures.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from raftchan.state import Result

#: The Raft roles a node reports; ``raftchan_role`` has one series per role.
ROLES = ("follower", "candidate", "leader")

Submit = Callable[[bytes, float], "asyncio.Future[list[Result]]"]

# Bucket bounds. Ops per command grow with load (group commit); latencies span a fsync on
# a fast disk to a commit that waits out an election.
_BATCH_OPS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_BATCH_BYTES_BUCKETS = tuple(float(4**k) for k in range(3, 13))  # 64 B .. 16 MiB
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
_SNAPSHOT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class NodeSample:
    """One node's figures at one moment, as the health check and the scrape see them.

    ``leader_known`` is true when the node leads or heard from its leader within one
    election timeout (a remembered but silent leader does not count).
    """

    name: str
    client_address: str
    raft_address: str
    role: str
    term: int
    commit_index: int
    applied_index: int
    ready: bool
    leader_known: bool
    leader: str | None
    channels: int
    sessions: int
    waiting_polls: int
    pinned_futures: int


class NodeMetrics:
    """The metrics of one node; see the module docstring.

    Args:
        sample: builds a :class:`NodeSample`; called on every scrape, on the thread that
            renders (the node's event loop), so it must be quick and must not block.
        process: also export the standard ``process_*`` metrics (CPU, memory, open files)
            of this process.
    """

    def __init__(self, sample: Callable[[], NodeSample], *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SampleCollector(sample))
        if process:
            ProcessCollector(registry=self.registry)
        self.appends_committed = Counter(
            "raftchan_appends_committed",
            "Items appended through this node while it led; a retry the state answers as a "
            "duplicate is not counted again. rate() gives appends/s.",
            registry=self.registry,
        )
        self.batch_ops = Histogram(
            "raftchan_commit_batch_ops",
            "State-machine ops in one Raft command submitted by this node (group commit).",
            buckets=_BATCH_OPS_BUCKETS,
            registry=self.registry,
        )
        self.batch_bytes = Histogram(
            "raftchan_commit_batch_bytes",
            "Encoded size of one Raft command submitted by this node.",
            buckets=_BATCH_BYTES_BUCKETS,
            registry=self.registry,
        )
        self.apply_latency = Histogram(
            "raftchan_apply_latency_seconds",
            "From handing a command to Raft until this node applied it (commands that "
            "committed; failed or unknown outcomes are not observed).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.snapshot_duration = Histogram(
            "raftchan_snapshot_duration_seconds",
            "Time spent writing one snapshot (serializing the state and writing the file).",
            buckets=_SNAPSHOT_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def count_appends(self, items: int) -> None:
        """Count ``items`` newly committed appends."""
        if items > 0:
            self.appends_committed.inc(items)

    def observe_snapshot(self, seconds: float) -> None:
        """Record one snapshot write; safe from any thread (Raft's thread calls it)."""
        self.snapshot_duration.observe(seconds)

    def instrument_submit(self, submit: Submit, ops_submitted: Callable[[], int]) -> Submit:
        """Wrap the committer's submit function to observe batch sizes and apply latency.

        ``ops_submitted`` reads the committer's running total of ops submitted (zero until
        its first command), which it raises just before each call to submit, so the
        difference from the previous call is the number of ops in this command.
        """
        seen = 0

        def instrumented(command: bytes, timeout: float) -> asyncio.Future[list[Result]]:
            nonlocal seen
            total = ops_submitted()
            self.batch_ops.observe(total - seen)
            seen = total
            self.batch_bytes.observe(len(command))
            future = submit(command, timeout)
            future.add_done_callback(functools.partial(self._applied, time.perf_counter()))
            return future

        return instrumented

    def _applied(self, started: float, future: asyncio.Future[list[Result]]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.apply_latency.observe(time.perf_counter() - started)


class _SampleCollector(Collector):
    """Turns one :class:`NodeSample` per scrape into gauges."""

    def __init__(self, sample: Callable[[], NodeSample]) -> None:
        self._sample = sample

    def collect(self) -> Iterator[Metric]:
        s = self._sample()
        yield InfoMetricFamily(
            "raftchan_node",
            "This node's name and addresses.",
            value={
                "name": s.name,
                "client_address": s.client_address,
                "raft_address": s.raft_address,
            },
        )
        role = GaugeMetricFamily(
            "raftchan_role",
            "1 for this node's current Raft role, 0 for the others.",
            labels=["role"],
        )
        for name in ROLES:
            role.add_metric([name], 1.0 if s.role == name else 0.0)
        yield role
        gauges: tuple[tuple[str, str, float], ...] = (
            ("raftchan_term", "Current Raft term.", s.term),
            ("raftchan_commit_index", "Raft log index known to be committed.", s.commit_index),
            ("raftchan_applied_index", "Raft log index applied to the state.", s.applied_index),
            (
                "raftchan_ready",
                "1 once this node has applied what the leader had committed when it joined.",
                float(s.ready),
            ),
            (
                "raftchan_leader_known",
                "1 if this node leads or heard from its leader within an election timeout.",
                float(s.leader_known),
            ),
            ("raftchan_channels", "Channels in the replicated state.", s.channels),
            ("raftchan_sessions", "Client sessions remembered for de-duplication.", s.sessions),
            (
                "raftchan_waiting_polls",
                "Long polls (following readers) waiting on this node for new items.",
                s.waiting_polls,
            ),
            (
                "raftchan_pinned_futures",
                "Dask future keys the channels reference and keep pinned (lost ones not "
                "counted); 0 on a node without --dask-scheduler.",
                s.pinned_futures,
            ),
        )
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)
