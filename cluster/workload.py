"""Concurrent clients that drive a real cluster and record what they saw into a history.

A :class:`Workload` is drawn up front (by Hypothesis in the fault suite): per client, the
list of operations it will issue. :func:`run_clients` plays them, each client in a thread
of its own with its own :class:`raftchan.Client` (hence its own session), recording each
operation's invocation and completion in a :class:`~cluster.history.Recorder`. Readers
iterate every channel at the same time and record the ``(index, value)`` pairs they saw.

Outcomes follow what each error lets a client conclude (see :mod:`raftchan.errors`):
an append that raised ``Timeout``, ``CommitUnknown`` or ``NoLeader`` after it was queued
may still be stored (the client keeps retrying it), so it is *unknown*; a failed read or
len changed nothing, so it is *fail*.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import raftchan
from cluster.harness import LocalCluster
from cluster.history import STOPPED, Recorder
from raftchan.client import RetryPolicy

#: Operation kinds a client plan may hold (``stop`` is issued once, at the end of a run).
PLAN_KINDS = ("append", "read", "len")


@dataclass(frozen=True)
class ClientPlan:
    """One client's operations, in order, each as ``(kind, channel)``.

    ``home`` is the node index the client lists first: its iterations' long polls go
    there. ``pinned`` clients know only their home node, as a client on the far side of a
    partition would: they show what a cut-off node answers.
    """

    ops: tuple[tuple[str, str], ...]
    home: int = 0
    pinned: bool = False


@dataclass(frozen=True)
class Workload:
    """Every client's plan, the channels, and the pacing of one run."""

    channels: tuple[str, ...]
    clients: tuple[ClientPlan, ...]
    #: Seconds a client waits between its operations (keeps a run spread over the faults).
    pause: float = 0.05
    #: Bounds each client operation, retries included.
    op_timeout: float = 5.0


@dataclass
class RunClients:
    """Threads of one run: the writers/readers of the plans and the iterating readers."""

    threads: list[threading.Thread] = field(default_factory=list)
    iterators: list[_Iterator] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def addresses_from(cluster: LocalCluster, home: int, pinned: bool) -> str:
    """The address list a client is given: its home node first (or only)."""
    addresses = cluster.client_addresses
    home %= len(addresses)
    if pinned:
        return addresses[home]
    return ",".join(addresses[home:] + addresses[:home])


def _retry(op_timeout: float) -> RetryPolicy:
    # Give up on one attempt quickly: a client stuck on a paused node must move on
    # within one operation's time.
    return RetryPolicy(timeout=op_timeout, attempt_timeout=min(2.0, op_timeout))


def start_clients(
    cluster: LocalCluster, workload: Workload, recorder: Recorder, deadline: float
) -> RunClients:
    """Start every planned client and one iterating reader per channel; returns at once.

    Clients stop at ``deadline`` (a monotonic time) even with operations left.
    """
    run = RunClients()
    for process, plan in enumerate(workload.clients):
        thread = threading.Thread(
            target=_play,
            args=(cluster, workload, plan, process, recorder, deadline, run.errors),
            name=f"client-{process}",
            daemon=True,
        )
        run.threads.append(thread)
    first_reader = len(workload.clients)
    for k, channel in enumerate(workload.channels):
        address = addresses_from(cluster, k + 1, pinned=False)
        run.iterators.append(_Iterator(address, channel, first_reader + k, recorder))
    for thread in [*run.threads, *run.iterators]:
        thread.start()
    return run


def _play(
    cluster: LocalCluster,
    workload: Workload,
    plan: ClientPlan,
    process: int,
    recorder: Recorder,
    deadline: float,
    errors: list[BaseException],
) -> None:
    address = addresses_from(cluster, plan.home, plan.pinned)
    client = raftchan.Client(
        address, timeout=workload.op_timeout, retry=_retry(workload.op_timeout)
    )
    try:
        channels: dict[str, Any] = {}
        for n, (kind, name) in enumerate(plan.ops):
            if time.monotonic() >= deadline:
                return
            chan = channels.get(name)
            if chan is None:
                chan = channels[name] = _open(client, name, workload.op_timeout, deadline)
                if chan is None:
                    return
            _one_op(recorder, process, kind, name, chan, [process, n], workload.op_timeout)
            time.sleep(workload.pause)
    except BaseException as exc:  # a bug in the harness or client: the run must fail
        errors.append(exc)
    finally:
        client.close(timeout=1.0)


def _open(client: raftchan.Client, name: str, timeout: float, deadline: float) -> Any:
    """Open a channel, retrying through faults until ``deadline``; None if it never worked."""
    while time.monotonic() < deadline:
        try:
            return client.channel(name)
        except (raftchan.NoLeader, raftchan.Timeout, raftchan.CommitUnknown):
            time.sleep(0.1)
    return None


def _one_op(
    recorder: Recorder,
    process: int,
    kind: str,
    channel: str,
    chan: Any,
    value: list[int],
    timeout: float,
) -> None:
    if kind == "append":
        op = recorder.invoke(process, "append", channel, value)
        try:
            index = chan.put(value, timeout=timeout)
        except raftchan.ChannelStopped:
            recorder.complete(op, "ok", STOPPED)
        except (raftchan.Timeout, raftchan.CommitUnknown, raftchan.NoLeader):
            recorder.complete(op, "unknown")
        else:
            recorder.complete(op, "ok", index)
        return
    op = recorder.invoke(process, kind, channel)
    try:
        if kind == "read":
            result: Any = (0, tuple(chan.read(start=0, timeout=timeout)))
        else:
            result = len(chan)
    except (raftchan.Timeout, raftchan.CommitUnknown, raftchan.NoLeader):
        recorder.complete(op, "fail")  # a read that did not answer changed nothing
    else:
        recorder.complete(op, "ok", result)


class _Iterator(threading.Thread):
    """Follows one channel from index 0 until it is stopped; records every item seen."""

    def __init__(self, address: str, channel: str, process: int, recorder: Recorder) -> None:
        super().__init__(name=f"iterator-{channel}", daemon=True)
        self.address = address
        self.channel = channel
        self.process = process
        self.recorder = recorder
        self.items: list[tuple[int, Any]] = []
        self.ended = False
        self.error: BaseException | None = None
        self._client = raftchan.Client(
            address, retry=RetryPolicy(timeout=120.0, attempt_timeout=2.0), poll_wait=1.0
        )

    def run(self) -> None:
        try:
            chan = self._client.channel(self.channel)
            for index, item in enumerate(chan.iterate(start=0)):
                self.items.append((index, item))
            self.ended = True
        except raftchan.Closed:
            pass  # cut off by finish(): recorded as not ended
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float) -> None:
        """Wait for the iteration to end by itself; cut it off after ``timeout``; record it."""
        self.join(timeout)
        if self.is_alive():
            self._client.close(timeout=1.0)
            self.join(5.0)
        else:
            self._client.close(timeout=1.0)
        self.recorder.record_iteration(self.process, self.channel, 0, list(self.items), self.ended)


def stop_channels(cluster: LocalCluster, channels: Sequence[str], timeout: float) -> None:
    """Stop every channel of the run (after healing), so every iteration must end."""
    with raftchan.Client(cluster.addresses, timeout=timeout) as client:
        for name in channels:
            client.channel(name).stop()
