"""One fault run, end to end: workload + nemesis against a real cluster, then the checks.

:func:`run_case` plays a :class:`~cluster.workload.Workload` while a
:class:`~cluster.nemesis.Nemesis` plays its fault schedule, heals everything, checks that
writes succeed again within a bound, stops every channel (so every iteration must end),
reads every node's copy of every channel, and hands all of it to
:func:`cluster.checker.check_all`. A failing run leaves its history, schedule, report and
node logs in a folder whose path the report names.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import raftchan
from cluster.checker import check_all
from cluster.harness import LocalCluster, receive_message
from cluster.history import History, Recorder
from cluster.nemesis import FaultEvent, Nemesis, describe, heal_everything
from cluster.workload import Workload, start_clients
from raftchan import protocol
from raftchan.codec import ItemCodec
from raftchan.config import split_address

#: After every fault is healed, a write must commit within this many seconds.
RECOVERY_BOUND = 30.0


@dataclass
class RunReport:
    """What one run did and found."""

    operations: int = 0
    acknowledged_appends: int = 0
    ok_reads: int = 0
    unknown: int = 0
    failed: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    recovery_seconds: float | None = None
    violations: list[str] = field(default_factory=list)
    verdict: str = ""
    artifacts: str | None = None

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        kinds = ", ".join(f["kind"] for f in self.faults) or "none"
        text = (
            f"{self.operations} operations ({self.acknowledged_appends} appends and "
            f"{self.ok_reads} reads acknowledged, {self.unknown} unknown, {self.failed} failed), "
            f"faults: {kinds}; recovery {self.recovery_seconds}s; "
            f"linearizability: {self.verdict}; violations: {len(self.violations)}"
        )
        if self.artifacts:
            text += f"; evidence in {self.artifacts}"
        return text


def run_case(
    cluster: LocalCluster,
    workload: Workload,
    schedule: Sequence[FaultEvent],
    *,
    artifacts_dir: Path,
    time_limit: float = 120.0,
    check_time_limit: float = 60.0,
) -> RunReport:
    """Play ``workload`` under ``schedule`` on a running ``cluster`` and check the outcome.

    ``time_limit`` bounds the workload and the schedule together (seconds); clients stop
    at it with operations left, the nemesis heals its current fault. ``check_time_limit``
    bounds the linearizability search (an exhausted search is reported, not passed).
    """
    recorder = Recorder()
    report = RunReport()
    started = time.monotonic()
    deadline = started + time_limit
    clients = start_clients(cluster, workload, recorder, deadline)
    nemesis = Nemesis(cluster)
    nemesis.start(schedule)
    try:
        return _finish_case(
            cluster, workload, schedule, recorder, report, clients, nemesis, deadline,
            artifacts_dir, check_time_limit,
        )  # fmt: skip
    finally:
        # On any exit (a timeout of the test included) no fault may outlive the run.
        nemesis.stop(timeout=60.0)


def _finish_case(
    cluster: LocalCluster,
    workload: Workload,
    schedule: Sequence[FaultEvent],
    recorder: Recorder,
    report: RunReport,
    clients: Any,
    nemesis: Nemesis,
    deadline: float,
    artifacts_dir: Path,
    check_time_limit: float,
) -> RunReport:
    for thread in clients.threads:
        thread.join(max(0.0, deadline - time.monotonic()) + workload.op_timeout + 5.0)
    if not nemesis.join(max(0.0, deadline - time.monotonic())):
        nemesis.stop(timeout=60.0)
    report.faults = [asdict(event) for event in nemesis.injected]
    problems: list[str] = [f"client crashed: {exc!r}" for exc in clients.errors]
    if nemesis.error is not None:
        problems.append(f"nemesis failed: {nemesis.error!r}")

    heal_everything(cluster, ready_timeout=60.0)
    report.recovery_seconds = _time_to_write(cluster, RECOVERY_BOUND)
    if report.recovery_seconds is None:
        problems.append(f"no write committed within {RECOVERY_BOUND}s after healing")

    _stop_all(cluster, workload.channels, recorder, len(workload.clients) + 1000)
    for iterator in clients.iterators:
        iterator.finish(timeout=60.0)
        if iterator.error is not None:
            problems.append(f"iteration of {iterator.channel!r} failed: {iterator.error!r}")
    per_node = contents_of_every_node(cluster, workload.channels)
    history = recorder.history()
    report.operations = len(history)
    report.acknowledged_appends = sum(op.ok and op.kind == "append" for op in history)
    report.ok_reads = sum(op.ok and op.kind in ("read", "len") for op in history)
    report.unknown = sum(op.outcome == "unknown" for op in history)
    report.failed = sum(op.outcome == "fail" for op in history)

    problems.extend(leaders_per_term(cluster))
    check = check_all(history, per_node_contents=per_node, time_limit=check_time_limit)
    report.verdict = check.linearizability.verdict
    if check.linearizability.verdict == "violation":
        problems.append(f"not linearizable:\n{check.linearizability.explanation}")
    elif check.linearizability.verdict == "unknown":
        problems.append(f"linearizability not decided within {check_time_limit}s")
    for name, found in check.violations.items():
        problems.extend(f"{name}: {problem}" for problem in found)
    report.violations = problems
    if not report.ok:
        report.artifacts = str(
            _save_evidence(artifacts_dir, cluster, history, schedule, report, per_node, check)
        )
    return report


_LEADER_LINE = re.compile(r"raft role \w+ -> leader \(term (\d+)\)")


def leaders_per_term(cluster: LocalCluster) -> list[str]:
    """Violations of Raft's election safety found in the node logs: a term with two leaders."""
    leaders: dict[int, set[str]] = {}
    for node in cluster.nodes:
        for match in _LEADER_LINE.finditer(node.log_text()):
            leaders.setdefault(int(match.group(1)), set()).add(node.spec.name)
    return [
        f"one_leader_per_term: term {term} had leaders {sorted(names)}"
        for term, names in sorted(leaders.items())
        if len(names) > 1
    ]


