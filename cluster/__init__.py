"""Run and break real local raftchan clusters: node processes, kills, pauses, restarts.

Used by the tests, the benchmarks and ``raftchan up``. See :class:`LocalCluster`.
"""

from __future__ import annotations

from cluster.harness import (
    FAST_TUNING,
    ClusterNotReady,
    LocalCluster,
    NodeExited,
    PortInUse,
    agreed_leader,
)
from cluster.ports import free_base_port, free_ports
from cluster.process import NodeProcess, NodeSpec

__all__ = [
    "FAST_TUNING",
    "ClusterNotReady",
    "LocalCluster",
    "NodeExited",
    "NodeProcess",
    "NodeSpec",
    "PortInUse",
    "agreed_leader",
    "free_base_port",
    "free_ports",
]
