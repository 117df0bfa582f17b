"""Client and Channel: the blocking API, a facade over :class:`~raftchan.client.AsyncClient`.

Each :class:`Client` owns a private event loop running in a daemon thread; every
blocking call submits a coroutine to that loop and waits for its result. Appends do not
wait: they are encoded in the caller's thread (so encoding errors raise there) and
handed to the loop in order, many at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sys
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Generator, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from raftchan.client import AsyncChannel, AsyncClient, RetryPolicy, _Caller, _run_as
from raftchan.codec import Encoded, ItemCodec
from raftchan.errors import Closed
from raftchan.limits import DEFAULT_LIMITS, Limits
from raftchan.protocol import ChannelInfo
from raftchan.security import ClientTLS

__all__ = ["Channel", "Client"]

_T = TypeVar("_T")

#: How often a blocked call checks that the loop thread is still alive.
_LIVENESS_CHECK = 1.0


class Client:
    """A blocking client of one raftchan cluster; safe to share between threads.

    Takes the same arguments as :class:`~raftchan.client.AsyncClient` (address list or
    ``$RAFTCHAN_ADDRESS``, ``timeout``, ``retry``, ``codec``, ``dask_client``, ``token``,
    ``tls``, ...).
    Without ``dask_client``, the Dask client current in the constructing thread (a
    ``worker_client()`` inside a task, or the default client) is used when there is one,
    since reads are decoded on the client's own thread, where ``get_client()`` would not
    find a task's worker client. No I/O happens until
    the first operation. Use it as a context manager or call :meth:`close`; a client
    that is dropped without closing stops its thread when it is garbage collected.
    """

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        codec: ItemCodec | None = None,
        limits: Limits = DEFAULT_LIMITS,
        max_in_flight: int = 8,
        poll_wait: float = 5.0,
        dask_client: Any = None,
        token: str | None = None,
        tls: ClientTLS = None,
    ) -> None:
        if dask_client is None and codec is None:
            dask_client = _current_dask_client()
        self._async = AsyncClient(
            address,
            timeout=timeout,
            retry=retry,
            codec=codec,
            limits=limits,
            max_in_flight=max_in_flight,
            poll_wait=poll_wait,
            dask_client=dask_client,
            token=token,
            tls=tls,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=_run_forever, args=(self._loop,), name="raftchan-client", daemon=True
        )
        # Appends waiting to be handed to the loop, in the order they were made.
        self._handoff: list[tuple[str, list[Encoded], _Caller]] = []
        self._handoff_lock = threading.Lock()
        self._closed = False
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_loop, self._loop, self._thread)

    # -- public API ----------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return self._async.addresses

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self, timeout: float | None = None) -> str:
        """Connect to some node now; see :meth:`AsyncClient.connect`."""
        return self._run(self._async.connect(timeout))

    def channel(
        self,
        name: str,
        maxlen: int | None = None,
        timeout: float | None = None,
        *,
        create: bool = True,
    ) -> Channel:
        """Open channel ``name`` (created if missing, unless ``create=False``; ``maxlen``
        as in :meth:`AsyncClient.channel`, which also lists the errors)."""
        opened = self._async.channel(name, maxlen, timeout, create=create)
        return Channel(self, self._run(opened))

    def flush(self, timeout: float | None = None) -> None:
        """Block until every earlier append of this client is answered; see
        :meth:`AsyncClient.flush` (raises a refusal, or Timeout). A refusal is raised
        by the next flush of the thread that made the refused append, whatever flushes
        of other threads raised before."""
        self._run(self._async.flush(timeout))

    def status(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every known node's status; see :meth:`AsyncClient.status`."""
        return self._run(self._async.status(timeout))

    def members(self, timeout: float | None = None) -> dict[str, Any]:
        """The cluster's membership as the leader has it; see :meth:`AsyncClient.members`."""
        return self._run(self._async.members(timeout))

    def add_member(
        self,
        raft_address: str,
        client_address: str,
        name: str | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        """Add a node, once committed; see :meth:`AsyncClient.add_member` (and its errors)."""
        return self._run(self._async.add_member(raft_address, client_address, name, timeout))

    def remove_member(self, raft_address: str, timeout: float | None = None) -> list[str]:
        """Remove a node, once committed; see :meth:`AsyncClient.remove_member`."""
        return self._run(self._async.remove_member(raft_address, timeout))

    def close(self, timeout: float = 5.0) -> None:
        """Flush (best effort, ``timeout`` seconds), end the session, stop the loop thread.

        Calls made afterwards raise :class:`~raftchan.errors.Closed`; so do calls blocked
        in other threads (an iteration, a flush) at that moment.
        """
        if self._closed:
            return
        try:
            self._run(self._async.close(timeout))
        finally:
            self._closed = True
            self._finalizer()  # stops the loop; its thread then closes it
            self._thread.join(timeout=5.0)

    # -- plumbing for Channel ------------------------------------------------------------

    def _append(self, channel: str, items: Iterable[Any]) -> None:
        datas = self._async._prepare(channel, items)
        if not datas:
            return
        owner = threading.current_thread()  # its flush raises their refusals
        with self._handoff_lock:
            # One wake-up of the loop per burst of appends, not one per item.
            first = not self._handoff
            self._handoff.append((channel, datas, owner))
        if first:
            try:
                self._loop.call_soon_threadsafe(self._drain_handoff)
            except RuntimeError:  # the loop is gone: the client was closed meanwhile
                raise Closed("this raftchan client is closed") from None

    def _drain_handoff(self) -> None:
        """On the loop: queue handed-off appends in the order they were made."""
        with self._handoff_lock:
            batch, self._handoff = self._handoff, []
        for channel, datas, owner in batch:
            if self._async.closed:
                return
            self._async._enqueue(channel, datas, owner)

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the loop and wait for its result, after all earlier appends."""
        if self._closed:
            coro.close()
            raise Closed("this raftchan client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking raftchan call from the client's own event loop")
        caller = threading.current_thread()
        future = asyncio.run_coroutine_threadsafe(self._after_handoff(coro, caller), self._loop)
        while True:
            try:
                return future.result(timeout=_LIVENESS_CHECK)
            except concurrent.futures.TimeoutError:
                if not self._thread.is_alive():
                    raise Closed("this raftchan client is closed") from None
            except concurrent.futures.CancelledError:
                raise Closed("this raftchan client is closed") from None
            except (KeyboardInterrupt, SystemExit):
                future.cancel()
                raise

    async def _after_handoff(
        self, coro: Coroutine[Any, Any, _T], caller: threading.Thread
    ) -> _T:
        # The call is the calling thread's: a flush, put, stop or delete counts as its.
        _run_as(caller)
        # Appends made before this call in any thread reach the outbox before it runs:
        # that is what makes flush() cover "every earlier append".
        self._drain_handoff()
        return await coro

    def _run_soon(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Schedule ``coro`` on the loop without waiting (cleanup); dropped if closed."""
        if self._closed:
            coro.close()
            return
        try:
            asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:
            coro.close()


class Channel:
    """One channel of a :class:`Client`; get it with ``client.channel(name)``.

    Every ``timeout`` is in seconds, defaults to the client's, and bounds the whole
    operation including retries. Methods are safe to call from any thread.
    """

    def __init__(self, client: Client, channel: AsyncChannel) -> None:
        self._client = client
        self._channel = channel
        self.name = channel.name

    def __repr__(self) -> str:
        return f"<Channel {self.name!r}>"

    def append(self, item: Any) -> None:
        """Queue ``item``; returns at once. Errors that can be known now raise here.

        :class:`~raftchan.errors.ItemNotEncodable` / :class:`~raftchan.errors.LimitExceeded`
        for an item that cannot be sent, :class:`~raftchan.errors.ChannelStopped` if the
        channel is known to be stopped, :class:`~raftchan.errors.Closed` after close.
        Anything else surfaces at the next :meth:`flush`.
        """
        self._client._append(self.name, (item,))

    def extend(self, items: Iterable[Any]) -> None:
        """Queue several items in order; if any cannot be encoded, none is queued."""
        self._client._append(self.name, items)

    def flush(self, timeout: float | None = None) -> None:
        """Block until every earlier append of this client (any channel) is answered;
        raises a refusal or Timeout as :meth:`Client.flush` does."""
        self._client.flush(timeout)

    def put(self, item: Any, timeout: float | None = None) -> int:
        """Append ``item``, block until it and every earlier append are answered, return
        its index; raises only this item's refusal (others are left to :meth:`flush`).
        See :meth:`AsyncChannel.put <raftchan.client.AsyncChannel.put>`."""
        return self._client._run(self._channel.put(item, timeout))

    @property
    def data(self) -> deque[Any]:
        """A linearizable snapshot of the retained items (a ``collections.deque``)."""
        return self._client._run(self._channel.data())

    def __len__(self) -> int:
        """The number of retained items (linearizable)."""
        return self._client._run(self._channel.len())

    def info(self, timeout: float | None = None) -> ChannelInfo:
        """Indexes, stop marker and maxlen of the channel (linearizable)."""
        return self._client._run(self._channel.info(timeout))

    def read(
        self, start: int | None = None, end: int | None = None, timeout: float | None = None
    ) -> list[Any]:
        """Items with indexes in ``[start, end)``; see :meth:`AsyncChannel.read`."""
        return self._client._run(self._channel.read(start, end, timeout))

    def __iter__(self) -> Iterator[Any]:
        return self.iterate()

    def iterate(self, start: int | None = None) -> Generator[Any, None, None]:
        """Items from ``start`` (default: the oldest retained), then new ones as they come.

        Ends once the channel is stopped (by anyone); see :meth:`AsyncChannel.iterate`.
        Items are fetched a response at a time on the client's loop. Call ``close()`` on
        the generator (or let it be collected) to stop early.
        """
        batches = self._client._async._batches(self.name, start)
        try:
            while True:
                batch = self._client._run(_next_batch(batches))
                if batch is None:
                    return
                yield from batch
        finally:
            self._client._run_soon(batches.aclose())

    def stop(self, timeout: float | None = None) -> None:
        """Flush, then stop the channel; see :meth:`AsyncChannel.stop`."""
        self._client._run(self._channel.stop(timeout))

    def delete(self, timeout: float | None = None) -> None:
        """Flush, then delete the channel; see :meth:`AsyncChannel.delete`."""
        self._client._run(self._channel.delete(timeout))


def _current_dask_client() -> Any:
    """The Dask client ``distributed.get_client()`` gives in this thread, if one exists."""
    if "distributed" not in sys.modules:
        return None  # no Dask client can exist, and importing distributed is not free
    try:
        from distributed import default_client
        from distributed.worker import get_worker
    except ImportError:
        return None
    try:
        get_worker()
    except ValueError:
        pass
    else:
        # Inside a task: get_client() gives the worker's client (creating it if needed).
        from distributed import get_client

        return get_client()
    try:
        return default_client()
    except ValueError:
        return None


async def _next_batch(batches: AsyncIterator[list[Any]]) -> list[Any] | None:
    try:
        return await batches.__anext__()
    except StopAsyncIteration:
        return None


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # Iterations abandoned mid-way leave async generators to finalize.
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


#: Seconds a client that was never closed gives its loop to wind down at exit.
_STOP_WAIT = 2.0


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Cancel what still runs on ``loop`` and stop it (from any thread), and wait up to
    ``_STOP_WAIT`` seconds for ``thread`` to end: at interpreter exit (a client never
    closed) its tasks were otherwise destroyed pending, each with a message."""

    async def cancel_rest() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        loop.stop()

    with contextlib.suppress(RuntimeError):  # already closed
        asyncio.run_coroutine_threadsafe(cancel_rest(), loop)
    if threading.current_thread() is not thread:
        thread.join(_STOP_WAIT)
