"""pysyncobj on the asyncio loop: the poller's events and the ticker's timing."""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from pysyncobj.poller import POLL_EVENT_TYPE

from raftchan.loop_ticker import LoopPoller, Ticker


def in_a_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@in_a_loop
async def test_a_readable_socket_reaches_its_callback_and_wakes_the_ticker() -> None:
    loop = asyncio.get_running_loop()
    poller = LoopPoller(loop)
    wakes: list[None] = []
    poller.on_event = lambda: wakes.append(None)
    ours, theirs = socket.socketpair()
    got: asyncio.Future[tuple[int, int]] = loop.create_future()

    def on_ready(fd: int, event: int) -> None:
        ours.recv(16)
        if not got.done():
            got.set_result((fd, event))

    try:
        poller.subscribe(ours.fileno(), on_ready, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)
        theirs.send(b"x")
        fd, event = await asyncio.wait_for(got, 5)
        assert fd == ours.fileno()
        assert event == POLL_EVENT_TYPE.READ
        assert wakes
    finally:
        poller.close()
        ours.close()
        theirs.close()


@in_a_loop
async def test_a_socket_closed_before_it_is_unsubscribed_frees_its_number() -> None:
    # pysyncobj's disconnect closes the socket, then unsubscribes it.
    loop = asyncio.get_running_loop()
    poller = LoopPoller(loop)
    first, peer = socket.socketpair()
    number = first.fileno()
    poller.subscribe(number, lambda fd, event: None, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE)
    first.close()
    peer.close()
    poller.unsubscribe(number)  # must not raise
    # The number is reused by the next socket, which must be watchable again.
    second, peer2 = socket.socketpair()
    got: asyncio.Future[int] = loop.create_future()

    def on_ready(fd: int, event: int) -> None:
        if not got.done():
            got.set_result(event)

    try:
        poller.subscribe(second.fileno(), on_ready, POLL_EVENT_TYPE.READ)
        peer2.send(b"y")
        assert await asyncio.wait_for(got, 5) == POLL_EVENT_TYPE.READ
    finally:
        poller.close()
        second.close()
        peer2.close()


@in_a_loop
async def test_wakes_before_a_tick_make_one_tick() -> None:
    ticks: list[float] = []
    ticker = Ticker(asyncio.get_running_loop(), lambda: ticks.append(time.monotonic()), 10.0)
    ticker.start()
    await asyncio.sleep(0.05)
    before = len(ticks)
    for _ in range(5):
        ticker.wake()
    await asyncio.sleep(0.05)
    ticker.stop()
    assert before == 1  # the start
    assert len(ticks) == 2


@in_a_loop
async def test_it_ticks_at_the_deadline_asked_for_and_every_period_otherwise() -> None:
    ticks: list[float] = []
    started = time.monotonic()
    ticker = Ticker(
        asyncio.get_running_loop(),
        lambda: ticks.append(time.monotonic()),
        period=0.5,
        next_deadline=lambda: started + 0.1,
    )
    ticker.start()
    await asyncio.sleep(0.3)
    ticker.stop()
    # The start, then one at the deadline; nothing more before the period runs out.
    assert len(ticks) == 2
    assert ticks[1] - started == pytest.approx(0.1, abs=0.08)


@in_a_loop
async def test_a_deadline_already_past_does_not_make_it_spin() -> None:
    ticks: list[float] = []
    ticker = Ticker(
        asyncio.get_running_loop(),
        lambda: ticks.append(time.monotonic()),
        period=0.05,
        next_deadline=lambda: 0.0,  # long past, and never acted upon
    )
    ticker.start()
    await asyncio.sleep(0.3)
    ticker.stop()
    assert 2 <= len(ticks) <= 10  # paced by the period, not thousands


@in_a_loop
async def test_a_failing_tick_is_logged_and_ticking_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def tick() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("broken tick")

    ticker = Ticker(asyncio.get_running_loop(), tick, period=0.02)
    ticker.start()
    await asyncio.sleep(0.2)
    ticker.stop()
    assert len(calls) >= 3
    assert "Raft tick failed" in caplog.text


@in_a_loop
async def test_no_tick_after_stop() -> None:
    ticks: list[float] = []
    ticker = Ticker(asyncio.get_running_loop(), lambda: ticks.append(0.0), period=0.01)
    ticker.start()
    await asyncio.sleep(0.05)
    ticker.stop()
    count = len(ticks)
    ticker.wake()
    await asyncio.sleep(0.05)
    assert len(ticks) == count
