"""The nemesis: faults injected into a running :class:`~cluster.harness.LocalCluster`.

A fault schedule is drawn up front (by Hypothesis in the fault suite) as a list of
:class:`FaultEvent`; :class:`Nemesis` plays it one event at a time: wait ``gap`` seconds,
inject the fault, hold it ``duration`` seconds, heal it. Events never overlap, so a
shrunk failing schedule reads as a plain story ("isolate the leader for 3 s, then kill
node 2 for 1 s").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cluster.harness import LocalCluster

logger = logging.getLogger(__name__)

#: Every kind of fault, and what it does to a cluster of ``n`` nodes:
#:
#: - ``kill_leader``: SIGKILL the leader; restart it (same data folder) when healed.
#: - ``kill_node``: SIGKILL node ``target % n``; restart it when healed.
#: - ``pause_leader``: SIGSTOP the leader (it keeps its sockets and believes it leads);
#:   SIGCONT when healed.
#: - ``partition_minority``: cut a minority (``target`` picks which) off from the rest.
#: - ``isolate_leader``: cut the leader off from every other node; clients still reach
#:   it, so a leader that served reads without confirming its leadership would serve
#:   stale ones.
#: - ``bridge``: split the other nodes into two sides that cannot hear each other while
#:   node ``target`` still hears both (with 3 nodes: two nodes lose only each other).
#: - ``kill_all``: SIGKILL every node at once (acknowledged writes just happened: the
#:   workload keeps writing), restart them all when healed.
FAULT_KINDS = (
    "kill_leader",
    "kill_node",
    "pause_leader",
    "partition_minority",
    "isolate_leader",
    "bridge",
    "kill_all",
)

#: Faults aimed at the leader; they wait up to LEADER_WAIT seconds for one to be agreed.
LEADER_FAULTS = frozenset({"kill_leader", "pause_leader", "isolate_leader"})
LEADER_WAIT = 15.0

#: Faults that need the nodes' fault hook (``LocalCluster(fault_injection=True)``).
NETWORK_FAULTS = frozenset({"partition_minority", "isolate_leader", "bridge"})


@dataclass(frozen=True)
class FaultEvent:
    """One fault: after ``gap`` seconds, inject ``kind`` and heal it ``duration`` s later."""

    kind: str
    gap: float
    duration: float
    target: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.gap < 0 or self.duration < 0:
            raise ValueError("fault times must not be negative")


@dataclass
class Injected:
    """What the nemesis actually did for one event (written into the run's report)."""

    kind: str
    nodes: list[str]
    started: float
    healed: float | None = None
    note: str = ""


class Nemesis:
    """Plays a fault schedule against ``cluster`` in a thread of its own.

    Args:
        cluster: the cluster to break; network faults need ``fault_injection=True``.
        clock: the clock the history uses, so injected faults line up with operations.
        ready_timeout: bounds each wait for the cluster after a heal (a restart).
    """

    def __init__(
        self,
        cluster: LocalCluster,
        clock: Callable[[], float] = time.monotonic,
        ready_timeout: float = 60.0,
    ) -> None:
        self.cluster = cluster
        self.clock = clock
        self.ready_timeout = ready_timeout
        self.injected: list[Injected] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, schedule: Sequence[FaultEvent]) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(list(schedule),), name="nemesis", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Cut the schedule short (the fault in progress is healed) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def join(self, timeout: float) -> bool:
        """Wait for the schedule to finish; True if it did within ``timeout``."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self, schedule: list[FaultEvent]) -> None:
        try:
            for event in schedule:
                if self._stop.wait(event.gap):
                    return
                heal = self._inject(event)
                try:
                    self._stop.wait(event.duration)
                finally:
                    heal()
                    self.injected[-1].healed = self.clock()
        except BaseException as exc:  # reported by the runner, which then fails the run
            logger.exception("the nemesis failed")
            self.error = exc

    def _inject(self, event: FaultEvent) -> Callable[[], None]:
        cluster = self.cluster
        n = cluster.size
        leader = cluster.leader()
        deadline = time.monotonic() + LEADER_WAIT
        while leader is None and event.kind in LEADER_FAULTS and time.monotonic() < deadline:
            time.sleep(0.1)  # an election from the previous fault may still be running
            leader = cluster.leader()
        record = Injected(event.kind, [], self.clock())
        self.injected.append(record)

        def named(indexes: Sequence[int]) -> list[str]:
            return [cluster.names[i] for i in indexes]

        if event.kind in LEADER_FAULTS and leader is None:
            record.note = "no agreed leader at that moment: the fault hit a random node"
            leader = event.target % n
        target = leader if event.kind in LEADER_FAULTS else event.target % n
        if event.kind != "kill_all" and target is not None and not cluster.is_running(target):
            # Every earlier fault was healed, so a node that is down now exited by itself.
            raise RuntimeError(
                f"node {cluster.names[target]} is not running before {event.kind}: it exited "
                "by itself (its log says why)"
            )
        if event.kind in ("kill_leader", "kill_node"):
            victim = leader if event.kind == "kill_leader" else event.target % n
            assert victim is not None
            record.nodes = named([victim])
            cluster.kill(victim)
            return lambda: cluster.restart(victim)
        if event.kind == "pause_leader":
            assert leader is not None
            paused = leader
            record.nodes = named([paused])
            cluster.pause(paused)
            return lambda: cluster.resume(paused)
        if event.kind == "partition_minority":
            size = (n - 1) // 2
            minority = [(event.target + k) % n for k in range(size)]
            record.nodes = named(minority)
            cluster.partition([minority])
            return cluster.heal
        if event.kind == "bridge":
            middle = event.target % n
            others = [i for i in range(n) if i != middle]
            left, right = others[: len(others) // 2], others[len(others) // 2 :]
            record.nodes = named([middle])
            cluster.bridge(left, right)
            return cluster.heal
        if event.kind == "isolate_leader":
            assert leader is not None
            record.nodes = named([leader])
            cluster.isolate(leader)
            return cluster.heal
        # kill_all
        record.nodes = list(cluster.names)
        cluster.kill_all()

        def restart_all() -> None:
            cluster.start()

        return restart_all


def heal_everything(cluster: LocalCluster, ready_timeout: float) -> None:
    """Undo every fault: heal partitions, resume paused nodes, start killed ones, and
    wait until the cluster has a leader that every node follows."""
    if cluster.fault_injection:
        cluster.heal()
    for i, node in enumerate(cluster.nodes):
        if node.running and node.paused:
            cluster.resume(i)
    cluster.start()
    cluster.wait_ready(timeout=ready_timeout)


def describe(schedule: Sequence[FaultEvent]) -> list[dict[str, Any]]:
    """The schedule as plain data, for a run's report."""
    return [asdict(event) for event in schedule]
