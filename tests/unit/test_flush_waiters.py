"""The client's flush waiters: released by answers, expired by one shared timer."""

from __future__ import annotations

import asyncio

import pytest

from raftchan.client import _FlushExpired, _FlushWaiters

#: asyncio runs a timer up to its clock's resolution early.
TIMER_SLACK = 0.001


def test_an_answer_releases_exactly_the_waiters_it_completes() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiters = _FlushWaiters()
        futures = {target: loop.create_future() for target in (3, 1, 2)}
        for target, future in futures.items():
            waiters.add(target, future, loop.time() + 60)
        waiters.release_through(2)
        assert futures[1].done() and futures[2].done()
        assert not futures[3].done()
        waiters.fail_all(RuntimeError("closed"))
        with pytest.raises(RuntimeError):
            futures[3].result()

    asyncio.run(main())


def test_each_waiter_expires_at_its_own_deadline_and_no_sooner() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiters = _FlushWaiters()
        start = loop.time()
        late = loop.create_future()
        early = loop.create_future()
        released = loop.create_future()
        waiters.add(9, late, start + 0.30)
        waiters.add(5, early, start + 0.10)  # earlier deadline: the timer is re-armed
        waiters.add(1, released, start + 0.05)
        waiters.release_through(1)  # its deadline still fires the timer: nothing to expire
        with pytest.raises(_FlushExpired):
            await early
        # Not before its deadline; and not at the later one (the timer was re-armed), or
        # the late waiter would have expired in the same call.
        assert loop.time() - start >= 0.10 - TIMER_SLACK
        assert not late.done()
        with pytest.raises(_FlushExpired):
            await late
        assert loop.time() - start >= 0.30 - TIMER_SLACK
        assert released.result() is None

    asyncio.run(main())


def test_fail_all_leaves_no_timer_behind() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiters = _FlushWaiters()
        future = loop.create_future()
        waiters.add(1, future, loop.time() + 0.05)
        waiters.fail_all(RuntimeError("closed"))
        await asyncio.sleep(0.1)  # the old deadline passes; nothing may fire or fail
        with pytest.raises(RuntimeError):
            future.result()

    asyncio.run(main())
