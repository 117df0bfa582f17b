"""The replica: binds the channel state machine to pysyncobj. The only module that imports it.

What this module owns:

- **One replicated method** taking the bytes of one command (adding or renaming
  ``@replicated`` methods changes pysyncobj's method ids and breaks existing logs).
- **Durability.** raftchan's own :class:`~raftchan.journal.DurableJournal` is plugged in
  through pysyncobj's ``createJournal`` seam, and snapshots are msgpack files written by
  :mod:`raftchan.snapshot`. Under the default fsync policy the journal is fsynced before
  any Raft message leaves the node (so a follower's acknowledgement means "on my disk")
  and before any applied result is handed to a client (so the leader's own copy is on
  disk before the client hears "committed"). Both are cheap when nothing is dirty.
- **Threads.** pysyncobj runs one tick thread for network I/O, applies and callbacks. The
  state is mutated only there, under :attr:`Replica.lock`; results are handed to asyncio
  with ``call_soon_threadsafe``.
- **Outcomes.** pysyncobj's LEADER_CHANGED, DISCARDED and UNKNOWN_OUTCOME all become
  :class:`~raftchan.errors.CommitUnknown`: the command may still commit, and only the
  state's de-duplication makes a retry safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport

from raftchan import journal as journal_module
from raftchan import snapshot as snapshot_module
from raftchan.config import NodeConfig
from raftchan.errors import CommitUnknown, NoLeader, NotLeader, RaftchanError
from raftchan.limits import Limits
from raftchan.peer_connection import install_message_bound
from raftchan.state import ChannelState, Result

logger = logging.getLogger(__name__)

JOURNAL_FILE = "raft.journal"
SNAPSHOT_FILE = "raft.snapshot"

_ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}


def append_batch_bytes(limits: Limits) -> int:
    """pysyncobj's append-entries batch size: above any command raftchan can build.

    A command holds at most one append request beyond the committer's soft cap, and a
    request fits in one client frame.
    """
    return max(8 * 1024 * 1024, 4 * limits.max_frame_bytes)


def peer_message_bytes(limits: Limits) -> int:
    """The largest Raft message a node accepts from an authenticated peer.

    An append-entries message holds a batch up to :func:`append_batch_bytes` plus the
    entry that crossed it (at most one client frame); compressed, then encrypted and
    base64-encoded (4/3), it stays well under twice that.
    """
    return 2 * (append_batch_bytes(limits) + limits.max_frame_bytes)


class _SyncBeforeSendTransport(TCPTransport):
    """pysyncobj's TCP transport, fsyncing the journal before any message leaves.

    A follower's append-entries reply tells the leader "stored"; Raft counts it toward the
    majority. Syncing here makes that statement true on disk, at one fsync per tick at most.
    The optional ``blocked`` set drops messages to chosen peers (a partition switch used
    only by the fault harness).
    """

    def __init__(
        self,
        syncObj: Any,  # noqa: N803 - pysyncobj's keyword names
        selfNode: Any,  # noqa: N803
        otherNodes: Any,  # noqa: N803
        *,
        journal: journal_module.DurableJournal,
    ) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        self._journal = journal
        self.blocked: set[str] = set()

    def send(self, node: Any, message: Any) -> bool:
        if node.id in self.blocked:
            return False
        self._journal.sync()
        return bool(super().send(node, message))


class _RaftNode(SyncObj):
    """The pysyncobj object: exactly one replicated method; no other replicated state."""

    def __init__(self, apply: Callable[[bytes], list[Result]], **kwargs: Any) -> None:
        self._raftchan_apply = apply
        super().__init__(**kwargs)

    @replicated
    def apply_command(self, command: bytes) -> list[Result]:
        return self._raftchan_apply(command)


class Replica:
    """One node's copy of the replicated channel state.

    ``on_applied(position)``, ``on_role_changed()`` and ``on_fatal(reason)`` are called on
    the asyncio loop (never in pysyncobj's thread); after ``on_fatal`` the node must stop.
    ``on_snapshot_written(seconds)`` is called in pysyncobj's thread after each snapshot
    written, with the time it took; it must be quick and thread-safe.
    Read :attr:`state` only while holding :attr:`lock`.
    """

    def __init__(
        self,
        config: NodeConfig,
        loop: asyncio.AbstractEventLoop,
        on_applied: Callable[[int], None] = lambda position: None,
        on_role_changed: Callable[[], None] = lambda: None,
        on_fatal: Callable[[str], None] = lambda reason: None,
        on_snapshot_written: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.state = ChannelState()
        self._loop = loop
        self._on_applied = on_applied
        self._on_role_changed = on_role_changed
        self._on_fatal = on_fatal
        self._on_snapshot_written = on_snapshot_written
        self._closed = False

        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        journal_path = str(data_dir / JOURNAL_FILE)
        snapshot_path = str(data_dir / SNAPSHOT_FILE)
        self.journal = journal_module.DurableJournal(
            journal_path,
            snapshot_path=snapshot_path,
            fsync=config.fsync == "always",
            record_synced=config.record_synced,
        )
        journal_module.install_journal_factory()
        install_message_bound(peer_message_bytes(config.limits))
        journal_module.register_journal(journal_path, self.journal)

        tuning = config.raft
        conf = SyncObjConf(
            journalFile=journal_path,
            fullDumpFile=snapshot_path,
            serializer=self._write_snapshot,
            deserializer=self._read_snapshot,
            # A serializer turns fork off anyway; say so, since a forked child would
            # snapshot a state another thread may be mutating.
            useFork=False,
            # Send each command at once instead of every append_entries_period: group
            # commit already batches, and a lone client must not wait for the period.
            appendEntriesUseBatch=False,
            appendEntriesPeriod=tuning.append_entries_period,
            # pysyncobj 0.3.17 splits an entry at least this large into chunks and ends the
            # transfer by comparing against the command's length instead of the pickled
            # entry's, so an entry a few bytes under a multiple of the size arrives
            # truncated, fails to unpickle on the follower, and is resent the same way
            # forever (seen with a 131,046-byte command). Keep every command below it.
            appendEntriesBatchSizeBytes=append_batch_bytes(config.limits),
            raftMinTimeout=tuning.min_timeout,
            raftMaxTimeout=tuning.max_timeout,
            leaderFallbackTimeout=tuning.leader_fallback_timeout,
            connectionRetryTime=tuning.connection_retry,
            connectionTimeout=max(tuning.max_timeout, 1.0),
            logCompactionMinEntries=tuning.compaction_min_entries,
            logCompactionMinTime=tuning.compaction_min_time,
            # Without a leader, fail commands at once: the server turns that into
            # NoLeader and clients look elsewhere instead of hanging.
            commandsWaitLeader=False,
            bindAddress=config.peer_address,
            password=config.cluster_secret,
            onStateChanged=self._state_changed,
            dynamicMembershipChange=False,
        )
        self._transport_class = functools.partial(_SyncBeforeSendTransport, journal=self.journal)
        self._node = _RaftNode(
            self._apply,
            selfNode=config.peer_address,
            otherNodes=list(config.peers),
            conf=conf,
            transportClass=self._transport_class,
        )

    # -- pysyncobj thread -------------------------------------------------------------------

    def _apply(self, command: bytes) -> list[Result]:
        # The leader's own copy must be on disk before any client hears "committed".
        self.journal.sync()
        with self.lock:
            results = self.state.apply(command)
            position = self.state.position
        self._call_in_loop(self._on_applied, position)
        return results

    def _write_snapshot(self, file_name: str, data: Any) -> None:
        started = time.perf_counter()
        last_entry, prev_entry, cluster = data
        with self.lock:
            state_bytes = self.state.to_bytes()
        node_ids = sorted(getattr(node, "id", str(node)) for node in cluster)
        snapshot_module.write_snapshot(file_name, last_entry, prev_entry, node_ids, state_bytes)
        self._on_snapshot_written(time.perf_counter() - started)

    def _read_snapshot(self, file_name: str) -> tuple[Any, Any, Any]:
        try:
            snap = snapshot_module.read_snapshot(file_name)
            state = ChannelState.from_bytes(snap.state)
        except Exception as exc:
            # pysyncobj only logs a failed load and carries on with an empty state whose
            # journal starts past it: the node would silently never apply again. Stop it.
            logger.critical("cannot load snapshot %s: %s", file_name, exc)
            self._call_in_loop(self._on_fatal, f"cannot load snapshot {file_name}: {exc}")
            raise
        with self.lock:
            self.state = state
            position = state.position
        logger.info(
            "loaded snapshot at log index %d (state position %d)", snap.last_entry[1], position
        )
        self._call_in_loop(self._on_applied, position)
        return snap.last_entry, snap.prev_entry, list(snap.node_ids)

    def _state_changed(self, old: int, new: int) -> None:
        # The term goes into the log line so that a test can check that no term ever had
        # two leaders (runs in pysyncobj's thread, which owns the term).
        term = getattr(self._node, "_SyncObj__raftCurrentTerm", None)
        logger.info(
            "raft role %s -> %s (term %s)", _ROLE_NAMES.get(old), _ROLE_NAMES.get(new), term
        )
        self._call_in_loop(self._on_role_changed)

    def _call_in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        if self._closed:
            return
        # RuntimeError: the loop is closing and nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    # -- asyncio side -----------------------------------------------------------------------

    def submit(self, command: bytes, timeout: float) -> asyncio.Future[list[Result]]:
        """Replicate one command; the future resolves with its results once applied here.

        The future fails with :class:`NoLeader` or :class:`NotLeader` when the command was
        certainly not appended, and with :class:`CommitUnknown` when it may or may not
        commit (leader changed, discarded, or ``timeout`` seconds passed without an answer).
        """
        future: asyncio.Future[list[Result]] = self._loop.create_future()

        def settle(result: Any, error: RaftchanError | None) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        def on_done(result: Any, reason: int) -> None:  # runs in pysyncobj's thread
            error = None if reason == FAIL_REASON.SUCCESS else self._failure(reason)
            self._call_in_loop(settle, result, error)

        self._node.apply_command(command, callback=on_done)
        self._loop.call_later(
            timeout,
            settle,
            None,
            CommitUnknown(f"no commit confirmation within {timeout:.1f} s"),
        )
        return future

    def _failure(self, reason: int) -> RaftchanError:
        if reason == FAIL_REASON.MISSING_LEADER:
            return NoLeader("the cluster has no leader right now")
        if reason == FAIL_REASON.QUEUE_FULL:
            return NoLeader("the leader's command queue is full")
        if reason == FAIL_REASON.NOT_LEADER:
            return NotLeader("leadership moved before the command was appended")
        return CommitUnknown(f"raft outcome unknown (pysyncobj reason {reason})")

    @property
    def is_leader(self) -> bool:
        return bool(self._node._isLeader())

    @property
    def is_ready(self) -> bool:
        """True once this node has applied everything the leader had committed when it joined."""
        return bool(self._node.isReady())

    def hears_leader(self) -> bool:
        """True if this node leads, or heard from its leader within one election timeout.

        pysyncobj starts no election while a node has no peer connection at all, so such
        a node keeps naming its old leader for ever; the election deadline, which every
        message from the leader pushes back, tells a live leader from a remembered one.
        A leader whose process died is also given up at once: the kernel closes its
        connection, while the deadline would keep naming it for up to a timeout more.
        """
        if self.is_leader:
            return True
        leader = self._node._getLeader()
        deadline = self._node._SyncObj__raftElectionDeadline
        if leader is None or time.monotonic() >= float(deadline):
            return False
        connection = self._node._SyncObj__transport._connections.get(leader)
        return connection is not None and connection.state == CONNECTION_STATE.CONNECTED

    def leader_raft_address(self) -> str | None:
        leader = self._node._getLeader()
        return None if leader is None else str(leader.id)

    def leader_client_address(self) -> str | None:
        """The leader's client address, when the leader has registered it in the state."""
        raft_address = self.leader_raft_address()
        if raft_address is None:
            return None
        if raft_address == self.config.peer_address:
            return self.config.client_address
        with self.lock:
            record = self.state.nodes.get(raft_address)
        return None if record is None else record.client_address

    def status(self) -> dict[str, Any]:
        """This node's view of the cluster (no I/O; values may lag by a tick)."""
        raw = self._node.getStatus()
        with self.lock:
            position = self.state.position
            channels = len(self.state.channels)
            sessions = len(self.state.sessions)
        return {
            "name": self.config.name,
            "client_address": self.config.client_address,
            "raft_address": self.config.peer_address,
            "role": _ROLE_NAMES.get(raw["state"], "unknown"),
            "term": raw["raft_term"],
            "commit_index": raw["commit_idx"],
            "applied_index": raw["last_applied"],
            "log_entries": raw["log_len"],
            "leader": self.leader_client_address(),
            "leader_raft_address": self.leader_raft_address(),
            "has_quorum": bool(raw["has_quorum"]),
            "ready": self.is_ready,
            "position": position,
            "channels": channels,
            "sessions": sessions,
            "journal_synced_bytes": self.journal.synced_length,
        }

    def set_blocked_peers(self, peers: set[str]) -> None:
        """Drop all Raft messages to these peers (fault injection for the test harness)."""
        transport = self._node._SyncObj__transport
        transport.blocked = set(peers)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the Raft thread and sync the journal; waits up to ``timeout`` seconds."""
        if self._closed:
            return
        self._closed = True
        self._node.destroy()
        deadline = time.monotonic() + timeout
        while self._node.tick_thread_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.journal.sync()
