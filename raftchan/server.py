"""The node: an asyncio client listener in front of the replica.

Any node accepts connections. Writes and linearizable reads are served by the leader only
(followers answer ``not_leader`` with the leader's client address); long-polls and status
are served by every node. One place reads the socket (:meth:`NodeServer._serve_connection`);
everything about bytes is in :mod:`raftchan.protocol`. With ``http_address`` set the node
also serves ``/health`` and ``/metrics`` (:mod:`raftchan.http_endpoint`,
:mod:`raftchan.metrics`) on the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from raftchan import membership, protocol
from raftchan.committer import Committer
from raftchan.config import ConfigError, NodeConfig, split_address
from raftchan.errors import (
    ChannelNotFound,
    CommitUnknown,
    MembershipChangeInProgress,
    NoLeader,
    NotLeader,
    ProtocolError,
    RaftchanError,
    RequestInvalid,
    Unauthorized,
    error_from_wire,
)
from raftchan.http_endpoint import HttpEndpoint
from raftchan.metrics import NodeMetrics, NodeSample
from raftchan.replica import Replica
from raftchan.security import server_ssl_context, token_accepted
from raftchan.state import Result, encode_command

logger = logging.getLogger(__name__)

#: How often a node checks that the replicated state knows its client address.
REGISTER_INTERVAL = 1.0
#: How long a membership request waits for a change still in flight (or for a new
#: leader's first commit) to settle before it is refused as MembershipChangeInProgress.
MEMBER_SETTLE_WAIT = 5.0
#: How long a Dask key unknown to the scheduler is waited for before it counts as lost.
CONFIRM_WAIT = 3.0
#: How often a request held during an election checks whether a leader emerged (seconds).
LEADER_POLL_INTERVAL = 0.01
#: Bounds the leader's wait for its keeper to confirm an append's future pins; past it the
#: client gets DaskUnavailable (retryable: the re-send is de-duplicated and asks again).
#: Below the client's default attempt timeout, so the client hears why.
CONFIRM_TIMEOUT = 6.0
#: Bytes of a read response spent on framing and fields besides the items.
_RESPONSE_OVERHEAD = 4096


class NodeServer:
    """One raftchan node: replica + group commit + client listener."""

    def __init__(self, config: NodeConfig) -> None:
        config.validate()
        self.config = config
        self.limits = config.limits
        self._loop = asyncio.get_running_loop()
        self._applied = asyncio.Event()
        #: Long polls waiting in :meth:`_poll` right now.
        self.waiting_polls = 0
        self.metrics = NodeMetrics(self.sample)
        self.replica = Replica(
            config,
            self._loop,
            on_applied=self._on_applied,
            on_role_changed=self._on_role_changed,
            on_fatal=self._on_fatal,
            on_snapshot_written=self.metrics.observe_snapshot,
        )
        commit_timeout = max(4 * config.raft.max_timeout, 5.0)
        submit = self.metrics.instrument_submit(
            self.replica.submit, lambda: self.committer.ops_submitted
        )
        self.committer = Committer(submit, self.limits, commit_timeout=commit_timeout)
        #: Bounds the wait for a membership change's commit (then: CommitUnknown).
        self._member_timeout = 2 * commit_timeout
        #: The membership change this leader is running, and its task.
        self._member_change: tuple[tuple[str, str], asyncio.Future[None]] | None = None
        self.http: HttpEndpoint | None = None
        if config.http_address is not None:
            self.http = HttpEndpoint(
                config.http_address, sample=self.sample, render=self.metrics.render
            )
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._was_leader = False
        self.keeper: Any = None
        if config.dask_scheduler:
            # Imported only here: a node without a Dask scheduler never imports distributed.
            from raftchan.keeper import Keeper

            self.keeper = Keeper(
                config.dask_scheduler,
                pinned_keys=self._pinned_keys,
                unreferenced=self._unreferenced,
                mark_lost=self._mark_lost,
                is_ready=lambda: self.replica.is_ready,
                confirm_wait=CONFIRM_WAIT,
            )
        #: Long polls this node answered (with items or a timely empty answer).
        self.polls_answered = 0
        #: Set when the node must stop; ``fatal`` then says why (None for a clean stop).
        self.stopped = asyncio.Event()
        self.fatal: str | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the Raft, client and HTTP addresses; ConfigError if one cannot be
        bound (the message names it and the system's reason)."""
        await asyncio.to_thread(self.replica.wait_bound)
        host, port = split_address(self.config.client_address)
        tls = None
        if self.config.tls_cert_file is not None and self.config.tls_key_file is not None:
            tls = server_ssl_context(self.config.tls_cert_file, self.config.tls_key_file)
        try:
            self._server = await asyncio.start_server(
                self._serve_connection, host, port, reuse_address=True, limit=2**20, ssl=tls
            )
        except OSError as exc:
            raise _listen_error(self.config.client_address, "--client-address", exc) from None
        if self.http is not None:
            try:
                self.http.start()
            except OSError as exc:
                raise _listen_error(self.http.address, "--http-address", exc) from None
        self._background.append(asyncio.create_task(self._register_loop()))
        if self.keeper is not None:
            self.keeper.start()
            self.keeper.set_leader(self.replica.is_leader)
        logger.info(
            "node %s ready: client=%s raft=%s http=%s",
            self.config.name,
            self.config.client_address,
            self.config.peer_address,
            self.http_address or "off",
        )

    @property
    def http_address(self) -> str | None:
        """Where ``/health`` and ``/metrics`` are served (the port chosen for port 0)."""
        return None if self.http is None else self.http.bound_address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self.http is not None:
            await self.http.close()
        for task in [*self._background, *self._connections]:
            task.cancel()
        for task in [*self._background, *self._connections]:
            with contextlib.suppress(BaseException):
                await task
        self.committer.fail_pending(CommitUnknown("node is shutting down"))
        if self.keeper is not None:
            await self.keeper.close()
        await asyncio.to_thread(self.replica.close)
        logger.info("node %s stopped", self.config.name)

    # -- replica callbacks (on the loop) -------------------------------------------------

    def _on_applied(self, position: int) -> None:
        # Wake every long-poll waiter; each re-checks its own condition.
        self._applied.set()
        self._applied = asyncio.Event()

    def _on_fatal(self, reason: str) -> None:
        self.fatal = reason
        self.stopped.set()

    def _on_role_changed(self) -> None:
        leading = self.replica.is_leader
        if self._was_leader and not leading:
            # Commands already submitted settle through pysyncobj (or time out); only the
            # ones not yet handed to Raft are failed here, as certainly not applied.
            self.committer.fail_pending(NotLeader(leader=self.replica.leader_client_address()))
        self._was_leader = leading
        if self.keeper is not None:
            self.keeper.set_leader(leading)

    # -- what operators see (on the loop) --------------------------------------------------

    def sample(self) -> NodeSample:
        """This node's figures now, for ``/health`` and ``/metrics`` (no I/O)."""
        status = self.replica.status()
        pinned = 0
        if self.keeper is not None:
            with self.replica.lock:
                # A channel marks lost only keys it references, so lost is within refs.
                pinned = sum(
                    len(channel.refs) - len(channel.lost)
                    for channel in self.replica.state.channels.values()
                )
        return NodeSample(
            name=self.config.name,
            client_address=self.config.client_address,
            raft_address=self.config.peer_address,
            role=status["role"],
            term=status["term"],
            commit_index=status["commit_index"],
            applied_index=status["applied_index"],
            ready=status["ready"],
            leader_known=self.replica.hears_leader(),
            leader=status["leader"],
            channels=status["channels"],
            sessions=status["sessions"],
            waiting_polls=self.waiting_polls,
            pinned_futures=pinned,
        )

    # -- the keeper's view of the state (on the loop) -------------------------------------

    def _pinned_keys(self) -> dict[str, list[bytes]]:
        with self.replica.lock:
            return self.replica.state.pinned_keys()

    def _unreferenced(self, channel: str, keys: list[bytes]) -> list[bytes]:
        with self.replica.lock:
            return self.replica.state.unreferenced(channel, keys)

    def _mark_lost(self, channel: str, keys: list[bytes]) -> None:
        task = asyncio.ensure_future(self._commit(["lost", channel, keys]))
        task.add_done_callback(_log_lost_failure)

    def _release(self, channel: str, result: Result) -> None:
        released = result.get("released")
        if released and self.keeper is not None:
            self.keeper.release(channel, released)

    async def _change_members(self, request: protocol.Request) -> dict[str, Any]:
        """Serve member_add / member_remove on the leader; answers once committed.

        The same change asked again while it is in flight (a client retrying after a lost
        answer) waits for it; any other change meanwhile is MembershipChangeInProgress.
        """
        if isinstance(request, protocol.MemberAdd):
            kind, address = membership.ADD, request.address
        else:
            assert isinstance(request, protocol.MemberRemove)
            kind, address = membership.REMOVE, request.address
        for given in (address, getattr(request, "client_address", address)):
            try:
                split_address(given)
            except ConfigError as exc:
                raise RequestInvalid(str(exc)) from None
        if self._member_change is not None:
            (running, future) = self._member_change
            if running != (kind, address):
                raise MembershipChangeInProgress(
                    f"a change ({running[0]} {running[1]}) is in flight; nothing changed"
                )
            await asyncio.shield(future)
            return {"members": self.replica.members()}
        await self._settle_membership()
        members = self.replica.members()
        if kind == membership.ADD:
            membership.check_add(members, address)
        else:
            membership.check_remove(members, address, self.config.peer_address)
        future = asyncio.ensure_future(self._run_member_change(request, kind, address))
        self._member_change = ((kind, address), future)
        future.add_done_callback(lambda _: setattr(self, "_member_change", None))
        await asyncio.shield(future)
        return {"members": self.replica.members()}

    async def _run_member_change(self, request: protocol.Request, kind: str, address: str) -> None:
        if isinstance(request, protocol.MemberAdd):
            # Record the new node's client address first, so that every node can point
            # clients at it as soon as it may lead.
            await self._commit(["node", request.name, address, request.client_address])
        logger.info("membership change: %s %s", kind, address)
        await self.replica.change_members(kind, address, self._member_timeout)
        logger.info("membership change committed: %s %s", kind, address)

    async def _settle_membership(self) -> None:
        """Wait up to MEMBER_SETTLE_WAIT for this leader to be able to change membership."""
        deadline = self._loop.time() + MEMBER_SETTLE_WAIT
        while self.replica.change_pending() or not self.replica.leader_ready():
            if self._loop.time() >= deadline:
                what = (
                    "an earlier membership change is not committed yet"
                    if self.replica.change_pending()
                    else "this leader has not committed an entry of its term yet"
                )
                raise MembershipChangeInProgress(f"{what}; nothing changed")
            self._require_leader()
            await asyncio.sleep(0.05)

    async def _member_list(self) -> dict[str, Any]:
        await self._barrier()
        members = self.replica.members()
        with self.replica.lock:
            records = {address: self.replica.state.nodes.get(address) for address in members}
        return {
            "members": [
                {
                    "raft_address": address,
                    "name": None if record is None else record.name,
                    "client_address": None if record is None else record.client_address,
                }
                for address, record in records.items()
            ],
            "leader": self.config.peer_address,
            "change_pending": self.replica.change_pending(),
        }

    async def _register_loop(self) -> None:
        """Make sure the replicated state maps this node's Raft address to its client address.

        Followers use it to point clients at the leader.
        """
        op = ["node", self.config.name, self.config.peer_address, self.config.client_address]
        while True:
            await asyncio.sleep(REGISTER_INTERVAL)
            with self.replica.lock:
                record = self.replica.state.nodes.get(self.config.peer_address)
            if (
                record is not None
                and record.client_address == self.config.client_address
                and record.name == self.config.name
            ):
                continue
            if self.replica.leader_raft_address() is None:
                continue
            try:
                if self.replica.is_leader:
                    await self.committer.submit_op(op)
                else:
                    # pysyncobj forwards a follower's command to the leader.
                    command = encode_command(
                        [op], self.limits.max_channels, self.limits.max_sessions
                    )
                    await self.replica.submit(command, 5.0)
            except RaftchanError as exc:
                logger.debug("registering client address failed (will retry): %s", exc)

    # -- connections ---------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        decoder = protocol.FrameDecoder(self.limits.max_frame_bytes)
        requests: set[asyncio.Task[None]] = set()
        greeted = False
        try:
            while True:
                data = await reader.read(2**16)
                if not data:
                    return
                decoder.feed(data)
                for message in decoder.messages():
                    if not greeted:
                        protocol.check_hello(message)
                        self._check_token(message, peer)
                        hello = protocol.hello_response(self.config.name, self.limits)
                        writer.write(protocol.encode_frame(hello))
                        greeted = True
                        continue
                    if len(requests) >= self.limits.max_pending_requests:
                        # Backpressure: stop reading until an answer has gone out.
                        await asyncio.wait(requests, return_when=asyncio.FIRST_COMPLETED)
                    handler = asyncio.create_task(self._handle(message, writer))
                    requests.add(handler)
                    handler.add_done_callback(requests.discard)
        except (ProtocolError, Unauthorized) as exc:
            logger.warning("closing connection from %s: %s", peer, exc)
            with contextlib.suppress(Exception):
                writer.write(protocol.encode_frame(protocol.error_response(None, exc)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for handler in requests:
                handler.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._connections.discard(task)

    def _check_token(self, hello: dict[str, Any], peer: Any) -> None:
        """Raise Unauthorized unless this node needs no token or the hello carries one of
        its tokens; no request of the connection is read before this passes."""
        tokens = self.config.tokens
        if tokens and not token_accepted(hello.get("token"), tokens):
            given = "no token" if hello.get("token") is None else "a token it does not accept"
            raise Unauthorized(f"node {self.config.name} requires a token; {peer} gave {given}")

    async def _handle(self, message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        # The same id rule as parse_request: a refused id (a bool, say) is answered as nil,
        # never echoed, so the asker cannot mistake the answer for one of its requests.
        request_id = protocol.request_id_of(message)
        try:
            request = protocol.parse_request(message, self.limits)
            response = await self._dispatch(request)
        except RaftchanError as exc:
            response = protocol.error_response(request_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours: answer it, keep serving others
            logger.exception("request %r failed", message.get("type"))
            response = protocol.error_response(request_id, RaftchanError(f"internal error: {exc}"))
        if writer.is_closing():
            return
        try:
            frame = protocol.encode_frame(response)
        except Exception as exc:
            frame = protocol.encode_frame(
                protocol.error_response(request_id, RaftchanError(f"unencodable response: {exc}"))
            )
        writer.write(frame)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _dispatch(self, request: protocol.Request) -> dict[str, Any]:
        rid = request.id
        if isinstance(request, protocol.Ping):
            return protocol.ok_response(rid)
        if isinstance(request, protocol.Status):
            keeper = {} if self.keeper is None else self.keeper.status()
            return protocol.ok_response(
                rid,
                **self.replica.status(),
                **keeper,
                polls_answered=self.polls_answered,
                http_address=self.http_address,
            )
        if isinstance(request, protocol.Poll):
            return protocol.ok_response(rid, **await self._poll(request))
        if isinstance(request, protocol.Fault):
            if not self.config.fault_injection:
                raise RequestInvalid("fault injection is off on this node")
            self.replica.set_blocked_peers(set(request.block))
            logger.warning("fault injection: Raft traffic to %s dropped", request.block or "none")
            return protocol.ok_response(rid)
        await self._await_leader()
        self._require_leader()
        if isinstance(request, protocol.Append):
            return await self._append(request)
        if isinstance(request, protocol.Open):
            result = await self._commit(["open", request.channel, request.maxlen])
            self._release(request.channel, result)
            return protocol.ok_response(rid, **_without_ok(result))
        if isinstance(request, protocol.Stop):
            result = await self._commit(["stop", request.channel])
            return protocol.ok_response(rid, **_without_ok(result))
        if isinstance(request, protocol.Delete):
            result = await self._commit(["delete", request.channel])
            self._release(request.channel, result)
            return protocol.ok_response(rid)
        if isinstance(request, protocol.EndSession):
            await self._commit(["end_session", request.session])
            return protocol.ok_response(rid)
        if isinstance(request, protocol.Info):
            await self._barrier()
            with self.replica.lock:
                if request.channel not in self.replica.state.channels:
                    raise ChannelNotFound(
                        f"channel {request.channel!r} does not exist", channel=request.channel
                    )
                info = self.replica.state.info(request.channel)
            return protocol.ok_response(rid, **info)
        if isinstance(request, protocol.MemberList):
            return protocol.ok_response(rid, **await self._member_list())
        if isinstance(request, (protocol.MemberAdd, protocol.MemberRemove)):
            return protocol.ok_response(rid, **await self._change_members(request))
        if isinstance(request, protocol.Read):
            await self._barrier()
            return protocol.ok_response(
                rid, **self._read(request.channel, request.start, request.end)
            )
        raise AssertionError(f"unhandled request type {request.TYPE}")

    # -- writes and linearizable reads ---------------------------------------------------

    async def _append(self, request: protocol.Append) -> dict[str, Any]:
        """Commit an append; if it holds Dask futures, answer only once their pins are confirmed.

        The answer's ``lost`` lists keys the scheduler did not know: they are stored and
        marked lost in the channel.
        """
        op: list[Any] = ["append", request.channel, request.session, request.seq, request.items]
        if request.keys is not None:
            if self.keeper is None:
                raise RequestInvalid(
                    "this cluster keeps no Dask futures: its nodes run without --dask-scheduler"
                )
            op.append(request.keys)
        result = await self._commit(op)
        self._release(request.channel, result)
        if not result["duplicate"]:
            # A retry that overlaps an earlier append only in part counts its whole
            # length: the result does not say which of its indexes are new.
            self.metrics.count_appends(len(result["indexes"]))
        fields: dict[str, Any] = {"indexes": result["indexes"], "duplicate": result["duplicate"]}
        if request.keys and self.keeper is not None:
            keys = list(dict.fromkeys(key for item_keys in request.keys for key in item_keys))
            if keys:
                lost = await self.keeper.confirm(request.channel, keys, CONFIRM_TIMEOUT)
                if lost:
                    with contextlib.suppress(RaftchanError):  # e.g. deleted meanwhile
                        await self._commit(["lost", request.channel, lost])
                    fields["lost"] = lost
        return protocol.ok_response(request.id, **fields)

    async def _await_leader(self) -> None:
        """While an election is on (this node neither leads nor hears a live leader), hold
        the request up to two election timeouts for one to emerge.

        Answering at once would send the client into its backoff, and it would retry a
        few hundred milliseconds after the new leader is already there; held here, it gets
        the new leader's address (or is served) as soon as the election ends.
        """
        deadline = self._loop.time() + 2 * self.config.raft.max_timeout
        while not (self.replica.is_leader or self.replica.hears_leader()):
            if self._loop.time() >= deadline:
                return
            await asyncio.sleep(LEADER_POLL_INTERVAL)

    def _require_leader(self) -> None:
        if not self.replica.is_leader:
            leader = self.replica.leader_client_address()
            if leader is None and self.replica.leader_raft_address() is None:
                raise NoLeader("no leader is known to this node")
            raise NotLeader(leader=leader)

    async def _commit(self, op: list[Any]) -> Result:
        result = await self.committer.submit_op(op)
        if not result.get("ok"):
            raise error_from_wire(result["code"], result["message"], result.get("details"))
        return result

    async def _barrier(self) -> None:
        if self.config.unsafe_local_reads:
            return  # the deliberately broken build the fault suite must catch
        await self.committer.barrier()
        # The barrier proves leadership at commit time; if we lost it since, the state we
        # would read is still committed, so serving it stays linearizable.

    def _read(self, channel: str, start: int | None, end: int | None) -> dict[str, Any]:
        with self.replica.lock:
            result = self.replica.state.read(channel, start, end, self.limits.max_read_items)
        if not result.get("ok"):
            raise error_from_wire(result["code"], result["message"], result.get("details"))
        items: list[bytes] = result["items"]
        budget = self.limits.max_frame_bytes - _RESPONSE_OVERHEAD
        total = 0
        for count, item in enumerate(items):
            total += len(item) + 8
            if total > budget:
                items = items[: max(count, 1)]
                break
        return {**_without_ok(result), "items": items}

    # -- long-poll (any node) ------------------------------------------------------------

    async def _poll(self, request: protocol.Poll) -> dict[str, Any]:
        """Items at ``request.start`` once this node has applied ``min_position``.

        Returns early with what is there; an empty answer after ``wait`` seconds otherwise.
        """
        self.waiting_polls += 1
        try:
            return await self._poll_until(request)
        finally:
            self.waiting_polls -= 1

    async def _poll_until(self, request: protocol.Poll) -> dict[str, Any]:
        deadline = self._loop.time() + request.wait
        while True:
            event = self._applied
            with self.replica.lock:
                position = self.replica.state.position
                channel = self.replica.state.channels.get(request.channel)
                # A node that knows no leader may be cut off from the majority: its
                # empty answers would stall the reader, so send the reader elsewhere.
                caught_up = (
                    position >= request.min_position
                    and self.replica.is_ready
                    and self.replica.hears_leader()
                )
                has_news = channel is not None and (
                    channel.next > request.start or channel.stopped or request.start < channel.first
                )
            if caught_up and (channel is None or has_news):
                self.polls_answered += 1
                return self._read(request.channel, request.start, None)
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                if not caught_up:
                    raise NoLeader(
                        f"node {self.config.name} is at position {position} (reader: "
                        f"{request.min_position}) or knows no leader; try another node"
                    )
                self.polls_answered += 1
                return self._read(request.channel, request.start, None)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)


def _listen_error(address: str, flag: str, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot listen on {address} ({flag}): {exc.strerror or exc}")


def _without_ok(result: Result) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("ok", "released")}


def _log_lost_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("could not mark future keys lost: %s", task.exception())


async def serve(config: NodeConfig, stop: asyncio.Event | None = None) -> str | None:
    """Run a node until ``stop`` is set, SIGTERM/SIGINT arrives, or it fails.

    Returns ``None`` after a clean stop, or the reason the node could not go on.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    server = NodeServer(config)
    try:
        await server.start()
        stop_wait = asyncio.create_task(stop.wait())
        fatal_wait = asyncio.create_task(server.stopped.wait())
        await asyncio.wait({stop_wait, fatal_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        fatal_wait.cancel()
    finally:
        await server.close()
    return server.fatal


def run_node(config: NodeConfig) -> None:
    """Run one node in the foreground until SIGTERM/SIGINT (raises ConfigError first if unsafe).

    Exits the process with status 1 when the node cannot go on (for example, a snapshot
    that cannot be loaded), after logging why.
    """
    config.validate()
    fatal = asyncio.run(serve(config))
    if fatal is not None:
        raise SystemExit(f"raftchan node {config.name} stopped: {fatal}")
