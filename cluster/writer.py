"""A writer thread for tests: numbered items appended to one channel, flushed in a loop.

Tests that break or reshape a cluster under load run it beside their faults and then
demand exactly items 0 .. ``appended``-1 back: a loss shows as a gap, a duplicated retry
as a repeat.
"""

from __future__ import annotations

import threading
import time

import raftchan

__all__ = ["Writer"]


class Writer(threading.Thread):
    """Appends numbered items to one channel, flushing every ``flush_every`` appends of
    ``batch`` items each, until stopped.

    ``acked`` items (0 .. acked-1) were confirmed by a returned flush; ``appended`` items
    were handed to the client. A flush that fails ends the thread with ``error`` set: after
    any fault these tests allow, a flush must succeed again once the cluster is mended.
    With ``flush_every`` above 1 the client pipelines the appends between flushes, so that
    requests are in flight at almost any moment a fault strikes.
    """

    def __init__(
        self,
        chan: raftchan.Channel,
        *,
        batch: int = 5,
        flush_every: int = 1,
        pause: float = 0.0,
        flush_timeout: float = 90.0,
    ) -> None:
        super().__init__(name=f"writer-{chan.name}", daemon=True)
        self.chan = chan
        self.batch = batch
        self.flush_every = flush_every
        self.pause = pause
        self.flush_timeout = flush_timeout
        self.appended = 0
        self.acked = 0
        self.flushes = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                for _ in range(self.flush_every):
                    self.chan.extend(range(self.appended, self.appended + self.batch))
                    self.appended += self.batch
                self.chan.flush(timeout=self.flush_timeout)
                self.acked = self.appended
                self.flushes += 1
                if self.pause:
                    self._halt.wait(self.pause)
        except BaseException as exc:  # reported by finish(), in the test's thread
            self.error = exc

    def wait_acked(self, count: int, timeout: float) -> None:
        """Block until at least ``count`` items are acknowledged."""
        deadline = time.monotonic() + timeout
        while self.acked < count:
            self.raise_error()
            assert self.is_alive(), "the writer stopped early"
            assert time.monotonic() < deadline, (
                f"only {self.acked} of {count} items acknowledged after {timeout} s"
            )
            time.sleep(0.02)

    def finish(self) -> None:
        """Stop after the current batch is flushed; raise whatever stopped it otherwise."""
        self._halt.set()
        self.join(2 * self.flush_timeout + 30.0)
        assert not self.is_alive(), f"the writer hung (appended {self.appended})"
        self.raise_error()
        assert self.acked == self.appended

    def raise_error(self) -> None:
        if self.error is not None:
            raise AssertionError(
                f"the writer failed after {self.acked} acknowledged items: {self.error!r}"
            ) from self.error
