"""The keeper: the leader's Dask client, keeping every future key in the channels alive.

The only node module that talks to the Dask scheduler. Each channel's keys are desired by
a fixed scheduler-side pseudo-client (:func:`raftchan.dask.pin_name`), which no
connection owns, so the keys outlive any writer, reader, keeper or leader. What the
keeper does, only while its node leads:

- **Confirm.** After an append holding future keys is applied, the server asks the keeper
  to pin them (idempotent: the writer pinned them already) and to say which ones the
  scheduler does not know; only then does the append get its answer. Keys the scheduler
  still does not know after :attr:`Keeper.confirm_wait` seconds are reported lost.
- **Re-assert.** On becoming leader (and after reconnecting to the scheduler) it pins
  every key referenced by any channel and logs how long that took; unknown keys are
  reported lost through ``mark_lost``.
- **Release.** Keys a trim or delete left unreferenced are released, after checking (at
  the moment of release) that the channel still does not reference them.
- **Watch.** An idle keeper checks every :data:`HEALTH_INTERVAL` seconds that the
  scheduler is still the same one (its id); a restarted scheduler has forgotten every
  key, so the keeper reconnects and re-asserts, which marks those keys lost.

All scheduler calls go through one worker task, in order: a release and a later pin of
the same key can never be reordered on the scheduler. While the scheduler is unreachable
the keeper keeps reconnecting with backoff; confirmations wait (and the server answers
:class:`~raftchan.errors.DaskUnavailable` after its own bound), everything else in the
cluster goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
from distributed import Client as DaskClient

from raftchan import _scheduler_ops
from raftchan.dask import PIN_PREFIX, decode_key, encode_key, pin_name
from raftchan.errors import DaskUnavailable

logger = logging.getLogger(__name__)

# The scheduler need not have raftchan installed: ship these functions' code.
cloudpickle.register_pickle_by_value(_scheduler_ops)

#: Bounds one call to the scheduler; a call that takes longer counts as a lost connection.
RPC_TIMEOUT = 30.0
#: Bounds one connection attempt to the scheduler.
CONNECT_TIMEOUT = 5.0
#: Longest wait between reconnection attempts.
MAX_BACKOFF = 2.0
#: Keys per re-assert call (bounds the size of one message to the scheduler).
REASSERT_CHUNK = 20_000
#: How often an idle keeper checks that it still talks to the same scheduler. A restarted
#: scheduler has forgotten every key: the keeper then reconnects and re-asserts, which
#: marks the keys lost in the channels.
HEALTH_INTERVAL = 2.0
#: Released keys are released once more this many seconds later. A writer's own pin
#: travels on the writer's Dask connection and may reach the scheduler after the leader
#: released the key (trimmed right after its append); the second release catches such a
#: late pin. (The writer's own Future keeps the key alive until its append is answered,
#: so releasing early never loses a key a channel still references.)
RELEASE_AGAIN_AFTER = 1.0


@dataclass(eq=False)
class _Confirm:
    channel: str
    keys: list[bytes]
    future: asyncio.Future[list[bytes]]
    deadline: float
    lost: list[bytes] = field(default_factory=list)


class Keeper:
    """Keeps the channels' future keys pinned on one Dask scheduler; see the module docstring.

    Args:
        address: the Dask scheduler's address.
        pinned_keys: per channel, the keys to keep (the replicated state's view).
        unreferenced: ``(channel, keys)`` -> those keys the channel no longer references.
        mark_lost: records ``(channel, keys)`` as lost in the replicated state.
        is_ready: true once this node has applied everything committed before it led.
        confirm_wait: how long a key unknown to the scheduler is waited for before it is
            reported lost (a writer's submission may still be on its way).
    """

    def __init__(
        self,
        address: str,
        *,
        pinned_keys: Callable[[], dict[str, list[bytes]]],
        unreferenced: Callable[[str, list[bytes]], list[bytes]],
        mark_lost: Callable[[str, list[bytes]], None],
        is_ready: Callable[[], bool] = lambda: True,
        confirm_wait: float = 5.0,
    ) -> None:
        self.address = address
        self._pinned_keys = pinned_keys
        self._unreferenced = unreferenced
        self._mark_lost = mark_lost
        self._is_ready = is_ready
        self.confirm_wait = confirm_wait
        self._leading = False
        self._wake = asyncio.Event()
        self._confirms: list[_Confirm] = []
        self._releases: list[tuple[str, list[bytes]]] = []
        self._task: asyncio.Task[None] | None = None
        self._client: DaskClient | None = None
        self._scheduler_id: str | None = None
        #: Set while connected with every key re-asserted since this node became leader.
        self.ready = asyncio.Event()
        #: Figures of the last re-assert (for status and logs).
        self.last_reassert_keys = 0
        self.last_reassert_seconds: float | None = None
        self.released_total = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._fail_confirms(DaskUnavailable("the node is shutting down"))
        await self._disconnect()

    def set_leader(self, leading: bool) -> None:
        """Follow this node's role: connect and re-assert when leading, disconnect when not."""
        if leading == self._leading:
            return
        self._leading = leading
        if not leading:
            self.ready.clear()
            self._releases.clear()  # the next leader re-asserts and releases by state
            self._fail_confirms(DaskUnavailable("this node stopped leading"))
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return {
            "dask_scheduler": self.address,
            "dask_connected": self._client is not None and self._client.status == "running",
            "dask_ready": self.ready.is_set(),
            "dask_reassert_keys": self.last_reassert_keys,
            "dask_reassert_seconds": self.last_reassert_seconds,
            "dask_released": self.released_total,
        }

    # -- requests from the server ----------------------------------------------------------

    async def confirm(self, channel: str, keys: list[bytes], timeout: float) -> list[bytes]:
        """Pin ``keys`` of ``channel`` on the scheduler; return those it does not know.

        Raises :class:`DaskUnavailable` when that could not be confirmed within
        ``timeout`` seconds (scheduler unreachable, or this node stopped leading): the
        append is stored, and a re-send of it asks again.
        """
        loop = asyncio.get_running_loop()
        request = _Confirm(channel, keys, loop.create_future(), loop.time() + self.confirm_wait)
        # Nobody may be waiting any more when it fails (the server's bound passed).
        request.future.add_done_callback(_retrieve)
        self._confirms.append(request)
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout)
        except asyncio.TimeoutError:
            raise DaskUnavailable(
                f"could not confirm {len(keys)} future pin(s) with the Dask scheduler "
                f"{self.address} within {timeout:.1f} s"
            ) from None

    def release(self, channel: str, keys: list[bytes], again: bool = True) -> None:
        """Release ``keys`` of ``channel`` soon, unless the channel references them again.

        ``again``: release them a second time :data:`RELEASE_AGAIN_AFTER` seconds later.
        """
        if self._leading and keys:
            self._releases.append((channel, keys))
            self._wake.set()
            if again:
                asyncio.get_running_loop().call_later(
                    RELEASE_AGAIN_AFTER, self.release, channel, keys, False
                )

    # -- the worker --------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self._leading:
                await self._disconnect()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self._client is None:
                    await self._connect()
                    await self._reassert()
                    backoff = 0.1
                await self._serve_requests()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "Dask scheduler %s: %s; retrying in %.1f s (future pins wait meanwhile)",
                    self.address,
                    exc,
                    backoff,
                )
                self.ready.clear()
                await self._disconnect()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _connect(self) -> None:
        client: DaskClient = await asyncio.wait_for(
            DaskClient(
                self.address,
                asynchronous=True,
                timeout=CONNECT_TIMEOUT,
                set_as_default=False,
            ),
            CONNECT_TIMEOUT * 2,
        )
        self._client = client
        identity = await asyncio.wait_for(client.scheduler.identity(), RPC_TIMEOUT)
        self._scheduler_id = identity.get("id")
        logger.info(
            "keeper connected to the Dask scheduler %s (id %s)", self.address, self._scheduler_id
        )

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), CONNECT_TIMEOUT)

    async def _call(self, function: Any, *args: Any) -> Any:
        client = self._client
        if client is None or client.status != "running":
            raise ConnectionError("not connected")
        return await asyncio.wait_for(client.run_on_scheduler(function, *args), RPC_TIMEOUT)

    async def _reassert(self) -> None:
        """Pin every key every channel references; report the unknown ones lost."""
        while not self._is_ready():
            # Entries committed under the previous leader must be applied first, or their
            # keys would be missed.
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        by_channel = self._pinned_keys()
        total = sum(len(keys) for keys in by_channel.values())
        lost_total = 0
        pairs = [(pin_name(channel), key) for channel, keys in by_channel.items() for key in keys]
        for start in range(0, len(pairs), REASSERT_CHUNK):
            groups: dict[str, list[Any]] = {}
            for name, key in pairs[start : start + REASSERT_CHUNK]:
                groups.setdefault(name, []).append(decode_key(key))
            missing = await self._call(_scheduler_ops.pin, groups, 0.0)
            lost_total += self._report_lost(missing)
        released = await self._release_unreferenced(list(by_channel))
        elapsed = time.perf_counter() - started
        self.last_reassert_keys = total
        self.last_reassert_seconds = elapsed
        self.ready.set()
        logger.info(
            "keeper re-asserted %d future keys in %d channels on %s in %.3f s (%d unknown, "
            "marked lost; %d no longer referenced, released)",
            total,
            len(by_channel),
            self.address,
            elapsed,
            lost_total,
            released,
        )

    async def _release_unreferenced(self, channels: list[str]) -> int:
        """Release what the channels' names desire but the channels no longer reference.

        Catches releases a previous leader decided but did not live to send. Also releases
        writers' pins of appends not committed yet; harmless, since each such writer keeps
        its own Future until the append is answered, and that answer waits for this
        keeper's confirmation, which pins again.
        """
        names = [pin_name(channel) for channel in channels]
        released = 0
        for start in range(0, len(names), REASSERT_CHUNK):
            wanted = await self._call(_scheduler_ops.wanted, names[start : start + REASSERT_CHUNK])
            groups: dict[str, list[Any]] = {}
            for name, keys in wanted.items():
                channel = name[len(PIN_PREFIX) :]
                gone = self._unreferenced(channel, [encode_key(k) for k in keys])
                if gone:
                    groups[name] = [decode_key(k) for k in gone]
            if groups:
                released += await self._call(_scheduler_ops.release, groups)
        self.released_total += released
        return released

    def _report_lost(self, missing: dict[str, list[Any]]) -> int:
        count = 0
        for name, keys in missing.items():
            channel = name[len(PIN_PREFIX) :]
            self._mark_lost(channel, [encode_key(k) for k in keys])
            count += len(keys)
        return count

    async def _serve_requests(self) -> None:
        """Run queued releases and confirmations in order until leadership or the link ends."""
        while self._leading:
            if self._releases:
                await self._run_releases()
            if self._confirms:
                await self._run_confirms()
            if not self._releases and not self._confirms:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), HEALTH_INTERVAL)
                except asyncio.TimeoutError:
                    await self._check_scheduler()
            elif self._confirms and not self._releases:
                # Keys not known yet: give the writers' submissions a moment.
                await asyncio.sleep(0.02)

    async def _check_scheduler(self) -> None:
        """Raise (so the worker reconnects and re-asserts) if the scheduler was replaced."""
        client = self._client
        if client is None:
            raise ConnectionError("not connected")
        identity = await asyncio.wait_for(client.scheduler.identity(), RPC_TIMEOUT)
        if identity.get("id") != self._scheduler_id:
            raise ConnectionError(
                f"the scheduler was replaced (id {self._scheduler_id} -> {identity.get('id')}); "
                "its keys are gone"
            )

    async def _run_releases(self) -> None:
        batch, self._releases = self._releases, []
        groups: dict[str, list[Any]] = {}
        for channel, keys in batch:
            # Checked now, not when the trim happened: a key appended again since must stay.
            gone = self._unreferenced(channel, keys)
            if gone:
                groups.setdefault(pin_name(channel), []).extend(decode_key(k) for k in gone)
        if groups:
            try:
                self.released_total += await self._call(_scheduler_ops.release, groups)
            except Exception:
                self._releases[:0] = batch  # try again after reconnecting
                raise

    async def _run_confirms(self) -> None:
        batch = [c for c in self._confirms if not c.future.done()]
        self._confirms = []
        groups: dict[str, list[Any]] = {}
        for request in batch:
            # A key trimmed by the very append that brought it (maxlen) is released, not
            # pinned; it counts as confirmed.
            gone = set(self._unreferenced(request.channel, request.keys))
            if gone:
                request.keys = [k for k in request.keys if k not in gone]
            groups.setdefault(pin_name(request.channel), []).extend(
                decode_key(k) for k in request.keys
            )
        groups = {name: keys for name, keys in groups.items() if keys}
        if not groups:
            for request in batch:
                request.future.set_result([])
            return
        try:
            missing = await self._call(_scheduler_ops.pin, groups, 0.05)
        except Exception:
            self._confirms[:0] = batch
            raise
        unknown = {name: {encode_key(k) for k in keys} for name, keys in missing.items()}
        now = asyncio.get_running_loop().time()
        for request in batch:
            lost = [k for k in request.keys if k in unknown.get(pin_name(request.channel), ())]
            if not lost:
                request.future.set_result([])
            elif now >= request.deadline:
                logger.warning(
                    "channel %r: %d future key(s) unknown to the Dask scheduler after %.1f s; "
                    "marked lost",
                    request.channel,
                    len(lost),
                    self.confirm_wait,
                )
                request.future.set_result(lost)
            else:
                # Pinned what is known; ask again for the rest.
                request.keys = lost
                self._confirms.append(request)

    def _fail_confirms(self, error: Exception) -> None:
        confirms, self._confirms = self._confirms, []
        for request in confirms:
            if not request.future.done():
                request.future.set_exception(error)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
