"""AsyncClient: leader discovery, retries, sessions, pipelined appends, resuming readers.

How appends travel
    ``append`` encodes the item and queues it in the client's outbox with the next
    sequence number of the client's session (one numbering across all channels). A
    background sender turns runs of queued items for the same channel into ``append``
    requests and keeps up to ``max_in_flight`` of them on the one leader connection.
    Every item stays queued until the cluster has answered for it. When a connection
    drops, the leader changes, or an answer leaves the outcome unknown, the sender
    reconnects and re-sends *every* unanswered item in sequence order with its original
    sequence number; the replicated state recognises repeats, so nothing is stored twice
    and nothing is reordered. ``flush`` waits for the answers.

What the errors let a caller conclude
    :class:`~raftchan.errors.NoLeader` from an operation: no node could be asked within
    its deadline; nothing was executed. :class:`~raftchan.errors.Timeout`: the request
    was sent but no answer came within the deadline; it may or may not have taken effect
    (for ``flush``: the appends stay queued and keep being retried). Channel errors
    (:class:`~raftchan.errors.ChannelStopped`, ...) mean the request was refused and
    changed nothing. :class:`~raftchan.errors.Closed`: this client was closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import heapq
import itertools
import logging
import os
import random
import ssl
import sys
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias, TypeVar

import msgpack

from raftchan import protocol
from raftchan.codec import Encoded, ItemCodec
from raftchan.config import parse_addresses, split_address
from raftchan.errors import (
    ChannelNotFound,
    ChannelStopped,
    Closed,
    CommitUnknown,
    DaskUnavailable,
    FutureLost,
    LimitExceeded,
    MemberExists,
    MemberNotFound,
    NodeNotTrusted,
    NoLeader,
    NotLeader,
    ProtocolError,
    RaftchanError,
    RequestInvalid,
    Timeout,
    TrimmedGap,
    Unauthorized,
)
from raftchan.limits import DEFAULT_LIMITS, Limits
from raftchan.protocol import ChannelInfo, ReadResult
from raftchan.security import ClientTLS, client_ssl_context, resolve_token

try:  # Linux and other Unix: how much of a socket's output its peer has not acknowledged
    import fcntl
    import termios

    _SEND_QUEUE_IOCTL: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # elsewhere only asyncio's own buffer is counted
    _SEND_QUEUE_IOCTL = None

__all__ = ["AsyncChannel", "AsyncClient", "Backoff", "RetryPolicy"]

logger = logging.getLogger(__name__)

#: Bytes of an append frame spent on everything but the items (ids, names, session).
_APPEND_OVERHEAD = 4096
#: msgpack header bytes of one ``bin`` item inside an append frame (bin 32 at most).
_ITEM_OVERHEAD = 5

_T = TypeVar("_T")

#: Refusals decided by the replicated state itself: they consume their sequence numbers.
#: Anything else refused was refused by the node before the state saw it.
_STATE_REFUSALS = (ChannelStopped, ChannelNotFound)

#: What dialling a node may raise: refused/reset/unresolvable (OSError), a timeout
#: (not an OSError on Python 3.10), EOF during the handshake, a malformed leader hint
#: (ValueError), or a handshake the node rejected (RaftchanError).
_DIAL_ERRORS = (OSError, asyncio.TimeoutError, EOFError, ValueError, RaftchanError)

#: Dial outcomes that another attempt would only repeat: the client gives up at once.
_FINAL_DIAL_ERRORS = (Unauthorized, NodeNotTrusted)


@dataclass(frozen=True)
class _Credentials:
    """How this client proves itself (token) and checks the node (TLS context)."""

    token: str | None = None
    ssl: ssl.SSLContext | None = None


# ---------------------------------------------------------------------------------------
# Retry policy


@dataclass(frozen=True)
class RetryPolicy:
    """How the client waits between attempts and how long it keeps trying.

    After the ``n``-th failed attempt of an operation (``n`` from 0) the client waits
    ``min(initial_delay * multiplier**n, max_delay)``, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` so that many clients do not retry in lockstep.

    Attributes:
        initial_delay: seconds to wait after the first failed attempt.
        multiplier: growth of the delay per further failed attempt (at least 1).
        max_delay: cap of the delay before jitter, in seconds.
        jitter: fraction of random spread applied to each delay (0 to 1).
        timeout: default overall deadline of one operation (``channel``, ``flush``,
            ``data``, ``stop``, one poll of an iteration, ...) in seconds, covering every
            reconnect, redirect and retry. An operation given its own ``timeout`` uses
            that instead.
        attempt_timeout: how long the client waits for any single response beyond the
            poll's own wait. A node that stays silent that long is treated as gone: the
            connection is dropped and the client moves on.
        connect_timeout: bounds one dial of a node, connect and handshake together (at most
            ``attempt_timeout``). A node whose host is down or cut off the network never
            answers a dial; the client tries the next node after this long.
        probe_after: seconds a connection may stay quiet (nothing received) while
            requests wait on it before the client pings the node.
        probe_timeout: how long the node may then show no sign of itself (no answer to the
            ping, no frame, no more taken of the client's bytes sent before the ping)
            before it counts as gone: the connection is dropped and its requests are
            re-sent to another node, well before ``attempt_timeout``. A node that holds a
            request (an election, a slow commit) answers pings meanwhile; one whose host
            lost power or was cut off, or whose process hangs, answers nothing and closes
            nothing, and is left after ``probe_after + probe_timeout`` seconds. No ping is
            sent on a connection with as many requests waiting as the node reads at once
            (its announced ``max_pending_requests``); there only ``attempt_timeout``
            applies.
    """

    initial_delay: float = 0.05
    multiplier: float = 2.0
    # Nodes hold a request while an election is on and answer once a leader emerges, so
    # backoff matters only when no node answers at all; a short cap keeps the client
    # close behind a node that comes back.
    max_delay: float = 0.5
    jitter: float = 0.2
    timeout: float = 30.0
    attempt_timeout: float = 10.0
    # An election takes about a second: a client should not be left behind much longer.
    connect_timeout: float = 2.0
    probe_after: float = 1.0
    probe_timeout: float = 1.0

    def __post_init__(self) -> None:
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("retry delays must not be negative")
        if self.multiplier < 1:
            raise ValueError("the retry multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter is a fraction between 0 and 1")
        timeouts = (
            self.timeout,
            self.attempt_timeout,
            self.connect_timeout,
            self.probe_after,
            self.probe_timeout,
        )
        if min(timeouts) <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def dial_timeout(self) -> float:
        """Bounds one dial of a node, connect and handshake together."""
        return min(self.connect_timeout, self.attempt_timeout)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        # Cap the exponent first: a long outage must not overflow the float.
        base = self.initial_delay * self.multiplier ** min(attempt, 64)
        base = min(base, self.max_delay)
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1.0 + spread))


class Backoff:
    """Successive delays of one :class:`RetryPolicy`; ``reset`` after a success."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self._policy = policy
        self._rng = rng
        self.attempt = 0

    def next_delay(self) -> float:
        delay = self._policy.delay(self.attempt, self._rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


# ---------------------------------------------------------------------------------------
# Addresses


class _AddressBook:
    """Which node to dial next: the leader hint if any, else round-robin from ``start``."""

    def __init__(self, addresses: Sequence[str], start: int = 0) -> None:
        if not addresses:
            raise ValueError("at least one address is needed")
        self.addresses = list(addresses)
        self._cursor = start
        self._hint: str | None = None

    def hint(self, leader: str | None) -> None:
        """Dial ``leader`` next (a node's ``not_leader`` answer named it)."""
        self._hint = leader

    def step_past(self, address: str) -> None:
        """Do not dial ``address`` next (it just closed or went quiet) unless it is hinted."""
        if self.addresses[self._cursor % len(self.addresses)] == address:
            self._cursor += 1

    def next(self) -> str:
        if self._hint is not None:
            address, self._hint = self._hint, None
            return address
        address = self.addresses[self._cursor % len(self.addresses)]
        self._cursor += 1
        return address


class _Link:
    """One connection slot: the open connection, the dial in progress, and where to dial.

    The client keeps two: one for the leader (writes and linearizable reads) and one
    for long polls, which any caught-up node may answer.
    """

    def __init__(
        self,
        book: _AddressBook,
        retry: RetryPolicy,
        max_frame_bytes: int,
        credentials: _Credentials,
    ) -> None:
        self.book = book
        self.retry = retry
        self.max_frame_bytes = max_frame_bytes
        self.credentials = credentials
        #: A refusal no retry can cure (wrong token, untrusted node): raised to every caller.
        self.refused: RaftchanError | None = None
        self.conn: _Connection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.last_error = "no attempt yet"
        self.closed = False

    async def connection(self, deadline: float | None) -> _Connection:
        """The open connection, dialling first if needed; waits at most until ``deadline``.

        Raises :class:`_DeadlinePassed` when the deadline passes first.
        """
        while True:
            if self.closed:
                raise Closed("this raftchan client is closed")
            if self.refused is not None:
                raise self.refused
            conn = self.conn
            if conn is not None and not conn.closed:
                return conn
            task = self.connect_task
            if task is None or task.done():
                task = self.connect_task = asyncio.get_running_loop().create_task(self._dial())
            remaining = None if deadline is None else _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise _DeadlinePassed
            done, _ = await asyncio.wait({task}, timeout=remaining)
            if not done:
                raise _DeadlinePassed
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # a bug in _dial: surface it

    async def _dial(self) -> None:
        """Dial nodes (hint first, then round-robin) with backoff until one handshakes."""
        backoff = Backoff(self.retry)
        while not self.closed:
            address = self.book.next()
            try:
                conn = await _Connection.open(
                    address,
                    self.retry.dial_timeout,
                    self.max_frame_bytes,
                    self.credentials,
                    probe=(self.retry.probe_after, self.retry.probe_timeout),
                )
            except _FINAL_DIAL_ERRORS as exc:
                logger.error("%s refused this client: %s", address, exc)
                self.refused = exc
                return
            except _DIAL_ERRORS as exc:
                self.last_error = f"{address}: {_dial_error_text(exc)}"
                logger.debug("connecting failed: %s", self.last_error)
                await asyncio.sleep(backoff.next_delay())
                continue
            logger.debug("connected to %s (%s)", conn.node, address)
            self.conn = conn
            return

    def abandon(self, conn: _Connection, hint: str | None) -> None:
        """Stop using ``conn`` (wrong node, or broken); dial ``hint`` next if known."""
        if self.conn is conn:
            self.book.hint(hint)
            self.book.step_past(conn.address)
            self.conn = None
            conn.close()

    async def close(self) -> None:
        self.closed = True
        task = self.connect_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close(Closed("this raftchan client is closed"))
            await conn.wait_closed()


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


class _FlushExpired(Exception):
    """A flush waiter's deadline passed (turned into :class:`Timeout` by ``flush``)."""


class _FlushWaiters:
    """Futures waiting for "every append up to ticket T is answered", nearest T first.

    Many producers each awaiting their own ``put`` make many waiters; a heap releases the
    ones an answer completes without looking at the others. Each waiter also has a
    deadline (the loop's clock). One loop timer, armed for the earliest deadline, expires
    them: a timer of its own per flush cost about as much as the rest of a ``put``.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, asyncio.Future[None], float]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, target: int, future: asyncio.Future[None], deadline: float) -> None:
        """Wait for ticket ``target``; at ``deadline`` the future fails with _FlushExpired."""
        heapq.heappush(self._heap, (target, next(self._order), future, deadline))
        if self._timer is None or deadline < self._timer.when():
            self._arm(deadline)

    def release_through(self, done: int) -> None:
        """Resolve every waiter whose target is at most ``done``."""
        heap = self._heap
        while heap and heap[0][0] <= done:
            future = heapq.heappop(heap)[2]
            if not future.done():
                future.set_result(None)

    def fail_all(self, error: BaseException) -> None:
        """Fail every waiter that is still waiting with ``error``, and forget them all."""
        heap, self._heap = self._heap, []
        self._disarm()
        for _, _, future, _ in heap:
            if not future.done():
                future.set_exception(error)

    def _arm(self, at: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_at(at, self._expire_due)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None

    def _expire_due(self) -> None:
        # Runs once per deadline reached, usually that of a waiter released long ago: a
        # scan of the waiting ones is cheap at that rate. A millisecond of slack keeps a
        # timer that fires a hair early from re-arming for the same instant.
        self._timer = None
        now = asyncio.get_running_loop().time() + 0.001
        waiting = []
        for entry in self._heap:
            future, deadline = entry[2], entry[3]
            if future.done():
                continue
            if deadline <= now:
                future.set_exception(_FlushExpired())
            else:
                waiting.append(entry)
        heapq.heapify(waiting)
        self._heap = waiting
        if waiting:
            self._arm(min(entry[3] for entry in waiting))


# ---------------------------------------------------------------------------------------
# The outbox: appends from queueing to their answer (pure logic, no I/O)


#: Who makes appends and flushes: the asyncio task, or the thread of a blocking call.
_Caller: TypeAlias = "asyncio.Task[Any] | threading.Thread"

#: Set by the blocking Client in the loop task that runs a call for a thread (and so in
#: the tasks that task starts): the call counts as that thread's.
_THREAD_CALLER: contextvars.ContextVar[threading.Thread] = contextvars.ContextVar(
    "raftchan_thread_caller"
)
#: The maker of appends queued without one (the outbox's own tests).
_UNKNOWN_CALLER: _Caller = threading.Thread(name="raftchan-unknown-caller")


def _caller() -> _Caller:
    """The calling thread (blocking Client) or asyncio task: a refusal is raised to its
    maker. A flush run in a task of its own (gather; asyncio.wait_for before Python
    3.12) flushes as that task."""
    thread = _THREAD_CALLER.get(None)
    if thread is not None:
        return thread
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        task = None
    return threading.current_thread() if task is None else task


def _run_as(caller: threading.Thread) -> None:
    """In the loop task running a blocking call: the call is ``caller``'s (this task's
    context only; the calling thread's own context is left alone)."""
    _THREAD_CALLER.set(caller)


class _Refusal:
    """An append the cluster refused (or stored with lost futures), until reported.

    Its maker is held weakly: once its thread or task is gone, only others can be told.
    """

    __slots__ = ("ticket", "error", "_owner", "told_other")

    def __init__(self, ticket: int, error: RaftchanError, owner: _Caller) -> None:
        self.ticket = ticket  # the first refused item's ticket
        self.error = error
        self._owner = weakref.ref(owner)
        self.told_other = False  # raised to a flush of another caller already

    def made_by(self, caller: _Caller) -> bool:
        return self._owner() is caller

    @property
    def orphaned(self) -> bool:
        return self._owner() is None


#: Refusals kept for a maker that has not flushed since, once another caller was told:
#: a thread that appends and never flushes must not grow the client without bound.
_MAX_KEPT_REFUSALS = 1000
#: Refusals kept at all, told or not (the oldest go first, with a warning).
_MAX_REFUSALS = 10 * _MAX_KEPT_REFUSALS


@dataclass(eq=False)
class _Item:
    ticket: int  # position in this client's append order; never changes
    seq: int  # sequence number within the current session
    channel: str
    data: bytes
    owner: _Caller | None = None  # who appended it (see _Refusal); None in unit tests
    sent: bool = False  # sent at least once under the current session
    keys: tuple[bytes, ...] = ()  # future keys the item references (see codec.Encoded)
    # The referenced objects (Dask futures): the writer's own references keep them alive
    # on the scheduler until the cluster has answered, i.e. confirmed its own pin.
    refs: tuple[Any, ...] = ()


@dataclass(frozen=True, eq=False)
class _Batch:
    """The items of one append request, and the session and epoch it was sent in."""

    epoch: int
    session: bytes
    channel: str
    items: tuple[_Item, ...]
    #: Some item went out before in this session: an earlier request may have stored it.
    resend: bool = False

    @property
    def seq(self) -> int:
        return self.items[0].seq

    @property
    def payload(self) -> list[bytes]:
        return [item.data for item in self.items]

    @property
    def keys(self) -> list[list[bytes]] | None:
        """Per item, the future keys it references; ``None`` when no item references any."""
        if not any(item.keys for item in self.items):
            return None
        return [list(item.keys) for item in self.items]


class _Outbox:
    """Every append not yet answered, in order; see the module docstring.

    ``epoch`` grows whenever everything unanswered must be sent again; answers to
    requests of an older epoch still count when they are definite (stored or refused),
    but cannot trigger yet another re-send.

    Tickets number the appends in the order they were made and never change, so
    ``flush`` can wait for "everything up to ticket T" even if the items are renumbered
    into a new session (see :meth:`_rotate`).
    """

    def __init__(self, new_session: Callable[[], bytes] | None = None) -> None:
        self._new_session = new_session or (lambda: os.urandom(protocol.SESSION_ID_BYTES))
        self.session = self._new_session()
        #: True once anything was sent under ``session`` (so ending it is worth a request).
        self.session_used = False
        self.epoch = 0
        self._pending: OrderedDict[int, _Item] = OrderedDict()
        self._unsent: deque[_Item] = deque()
        self._last_ticket = 0
        self._next_seq = 1
        self._errors: list[_Refusal] = []
        #: The refusals of watched tickets (``put``), reported by the put alone.
        self.refused: dict[int, RaftchanError] = {}
        #: Items refused before they were sent, ever (see next_batch).
        self.refused_unsent = 0
        #: The session's seq 1 was refused before reaching the state (see expire()).
        self._unborn = False
        #: Tickets whose index the caller waits for (``put``), and the indexes they got.
        self.watched: set[int] = set()
        self.indexes: dict[int, int] = {}

    # -- queueing and batching ------------------------------------------------------------

    @property
    def last_ticket(self) -> int:
        return self._last_ticket

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(
        self, channel: str, datas: Iterable[bytes | Encoded], owner: _Caller | None = None
    ) -> int:
        """Queue encoded items for ``channel``, made by ``owner``; the last one's ticket."""
        for data in datas:
            self._last_ticket += 1
            if isinstance(data, Encoded):
                item = _Item(
                    self._last_ticket,
                    self._next_seq,
                    channel,
                    data.data,
                    owner=owner,
                    keys=data.keys,
                    refs=data.refs,
                )
            else:
                item = _Item(self._last_ticket, self._next_seq, channel, data, owner=owner)
            self._next_seq += 1
            self._pending[item.ticket] = item
            self._unsent.append(item)
        return self._last_ticket

    def done_through(self) -> int:
        """Highest ticket T such that every append up to T is answered."""
        for ticket in self._pending:
            return ticket - 1
        return self._last_ticket

    def has_unsent(self) -> bool:
        self._skip_answered()
        return bool(self._unsent)

    def next_batch(
        self, max_items: int, max_bytes: int, max_item_bytes: int | None = None
    ) -> _Batch | None:
        """The next run of unsent items for one channel, within the given bounds.

        Takes at least one item when it returns a batch, so an item that alone exceeds
        ``max_bytes`` still goes out (and gets the node's own verdict). An item above
        ``max_item_bytes`` (the node's bound) that was never sent in this session is
        refused here instead, and the items after it are renumbered: the node would
        refuse the whole request it went out in, and its neighbours with it. ``None``
        when nothing is left to send (refusing may have answered the last items).
        """
        taken: list[_Item] = []
        while self._unsent and len(taken) < max_items:
            item = self._unsent[0]
            if item.ticket not in self._pending:  # answered while queued for a re-send
                self._unsent.popleft()
                continue
            if (
                max_item_bytes is not None
                and len(item.data) > max_item_bytes
                and self._refuse_unsent(item, max_item_bytes)
            ):
                continue
            if not taken:
                channel, size = item.channel, len(item.channel)
            cost = len(item.data) + _ITEM_OVERHEAD
            if item.channel != channel or (taken and size + cost > max_bytes):
                break
            if taken and item.seq != taken[-1].seq + 1:
                # A hole (a refused item's number): the state numbers a request's items
                # from its first, so one request across it would store them under numbers
                # one lower than ours. Sent apart, the part after it meets the state's
                # "sequence gap" instead (see gap()).
                break
            taken.append(self._unsent.popleft())
            size += cost
        if not taken:
            return None
        resend = any(item.sent for item in taken)
        for item in taken:
            item.sent = True
        self.session_used = True
        return _Batch(self.epoch, self.session, channel, tuple(taken), resend)

    def _refuse_unsent(self, item: _Item, limit: int) -> bool:
        """Refuse ``item`` (too large for the node) before it is sent, if nothing numbered
        after it was sent in this session: they all move down one number, so no request
        ever meets a hole in the numbers. Returns whether it did."""
        later = [other for other in self._pending.values() if other.seq > item.seq]
        if item.sent or any(other.sent for other in later):
            return False  # numbers the state may have seen: leave it to the node
        self._unsent.remove(item)
        for other in later:
            other.seq -= 1
        self._next_seq -= 1
        self.refused_unsent += 1
        self._fail([item], _item_too_large(item.channel, len(item.data), limit))
        return True

    def _skip_answered(self) -> None:
        while self._unsent and self._unsent[0].ticket not in self._pending:
            self._unsent.popleft()

    # -- answers -------------------------------------------------------------------------

    def acknowledge(
        self, batch: _Batch, indexes: Sequence[int] = (), lost: Sequence[bytes] = ()
    ) -> None:
        """The batch is stored (or was stored before: a repeat) at ``indexes``.

        ``lost``: future keys of the batch the Dask scheduler did not know when the leader
        pinned them. The items are stored all the same; the next ``flush`` covering them
        raises :class:`FutureLost` naming those keys.
        """
        answered: list[_Item] = []
        for position, item in enumerate(batch.items):
            if self._pending.pop(item.ticket, None) is None:
                continue
            answered.append(item)
            if item.ticket in self.watched and position < len(indexes):
                self.indexes[item.ticket] = indexes[position]
        holders = [item for item in answered if set(item.keys) & set(lost)]
        if holders:
            names = ", ".join(_key_repr(key) for key in lost)
            error = FutureLost(
                f"appended to {batch.channel!r}, but the Dask scheduler did not know "
                f"the future(s) {names}: stored and marked lost",
                channel=batch.channel,
                keys=[_key_repr(key) for key in lost],
            )
            self._record(holders, error)

    def refuse(self, batch: _Batch, error: RaftchanError) -> None:
        """The cluster refused the batch for a reason that a retry would not change."""
        if batch.session != self.session:
            # Answer from before a session change: the items were renumbered and will get
            # their own answer in the new session.
            return
        by_node = not isinstance(error, _STATE_REFUSALS)
        if batch.resend:
            # A request that re-sent items (after a lost answer) was refused: an earlier
            # request may have stored some of them. A re-send can join requests that were
            # sent apart, and the state refuses a decided range if any part of it was
            # refused (a node may also hold a lower bound than the one that took them).
            error = CommitUnknown(
                f"a re-sent append was refused ({error}); an earlier attempt may have "
                "stored it",
                refusal=error.code,
            )
        elif batch.seq == 1 and by_node:
            # Refused before reaching the replicated state, so the state never created
            # this session; see expire().
            self._unborn = True
        items = [item for item in batch.items if item.ticket in self._pending]
        position = error.details.get("item") if isinstance(error, LimitExceeded) else None
        if items and isinstance(position, int) and 0 <= position < len(batch.items):
            # One item too large for the node took the whole request down: next_batch
            # keeps such items out of requests it builds, except items it sent before
            # (numbers the state may know), or when it did not know the node's bound.
            size = len(batch.items[position].data)
            limit = error.details.get("max_item_bytes", "?")
            error = _item_too_large(batch.channel, size, limit, len(items))
        self._fail(items, error)

    def unborn(self, batch: _Batch) -> bool:
        """Whether ``batch``'s session never reached the state (see :meth:`expire`)."""
        return batch.session == self.session and self._unborn

    def expire(self, batch: _Batch, error: RaftchanError) -> None:
        """The state does not know this session: what was sent under it has an unknown outcome.

        Those items are answered with ``error``; the rest move to a fresh session so the
        client can go on appending. One exception: if the session's first request never
        reached the state (refused by the node itself), the state never had the session,
        so nothing sent under it was applied: everything moves on without an error.
        """
        if batch.session != self.session:
            return
        if not self._unborn:
            self._fail([item for item in self._pending.values() if item.sent], error)
        self._rotate(list(self._pending.values()))

    def gap(self, batch: _Batch, expected: int) -> bool:
        """The state answered "sequence gap: expected E"; return True if that forced a new session.

        Normally E is an item still queued here (an earlier request was lost) and the
        caller re-sends everything. But a request the node refuses before it reaches the
        replicated state (a request-level limit, say) leaves its sequence numbers
        unconsumed, so the state keeps waiting for a number this client will never send
        again. Then every queued item below E was applied (the state's last sequence is
        E - 1) and the items from E on move to a fresh session.
        """
        if batch.session != self.session:
            return False
        waiting = next((i for i in self._pending.values() if i.seq == expected), None)
        if waiting is not None or not 0 < expected < self._next_seq:
            return False
        applied = [item for item in self._pending.values() if item.seq < expected]
        for item in applied:
            self._pending.pop(item.ticket)
        self._rotate([item for item in self._pending.values() if item.seq >= expected])
        return True

    def rewind(self) -> None:
        """Queue every unanswered item to be sent again, in order, with its sequence number."""
        self.epoch += 1
        self._unsent = deque(self._pending.values())

    def _fail(self, items: list[_Item], error: RaftchanError) -> None:
        for item in items:
            self._pending.pop(item.ticket, None)
        self._record(items, error)

    def _record(self, items: list[_Item], error: RaftchanError) -> None:
        """Keep ``error`` for the flushes that must raise it: one record per maker."""
        first: dict[int, _Item] = {}
        for item in items:
            if item.ticket in self.watched:
                self.refused[item.ticket] = error  # its put raises it
            else:
                first.setdefault(id(item.owner), item)
        for item in first.values():
            self.keep(item.ticket, error, item.owner)

    def keep(self, ticket: int, error: RaftchanError, owner: _Caller | None) -> None:
        """Record a refusal of the append ``ticket`` made by ``owner`` (see take_error)."""
        self._errors.append(_Refusal(ticket, error, owner or _UNKNOWN_CALLER))
        # Told to someone else, and its maker gone or silent too long: let it go.
        spent = [r for r in self._errors if r.told_other and r.orphaned]
        told = [r for r in self._errors if r.told_other and not r.orphaned]
        excess = max(0, len(self._errors) - len(spent) - _MAX_KEPT_REFUSALS)
        for refusal in spent + told[:excess]:
            self._errors.remove(refusal)
        if len(self._errors) > _MAX_REFUSALS:
            dropped = self._errors.pop(0)
            logger.warning("more refused appends than flushes to report them: %s", dropped.error)

    def _rotate(self, renumber: list[_Item]) -> None:
        """Start a new session; ``renumber`` (unanswered, in order) get numbers 1, 2, ..."""
        self.session = self._new_session()
        self.session_used = False
        self._unborn = False
        self._next_seq = 1
        for item in renumber:
            item.seq = self._next_seq
            item.sent = False
            self._next_seq += 1
        self.rewind()

    @property
    def has_refusals(self) -> bool:
        return bool(self._errors)

    def take_error(self, through: int, caller: _Caller | None = None) -> RaftchanError | None:
        """The error a flush of ``caller`` covering tickets up to ``through`` raises.

        That is the first refusal up to there that ``caller`` made, else the first that
        no flush of another caller covered yet. Every refusal up to there is then spent
        for ``caller`` (a flush raises at most one error for all it covers) and for
        other callers (the first flush of another that covers it raised); each stays
        only for its maker's next flush, which always raises it: the caller that made
        the refused append learns of it even if another caller's flush came first.
        """
        caller = caller or _UNKNOWN_CALLER
        covered = [r for r in self._errors if r.ticket <= through]
        own = [r for r in covered if r.made_by(caller)]
        untold = [r for r in covered if not r.told_other and not r.made_by(caller)]
        raised = min(own or untold, key=lambda r: r.ticket, default=None)
        for refusal in covered:
            refusal.told_other = refusal.told_other or not refusal.made_by(caller)
            if refusal.made_by(caller) or refusal.orphaned:
                self._errors.remove(refusal)
        # A copy for each raise: one exception object raised in two threads would carry
        # both tracebacks (and keep their frames alive).
        return None if raised is None else copy.copy(raised.error)


#: Errors whose errno says why a dial failed better than asyncio's text ("Connect call
#: failed (address)"); their subclasses with words of their own (name resolution, TLS)
#: keep them.
_ERRNO_DIAL_ERRORS = (OSError, ConnectionRefusedError, ConnectionResetError, TimeoutError)


def _dial_error_text(exc: BaseException) -> str:
    """Why a dial failed, in words ('Connection refused', 'Name or service not known')."""
    if type(exc) in _ERRNO_DIAL_ERRORS and isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _item_too_large(channel: str, size: int, limit: Any, refused: int = 1) -> LimitExceeded:
    """The error for an item of ``size`` bytes above the node's bound ``limit``; with
    ``refused`` > 1, the node refused the whole request, that many appends."""
    lost = "" if refused == 1 else f", nor the {refused - 1} other append(s) of its request"
    return LimitExceeded(
        f"an item of {size} bytes appended to {channel!r} exceeds the node's "
        f"max_item_bytes={limit}: it was not stored{lost}",
        channel=channel,
        limit="max_item_bytes",
        size=size,
        max_item_bytes=limit,
        refused=refused,
    )


# ---------------------------------------------------------------------------------------
# One connection


def _key_repr(key: bytes) -> str:
    """A future key (as carried in an append) in the form Dask prints it."""
    try:
        decoded = msgpack.unpackb(key, raw=False)
    except Exception:
        return repr(key)
    return repr(decoded)


class _ConnectionLost(CommitUnknown):
    """The connection dropped before the answer came; the request's outcome is unknown."""


class _Connection:
    """One handshaken connection to a node; requests are pipelined, answers matched by id.

    One reader task reads the socket and resolves each request's future. A request that
    gets no answer within its response timeout makes the connection count as dead: it is
    closed and every request on it fails with :class:`_ConnectionLost`. With ``probe``
    (``(after, timeout)``), a connection where requests wait and nothing was received for
    ``after`` seconds sends a :class:`~raftchan.protocol.Ping`; one unanswered for
    ``timeout`` seconds makes the connection count as dead the same way.
    """

    def __init__(
        self,
        address: str,
        node: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: protocol.FrameDecoder,
        probe: tuple[float, float] | None = None,
    ) -> None:
        self.address = address
        self.node = node
        self._reader = reader
        self._writer = writer
        self._decoder = decoder
        self._next_id = 1
        self._pending: dict[
            int, tuple[asyncio.Future[dict[str, Any]], asyncio.TimerHandle | None]
        ] = {}
        #: The limits the node announced in its hello (empty for a node that did not).
        self.node_limits: dict[str, int] = {}
        self.closed = False
        self._probe = probe
        self._probe_timer: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        #: When a frame last arrived, or the first of the waiting requests was sent if
        #: later: the connection is quiet from then on.
        self._quiet_since = loop.time()
        #: Bytes of frames handed to the transport, ever (see _delivered).
        self._written = 0
        #: The ping out, if any: its id, when it was sent, _delivered() then, and the
        #: bytes written before it (the only ones whose delivery can show the node is
        #: there, see _heard_since_ping).
        self._ping_id: int | None = None
        self._ping_sent_at = 0.0
        self._ping_delivered = 0
        self._ping_written = 0
        self._read_task = loop.create_task(self._read_loop())

    @classmethod
    async def open(
        cls,
        address: str,
        timeout: float,
        max_frame_bytes: int,
        credentials: _Credentials,
        probe: tuple[float, float] | None = None,
    ) -> _Connection:
        """Connect (with TLS if the credentials hold a context) and handshake, both within
        ``timeout`` seconds; ``probe``: see the class.

        Raises :class:`NodeNotTrusted` if the node's certificate does not verify, and
        :class:`Unauthorized` if the node refuses the token.
        """
        host, port = split_address(address)
        tls = credentials.ssl
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls is not None else None
                ),
                timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise NodeNotTrusted(f"{address}: {exc.verify_message or exc}") from None
        decoder = protocol.FrameDecoder(max_frame_bytes)
        try:
            writer.write(protocol.encode_frame(protocol.hello_request(credentials.token)))
            hello = await asyncio.wait_for(_read_message(reader, decoder), _remaining(deadline))
            if "ok" in hello:  # the node answered the hello with an error response
                raise protocol.response_error(hello) or ProtocolError("unexpected hello answer")
            protocol.check_hello(hello)
        except BaseException:
            writer.close()
            raise
        conn = cls(address, str(hello.get("node", "")), reader, writer, decoder, probe)
        conn.node_limits = protocol.announced_limits(hello)
        # Accept the largest frame the node may send (a read page fills its own limit).
        decoder.max_frame_bytes = max(
            max_frame_bytes, conn.node_limits.get("max_frame_bytes", max_frame_bytes)
        )
        return conn

    def send(
        self, request: protocol.Request, timeout: float | None
    ) -> asyncio.Future[dict[str, Any]]:
        """Send ``request`` (its id is assigned here); the future gets the response map.

        ``timeout``: seconds without its answer after which the connection counts as dead
        (``None``: no bound of its own).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        # Callers may stop waiting (deadline); the failure must not be logged as unretrieved.
        future.add_done_callback(_retrieve)
        if self.closed:
            future.set_exception(_ConnectionLost(f"connection to {self.address} is closed"))
            return future
        request_id = self._next_id
        self._next_id += 1
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, self._no_answer, request_id, timeout)
        if not self._pending:
            self._quiet_since = loop.time()
        self._pending[request_id] = (future, timer)
        frame = protocol.encode_frame(replace(request, id=request_id).to_wire())
        self._written += len(frame)
        self._writer.write(frame)
        if self._probe is not None and not isinstance(request, protocol.Ping):
            self._arm_probe(self._quiet_since + self._probe[0])
        return future

    async def drain(self) -> None:
        """Wait while the socket's send buffer is full (back-pressure for the sender)."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._writer.drain()

    def close(self, error: RaftchanError | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        failure = error or _ConnectionLost(f"connection to {self.address} was closed")
        pending, self._pending = self._pending, {}
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        for future, timer in pending.values():
            if timer is not None:
                timer.cancel()
            if not future.done():
                future.set_exception(failure)
        if isinstance(error, _ConnectionLost) or self._writer.transport.get_write_buffer_size():
            # What waits to go out cannot reach a node that is gone, and a plain close
            # would wait for it (the sender's drain() with it; with TLS, asyncio's own
            # buffer may be empty while the socket's transport below it is full): every
            # request on the connection has failed above and is re-sent elsewhere.
            self._writer.transport.abort()
        else:
            self._writer.close()
        if self._read_task is not asyncio.current_task():
            self._read_task.cancel()

    async def wait_closed(self) -> None:
        with contextlib.suppress(BaseException):
            await self._read_task

    # -- telling a node that holds our requests from one that is gone --------------------

    def _arm_probe(self, when: float) -> None:
        if self._probe_timer is None and not self.closed:
            self._probe_timer = asyncio.get_running_loop().call_at(when, self._check_quiet)

    def _check_quiet(self) -> None:
        """Ping the node once requests have waited ``after`` seconds on a quiet connection;
        count it as gone if the ping then shows no sign of it for ``timeout`` seconds."""
        self._probe_timer = None
        if self.closed or self._probe is None:
            return
        after, timeout = self._probe
        loop = asyncio.get_running_loop()
        # A millisecond of slack keeps a timer that fires a hair early from re-arming for
        # the same instant (as _FlushWaiters does).
        now = loop.time() + 0.001
        if self._ping_id is not None:
            if not self._heard_since_ping():
                if now < self._ping_sent_at + timeout:
                    self._arm_probe(self._ping_sent_at + timeout)
                else:
                    # An answer read in this turn of the loop is handled only in the next
                    # one (after a stall of the loop, say): decide after it.
                    loop.call_soon(self._leave_if_gone, timeout)
                return
            self._forget_ping()
        if not self._pending:
            return  # the next request arms the probe again
        if now < self._quiet_since + after:
            self._arm_probe(self._quiet_since + after)
            return
        limit = self.node_limits.get("max_pending_requests")
        if limit is not None and len(self._pending) >= limit:
            # The node reads nothing more of this connection until it answers one of
            # them: a ping would wait unread. Such a connection is left to the requests'
            # own timeouts.
            self._arm_probe(now + after)
            return
        self._ping_written = self._written
        self._ping_sent_at = loop.time()
        self._ping_id = self._next_id
        self.send(protocol.Ping(0), None)
        # Measured once the ping is out: with TLS, what moved into the transport below
        # (which _delivered cannot see) already counts as taken and cannot pass for
        # progress later.
        self._ping_delivered = self._delivered()
        self._arm_probe(self._ping_sent_at + timeout)

    def _heard_since_ping(self) -> bool:
        """Whether the node showed itself since the ping went out: it answered it or sent
        anything, or its host took more of the bytes that were on their way before the
        ping (a large upload on a slow link still moving, which the ping waits behind).

        The ping's own bytes, and those of requests sent after it, prove nothing: the
        kernel of a host whose node process hangs still takes them, until its buffers
        fill. Bytes sent before the ping are taken in order, so those still moving show a
        node reading its connection, or a kernel whose buffers are not yet full: after at
        most those buffers, the node must answer.
        """
        if self._ping_id not in self._pending or self._quiet_since > self._ping_sent_at:
            return True
        return min(self._delivered(), self._ping_written) > self._ping_delivered

    def _leave_if_gone(self, timeout: float) -> None:
        if self.closed or self._ping_id is None:
            return
        if self._heard_since_ping():
            self._check_quiet()
            return
        logger.info(
            "%s went quiet: no answer to a ping within %.1fs; dropping the connection",
            self.address,
            timeout,
        )
        self.close(_ConnectionLost(f"{self.address} did not answer a ping within {timeout:.1f}s"))

    def _forget_ping(self) -> None:
        entry = self._pending.pop(self._ping_id, None) if self._ping_id is not None else None
        self._ping_id = None
        if entry is not None:  # unanswered, but the node showed itself: a late answer is ignored
            entry[0].cancel()

    def _delivered(self) -> int:
        """Bytes of ours the node's host has taken: all we wrote, less what still waits in
        asyncio's buffer and (on Linux) in the socket's send queue, unsent or unacknowledged.

        With TLS, ciphertext handed to the plain transport below asyncio's TLS layer is
        not seen (at most that transport's high-water mark, 64 KiB) and counts as taken.
        """
        transport = self._writer.transport
        waiting = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None and _SEND_QUEUE_IOCTL is not None:
            with contextlib.suppress(OSError, ValueError):
                queued = fcntl.ioctl(sock.fileno(), _SEND_QUEUE_IOCTL, b"\0\0\0\0")
                waiting += int.from_bytes(queued, sys.byteorder, signed=True)
        return self._written - waiting

    def _no_answer(self, request_id: int, timeout: float) -> None:
        if request_id in self._pending:
            logger.info(
                "no answer from %s within %.1fs; dropping the connection", self.address, timeout
            )
            self.close(_ConnectionLost(f"{self.address} did not answer within {timeout:.1f}s"))

    async def _read_loop(self) -> None:
        error: RaftchanError
        try:
            while True:
                data = await self._reader.read(2**16)
                if not data:
                    error = _ConnectionLost(f"{self.address} closed the connection")
                    break
                self._quiet_since = asyncio.get_running_loop().time()
                self._decoder.feed(data)
                for message in self._decoder.messages():
                    self._dispatch(message)
        except RaftchanError as exc:  # a bad frame, or the node's connection-level error
            # Requests in flight may still have been applied: that is an unknown outcome
            # (retried), not a refusal.
            logger.warning("connection to %s broken: %s", self.address, exc)
            error = _ConnectionLost(f"connection to {self.address} broken: {exc}")
        except OSError as exc:
            error = _ConnectionLost(f"connection to {self.address} failed: {exc}")
        self.close(error)

    def _dispatch(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        entry = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
        if entry is None:
            if request_id is None and not message.get("ok", False):
                # A connection-level error (the node is about to close the connection).
                raise protocol.response_error(message) or ProtocolError("bad error frame")
            return  # the answer to a request we stopped waiting for
        future, timer = entry
        if timer is not None:
            timer.cancel()
        if not future.done():
            future.set_result(message)


async def _read_message(
    reader: asyncio.StreamReader, decoder: protocol.FrameDecoder
) -> dict[str, Any]:
    while True:
        for message in decoder.messages():
            return message
        data = await reader.read(2**16)
        if not data:
            raise _ConnectionLost("the node closed the connection during the handshake")
        decoder.feed(data)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


# ---------------------------------------------------------------------------------------
# Error classification


class _DeadlinePassed(Exception):
    """Internal: an operation's deadline passed while waiting for a connection."""


def _is_retryable(error: BaseException) -> bool:
    """Errors after which the same request may simply be sent again (to the leader)."""
    if isinstance(error, CommitUnknown):
        return not error.details.get("session_expired")
    return isinstance(error, (NotLeader, NoLeader))


def _outcome(future: asyncio.Future[dict[str, Any]]) -> dict[str, Any] | RaftchanError:
    """The response map of a request answered ok, or the error it ended with."""
    if future.cancelled():
        return _ConnectionLost("the request was cancelled")
    exc = future.exception()
    if exc is not None:
        return exc if isinstance(exc, RaftchanError) else _ConnectionLost(repr(exc))
    message = future.result()
    return protocol.response_error(message) or message


def _parse(cls: type[_T], message: dict[str, Any]) -> _T:
    try:
        return cls.from_wire(message)  # type: ignore[attr-defined]
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed {cls.__name__} response: {exc}") from None


# ---------------------------------------------------------------------------------------
# The client


def default_codec(max_item_bytes: int | None, dask_client: Any = None) -> ItemCodec:
    """The Dask-aware codec when ``distributed`` can be imported, else the plain one."""
    try:
        from raftchan.dask import DaskCodec
    except ImportError:
        if dask_client is not None:
            raise
        return ItemCodec(max_item_bytes=max_item_bytes)
    return DaskCodec(dask_client, max_item_bytes=max_item_bytes)


class AsyncClient:
    """A client of one raftchan cluster, for use on one asyncio event loop.

    Args:
        address: the cluster's client addresses as ``"host:port,host:port"`` or a list;
            ``None`` reads ``$RAFTCHAN_ADDRESS`` (or the dask config key ``raftchan.address``).
            Any subset of the nodes will do: the others' leader hints lead the way.
        timeout: default overall deadline of each operation in seconds (``retry.timeout``,
            30 s, if not given).
        retry: backoff and attempt timeouts; see :class:`RetryPolicy`.
        codec: turns items into bytes and back (a subclass may add types). Default: the
            codec of :mod:`raftchan.dask` when ``distributed`` is installed (Dask futures
            are stored by key and kept alive), else the plain msgpack codec.
        dask_client: the Dask client that futures read from channels are bound to
            (default: ``distributed.get_client()`` at read time). Ignored with ``codec``.
        limits: the cluster's limits as this client assumes them (batch sizes, item size).
        max_in_flight: append requests sent but not yet answered, at most.
        poll_wait: seconds a node may hold one poll of an iteration before answering empty.
        token: sent to every node in the handshake, for nodes started with ``--token-file``
            (default ``$RAFTCHAN_TOKEN``). A node that refuses it raises
            :class:`~raftchan.errors.Unauthorized` from every operation, at once.
        tls: dial the nodes with TLS and verify their certificates: ``True`` trusts the
            system's CAs, a path trusts that CA bundle, an ``ssl.SSLContext`` is used as
            it is; ``None`` reads ``$RAFTCHAN_TLS_CA_FILE`` (no TLS if unset). A node whose
            certificate does not verify or does not name the address dialled raises
            :class:`~raftchan.errors.NodeNotTrusted`.

    No I/O happens until the first operation. ``async with AsyncClient(...) as client``
    closes the client on exit.
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
        retry = retry or RetryPolicy()
        self.retry = retry if timeout is None else replace(retry, timeout=timeout)
        self.addresses = parse_addresses(
            address if isinstance(address, (str, type(None))) else list(address)
        )
        self.codec = codec or default_codec(limits.max_item_bytes, dask_client)
        #: Our own codec takes the node's item bound (see _send_batches); a caller's is
        #: left as it was given.
        self._own_codec = codec is None
        self.limits = limits
        #: max_item_bytes as the node the appends last went to announced it (see _prepare).
        self._node_max_item_bytes: int | None = None
        self.max_in_flight = max_in_flight
        self.poll_wait = min(poll_wait, limits.max_poll_wait)
        self._credentials = _Credentials(resolve_token(token), client_ssl_context(tls))
        # A random start spreads many clients over the nodes for their first dial; the
        # leader's "not_leader" hints then take each client where writes are served.
        self._link = _Link(
            _AddressBook(self.addresses, random.randrange(len(self.addresses))),
            self.retry,
            limits.max_frame_bytes,
            self._credentials,
        )
        # Long polls go to the first listed node that answers them (a reader lists its
        # nearest node first), so followers carry the iterations and the leader the writes.
        self._poll_link = _Link(
            _AddressBook(self.addresses), self.retry, limits.max_frame_bytes, self._credentials
        )
        self._outbox = _Outbox()
        self._flushers = _FlushWaiters()
        self._sender: asyncio.Task[None] | None = None
        self._sender_wake = asyncio.Event()
        self._sender_backoff = Backoff(self.retry)
        self._resend_at = 0.0
        self._followed_hint: str | None = None
        self._in_flight = 0
        #: Channels known to be stopped (a refusal, a stop, or a response saying so).
        self._stopped: set[str] = set()
        #: Highest state position seen in any response: polls ask for at least this.
        self._position = 0
        self._closed = False
        #: Why the last append had to be re-sent (named by flush's Timeout).
        self._last_append_error: RaftchanError | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self, timeout: float | None = None) -> str:
        """Connect to some node now (otherwise the first operation does); return its name.

        Raises :class:`NoLeader` if no node answered the handshake within ``timeout``.
        """
        self._check_open()
        deadline = self._deadline(timeout)
        try:
            conn = await self._link.connection(deadline)
        except _DeadlinePassed:
            raise self._deadline_error("connect", None, uncertain=False) from None
        return conn.node

    async def channel(
        self,
        name: str,
        maxlen: int | None = None,
        timeout: float | None = None,
        *,
        create: bool = True,
    ) -> AsyncChannel:
        """Open channel ``name``, creating it if missing (``create=False``: it must exist).

        A new channel keeps only its newest ``maxlen`` items (``None``: unbounded). On an
        existing channel a number sets its bound (trimming at once if smaller), while
        ``None`` keeps the bound it has, so readers never lift a writer's bound.
        Raises :class:`~raftchan.errors.LimitExceeded` when the cluster holds its maximum
        number of channels, :class:`~raftchan.errors.RequestInvalid` for a bad name or
        maxlen (or a maxlen with ``create=False``, which changes nothing),
        :class:`~raftchan.errors.ChannelNotFound` with ``create=False`` for a channel
        that does not exist, and :class:`NoLeader` / :class:`Timeout` as described in
        the module docs.
        """
        if create:
            request: protocol.Request = protocol.Open(0, name, maxlen)
        elif maxlen is not None:
            raise RequestInvalid("channel(create=False) opens without changing: no maxlen")
        else:
            request = protocol.Info(0, name)
        await self._info_call(request, self._deadline(timeout))
        return AsyncChannel(self, name)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every append made before this call (on any channel) is answered.

        Returns only once all of them are committed. If some were refused, raises one
        such error (:class:`~raftchan.errors.ChannelStopped`,
        :class:`~raftchan.errors.LimitExceeded`, :class:`~raftchan.errors.FutureLost`, or
        :class:`CommitUnknown` if the cluster forgot this client's session), after all
        were answered: the first refusal of an append the caller made, else the first
        that no flush of another caller has covered yet. A caller is an asyncio task (or
        the thread of a blocking call): so the task that made a refused append learns of
        it by its next flush, even when another's flush raised it first. Await flush in
        that task, with its own timeout: a flush run in a task of its own (``gather``,
        or ``asyncio.wait_for`` before Python 3.12) flushes as that task. Raises
        :class:`Timeout` when ``timeout`` (seconds; default the client's) passes first:
        the unanswered appends stay queued and keep being retried, and a later ``flush``
        waits for them again.
        """
        await self._flush(timeout)

    async def _flush(self, timeout: float | None) -> None:
        """:meth:`flush`, as one coroutine (no await of another): each level of awaits
        costs every producer of a round a resume, several microseconds of client CPU per
        append at 64."""
        self._check_open()
        target = self._outbox.last_ticket
        waiter = self._flush_waiter(target, timeout)
        if waiter is not None:
            try:
                await waiter  # raises Closed if the client was closed meanwhile
            except _FlushExpired:
                raise self._unconfirmed(target, timeout) from None
        if self._outbox.has_refusals:
            error = self._outbox.take_error(target, _caller())
            if error is not None:
                raise error

    def _flush_waiter(self, target: int, timeout: float | None) -> asyncio.Future[None] | None:
        """A future done once every append up to ticket ``target`` is answered (None: they
        are); it fails with _FlushExpired at the deadline ``timeout`` sets."""
        if self._outbox.done_through() >= target:
            return None
        self._ensure_sender()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The waiters' shared timer, not asyncio.wait's task and callbacks: a put is a
        # flush.
        self._flushers.add(target, waiter, self._deadline(timeout))
        return waiter

    def _unconfirmed(self, target: int, timeout: float | None) -> Timeout:
        unanswered = target - self._outbox.done_through()
        last = self._last_append_error
        # Say why they keep being retried (no leader, Dask unavailable, ...).
        cause = "" if last is None else f"; last retry after {type(last).__name__}: {last}"
        return Timeout(
            f"flush: appends still unconfirmed after {self._timeout_of(timeout):.1f}s "
            f"(they stay queued and keep being retried{cause})",
            unanswered=unanswered,
        )

    async def status(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Ask every known node for its status; no leader is needed.

        Returns one dict per address, in order: the node's status fields plus
        ``client_address``; a node that could not be asked gives
        ``{"client_address": addr, "role": "unreachable", "error": str}``. ``timeout``
        (default ``retry.attempt_timeout``) bounds each node's connect, and then its answer.
        """
        self._check_open()
        limit = self.retry.attempt_timeout if timeout is None else timeout
        return list(await asyncio.gather(*(self._status_of(a, limit) for a in self.addresses)))

    async def members(self, timeout: float | None = None) -> dict[str, Any]:
        """The cluster's membership as the leader has it (a linearizable read).

        Returns ``{"members": [{"raft_address", "name", "client_address"}, ...],
        "leader": raft address, "change_pending": bool}``; name and client address are
        ``None`` for a member that has not registered them yet. ``timeout`` (default: the
        client's) bounds the whole call, retries included; raises Timeout after it.
        """
        self._check_open()
        answer = await self._call(protocol.MemberList(0), self._deadline(timeout))
        return {key: value for key, value in answer.items() if key not in ("id", "ok")}

    async def add_member(
        self,
        raft_address: str,
        client_address: str,
        name: str | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        """Add the node whose Raft port is ``raft_address``; returns the new member list.

        Start the node first, with an empty data folder and ``--peers`` listing the
        current members. Returns once the change is committed. ``client_address`` and
        ``name`` (default: the Raft address) are recorded so that clients can be pointed
        at the node. Raises :class:`~raftchan.errors.MemberExists` if it already is a
        member (also when an earlier attempt of this call, whose answer was lost, added
        it: then it returns normally instead), :class:`~raftchan.errors.MembershipChangeInProgress`
        while another change is not committed, and Timeout when ``timeout`` passes (the
        change may still commit: check with :meth:`members`).
        """
        self._check_open()
        request = protocol.MemberAdd(0, raft_address, client_address, name or raft_address)
        deadline = self._deadline(timeout)
        response = await self._call(request, deadline, ambiguous_ok=MemberExists)
        return list(response.get("members") or (await self.members(timeout))["members"])

    async def remove_member(self, raft_address: str, timeout: float | None = None) -> list[str]:
        """Remove the node whose Raft port is ``raft_address``; returns the new member list.

        Returns once the change is committed; stop the removed node afterwards. Raises
        :class:`~raftchan.errors.MemberNotFound` if it is not a member (unless an earlier
        attempt of this call removed it), :class:`~raftchan.errors.MembershipError` if the
        removal would leave one member or names the leader,
        :class:`~raftchan.errors.MembershipChangeInProgress` while another change is not
        committed, and Timeout when ``timeout`` passes (the change may still commit).
        """
        self._check_open()
        request = protocol.MemberRemove(0, raft_address)
        deadline = self._deadline(timeout)
        response = await self._call(request, deadline, ambiguous_ok=MemberNotFound)
        return list(response.get("members") or (await self.members(timeout))["members"])

    async def close(self, timeout: float = 5.0) -> None:
        """Flush (best effort, up to ``timeout`` seconds), end the session, disconnect.

        Appends that are still unanswered then are abandoned and a warning is logged;
        call :meth:`flush` first to learn their fate. Afterwards every call raises
        :class:`~raftchan.errors.Closed`. Closing twice is harmless.
        """
        if self._closed:
            return
        try:
            await self.flush(timeout)
        except RaftchanError as exc:
            logger.warning("closing with appends that were refused or not confirmed: %s", exc)
        if self._outbox.session_used:
            with contextlib.suppress(RaftchanError):
                request = protocol.EndSession(0, self._outbox.session)
                await self._call(request, self._deadline(min(timeout, 1.0)))
        await self._shut_down()

    # -- channel operations (AsyncChannel delegates here) -----------------------------------

    def _append(self, channel: str, items: Iterable[Any]) -> None:
        datas = self._prepare(channel, items)
        if datas:
            self._enqueue(channel, datas, _caller())

    def _prepare(self, channel: str, items: Iterable[Any]) -> list[Encoded]:
        """Check an append may go ahead and encode its items; safe from any thread.

        A codec that handles Dask futures pins them here, on the writer's own Dask
        connection, before the append can reach the cluster.
        """
        self._check_open()
        if channel in self._stopped:
            raise ChannelStopped(f"channel {channel!r} is stopped", channel=channel)
        datas = self.codec.encode_items(channel, items)
        # The bound the node last sent to announced, for a codec the caller gave (ours
        # takes it while encoding): an item above it would only be refused at the node.
        # Checked after encoding, so a Dask codec of the caller's may have pinned the
        # append's futures already.
        limit = None if self._own_codec else self._node_max_item_bytes
        if limit is not None:
            for data in datas:
                if len(data.data) > limit:
                    raise _item_too_large(channel, len(data.data), limit)
        return datas

    def _enqueue(self, channel: str, datas: list[Encoded], owner: _Caller) -> int:
        """Queue encoded items (on the loop's thread), wake the sender; the last ticket."""
        self._check_open()
        ticket = self._outbox.add(channel, datas, owner)
        self._ensure_sender()
        return ticket

    async def _put(self, channel: str, item: Any, timeout: float | None) -> int:
        owner = _caller()
        ticket = self._enqueue(channel, self._prepare(channel, (item,)), owner)
        self._outbox.watched.add(ticket)
        answered = False
        try:
            # Its own answer only: a refusal of another append is left to a flush, or a
            # put whose item was stored would raise, and a retry of it store it twice.
            waiter = self._flush_waiter(ticket, timeout)
            if waiter is not None:
                try:
                    await waiter
                except _FlushExpired:
                    raise self._unconfirmed(ticket, timeout) from None
            answered = True
        finally:
            self._outbox.watched.discard(ticket)
            index = self._outbox.indexes.pop(ticket, None)
            error = self._outbox.refused.pop(ticket, None)
            if error is not None and not answered:
                # Refused while this put had stopped waiting (Timeout, cancelled): the
                # maker's next flush raises it instead.
                self._outbox.keep(ticket, error, owner)
        if error is not None:
            raise error
        if index is None:
            # Stored, as flush says, but answered without its index (a session renumbering
            # settled it from the state's sequence alone).
            raise CommitUnknown("the item is stored but its index was not reported")
        return index

    async def _info(self, channel: str, timeout: float | None) -> ChannelInfo:
        return await self._info_call(protocol.Info(0, channel), self._deadline(timeout))

    async def _stop(self, channel: str, timeout: float | None) -> ChannelInfo:
        deadline = self._deadline(timeout)
        error = await self._flush_before(deadline)
        info = await self._info_call(protocol.Stop(0, channel), deadline)
        if error is not None:
            raise error
        return info

    async def _delete(self, channel: str, timeout: float | None) -> None:
        deadline = self._deadline(timeout)
        error = await self._flush_before(deadline)
        try:
            await self._call(protocol.Delete(0, channel), deadline, ambiguous_ok=ChannelNotFound)
        finally:
            self._stopped.discard(channel)
        if error is not None:
            raise error

    async def _read(
        self, channel: str, start: int | None, end: int | None, timeout: float | None
    ) -> list[bytes]:
        """Items ``[start, end)`` as stored, over as many pages as needed (linearizable)."""
        deadline = self._deadline(timeout)
        while True:
            items = await self._read_once(channel, start, end, deadline)
            if items is not None:
                return items
            if self._remaining(deadline) <= 0:
                raise Timeout(f"read of {channel!r} kept being overtaken by trimming")
            logger.debug("read of %r overtaken by maxlen trimming; reading again", channel)

    async def _batches(self, channel: str, start: int | None) -> AsyncGenerator[list[Any], None]:
        """Decoded items from ``start`` (None: the head), one list per response; follows new items.

        Ends once the channel is stopped and every item before the stop was yielded.
        """
        page = await self._read_page(channel, start, None, self._deadline(None))
        next_index = page.first
        while True:
            if page.first != next_index:
                raise ProtocolError(f"asked for index {next_index}, got items from {page.first}")
            if page.items:
                next_index += len(page.items)
                items = self.codec.decode_items(page.items)
                await self.codec.settle_page()
                yield items
            if page.stopped and next_index >= page.next:
                return
            poll = protocol.Poll(0, channel, next_index, self._position, self.poll_wait)
            # The node may hold a poll for poll_wait on purpose: that is not lost time.
            deadline = self._deadline(None) + self.poll_wait
            answer = await self._call(poll, deadline, wait=self.poll_wait, any_node=True)
            page = _parse(ReadResult, answer)
            self._observe(channel, page.stopped)

    # -- requests with retries -----------------------------------------------------------

    async def _info_call(self, request: protocol.Request, deadline: float) -> ChannelInfo:
        response = await self._call(request, deadline)
        info = _parse(ChannelInfo, response)
        self._observe(info.channel, info.stopped)
        return info

    async def _read_page(
        self, channel: str, start: int | None, end: int | None, deadline: float
    ) -> ReadResult:
        page = _parse(ReadResult, await self._call(protocol.Read(0, channel, start, end), deadline))
        self._observe(channel, page.stopped)
        return page

    async def _read_once(
        self, channel: str, start: int | None, end: int | None, deadline: float
    ) -> list[bytes] | None:
        """One paged read; ``None`` if trimming overtook it after the first page."""
        page = await self._read_page(channel, start, end, deadline)
        items = list(page.items)
        stop = page.next if end is None else min(end, page.next)
        cursor = page.first + len(items)
        while cursor < stop:
            # Later pages ask for the fixed range [cursor, stop): the result is the
            # channel as it was at the first page, which is what makes the read linearizable.
            try:
                page = await self._read_page(channel, cursor, stop, deadline)
            except (TrimmedGap, ChannelNotFound):
                # Trimmed (or deleted and re-created) under our feet: start over.
                return None
            if not page.items:
                return None
            items.extend(page.items)
            cursor += len(page.items)
        return items

    async def _call(
        self,
        request: protocol.Request,
        deadline: float,
        *,
        wait: float = 0.0,
        ambiguous_ok: type[RaftchanError] | None = None,
        any_node: bool = False,
    ) -> dict[str, Any]:
        """Send a request that is safe to repeat, retrying until an answer or ``deadline``.

        ``wait`` is how long the node may hold the request on purpose (a poll).
        ``any_node``: use the poll connection, which stays on whichever node answers.
        ``ambiguous_ok``: an error that, after an attempt with unknown outcome, means that
        attempt succeeded (``channel_not_found`` for a delete).
        """
        backoff = Backoff(self.retry)
        uncertain = False  # some attempt may have been executed
        last: BaseException | None = None
        followed: str | None = None  # the last leader hint this call went to at once
        link = self._poll_link if any_node else self._link
        while True:
            self._check_open()
            try:
                conn = await link.connection(deadline)
            except _DeadlinePassed:
                raise self._deadline_error(request.TYPE, last, uncertain) from None
            future = conn.send(request, self.retry.attempt_timeout + wait)
            done, _ = await asyncio.wait({future}, timeout=self._remaining(deadline))
            if not done:
                raise self._deadline_error(request.TYPE, last, uncertain=True)
            error = _outcome(future)
            if not isinstance(error, RaftchanError):
                self._note_position(error)
                return error
            if ambiguous_ok is not None and uncertain and isinstance(error, ambiguous_ok):
                return {}
            if isinstance(error, Closed) or not _is_retryable(error):
                raise error
            last = error
            uncertain = uncertain or isinstance(error, CommitUnknown)
            hint = error.leader if isinstance(error, NotLeader) and not any_node else None
            link.abandon(conn, hint)
            if hint is not None and hint != conn.address and hint != followed:
                # A new hint is news (an election ended): go there at once. The same
                # hint again means it is stale (that leader is gone): back off.
                followed = hint
                continue
            delay = min(backoff.next_delay(), self._remaining(deadline))
            logger.debug("%s: retrying in %.2fs after %s", request.TYPE, delay, error)
            await asyncio.sleep(max(delay, 0.0))

    # -- connection management -----------------------------------------------------------

    # -- the sender ----------------------------------------------------------------------

    def _ensure_sender(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._run_sender())
        self._sender_wake.set()

    async def _run_sender(self) -> None:
        """Send queued appends whenever there are some and a slot is free; never gives up."""
        while not self._closed:
            try:
                await self._send_step()
            except Closed:
                return
            except _FINAL_DIAL_ERRORS as exc:
                # Nothing was sent; the appends stay queued, and every waiting flush
                # learns why now instead of at its deadline.
                self._flushers.fail_all(exc)
                return
            except Exception:  # a bug of ours must not silently stop every append
                logger.exception("the append sender failed; restarting it")
                await asyncio.sleep(self._sender_backoff.next_delay())

    async def _send_step(self) -> None:
        delay = self._resend_at - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif not self._outbox.has_unsent() or self._in_flight >= self.max_in_flight:
            self._sender_wake.clear()
            await self._sender_wake.wait()
        else:
            conn = await self._link.connection(None)
            self._send_batches(conn)
            await conn.drain()

    def _send_batches(self, conn: _Connection) -> None:
        # Fit the batches to the smaller of our limits and the node's.
        node = conn.node_limits
        self._node_max_item_bytes = node.get("max_item_bytes")
        if self._own_codec and self._node_max_item_bytes is not None:
            # Checked while encoding, so an item too large is refused before the Dask
            # codec pins any future of the append (_prepare checks only afterwards).
            bound = min(self.limits.max_item_bytes, self._node_max_item_bytes)
            self.codec.max_item_bytes = bound
        max_frame = min(self.limits.max_frame_bytes, node.get("max_frame_bytes", 1 << 62))
        max_items = min(self.limits.max_batch_items, node.get("max_batch_items", 1 << 62))
        max_bytes = max_frame - _APPEND_OVERHEAD
        refused = self._outbox.refused_unsent
        while self._in_flight < self.max_in_flight:
            batch = self._outbox.next_batch(max_items, max_bytes, self._node_max_item_bytes)
            if batch is None:
                break
            request = protocol.Append(
                0, batch.channel, batch.session, batch.seq, batch.payload, batch.keys
            )
            future = conn.send(request, self.retry.attempt_timeout)
            self._in_flight += 1
            future.add_done_callback(functools.partial(self._on_append_answer, batch, conn))
        if self._outbox.refused_unsent != refused:
            # Items too large for the node were answered here, not by an answer: the
            # flushes and puts waiting for them end now.
            self._notify_flushers()

    def _on_append_answer(
        self, batch: _Batch, conn: _Connection, future: asyncio.Future[dict[str, Any]]
    ) -> None:
        if batch.epoch == self._outbox.epoch:
            self._in_flight -= 1
        error = _outcome(future)
        if not isinstance(error, RaftchanError):
            lost = error.get("lost") or ()
            self._outbox.acknowledge(batch, error.get("indexes") or (), lost)
            self._last_append_error = None
            self._sender_backoff.reset()
        elif isinstance(error, Closed):
            return
        elif isinstance(error, CommitUnknown) and error.details.get("session_expired"):
            if self._outbox.unborn(batch):
                # Routine: its first request was refused by a node, so the state never
                # had the session; nothing is lost (see _Outbox.expire).
                logger.debug("starting a new session: %s", error)
            else:
                logger.warning("the cluster forgot this client's session: %s", error)
            self._outbox.expire(batch, error)
            self._restart_sending()
        elif _is_retryable(error):
            self._retry_appends(batch, conn, error)
        else:
            if isinstance(error, ChannelStopped):
                self._stopped.add(batch.channel)
            self._outbox.refuse(batch, error)
        self._notify_flushers()
        self._sender_wake.set()

    def _retry_appends(self, batch: _Batch, conn: _Connection, error: RaftchanError) -> None:
        if not isinstance(error, NotLeader):  # a redirect is routine, not a reason
            self._last_append_error = error
        expected = error.details.get("expected")
        if isinstance(expected, int) and self._outbox.gap(batch, expected):
            logger.info("the cluster skipped refused appends; continuing in a new session")
            self._restart_sending()
            return
        if batch.epoch != self._outbox.epoch:
            return  # an answer from before the last re-send: that re-send covers it
        hint = error.leader if isinstance(error, NotLeader) else None
        # A sequence gap says nothing against this connection, nor does the leader's
        # keeper failing to reach Dask: it is still the leader.
        if expected is None and not isinstance(error, DaskUnavailable):
            self._link.abandon(conn, hint)
        self._outbox.rewind()
        self._in_flight = 0
        delay = self._sender_backoff.next_delay()
        if hint is not None and hint != self._followed_hint:
            # A hint not followed yet is news (an election ended): go there at once. The
            # same hint again means it is stale (that leader is gone): back off.
            self._followed_hint = hint
            delay = 0.0
        self._resend_at = asyncio.get_running_loop().time() + delay
        logger.debug("re-sending %d appends after %s", self._outbox.pending, error)

    def _restart_sending(self) -> None:
        # A new session: requests of the old one no longer hold in-flight slots.
        self._in_flight = 0

    def _notify_flushers(self) -> None:
        self._flushers.release_through(self._outbox.done_through())

    async def _flush_before(self, deadline: float) -> RaftchanError | None:
        """Flush before a stop or delete; return (not raise) a refusal so the op still runs.

        A timeout does raise: stopping while earlier appends are still on their way
        would refuse them.
        """
        try:
            await self.flush(self._remaining(deadline))
        except (Timeout, Closed):
            raise
        except RaftchanError as exc:
            return exc
        return None

    # -- helpers -------------------------------------------------------------------------

    async def _status_of(self, address: str, timeout: float) -> dict[str, Any]:
        try:
            conn = await _Connection.open(
                address, timeout, self.limits.max_frame_bytes, self._credentials
            )
        except _DIAL_ERRORS as exc:
            return {
                "client_address": address,
                "role": "unreachable",
                "error": _dial_error_text(exc),
            }
        try:
            future = conn.send(protocol.Status(0), timeout)
            done, _ = await asyncio.wait({future}, timeout=timeout)
            if not done or future.exception() is not None:
                reason = "no answer" if not done else str(future.exception())
                return {"client_address": address, "role": "unreachable", "error": reason}
            message = future.result()
        finally:
            conn.close()
            await conn.wait_closed()
        error = protocol.response_error(message)
        if error is not None:
            return {"client_address": address, "role": "error", "error": str(error)}
        fields = {k: v for k, v in message.items() if k not in ("id", "ok")}
        return {"client_address": address, **fields}

    def _observe(self, channel: str, stopped: bool) -> None:
        if stopped:
            self._stopped.add(channel)
        else:
            self._stopped.discard(channel)

    def _note_position(self, message: dict[str, Any]) -> None:
        position = message.get("position")
        if isinstance(position, int) and position > self._position:
            self._position = position

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("this raftchan client is closed")

    def _timeout_of(self, timeout: float | None) -> float:
        return self.retry.timeout if timeout is None else timeout

    def _deadline(self, timeout: float | None) -> float:
        return asyncio.get_running_loop().time() + self._timeout_of(timeout)

    @staticmethod
    def _remaining(deadline: float) -> float:
        return _remaining(deadline)

    def _deadline_error(
        self, what: str, last: BaseException | None, uncertain: bool
    ) -> RaftchanError:
        """Timeout if some attempt may have taken effect, else NoLeader (nothing executed)."""
        if uncertain:
            detail = f" (last error: {last})" if last is not None else ""
            return Timeout(f"{what}: no answer before the deadline{detail}")
        cause = last if last is not None else self._link.last_error
        return NoLeader(f"{what}: no node could serve it before the deadline ({cause})")

    async def _shut_down(self) -> None:
        self._closed = True
        sender = self._sender
        if sender is not None:
            sender.cancel()
        await self._link.close()
        await self._poll_link.close()
        if sender is not None:
            with contextlib.suppress(BaseException):
                await sender
        self._flushers.fail_all(Closed("this raftchan client is closed"))


# ---------------------------------------------------------------------------------------
# Channels


class AsyncChannel:
    """One channel of an :class:`AsyncClient`; get it with ``await client.channel(name)``.

    Every ``timeout`` is in seconds and defaults to the client's; it bounds the whole
    operation including retries (see :class:`RetryPolicy`).
    """

    def __init__(self, client: AsyncClient, name: str) -> None:
        self._client = client
        self.name = name

    def __repr__(self) -> str:
        return f"<AsyncChannel {self.name!r}>"

    def append(self, item: Any) -> None:
        """Queue ``item`` for appending; returns at once. Errors of encoding raise here.

        Raises :class:`~raftchan.errors.ItemNotEncodable` or
        :class:`~raftchan.errors.LimitExceeded` for an item that cannot be sent,
        :class:`~raftchan.errors.ChannelStopped` if the channel is already known to be
        stopped, :class:`~raftchan.errors.Closed` after close. Other failures surface at
        the next :meth:`flush`.
        """
        self._client._append(self.name, (item,))

    def extend(self, items: Iterable[Any]) -> None:
        """Queue several items in order; if any cannot be encoded, none is queued."""
        self._client._append(self.name, items)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait for every earlier append of this client; see :meth:`AsyncClient.flush`."""
        await self._client._flush(timeout)

    async def put(self, item: Any, timeout: float | None = None) -> int:
        """Append ``item``, wait until it and every earlier append are answered, and return
        the index it was stored at.

        Raises what ``append`` raises, and what ``flush`` would for this item alone: a
        refusal of it (:class:`~raftchan.errors.ChannelStopped`, ...; it was not stored),
        or :class:`~raftchan.errors.FutureLost` (stored, its future marked lost). Refusals
        of other appends are left to the next ``flush``. After :class:`Timeout` the item
        stays queued and is still stored at most once.
        """
        return await self._client._put(self.name, item, timeout)

    async def data(self, timeout: float | None = None) -> deque[Any]:
        """A linearizable snapshot of the retained items, as a ``collections.deque``."""
        return deque(await self.read(timeout=timeout))

    async def len(self, timeout: float | None = None) -> int:
        """The number of retained items (linearizable)."""
        info = await self.info(timeout)
        return info.next - info.first

    async def info(self, timeout: float | None = None) -> ChannelInfo:
        """Indexes, stop marker and maxlen of the channel (linearizable)."""
        return await self._client._info(self.name, timeout)

    async def read(
        self, start: int | None = None, end: int | None = None, timeout: float | None = None
    ) -> list[Any]:
        """Items with indexes in ``[start, end)`` (``None``: the head / the current end).

        Linearizable. Raises :class:`~raftchan.errors.TrimmedGap` if ``start`` is older
        than the oldest retained item.
        """
        stored = await self._client._read(self.name, start, end, timeout)
        items = self._client.codec.decode_items(stored)
        await self._client.codec.settle_page()
        return items

    async def iterate(self, start: int | None = None) -> AsyncIterator[Any]:
        """Items from ``start`` (default: the oldest retained), then new ones as they come.

        The start is linearizable. Ends after the stop marker; never goes back or skips:
        raises :class:`~raftchan.errors.TrimmedGap` if ``maxlen`` trimming overtook it.
        Each wait for new items is retried within the client's timeout; a cluster out of
        reach for longer ends the iteration with :class:`NoLeader` or :class:`Timeout`.
        """
        async for batch in self._client._batches(self.name, start):
            for item in batch:
                yield item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self.iterate()

    async def stop(self, timeout: float | None = None) -> None:
        """Flush, then set the stop marker: every iteration ends, appends are refused.

        Idempotent. If the flush found refused appends, the stop still happens and then
        that error is raised; a flush :class:`Timeout` raises before stopping.
        """
        await self._client._stop(self.name, timeout)

    async def delete(self, timeout: float | None = None) -> None:
        """Flush, then delete the channel and its items (errors as for :meth:`stop`)."""
        await self._client._delete(self.name, timeout)
