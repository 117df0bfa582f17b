"""Tests of group commit (raftchan.committer), driven by a fake replica.

The fake records every command the committer submits and lets each test decide when (and
how) each one completes, so the batching rules can be checked one step at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from raftchan.committer import Committer
from raftchan.errors import CommitUnknown, NotLeader
from raftchan.limits import Limits
from raftchan.state import Result

LIMITS = Limits(max_channels=7, max_sessions=9)
SID = b"s" * 16


@dataclass
class Submitted:
    ops: list[list[Any]]
    limits: list[int]
    timeout: float
    future: asyncio.Future[list[Result]]


class FakeReplica:
    """Stands in for ``Replica.submit``: records commands, completes them on request."""

    def __init__(self) -> None:
        self.commands: list[Submitted] = []
        self.refuse: Exception | None = None

    def submit(self, command: bytes, timeout: float) -> asyncio.Future[list[Result]]:
        if self.refuse is not None:
            raise self.refuse
        decoded = msgpack.unpackb(command, raw=False)
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        self.commands.append(Submitted(decoded["ops"], decoded["lim"], timeout, future))
        return future

    def ops(self, index: int) -> list[list[Any]]:
        return self.commands[index].ops

    async def apply(self, index: int) -> None:
        """Complete command ``index`` with one result per op naming the op."""
        command = self.commands[index]
        command.future.set_result([{"ok": True, "op": op} for op in command.ops])
        await settle()

    async def fail(self, index: int, error: BaseException) -> None:
        self.commands[index].future.set_exception(error)
        await settle()


async def settle() -> None:
    """Let done-callbacks and the tasks they wake run."""
    for _ in range(5):
        await asyncio.sleep(0)


def op(n: int) -> list[Any]:
    return ["stop", f"c{n}"]


def append_op(n: int, size: int) -> list[Any]:
    return ["append", "c", SID, n, [bytes([n % 256]) * size]]


def run(test: Callable[[FakeReplica], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(FakeReplica()), timeout=5))


def test_a_lone_op_is_submitted_at_once_with_the_limits() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, commit_timeout=3.5)
        future = committer.submit_op(op(1))
        assert len(raft.commands) == 1
        assert raft.ops(0) == [op(1)]
        assert raft.commands[0].limits == [7, 9]
        assert raft.commands[0].timeout == 3.5
        await raft.apply(0)
        assert future.result() == {"ok": True, "op": op(1)}

    run(scenario)


def test_ops_queued_while_max_inflight_are_outstanding_become_one_command() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=2)
        first = [committer.submit_op(op(n)) for n in (1, 2)]
        assert [raft.ops(i) for i in range(2)] == [[op(1)], [op(2)]]
        queued = [committer.submit_op(op(n)) for n in (3, 4, 5)]
        await settle()
        assert len(raft.commands) == 2, "nothing more may go out while two are in flight"
        await raft.apply(1)
        assert len(raft.commands) == 3
        assert raft.ops(2) == [op(3), op(4), op(5)]
        assert committer.commands_submitted == 3 and committer.ops_submitted == 5
        assert not first[0].done() and first[1].done()
        await raft.apply(0)
        await raft.apply(2)
        assert [f.result()["op"] for f in first + queued] == [op(n) for n in range(1, 6)]

    run(scenario)


def test_results_reach_the_right_waiters_in_order() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1)
        committer.submit_op(op(0))
        waiters = [asyncio.ensure_future(committer.submit_op(op(n))) for n in range(1, 6)]
        await settle()
        await raft.apply(0)
        results = [{"ok": n % 2 == 0, "n": n} for n in range(1, 6)]
        raft.commands[1].future.set_result(results)
        assert await asyncio.gather(*waiters) == results

    run(scenario)


def test_a_command_with_too_few_results_fails_the_waiters_left_over() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1)
        committer.submit_op(op(0))
        one, two = committer.submit_op(op(1)), committer.submit_op(op(2))
        await raft.apply(0)
        raft.commands[1].future.set_result([{"ok": True}])
        await settle()
        assert one.result() == {"ok": True}
        assert isinstance(two.exception(), RuntimeError)

    run(scenario)


def test_a_barrier_alone_is_an_empty_command() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS)
        barrier = committer.barrier()
        assert raft.ops(0) == []
        assert not barrier.done()
        await raft.apply(0)
        assert barrier.done() and barrier.result() is None

    run(scenario)


def test_a_barrier_waits_for_a_command_submitted_after_it() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1)
        committer.submit_op(op(1))
        barrier = committer.barrier()
        # Command 0 went out before the barrier was asked for: applying it proves nothing.
        await raft.apply(0)
        assert not barrier.done()
        assert raft.ops(1) == []
        await raft.apply(1)
        assert barrier.done()

    run(scenario)


def test_barriers_ride_along_with_the_ops_of_the_next_command() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1)
        committer.submit_op(op(0))
        before = committer.submit_op(op(1))
        barriers = [committer.barrier(), committer.barrier()]
        after = committer.submit_op(op(2))
        await raft.apply(0)
        assert len(raft.commands) == 2
        assert raft.ops(1) == [op(1), op(2)]
        assert not any(b.done() for b in barriers)
        await raft.apply(1)
        assert all(b.done() for b in barriers)
        assert before.result()["op"] == op(1) and after.result()["op"] == op(2)

    run(scenario)


def test_a_failed_command_fails_all_its_waiters_with_that_error() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1)
        committer.submit_op(op(0))
        ops = [committer.submit_op(op(n)) for n in (1, 2)]
        barrier = committer.barrier()
        await raft.apply(0)
        error = CommitUnknown("leader changed")
        await raft.fail(1, error)
        waiters: list[asyncio.Future[Any]] = [*ops, barrier]
        for future in waiters:
            assert future.exception() is error
        # The committer goes on: the next op gets a command of its own.
        later = committer.submit_op(op(3))
        await raft.apply(2)
        assert later.result()["op"] == op(3)

    run(scenario)


def test_a_failure_frees_the_slot_for_what_was_queued() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1)
        failed = committer.submit_op(op(0))
        queued = committer.submit_op(op(1))
        await raft.fail(0, NotLeader(leader="elsewhere:1"))
        assert isinstance(failed.exception(), NotLeader)
        assert raft.ops(1) == [op(1)]
        await raft.apply(1)
        assert queued.result()["op"] == op(1)

    run(scenario)


def test_a_cancelled_commit_is_an_unknown_outcome_for_its_waiters() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1)
        future = committer.submit_op(op(1))
        barrier = committer.barrier()
        raft.commands[0].future.cancel()
        await settle()
        raft.commands[1].future.cancel()
        await settle()
        # Not a CancelledError: that would look as if the waiting task itself was cancelled.
        assert isinstance(future.exception(), CommitUnknown)
        assert isinstance(barrier.exception(), CommitUnknown)

    run(scenario)


def test_a_submit_refused_at_once_fails_only_its_own_waiters() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS)
        raft.refuse = NotLeader(leader=None)
        refused = committer.submit_op(op(1))
        barrier = committer.barrier()
        assert refused.exception() is raft.refuse
        assert barrier.exception() is raft.refuse
        raft.refuse = None
        later = committer.submit_op(op(2))
        await raft.apply(0)
        assert later.result()["op"] == op(2)

    run(scenario)


def test_fail_pending_fails_what_was_not_submitted_and_spares_what_was() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1)
        inflight = committer.submit_op(op(0))
        pending: list[asyncio.Future[Any]] = [committer.submit_op(op(1)), committer.barrier()]
        error = NotLeader(leader="other:7101")
        committer.fail_pending(error)
        assert all(f.exception() is error for f in pending)
        await raft.apply(0)
        assert inflight.result()["op"] == op(0)
        # The failed op is gone for good: no command carries it.
        assert len(raft.commands) == 1
        later = committer.submit_op(op(2))
        assert raft.ops(1) == [op(2)]
        await raft.apply(1)
        assert later.done()

    run(scenario)


def test_a_waiter_that_gave_up_does_not_disturb_the_others() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1)
        committer.submit_op(op(0))
        gone, kept = committer.submit_op(op(1)), committer.submit_op(op(2))
        barrier = committer.barrier()
        gone.cancel()
        barrier.cancel()
        await raft.apply(0)
        await raft.apply(1)
        assert gone.cancelled() and kept.result()["op"] == op(2)

    run(scenario)


def test_the_byte_cap_splits_a_batch_and_keeps_op_order() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1, max_command_bytes=10)
        committer.submit_op(op(0))
        sizes = [4, 4, 4, 4, 30, 1, 1]
        queued = [committer.submit_op(append_op(n, size)) for n, size in enumerate(sizes, 1)]
        barrier = committer.barrier()
        applied = 0
        while applied < len(raft.commands):
            await raft.apply(applied)
            applied += 1
        chunks = [raft.ops(i) for i in range(1, len(raft.commands))]
        assert [op for chunk in chunks for op in chunk] == [
            append_op(n, size) for n, size in enumerate(sizes, 1)
        ]
        assert [[len(o[4][0]) for o in chunk] for chunk in chunks] == [[4, 4, 4], [4, 30], [1, 1]]
        # The soft cap: a chunk stops growing once it reaches the cap.
        for chunk in chunks:
            assert sum(len(o[4][0]) for o in chunk[:-1]) < 10
        assert [f.result()["op"] for f in queued] == [
            append_op(n, size) for n, size in enumerate(sizes, 1)
        ]
        assert barrier.done()

    run(scenario)


def test_one_op_over_the_cap_still_goes_out_alone() -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=1, max_command_bytes=10)
        committer.submit_op(op(0))
        big = committer.submit_op(append_op(1, 50))
        small = committer.submit_op(append_op(2, 2))
        await raft.apply(0)
        assert raft.ops(1) == [append_op(1, 50)]
        await raft.apply(1)
        assert raft.ops(2) == [append_op(2, 2)]
        await raft.apply(2)
        assert big.done() and small.done()

    run(scenario)


@pytest.mark.parametrize("max_inflight", [1, 3])
def test_many_concurrent_clients_each_get_their_own_result(max_inflight: int) -> None:
    async def scenario(raft: FakeReplica) -> None:
        committer = Committer(raft.submit, LIMITS, max_inflight=max_inflight)

        async def client(n: int) -> Result:
            return await committer.submit_op(op(n))

        tasks = [asyncio.ensure_future(client(n)) for n in range(50)]
        applied = 0
        while not all(t.done() for t in tasks):
            await settle()
            while applied < len(raft.commands):
                await raft.apply(applied)
                applied += 1
        assert [t.result()["op"] for t in tasks] == [op(n) for n in range(50)]
        assert committer.ops_submitted == 50
        assert committer.commands_submitted < 50

    run(scenario)
