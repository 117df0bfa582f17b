"""Dask futures in channels, on the client side; and the opt-in ``Client.channel``.

An item that is (or contains) a ``distributed.Future`` is stored as a msgpack ext type
(code :data:`FUTURE_EXT`) whose payload is the msgpack encoding of the future's key. The
cluster keeps such keys alive on the Dask scheduler under a fixed scheduler-side name per
channel (:func:`pin_name`), so no failure of a writer, a reader or a raftchan node
releases them. The codec imports ``distributed`` only once it meets a future (a program
that never imported ``distributed`` holds none), so plain clients do not pay for it.

Writing (:meth:`DaskCodec.encode_items`)
    The writer pins each key under the channel's name *on the connection of the Dask
    client that owns the future*, before the append can reach the cluster: messages on
    one Dask connection are handled in order, so the pin cannot overtake the task's
    submission (a pin sent on another connection can, and is then silently ignored).
    The raftchan client keeps the writer's Future referenced until the append is
    answered; the leader answers only after it has confirmed the pin itself.

Reading (:meth:`DaskCodec.decode_items`)
    Futures come back bound to the reader's Dask client (``dask_client=``, else
    ``distributed.get_client()``). One status request per page checks that the scheduler
    knows their keys, finishes at once the futures of keys already in memory, and then
    tells the scheduler that the client desires the keys. The future of a key the
    scheduler does not know within :data:`UNKNOWN_GRACE` seconds fails with
    :class:`~raftchan.errors.FutureLost` naming the key, instead of staying pending forever.

Old API
    ``raftchan.dask.install()`` gives ``distributed.Client`` a ``channel(name, maxlen=None)``
    method, so code written for the Channels of distributed 1.15-1.17 runs unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgpack

from raftchan.codec import SCALAR_TYPES, Encoded, ItemCodec
from raftchan.config import parse_addresses
from raftchan.errors import FutureLost, ItemNotEncodable
from raftchan.limits import DEFAULT_LIMITS

if TYPE_CHECKING:
    from distributed import Client as DaskClient
    from distributed import Future

__all__ = ["FUTURE_EXT", "DaskCodec", "install", "pin_name", "uninstall"]

#: Marks "the reader's Dask client is not looked up yet" while a page is decoded.
_UNRESOLVED = object()

logger = logging.getLogger(__name__)

#: msgpack ext type code of a stored Dask future (payload: msgpack of its key).
FUTURE_EXT = 42
#: Bounds the status request that tells a reader's future its key is unknown. When it
#: passes (scheduler unreachable), the future is left as Dask has it.
STATUS_TIMEOUT = 10.0
#: How long a reader keeps asking about a key the scheduler does not know before its
#: future fails with FutureLost (longer than the leader's own wait for a writer's task).
UNKNOWN_GRACE = 5.0
#: Prefix of the scheduler-side names under which channels keep their keys.
PIN_PREFIX = "raftchan-"
#: Statuses of a Dask client whose messages still reach the scheduler (``closing`` is
#: not one: its key may already be released).
LIVE_CLIENT_STATUSES = ("newly-created", "connecting", "running")


def pin_name(channel: str) -> str:
    """The scheduler-side pseudo-client name under which ``channel`` keeps its keys.

    One name per channel, shared by every raftchan cluster using the same Dask scheduler:
    two clusters sharing a scheduler must not use the same channel names.
    """
    return PIN_PREFIX + channel


def encode_key(key: Any) -> bytes:
    """A Dask key as the opaque bytes a channel stores (tuples become msgpack arrays)."""
    return msgpack.packb(key, use_bin_type=True)


def decode_key(data: bytes) -> Any:
    """The Dask key stored by :func:`encode_key` (arrays back to tuples)."""
    return msgpack.unpackb(data, raw=False, use_list=False)


class DaskCodec(ItemCodec):
    """The item codec that stores ``distributed.Future`` objects by key.

    Args:
        dask_client: the Dask client read futures are bound to. ``None``: the client
            ``distributed.get_client()`` returns when a page is decoded (the worker's
            client inside a task); without any Dask client, stored futures decode as
            plain ``msgpack.ExtType`` values.
        max_item_bytes: as for :class:`~raftchan.codec.ItemCodec`.
        status_timeout: bounds the one status request per decoded page (seconds).
    """

    def __init__(
        self,
        dask_client: DaskClient | None = None,
        max_item_bytes: int | None = DEFAULT_LIMITS.max_item_bytes,
        status_timeout: float = STATUS_TIMEOUT,
    ) -> None:
        super().__init__(max_item_bytes)
        # Weak: a Dask client that keeps a raftchan client (which holds this codec) in a
        # cache keyed by itself must still be collectable.
        self._dask_client = None if dask_client is None else weakref.ref(dask_client)
        self.status_timeout = status_timeout
        # Futures met while encoding, and the reader's client while decoding: per thread,
        # since the blocking client encodes in each caller's thread.
        self._local = threading.local()
        #: Status checks started on a reader's loop, referenced until done.
        self._checks: set[asyncio.Future[None]] = set()

    # -- writing ---------------------------------------------------------------------------

    def default(self, obj: Any) -> Any:
        distributed = sys.modules.get("distributed")
        if distributed is not None and isinstance(obj, distributed.Future):
            key = encode_key(obj.key)
            found = getattr(self._local, "found", None)
            if found is not None:
                found.append((key, obj))
            return msgpack.ExtType(FUTURE_EXT, key)
        return super().default(obj)

    def encode_items(self, channel: str, items: Iterable[Any]) -> list[Encoded]:
        """Encode the items and pin their futures' keys under :func:`pin_name`.

        Raises :class:`~raftchan.errors.ItemNotEncodable` for a future whose own Dask
        client is closed or missing (its key may already be released: nothing is sent),
        and as :meth:`ItemCodec.encode` otherwise.
        """
        records: list[Encoded] = []
        pins: dict[int, tuple[DaskClient, list[Any]]] = {}
        for item in items:
            if type(item) in SCALAR_TYPES:  # no future can hide in it
                records.append(Encoded(self.encode(item)))
                continue
            self._local.found = []
            try:
                data = self.encode(item)
                found: list[tuple[bytes, Future]] = self._local.found
            finally:
                self._local.found = None
            if not found:
                records.append(Encoded(data))
                continue
            for _key, future in found:
                client = future.client
                # A client still starting queues its messages (the submission, then the
                # pin) and sends them in order once connected; worker_client() can hand
                # one out while another task's thread starts it.
                if client is None or client.status not in LIVE_CLIENT_STATUSES:
                    raise ItemNotEncodable(
                        f"the Dask client of future {future.key!r} is not running; "
                        "its key may already be released",
                        type="Future",
                    )
                pins.setdefault(id(client), (client, []))[1].append(future.key)
            item_keys = tuple(dict.fromkeys(key for key, _future in found))
            records.append(Encoded(data, item_keys, tuple(future for _key, future in found)))
        for client, pinned in pins.values():
            # On the owner's own connection, after the submission it carried: see module doc.
            client._send_to_scheduler(
                {"op": "client-desires-keys", "keys": pinned, "client": pin_name(channel)}
            )
        return records

    # -- reading ---------------------------------------------------------------------------

    def ext_hook(self, code: int, data: bytes) -> Any:
        client = getattr(self._local, "client", None)
        if code == FUTURE_EXT and client is _UNRESOLVED:
            # The first future of the page: only now is distributed needed.
            client = self._local.client = self._reader_client()
        if code != FUTURE_EXT or client is None or client is _UNRESOLVED:
            return super().ext_hook(code, data)
        from distributed import Future

        key = decode_key(data)
        self._local.keys.append(key)
        return Future(key, client)

    def decode_items(self, datas: Iterable[bytes]) -> list[Any]:
        """Decode a page; bind its futures to the reader's Dask client and check their keys."""
        self._local.client = _UNRESOLVED
        self._local.keys = []
        try:
            items = [self.decode(data) for data in datas]
            keys: list[Any] = self._local.keys
            client = self._local.client
        finally:
            self._local.client = None
            self._local.keys = []
        if keys and client is not None and client is not _UNRESOLVED:
            keys = list(dict.fromkeys(keys))
            if _on_running_loop(client):
                # The reader's loop: settle_page() waits for the status answer, so that
                # the futures it finishes are finished when the reader gets them.
                checked = self._local.checked = asyncio.Event()
                check = asyncio.ensure_future(
                    _check_keys(client, keys, self.status_timeout, checked)
                )
                self._checks.add(check)  # a task nobody references may be collected
                check.add_done_callback(self._checks.discard)
            else:
                loop = client.loop
                assert loop is not None  # a running client has its loop
                loop.add_callback(_check_keys, client, keys, self.status_timeout)
        return items

    async def settle_page(self) -> None:
        """Wait for the status answer on the futures of the page just decoded in this
        thread, when its Dask client runs on this loop: their futures of keys in memory
        are then finished. Bounded by ``status_timeout``; a timeout is not an error (the
        futures finish when Dask's own reports come)."""
        checked = getattr(self._local, "checked", None)
        self._local.checked = None
        if checked is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(checked.wait(), self.status_timeout)

    @property
    def dask_client(self) -> DaskClient | None:
        """The Dask client given at construction (``None`` if none, or collected)."""
        return None if self._dask_client is None else self._dask_client()

    def _reader_client(self) -> DaskClient | None:
        client = self.dask_client
        if client is not None and client.status != "closed":
            return client
        try:
            from distributed import get_client

            return get_client()
        except ValueError:  # no Dask client anywhere: futures stay ExtType values
            return None


