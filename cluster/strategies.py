"""Hypothesis strategies for fault runs: workloads and fault schedules, drawn up front.

Everything a run does is drawn before it starts and never depends on the cluster's
answers, so Hypothesis can replay and shrink a failing run: fewer fault events, shorter
faults, fewer operations.
"""

from __future__ import annotations

from hypothesis import strategies as st

from cluster.nemesis import FAULT_KINDS, FaultEvent
from cluster.workload import ClientPlan, Workload


@st.composite
def workloads(
    draw: st.DrawFn,
    *,
    max_clients: int = 4,
    max_channels: int = 2,
    max_ops: int = 60,
    nodes: int = 3,
) -> Workload:
    """Several clients, each appending to, reading and measuring a few shared channels."""
    channels = tuple(f"ch{k}" for k in range(draw(st.integers(1, max_channels))))
    # Appends outnumber reads: the order is what is at stake, reads are what reveal it.
    kinds = st.sampled_from(("append", "append", "append", "read", "read", "len"))
    op = st.tuples(kinds, st.sampled_from(channels))
    plans = []
    for process in range(draw(st.integers(2, max_clients))):
        ops = draw(st.lists(op, min_size=10, max_size=max_ops))
        # Every client reads at least once, somewhere: without reads nothing reveals
        # what the others' appends did, and a run could pass while proving nothing.
        ops.insert(draw(st.integers(0, len(ops))), ("read", draw(st.sampled_from(channels))))
        plans.append(ClientPlan(tuple(ops), home=process % nodes))
    return Workload(
        channels,
        tuple(plans),
        pause=draw(st.sampled_from([0.02, 0.05, 0.1])),
        # A short operation timeout turns faults into unknown outcomes, which the
        # checker must then place (or leave out) correctly.
        op_timeout=draw(st.sampled_from([1.0, 5.0])),
    )


def fault_events(kinds: tuple[str, ...] = FAULT_KINDS) -> st.SearchStrategy[FaultEvent]:
    """One fault: which, which node when it matters, when, and for how long."""
    return st.builds(
        FaultEvent,
        kind=st.sampled_from(kinds),
        gap=st.sampled_from([0.2, 0.5, 1.0, 2.0]),
        duration=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
        target=st.integers(0, 4),
    )


def schedules(
    kinds: tuple[str, ...] = FAULT_KINDS, max_events: int = 3
) -> st.SearchStrategy[list[FaultEvent]]:
    """A fault schedule of up to ``max_events`` events played one after another."""
    return st.lists(fault_events(kinds), min_size=1, max_size=max_events)