def _time_to_write(cluster: LocalCluster, bound: float) -> float | None:
    """Seconds until a fresh client's write commits, or None if not within ``bound``."""
    started = time.monotonic()
    with raftchan.Client(cluster.addresses, timeout=bound) as client:
        try:
            client.channel("recovery-probe").put("probe", timeout=bound)
        except raftchan.RaftchanError:
            return None
    return round(time.monotonic() - started, 3)


def _stop_all(
    cluster: LocalCluster, channels: Sequence[str], recorder: Recorder, process: int
) -> None:
    with raftchan.Client(cluster.addresses, timeout=30.0) as client:
        for name in channels:
            op = recorder.invoke(process, "stop", name)
            try:
                client.channel(name).stop()
            except raftchan.RaftchanError:
                recorder.complete(op, "unknown")
            else:
                recorder.complete(op, "ok")


def contents_of_every_node(
    cluster: LocalCluster, channels: Sequence[str], nodes: Sequence[int] | None = None
) -> dict[str, dict[str, list[Any]]]:
    """Each node's own copy of each channel, once it has applied all the leader has.

    A poll is answered from the node's local state, so asking each node directly (with
    the leader's position as the minimum) reads that node's replica, not the leader's.
    ``nodes`` (indexes) limits the question to those nodes; the default is every node.
    """
    leader_position = max(status.get("position", 0) for status in cluster.status())
    codec = ItemCodec()
    contents: dict[str, dict[str, list[Any]]] = {}
    for i in range(cluster.size) if nodes is None else nodes:
        name, address = cluster.names[i], cluster.client_addresses[i]
        contents[name] = {}
        for channel in channels:
            items = _poll_all(address, channel, leader_position)
            contents[name][channel] = [codec.decode(item) for item in items]
    return contents


def _poll_all(address: str, channel: str, min_position: int) -> list[bytes]:
    host, port = split_address(address)
    items: list[bytes] = []
    with socket.create_connection((host, port), timeout=30.0) as sock:
        sock.sendall(protocol.encode_frame(protocol.hello_request()))
        protocol.check_hello(receive_message(sock))
        while True:
            poll = protocol.Poll(1, channel, len(items), min_position, 10.0)
            sock.sendall(protocol.encode_frame(poll.to_wire()))
            answer = receive_message(sock)
            error = protocol.response_error(answer)
            if error is not None:
                raise error
            page = protocol.ReadResult.from_wire(answer)
            items.extend(page.items)
            if not page.items or len(items) >= page.next:
                return items


def _save_evidence(
    artifacts_dir: Path,
    cluster: LocalCluster,
    history: History,
    schedule: Sequence[FaultEvent],
    report: RunReport,
    per_node: dict[str, dict[str, list[Any]]],
    check: Any,
) -> Path:
    folder = artifacts_dir / time.strftime("run-%Y%m%d-%H%M%S")
    suffix = 0
    while folder.exists():
        suffix += 1
        folder = artifacts_dir / f"{time.strftime('run-%Y%m%d-%H%M%S')}-{suffix}"
    folder.mkdir(parents=True)
    history.to_json(folder / "history.json")
    (folder / "schedule.json").write_text(json.dumps(describe(schedule), indent=1))
    (folder / "report.txt").write_text(report.summary() + "\n\n" + str(check) + "\n")
    (folder / "contents.json").write_text(json.dumps(per_node, indent=1, default=repr))
    for node in cluster.nodes:
        log = Path(node.spec.log_path)
        if log.exists():
            shutil.copy(log, folder / log.name)
    return folder
