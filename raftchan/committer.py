"""Group commit: every operation and read barrier waiting in one tick becomes ONE Raft command.

pysyncobj commits a few thousand commands per second; one command per client append would
cap the cluster there and cost one fsync per append. The committer instead gathers
whatever arrived while earlier commands were in flight and submits it as one command, with
at most ``max_inflight`` commands outstanding. A lone client therefore gets its append
submitted at once, and under load the batch grows by itself.

A read barrier is a waiter attached to the next command (an empty one if nothing else is
pending): when that command is applied, this node was still the leader when it committed,
so any state applied from then on is at least as new as every write that completed before
the read began.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raftchan.errors import CommitUnknown, RaftchanError
from raftchan.state import Result, encode_command

logger = logging.getLogger(__name__)

Submit = Callable[[bytes, float], "asyncio.Future[list[Result]]"]


@dataclass
class _Batch:
    ops: list[list[Any]] = field(default_factory=list)
    op_futures: list[asyncio.Future[Result]] = field(default_factory=list)
    barriers: list[asyncio.Future[None]] = field(default_factory=list)
    size: int = 0


class Committer:
    """Batches operations into Raft commands; see the module docstring.

    Args:
        submit: replicates one encoded command (``Replica.submit``).
        limits: supplies ``max_channels`` and ``max_sessions`` written into each command.
        max_inflight: commands outstanding at once.
        max_command_bytes: soft cap of one command's item bytes (one op may exceed it).
        commit_timeout: how long one command may wait for its commit before its waiters
            get :class:`~raftchan.errors.CommitUnknown`.
    """

    def __init__(
        self,
        submit: Submit,
        limits: Any,
        *,
        max_inflight: int = 2,
        max_command_bytes: int = 1024 * 1024,
        commit_timeout: float = 10.0,
    ) -> None:
        self._submit = submit
        self._limits = limits
        self._max_inflight = max_inflight
        self._max_command_bytes = max_command_bytes
        self._commit_timeout = commit_timeout
        self._pending = _Batch()
        self._inflight = 0
        self.commands_submitted = 0
        self.ops_submitted = 0

    def submit_op(self, op: list[Any]) -> asyncio.Future[Result]:
        """Queue one state-machine op; the future gets its result once committed and applied."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.ops.append(op)
        self._pending.op_futures.append(future)
        self._pending.size += _op_size(op)
        self._pump()
        return future

    def barrier(self) -> asyncio.Future[None]:
        """A future that resolves once a command submitted after this call is applied."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.barriers.append(future)
        self._pump()
        return future

    def fail_pending(self, error: RaftchanError) -> None:
        """Fail everything not yet submitted (this node stopped leading or is closing)."""
        batch, self._pending = self._pending, _Batch()
        waiters: list[asyncio.Future[Any]] = [*batch.op_futures, *batch.barriers]
        for future in waiters:
            if not future.done():
                future.set_exception(error)

    def _pump(self) -> None:
        while self._inflight < self._max_inflight and (self._pending.ops or self._pending.barriers):
            batch = self._take_batch()
            command = encode_command(
                batch.ops, self._limits.max_channels, self._limits.max_sessions
            )
            self._inflight += 1
            self.commands_submitted += 1
            self.ops_submitted += len(batch.ops)
            try:
                future = self._submit(command, self._commit_timeout)
            except Exception as exc:  # the replica refused synchronously: nothing was sent
                self._inflight -= 1
                self._settle(batch, None, exc)
                continue
            future.add_done_callback(functools.partial(self._on_committed, batch))

    def _take_batch(self) -> _Batch:
        pending = self._pending
        if pending.size <= self._max_command_bytes:
            self._pending = _Batch()
            return pending
        # Too big for one command: split at the byte cap, keep the rest queued.
        count, size = 0, 0
        while count < len(pending.ops) and (count == 0 or size < self._max_command_bytes):
            size += _op_size(pending.ops[count])
            count += 1
        taken = _Batch(pending.ops[:count], pending.op_futures[:count], pending.barriers, size)
        self._pending = _Batch(
            pending.ops[count:], pending.op_futures[count:], [], pending.size - size
        )
        return taken

    def _on_committed(self, batch: _Batch, future: asyncio.Future[list[Result]]) -> None:
        self._inflight -= 1
        if future.cancelled():
            # The command may still commit. A CancelledError handed to the waiters would
            # also read as if their own tasks had been cancelled.
            self._settle(batch, None, CommitUnknown("the command's commit was cancelled"))
        elif future.exception() is not None:
            self._settle(batch, None, future.exception())
        else:
            self._settle(batch, future.result(), None)
        self._pump()

    @staticmethod
    def _settle(batch: _Batch, results: list[Result] | None, error: BaseException | None) -> None:
        for index, op_future in enumerate(batch.op_futures):
            if op_future.done():
                continue
            if error is not None:
                op_future.set_exception(error)
            elif results is None or index >= len(results):
                op_future.set_exception(RuntimeError("command applied without a result"))
            else:
                op_future.set_result(results[index])
        for barrier in batch.barriers:
            if barrier.done():
                continue
            if error is not None:
                barrier.set_exception(error)
            else:
                barrier.set_result(None)


def _op_size(op: list[Any]) -> int:
    if op and op[0] == "append":
        return sum(len(item) for item in op[4])
    return 64
