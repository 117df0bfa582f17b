"""The fault suite: concurrent clients against a real cluster under faults, then checked.

Every run records a history (:mod:`cluster.history`), plays a fault schedule
(:mod:`cluster.nemesis`), heals, and is judged by :mod:`cluster.checker`: linearizable per
channel, nothing acknowledged lost, nothing stored twice, the same prefix on every node,
iterations gapless and ended by the stop, writes working again soon after healing.

- ``test_each_fault_kind``: every nemesis once, deterministically (the CI floor).
- ``test_drawn_schedules``: Hypothesis draws workloads and schedules (derandomized, a few
  examples); a failure is shrunk, and each failing run's evidence is saved.
- ``test_the_suite_catches_a_broken_build``: the same run against nodes that serve reads
  without the barrier must be reported as a violation, or the suite proves nothing.
- ``test_soak``: marked ``soak``, run by the command in the README: random seeds, five
  nodes, more clients, bounded by ``RAFTCHAN_SOAK_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from cluster.faultrun import RunReport, run_case
from cluster.harness import FAST_TUNING, LocalCluster
from cluster.nemesis import FAULT_KINDS, FaultEvent
from cluster.strategies import schedules, workloads
from cluster.workload import ClientPlan, Workload

#: Where failing runs leave their evidence (history, schedule, report, node logs).
ARTIFACTS = Path(os.environ.get("RAFTCHAN_FAULT_ARTIFACTS", "fault-artifacts")).resolve()
READY_TIMEOUT = 60.0


@contextmanager
def fresh_cluster(nodes: int = 3, **options: object) -> Iterator[LocalCluster]:
    """A new cluster in a folder of its own (Hypothesis examples cannot share tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="raftchan-faults-") as folder:
        base_dir = Path(folder) / "cluster"
        local = LocalCluster(nodes, base_dir=base_dir, fault_injection=True, **options)  # type: ignore[arg-type]
        try:
            local.start()
            local.wait_ready(timeout=READY_TIMEOUT)
            yield local
        finally:
            local.close()


def play(
    workload: Workload, schedule: Sequence[FaultEvent], nodes: int = 3, **options: object
) -> RunReport:
    with fresh_cluster(nodes, **options) as local:
        report = run_case(local, workload, schedule, artifacts_dir=ARTIFACTS)
    print(report.summary())
    return report


def mixed_workload(seed: int, clients: int = 4, ops: int = 50) -> Workload:
    rng = random.Random(seed)
    channels = ("ch0", "ch1")
    plans = []
    for process in range(clients):
        kinds = ("append", "append", "append", "read", "read", "len")
        plan = [(rng.choice(kinds), rng.choice(channels)) for _ in range(ops)]
        plans.append(ClientPlan(tuple(plan), home=process % 3))
    return Workload(channels, tuple(plans), pause=0.1)


def assert_clean(report: RunReport) -> None:
    assert report.ok, "\n".join([report.summary(), *report.violations[:20]])
    assert report.verdict == "ok"
    # A run in which nothing was acknowledged would pass every check and prove nothing.
    assert report.acknowledged_appends > 0 and report.ok_reads > 0, report.summary()


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_kind(kind: str) -> None:
    schedule = [FaultEvent(kind, gap=1.0, duration=2.5, target=1)]
    report = play(mixed_workload(seed=FAULT_KINDS.index(kind)), schedule)
    assert_clean(report)
    assert [fault["kind"] for fault in report.faults] == [kind]
    assert report.faults[0]["note"] == "", report.faults  # a leader fault hit the leader


@settings(
    max_examples=3,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(workload=workloads(max_ops=40), schedule=schedules(max_events=2))
def test_drawn_schedules(workload: Workload, schedule: list[FaultEvent]) -> None:
    assert_clean(play(workload, schedule))


def test_the_suite_catches_a_broken_build() -> None:
    """Nodes started with ``--unsafe-local-reads`` answer reads without a barrier: an
    isolated leader that still believes it leads serves stale reads to the clients that
    reach it. The run must be reported as a violation."""
    readers = tuple(
        ClientPlan(tuple(("read", "ch0") for _ in range(120)), home=i, pinned=True)
        for i in range(3)
    )
    writers = tuple(
        ClientPlan(tuple(("append", "ch0") for _ in range(120)), home=i) for i in (0, 1, 2)
    )
    workload = Workload(("ch0",), readers + writers, pause=0.1, op_timeout=10.0)
    # Keep the isolated leader believing in itself for the whole cut, long enough for
    # the majority to elect another leader and commit past it even on a loaded machine.
    tuning = dataclasses.replace(FAST_TUNING, leader_fallback_timeout=20.0)
    schedule = [FaultEvent("isolate_leader", gap=1.0, duration=8.0)]

    broken = play(workload, schedule, tuning=tuning, extra_args=["--unsafe-local-reads"])
    assert not broken.ok
    assert broken.verdict == "violation"
    assert any(v.startswith("reads_fresh: stale") for v in broken.violations)
    assert broken.artifacts is not None and (Path(broken.artifacts) / "history.json").exists()

    sound = play(workload, schedule, tuning=tuning)
    assert_clean(sound)


# ---------------------------------------------------------------------------------------
# Soak: .venv/bin/python -m pytest tests/faults -m soak -s  (RAFTCHAN_SOAK_SECONDS=600)

_SOAK_SECONDS = float(os.environ.get("RAFTCHAN_SOAK_SECONDS", "600"))
_soak_reports: list[RunReport] = []
_soak_end = 0.0


@pytest.fixture(scope="module")
def soak_summary() -> Iterator[list[RunReport]]:
    global _soak_end
    _soak_end = time.monotonic() + _SOAK_SECONDS
    started = time.monotonic()
    yield _soak_reports
    faults = sum(len(report.faults) for report in _soak_reports)
    print(
        "\nsoak summary: "
        f"{len(_soak_reports)} runs in {time.monotonic() - started:.0f} s, "
        f"{sum(r.operations for r in _soak_reports)} operations, {faults} faults, "
        f"{sum(r.unknown for r in _soak_reports)} unknown outcomes, "
        f"{sum(len(r.violations) for r in _soak_reports)} violations"
    )


@pytest.mark.soak
# One test function holds every soak run: give it the budget plus one run's worth.
@pytest.mark.timeout(_SOAK_SECONDS + 900)
@settings(
    max_examples=10_000, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(
    workload=workloads(max_clients=8, max_channels=3, max_ops=150, nodes=5),
    schedule=schedules(max_events=6),
)
def test_soak(
    soak_summary: list[RunReport], workload: Workload, schedule: list[FaultEvent]
) -> None:
    if time.monotonic() >= _soak_end:
        return  # the time budget is spent: the remaining examples are no-ops
    report = play(workload, schedule, nodes=5)
    soak_summary.append(report)
    assert_clean(report)
