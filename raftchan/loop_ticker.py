"""Run pysyncobj on the node's asyncio loop instead of in a tick thread of its own.

pysyncobj normally starts a thread that waits on its sockets and then "ticks": reads and
answers peer messages, counts commits, applies, sends. A node also runs an asyncio loop
for its clients, so with that thread every command crossed threads twice (a pipe write to
wake the tick thread, ``call_soon_threadsafe`` back with the result) and the two threads
took the GIL from each other on every message, which showed as futex calls between every
step of a commit.

Here pysyncobj's sockets are watched by the loop's own selector (:class:`LoopPoller`), and
:class:`Ticker` runs a tick

- in the loop iteration after any of those sockets was ready (once, however many were),
- in the iteration after a command was submitted (pysyncobj's "new command" notification),
- and at the latest every ``period`` seconds or at the deadline the node asks for, for
  pysyncobj's timers: heartbeats, election timeouts, reconnects.

A tick never waits: pysyncobj's own ``poll`` at its end returns at once. What a tick does
that blocks (an fsync, writing a snapshot) now holds up the loop for that long, as it held
up Raft before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import pysyncobj.syncobj
from pysyncobj.poller import POLL_EVENT_TYPE, Poller

__all__ = ["LoopPoller", "Ticker", "install_loop_poller"]

logger = logging.getLogger(__name__)

_Callback = Callable[[int, int], None]


class LoopPoller(Poller):
    """pysyncobj's poller interface on an asyncio loop's selector.

    Every event it delivers also calls ``on_event`` (the ticker's wake), since pysyncobj
    expects a tick after the sockets it watches were served.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._subscribed: dict[int, _Callback] = {}
        self.on_event: Callable[[], None] = lambda: None

    def subscribe(self, descr: Any, callback: _Callback, eventMask: int) -> None:  # noqa: N803
        fd = _fileno(descr)
        self.unsubscribe(fd)
        self._subscribed[fd] = callback
        # An error or hang-up reads as "readable" to epoll: the read then fails, and
        # pysyncobj disconnects, as it does on its own poller's error event.
        if eventMask & (POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR):
            self._loop.add_reader(fd, self._deliver, fd, POLL_EVENT_TYPE.READ)
        if eventMask & POLL_EVENT_TYPE.WRITE:
            self._loop.add_writer(fd, self._deliver, fd, POLL_EVENT_TYPE.WRITE)

    def unsubscribe(self, descr: Any) -> None:
        fd = _fileno(descr)
        if self._subscribed.pop(fd, None) is not None:
            # pysyncobj closes a socket first and unsubscribes it after. The selector then
            # fails to update the kernel's registration (which the close already removed),
            # but forgets the descriptor all the same, so the number is free for reuse.
            for remove in (self._loop.remove_writer, self._loop.remove_reader):
                with contextlib.suppress(OSError):
                    remove(fd)

    def poll(self, timeout: float) -> None:
        """Nothing to wait for: the loop delivers events as they come."""

    def close(self) -> None:
        """Stop watching every socket (the node is closing)."""
        for fd in list(self._subscribed):
            self.unsubscribe(fd)

    def _deliver(self, fd: int, event: int) -> None:
        callback = self._subscribed.get(fd)
        if callback is None:
            return
        try:
            callback(fd, event)
        finally:
            self.on_event()


def _fileno(descr: Any) -> int:
    return descr if isinstance(descr, int) else int(descr.fileno())


_original_create_poller = pysyncobj.syncobj.createPoller


def _create_poller(poller_type: Any) -> Any:
    if isinstance(poller_type, LoopPoller):
        return poller_type
    return _original_create_poller(poller_type)


def install_loop_poller() -> None:
    """Let ``SyncObjConf(pollerType=<a LoopPoller>)`` hand pysyncobj that very poller
    (pysyncobj only knows the names of its own). Affects the whole process; idempotent."""
    pysyncobj.syncobj.createPoller = _create_poller


class Ticker:
    """Runs ``tick()`` on the loop: soon after :meth:`wake`, and at least every ``period``
    seconds or at the time ``next_deadline()`` returns, whichever comes first.

    An exception in a tick is logged and the ticking goes on, as pysyncobj's own thread
    does.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tick: Callable[[], None],
        period: float,
        next_deadline: Callable[[], float | None] = lambda: None,
    ) -> None:
        self._loop = loop
        self._tick = tick
        self._period = period
        self._next_deadline = next_deadline
        self._soon: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._running = False

    def start(self) -> None:
        self._running = True
        self.wake()

    def stop(self) -> None:
        self._running = False
        for handle in (self._soon, self._timer):
            if handle is not None:
                handle.cancel()
        self._soon = self._timer = None

    def wake(self) -> None:
        """Tick in the next loop iteration (once, however often this is called before)."""
        if self._running and self._soon is None:
            self._soon = self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._soon = None
        if not self._running:
            return
        try:
            self._tick()
        except Exception:
            logger.exception("Raft tick failed; ticking on")
        if self._running:
            self._arm_timer()

    def _arm_timer(self) -> None:
        now = time.monotonic()
        at = now + self._period
        deadline = self._next_deadline()
        # A deadline already past is one the tick did not act on (an election deadline
        # while no peer is connected, say): the period paces those, or this would spin.
        if deadline is not None and deadline > now:
            at = min(at, deadline)
        if self._timer is not None:
            self._timer.cancel()
        # The loop's clock is time.monotonic as well: convert by the offset of the two.
        self._timer = self._loop.call_at(self._loop.time() + (at - now), self._run)