def _on_running_loop(client: DaskClient) -> bool:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return getattr(client.loop, "asyncio_loop", None) is running


async def _check_keys(
    client: DaskClient,
    keys: list[Any],
    timeout: float,
    checked: asyncio.Event | None = None,
    grace: float = UNKNOWN_GRACE,
) -> None:
    """On the Dask client's loop: desire the keys of futures just read, finish those in
    memory on the scheduler, fail those of keys it does not know.

    The status request goes first. After a desire, the scheduler reports on every key
    in a message of its own, and the futures stay pending until theirs arrives: for a
    page of 10,000 futures, 0.55 s of a reader's gather went to that, and a status
    request sent after the desire was answered only after the reports (over 1 s). Asked
    first, the status of all 10,000 keys took 20 ms. (Dask's reports still come, and
    change nothing.)

    An item becomes readable when its append commits, a moment before the leader has
    confirmed its pin: the writer's submission may still be on its way. So a key unknown
    at first is asked about again for ``grace`` seconds; if it shows up, this client
    desires it again (the first request was ignored); if not, its futures fail with
    :class:`FutureLost`. ``timeout`` bounds each status request. ``checked`` is set
    once the first status answer was dealt with (or could not be had).
    """
    try:
        await _check_keys_until_known(client, keys, timeout, checked, grace)
    finally:
        if checked is not None:
            checked.set()


async def _check_keys_until_known(
    client: DaskClient,
    keys: list[Any],
    timeout: float,
    checked: asyncio.Event | None,
    grace: float,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    delay = 0.01
    unknown = list(keys)
    first = True
    while unknown:
        try:
            statuses = await asyncio.wait_for(
                client.scheduler.get_task_status(keys=unknown), timeout
            )
        except Exception as exc:  # unreachable scheduler: Dask's own handling applies
            logger.warning("could not check %d future keys on the scheduler: %s", len(keys), exc)
            if first:
                _desire(client, keys)
            return
        _finish_in_memory(client, statuses)
        known = [key for key, status in statuses.items() if status is not None]
        if first:
            # All of them: the scheduler ignores a key it does not know yet, and such a
            # key is desired again below once it shows up.
            _desire(client, keys)
        elif known:
            _desire(client, known)
        first = False
        if checked is not None:
            checked.set()
        unknown = [key for key, status in statuses.items() if status is None]
        if unknown and loop.time() >= deadline:
            break
        if unknown:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
    for key in unknown:
        state = client.futures.get(key)
        if state is not None and state.status == "pending":
            state.set_error(
                FutureLost(
                    f"Dask future {key!r} is lost: the scheduler does not know its key "
                    "(scheduler restarted, data lost, or its writer died before submitting)",
                    key=repr(key),
                ),
                None,
            )


def _desire(client: DaskClient, keys: list[Any]) -> None:
    client._send_to_scheduler({"op": "client-desires-keys", "keys": keys, "client": client.id})


def _finish_in_memory(client: DaskClient, statuses: dict[Any, str | None]) -> None:
    for key, status in statuses.items():
        if status != "memory":
            continue
        state = client.futures.get(key)
        if state is not None and state.status == "pending":
            state.finish()


# ---------------------------------------------------------------------------------------
# distributed.Client.channel (opt-in)

_clients: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_clients_lock = threading.Lock()
#: The cluster address install() was given (or sent): it wins over the environment.
_address: str | None = None


def _channel(self: DaskClient, name: str, maxlen: int | None = None) -> Any:
    """Open raftchan channel ``name`` for this Dask client (create if missing, set maxlen).

    The raftchan cluster's address is the one :func:`install` was given or sent, else
    ``$RAFTCHAN_ADDRESS`` or the Dask config key ``raftchan.address``. Futures read from
    the channel are bound to this Dask client.
    """
    import raftchan

    with _clients_lock:
        rc = _clients.get(self)
        if rc is None or rc.closed:
            rc = _clients[self] = raftchan.Client(_address, dask_client=self)
            # A worker_client() is closed when its task ends: close the raftchan client
            # with it rather than leaving its thread to the garbage collector.
            weakref.finalize(self, rc.close, 1.0)
    return rc.channel(name, maxlen=maxlen)


def install(
    client: DaskClient | None = None, address: str | list[str] | tuple[str, ...] | None = None
) -> None:
    """Give ``distributed.Client`` a ``channel(name, maxlen=None)`` method (idempotent).

    ``address``: the raftchan cluster's client addresses; when given, ``channel`` uses
    them in this process, whatever ``$RAFTCHAN_ADDRESS`` says.

    With ``client``, also do this on every worker of that client's cluster, so that
    ``worker_client().channel(...)`` works inside tasks: the address (``address``, else
    ``$RAFTCHAN_ADDRESS`` or ``raftchan.address`` here) is resolved in this process and
    sent along, so the workers need neither. Raises
    :class:`~raftchan.errors.ConfigError` if there is none, before any worker is
    touched. Workers that join later need the same: a worker plugin, or a module that
    calls this.
    """
    from distributed import Client

    global _address
    if client is not None or address is not None:
        resolved = ",".join(parse_addresses(address))  # ConfigError here, not in tasks
        if client is not None:
            client.run(_install_on_worker, resolved)
        if address is not None:
            _address = resolved
    Client.channel = _channel  # type: ignore[attr-defined]


def _install_on_worker(address: str) -> None:
    install(address=address)


def uninstall() -> None:
    """Remove what :func:`install` added to ``distributed.Client`` in this process."""
    from distributed import Client

    global _address
    _address = None
    if getattr(Client, "channel", None) is _channel:
        del Client.channel  # type: ignore[attr-defined]
