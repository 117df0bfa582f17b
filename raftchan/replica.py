"""The replica: binds the channel state machine to pysyncobj. The only module that imports it.

What this module owns:

- **One replicated method** taking the bytes of one command (adding or renaming
  ``@replicated`` methods changes pysyncobj's method ids and breaks existing logs).
- **Durability.** raftchan's own :class:`~raftchan.journal.DurableJournal` is plugged in
  through pysyncobj's ``createJournal`` seam, and snapshots are msgpack files written by
  :mod:`raftchan.snapshot`. Under the default fsync policy the journal is fsynced before
  any Raft message but the leader's append-entries leaves the node (so a follower's
  acknowledgement means "on my disk"); the leader syncs right after sending new entries
  and before it counts its own copy toward a commit, and before any applied result is
  handed to a client. All are cheap when nothing is dirty.
- **Threads.** pysyncobj runs one tick thread for network I/O, applies and callbacks. The
  state is mutated only there, under :attr:`Replica.lock`; results are handed to asyncio
  with ``call_soon_threadsafe``.
- **Outcomes.** pysyncobj's LEADER_CHANGED, DISCARDED and UNKNOWN_OUTCOME all become
  :class:`~raftchan.errors.CommitUnknown`: the command may still commit, and only the
  state's de-duplication makes a retry safe.
- **Membership.** pysyncobj's dynamic membership, with the gaps :mod:`raftchan.membership`
  describes closed here: the membership a node starts with is computed from its snapshot
  and journal (``--peers`` only bootstraps an empty data folder), snapshots record the
  membership as of their own index, a change is refused while an earlier one is not yet
  applied, and membership entries take effect when appended and never again when applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import pickle
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjException, replicated
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport

from raftchan import item_segments, membership, pre_vote, retired_files
from raftchan import journal as journal_module
from raftchan import snapshot as snapshot_module
from raftchan.compaction import CompactionPolicy
from raftchan.config import ConfigError, NodeConfig, split_address
from raftchan.errors import (
    CommitUnknown,
    MemberExists,
    MemberNotFound,
    MembershipChangeInProgress,
    MembershipError,
    NoLeader,
    NotLeader,
    RaftchanError,
)
from raftchan.held_entries import for_follower
from raftchan.limits import Limits
from raftchan.peer_backlog import (
    ConnectedPeers,
    is_backlogged,
    is_snapshot_chunk_before_last,
    may_hold_after,
)
from raftchan.peer_connection import PICKLE_PROTOCOL, install_message_bound
from raftchan.snapshot_transfer import SnapshotReceiver
from raftchan.snapshot_turns import (
    TURN_KEY,
    UNCOORDINATED_FACTOR,
    WISH_KEY,
    SnapshotTurns,
    Wish,
    follower_wish,
)
from raftchan.snapshot_writer import BackgroundSnapshots, WriteSnapshot
from raftchan.state import ChannelState, Result

logger = logging.getLogger(__name__)

JOURNAL_FILE = "raft.journal"
SNAPSHOT_FILE = "raft.snapshot"

_ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}
#: Socket buffers asked for on peer connections (see the SyncObjConf in Replica).
PEER_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

#: pysyncobj binds the Raft port in its thread and, by default, retries every second
#: forever without a word: a node whose port another program held said it was ready,
#: and could only dial out. It now tries this many times, this far apart, and the node
#: stops with the reason (:meth:`Replica.wait_bound`). A port held by a process of ours
#: that is still exiting is free again well within that.
BIND_ATTEMPTS = 6
BIND_RETRY_S = 0.5


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


# pysyncobj keeps its deadlines on CLOCK_MONOTONIC_RAW (``raft_clock``). time.monotonic()
# reads CLOCK_MONOTONIC, which NTP slews, so the two drift apart with uptime (measured:
# 0.26 s after 8 hours): a time compared with or written into one of pysyncobj's must
# come from ``raft_clock``.

#: Seconds within which a follower that saw its leader's connection close stands for
#: election (each at a random point, so that they rarely split the vote).
_EARLY_ELECTION_WINDOW = 0.1


#: How long a leader that applied entries waits for a new command to carry the commit
#: index to its followers before it sends a message of its own for it (seconds).
_COMMIT_NOTICE_DELAY = 0.001


class _SyncBeforeSendTransport(TCPTransport):
    """pysyncobj's TCP transport, fsyncing the journal before a message leaves.

    A follower's append-entries reply tells the leader "stored"; Raft counts it toward the
    majority. Syncing here makes that statement true on disk, at one fsync per tick at most.
    The leader's own append-entries are the exception: they leave first and the leader
    syncs right after, so that its fsync runs while the followers write theirs (see
    :meth:`_RaftNode._onTick` for why the leader still never counts an entry it has not
    synced). The optional ``blocked`` set drops messages to chosen peers (a partition
    switch used only by the fault harness).
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

    def _onNodeDisconnected(self, node: Any) -> None:  # noqa: N802 - pysyncobj's name
        sync_obj = self._syncObj
        # Not held back any more: the transfer to it must be cancelled (see below).
        sync_obj.held_peers.discard(node)
        sync_obj.snapshot_turns.forget(node)
        super()._onNodeDisconnected(node)
        # A snapshot sent in chunks must start over: chunks still in the closed
        # connection's buffer are gone, and pysyncobj restarts a transfer only if it
        # notices the peer missing when it sends. Otherwise it resumes after the lost
        # chunks once the peer is back, and the peer installs a file with a hole in it
        # (seen: 64 KiB short of a 226 MB snapshot, after which the node could not start).
        sync_obj._SyncObj__serializer.cancelTransmisstion(node)
        leader = sync_obj._getLeader()
        if sync_obj._isLeader() or (leader is not None and leader != node):
            return
        # The leader's connection closed (or a candidate's vote request already made this
        # node forget its leader): the leader's process is gone or going; a live leader
        # that was only cut off keeps its connections until they time out. Waiting out
        # the rest of the election timeout would only add to the failover; a random start
        # within a short window keeps the followers from all standing at once.
        soon = raft_clock() + random.uniform(0.0, _EARLY_ELECTION_WINDOW)
        current = sync_obj._SyncObj__raftElectionDeadline
        sync_obj._SyncObj__raftElectionDeadline = min(current, soon)

    def send(self, node: Any, message: Any) -> bool:
        if node.id in self.blocked:
            return False
        sync_obj = self._syncObj
        leads = sync_obj._isLeader()
        kind = message.get("type")
        if kind != "append_entries" or not leads:
            self._journal.sync()
        # Snapshots in turn (raftchan.snapshot_turns): each key only when it says something.
        if kind == "append_entries" and leads:
            grant = sync_obj.snapshot_turns.grant_for(node, message["term"])
            if grant is not None:
                message[TURN_KEY] = grant
        elif kind == "next_node_idx" and sync_obj.snapshot_wish:
            message[WISH_KEY] = int(sync_obj.snapshot_wish)
        sent = bool(super().send(node, message))
        if sent and leads and may_hold_after(message):
            connection = self._connections.get(node)
            if connection is not None and is_backlogged(connection):
                sync_obj.hold_back(node)  # see raftchan.peer_backlog
        return sent


_MEMBERSHIP_TYPE = bytes([_COMMAND_TYPE.MEMBERSHIP])


def _refuse_snapshot_write(file_name: str, data: Any) -> None:
    raise RuntimeError("snapshots are written by raftchan.snapshot_writer")


def membership_change(command: bytes) -> membership.Change | None:
    """The ``(kind, raft address)`` of a pysyncobj membership log entry, else None.

    pysyncobj writes them as a type byte and a pickle of ``[kind, node id, node]``; the
    log is this node's own (pysyncobj unpickles every entry of it anyway).
    """
    if command[:1] != _MEMBERSHIP_TYPE:
        return None
    request = pickle.loads(command[1:])  # noqa: S301 - our own log, as pysyncobj reads it
    return str(request[0]), str(request[1])


class _MembershipJournal(journal_module.DurableJournal):
    """The journal, also keeping the log index of its last membership entry.

    A truncation or clear rescans, so that a membership entry a new leader overwrote does
    not hold up the next change.
    """

    last_change_index = 0

    def track_changes(self) -> None:
        """Find the last membership entry in the journal (once, after open)."""
        self.last_change_index = 0
        for entry in reversed(self[:]):  # rare: at open, truncation and snapshot install
            if entry[0][:1] == _MEMBERSHIP_TYPE:
                self.last_change_index = entry[1]
                break

    def add(self, command: bytes | bytearray | memoryview, idx: int, term: int) -> None:
        super().add(command, idx, term)
        if bytes(command[:1]) == _MEMBERSHIP_TYPE:
            self.last_change_index = idx

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802, N803 - pysyncobj's
        super().deleteEntriesFrom(entryFrom)
        self.track_changes()

    def clear(self) -> None:
        super().clear()
        self.track_changes()

    def changes_after(self, index: int) -> list[membership.Change]:
        """Membership changes in the journal at log indexes above ``index``, in order."""
        changes = []
        for command, idx, _term in self[:]:
            if idx > index:
                change = membership_change(command)
                if change is not None:
                    changes.append(change)
        return changes


class _RaftNode(SyncObj):
    """The pysyncobj object: exactly one replicated method; no other replicated state.

    Three of SyncObj's private methods are replaced (by their mangled names) to make
    membership changes follow Raft's single-server rules; see each one.
    """

    # pysyncobj's set of connected peers (its __init__ sets it; see hold_back).
    _SyncObj__connectedNodes: set[Any]
    # pysyncobj's "compact now" flag (see _SyncObj__tryLogCompaction).
    _SyncObj__forceLogCompaction: bool

    def __init__(
        self,
        apply: Callable[[bytes], list[Result]],
        journal: _MembershipJournal,
        compaction: CompactionPolicy,
        **kwargs: Any,
    ) -> None:
        self._raftchan_apply = apply
        self._raftchan_journal = journal
        self._raftchan_compaction = compaction
        #: Why the last membership change this leader refused was refused (tick thread).
        self.raftchan_refusal: str | None = None
        #: When the commit index applied last must go out if no command carries it first.
        self._commit_notice_due: float | None = None
        #: While a message is handled: the next index its answer must name, if not
        #: pysyncobj's (see _SyncObj__sendNextNodeIdx).
        self._raftchan_answer_next: int | None = None
        #: This node's pre-vote rounds, and when it last heard from its leader (raft_clock).
        self._raftchan_pre_votes = pre_vote.Rounds()
        self._raftchan_heard_leader_at = 0.0
        #: Peers the leader sends nothing more in its current round of append-entries
        #: (see raftchan.peer_backlog).
        self.held_peers: set[Any] = set()
        #: Snapshots taken in turn (see raftchan.snapshot_turns): the leader's record of
        #: its followers' wishes; a follower's own wish, the grant number its leader's
        #: last append-entries carried, and the last grant it wrote under.
        self.snapshot_turns = SnapshotTurns()
        self.snapshot_wish = Wish.IDLE
        self._raftchan_grant: int | None = None
        self._raftchan_used_grant: int | None = None
        #: How this node's latest snapshot write started: "leader", "turn" or "no turn".
        self.snapshot_started_by = ""
        super().__init__(**kwargs)
        # Steps at the end of every tick, after its new commands went out:
        self.addOnTickCallback(self._send_commit_notice_if_due)
        # and last, right before it waits for messages: the entries this tick appended
        # and sent are synced while the followers store them.
        self.addOnTickCallback(journal.sync)

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802, N803 - pysyncobj's
        # A leader counts itself toward every entry's majority. It sends new entries before
        # its own fsync, so it must sync before it counts: at the start of each tick, where
        # it counts, and at its end (above). Entries appended while it waited (the no-op of
        # a new term) are the ones the first sync is for. Both are free when nothing is new.
        self._raftchan_journal.sync()
        leads = self._isLeader()
        if not leads:
            # pysyncobj looks at the election deadline once per tick, and an idle tick
            # waits 50 ms: followers whose deadlines one event set (their leader's
            # connection closing, or its failed redials, at the same moments everywhere)
            # woke in step and stood in the same tick, splitting the vote. Wake at the
            # deadline itself, so that the random part of it tells them apart.
            remaining = self._SyncObj__raftElectionDeadline - raft_clock()
            if remaining <= 0:
                # pysyncobj decides to stand at the start of a tick, before it reads what
                # came in. After a long step of this node's own (installing a leader's
                # snapshot: 0.3-0.8 s for 120 MB) the deadline had passed with the
                # leader's messages waiting unread, and the node stood against a live
                # leader and took its leadership away. Silence from the leader is what
                # counts: read first, and stand only if nothing from it was there.
                self._poller.poll(0)
                remaining = self._SyncObj__raftElectionDeadline - raft_clock()
            if remaining <= 0 and not self._pre_vote_won():
                remaining = self._SyncObj__raftElectionDeadline - raft_clock()
            if remaining > 0:
                timeToWait = min(timeToWait, remaining)
        due = self._commit_notice_due
        if due is not None:
            timeToWait = min(timeToWait, max(0.0, due - time.monotonic()))
        elif leads and self._SyncObj__raftLastApplied < self._SyncObj__getCurrentLogIndex():
            # This tick may apply entries and so owe the followers a commit notice: its
            # wait for messages at the end must not outlast the notice's delay.
            timeToWait = min(timeToWait, _COMMIT_NOTICE_DELAY)
        super()._onTick(timeToWait)

    def _SyncObj__tryLogCompaction(self) -> None:  # noqa: N802 - overrides it
        # pysyncobj's own triggers (entries, time) are off (see Replica): raftchan's
        # policy weighs bytes as well, and starts a snapshot through pysyncobj's "force".
        # pysyncobj still reaps a finished snapshot write here, so it runs every tick.
        # The flag is set both ways on every tick: one set in the tick that reaps a
        # write (the log not yet trimmed) would otherwise stay, and start another
        # snapshot of the whole state right after it.
        # Who writes now follows raftchan.snapshot_turns: a follower once per turn its
        # leader gives it, the leader (with followers) only once its log is twice as
        # large. Neither writes on time alone at that size: after a long quiet every
        # node would be due at once.
        journal = self._raftchan_journal
        policy = self._raftchan_compaction
        entries, log_bytes = len(journal), journal.log_bytes
        serializer = self._SyncObj__serializer
        writing = serializer.writing
        # pysyncobj declines a snapshot when nothing was applied since the last one.
        fresh = self._SyncObj__raftLastApplied - 1 != self._SyncObj__lastSerializedEntry
        wanted = fresh and policy.due(entries, log_bytes)
        overdue = fresh and policy.due(entries, log_bytes, UNCOORDINATED_FACTOR, by_time=False)
        turns = self.snapshot_turns
        leads = self._isLeader()
        grant = self._raftchan_grant
        spent = not leads and grant is not None and grant == self._raftchan_used_grant
        has_turn = False
        if leads:
            turns.keep_only(self._SyncObj__otherNodes)
            due = overdue if self._SyncObj__otherNodes else wanted
            turns.leader_writing = writing or due
        else:
            if turns.holder is not None or turns.leader_writing:
                turns.reset()  # it led until lately
            has_turn = grant is not None and not spent and self._getLeader() is not None
            due = overdue or (wanted and has_turn)
        self.snapshot_wish = follower_wish(writing=writing, wanted=wanted, turn_spent=spent)
        self._SyncObj__forceLogCompaction = due
        SyncObj._SyncObj__tryLogCompaction(self)
        if serializer.writing and not writing:  # a write started in this tick
            self.snapshot_started_by = "leader" if leads else "turn" if has_turn else "no turn"
            if has_turn:
                self._raftchan_used_grant = grant  # one write per turn

    def _send_commit_notice_if_due(self) -> None:
        # Called after the tick's commands were sent: when one was, it carried the commit
        # index and cleared the due time. A notice of its own ahead of a command would
        # make each follower apply (and answer) before it even stores the new entries.
        due = self._commit_notice_due
        if due is None or time.monotonic() < due:
            return
        self._commit_notice_due = None
        if self._isLeader():
            self._SyncObj__sendAppendEntries()

    def _pre_vote_won(self) -> bool:
        """Whether pysyncobj may stand for election in this tick, its deadline past: only
        once a majority granted this node a pre-vote (see raftchan.pre_vote). Until then
        this asks, again every round, and holds pysyncobj's deadline back to the round's
        end."""
        others = self._SyncObj__otherNodes
        if not others or self._SyncObj__selfNode is None:
            return True  # alone, it wins; a read-only node never stands
        term = self._SyncObj__raftCurrentTerm + 1
        rounds = self._raftchan_pre_votes
        if rounds.won(term):
            rounds.clear()
            return True
        now = raft_clock()
        if rounds.due(term, now):
            rounds.start(term, now)
            message = pre_vote.request(
                term, self._SyncObj__getCurrentLogIndex(), self._SyncObj__getCurrentLogTerm()
            )
            for node in others:
                self._SyncObj__transport.send(node, message)
        self._SyncObj__raftElectionDeadline = rounds.retry_at
        return False

    def hears_leader_within(self, seconds: float) -> bool:
        """Whether this node heard from its leader within ``seconds``, and its connection
        to the leader is still up (the kernel closes it when the leader's process dies).
        False on the leader itself."""
        leader = self._getLeader()
        if leader is None or self._isLeader():
            return False
        connection = self._SyncObj__transport._connections.get(leader)
        if connection is None or connection.state != CONNECTION_STATE.CONNECTED:
            return False
        return bool(raft_clock() - self._raftchan_heard_leader_at < seconds)

    def _in_leader_lease(self) -> bool:
        """Whether this node leads, or heard from its leader within the shortest election
        timeout: it then refuses pre-votes."""
        return self._isLeader() or self.hears_leader_within(self._getConf().raftMinTimeout)

    def _answer_pre_vote(self, node: Any, message: Any) -> None:
        if self._SyncObj__selfNode is None:
            return  # a read-only node has no vote
        current_term = self._SyncObj__raftCurrentTerm
        granted = pre_vote.grants(
            message,
            current_term,
            self._SyncObj__getCurrentLogIndex(),
            self._SyncObj__getCurrentLogTerm(),
            self._in_leader_lease(),
        )
        if granted is not None:
            answer = pre_vote.answer(message["term"], granted, current_term)
            self._SyncObj__transport.send(node, answer)

    def _count_pre_vote(self, node: Any, message: Any) -> None:
        current_term = message.get("current_term")
        if type(current_term) is int and current_term > self._SyncObj__raftCurrentTerm:
            # A peer is at a later term: take it, as pysyncobj does on any message of a
            # later term, so that this node's next request can be granted.
            if not self._isLeader():
                self._SyncObj__setCurrentTerm(current_term, None)
                self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
                self._SyncObj__raftLeader = None
                self._raftchan_pre_votes.clear()
            return
        voters = len(self._SyncObj__otherNodes) + 1
        if self._raftchan_pre_votes.count(message, node.id, voters):
            # Won: stand in the next tick rather than at the end of the round.
            self._SyncObj__raftElectionDeadline = raft_clock()

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        # Overrides pysyncobj's: pre-votes are answered and counted here (pysyncobj has
        # none), and entries sent again are not cut and rewritten (see
        # raftchan.held_entries). Chunked messages carry no "entries" until assembled.
        kind = message.get("type")
        if kind == pre_vote.REQUEST:
            self._answer_pre_vote(node, message)
            return
        if kind == pre_vote.ANSWER:
            self._count_pre_vote(node, message)
            return
        turn = message.get(TURN_KEY)  # read before held_entries may rebuild the message
        if kind == "next_node_idx" and self._isLeader():
            self.snapshot_turns.heard(node, message.get(WISH_KEY, Wish.IDLE))
        if kind == "append_entries" and message.get("entries"):
            message, self._raftchan_answer_next = for_follower(self._raftchan_journal, message)
        try:
            SyncObj._SyncObj__onMessageReceived(self, node, message)
        finally:
            self._raftchan_answer_next = None
        if kind == "append_entries" and self._getLeader() == node:
            self._raftchan_heard_leader_at = raft_clock()
            self._raftchan_pre_votes.clear()
            # Only the current leader's turn counts (pysyncobj has checked its term).
            self._raftchan_grant = turn if type(turn) is int else None
        if is_snapshot_chunk_before_last(message) and self._getLeader() == node:
            # pysyncobj's follower answers a snapshot only after its last chunk. A leader
            # whose messages go unanswered for the connection timeout (1 s) closes the
            # connection and starts the transfer over: a 120 MB snapshot never got
            # through in one go, and the follower, cut off, stood for election. Answer
            # each chunk, as Raft's InstallSnapshot does; an answer that neither resets
            # nor confirms an index only tells the leader it was heard.
            self._SyncObj__sendNextNodeIdx(node, reset=False, success=False)

    def _SyncObj__sendNextNodeIdx(  # noqa: N802 - overrides it
        self,
        node: Any,
        reset: bool = False,
        nextNodeIdx: int | None = None,  # noqa: N803 - pysyncobj's name
        success: bool = False,
    ) -> None:
        # Entries all held answered as a heartbeat at the end of the log: the answer
        # confirms the entries sent, not the rest of the log (see raftchan.held_entries).
        if success and self._raftchan_answer_next is not None:
            nextNodeIdx = self._raftchan_answer_next
        SyncObj._SyncObj__sendNextNodeIdx(
            self, node, reset=reset, nextNodeIdx=nextNodeIdx, success=success
        )

    def _SyncObj__applyLogEntries(self) -> bool:  # noqa: N802 - overrides it
        # pysyncobj tells the followers the new commit index right after every apply: two
        # more messages and two answers per command, sent while the client's answer waits
        # for the GIL. The next command carries the index anyway; only when none comes
        # within a millisecond does a message of its own go out.
        applied = self._SyncObj__raftLastApplied
        SyncObj._SyncObj__applyLogEntries(self)
        leads = self._isLeader()
        if leads and self._SyncObj__raftLastApplied != applied and self._commit_notice_due is None:
            self._commit_notice_due = time.monotonic() + _COMMIT_NOTICE_DELAY
        return False

    def _SyncObj__sendAppendEntries(self) -> None:  # noqa: N802 - overrides it
        self._commit_notice_due = None  # every append-entries carries the commit index
        peers = self._SyncObj__connectedNodes
        if not isinstance(peers, ConnectedPeers):
            # Replaced here, in pysyncobj's thread, the only one that changes the set.
            peers = self._SyncObj__connectedNodes = ConnectedPeers(peers, self.held_peers)
        connections = self._SyncObj__transport._connections
        for node in peers:
            connection = connections.get(node)
            if connection is not None and is_backlogged(connection):
                self.held_peers.add(node)
                # Sent nothing, it would not be checked for a timeout: a connection
                # to a peer cut off (whose socket stays full) must still be closed.
                connection._TcpConnection__processConnectionTimeout()
        try:
            SyncObj._SyncObj__sendAppendEntries(self)
        finally:
            self.held_peers.clear()

    def hold_back(self, node: Any) -> None:
        """Send ``node`` nothing more in this round of append-entries (pysyncobj's
        thread; see raftchan.peer_backlog)."""
        self.held_peers.add(node)

    @replicated
    def apply_command(self, command: bytes) -> list[Result]:
        return self._raftchan_apply(command)

    def submit_command(self, command: bytes, callback: Callable[[Any, int], None]) -> None:
        """What ``apply_command(command, callback=...)`` does, with the call pickled in
        protocol 4 instead of pysyncobj's protocol 2.

        Protocol 2 stores bytes as a latin-1 string encoded in UTF-8: every byte above 127
        takes two, so a binary item took 1.5 times its size in the log, and again on the
        wire (where the message is pickled once more), and the inflated copy was then
        compressed. Every node reads both protocols (pysyncobj unpickles the call with
        ``pickle.loads``), nodes of earlier versions included.
        """
        func_id = self._methodToID[self._getFuncName("apply_command")]
        call = pickle.dumps((func_id, (command,)), protocol=PICKLE_PROTOCOL)
        self._applyCommand(call, callback, _COMMAND_TYPE.REGULAR)

    def _SyncObj__changeCluster(self, request: Any) -> bool:  # noqa: N802 - overrides it
        # Called on the leader in the tick thread right before a change is appended, so
        # the check and the append are one step. pysyncobj's own guard against a second
        # change in flight is never armed (measured); this is it. The leader must also
        # have applied the no-op of its term (pysyncobj checks that itself).
        applied = self._SyncObj__raftLastApplied
        if self._raftchan_journal.last_change_index > applied:
            self.raftchan_refusal = "in_progress"
            return False
        noop = self._SyncObj__noopIDx
        if noop is None or applied < noop:
            self.raftchan_refusal = "leader_not_ready"
            return False
        self.raftchan_refusal = "no_change"  # pysyncobj refuses adding a member, etc.
        accepted = bool(SyncObj._SyncObj__changeCluster(self, request))
        if accepted:
            self.raftchan_refusal = None
        return accepted

    def _SyncObj__doApplyCommand(self, command: bytes) -> Any:  # noqa: N802 - overrides it
        # pysyncobj re-runs a membership change when its entry is applied, to rebuild the
        # membership after a restart. A node here starts with the membership of its whole
        # log instead, and the change took effect when it was appended; running it again
        # when a follower applies late would briefly undo a later change (a removed node
        # re-added until its removal is applied).
        if command[:1] == _MEMBERSHIP_TYPE:
            return None
        return SyncObj._SyncObj__doApplyCommand(self, command)

    def _addNodeToCluster(self, args: Any, callback: Any) -> None:  # noqa: N802
        # pysyncobj's utility messages on the Raft port would change membership past
        # raftchan's checks (and tokens): only the client protocol may.
        callback(None, FAIL_REASON.REQUEST_DENIED)

    def _removeNodeFromCluster(self, args: Any, callback: Any) -> None:  # noqa: N802
        callback(None, FAIL_REASON.REQUEST_DENIED)


class Replica:
    """One node's copy of the replicated channel state.

    ``on_applied(position)``, ``on_role_changed()`` and ``on_fatal(reason)`` are called on
    the asyncio loop (never in pysyncobj's thread); after ``on_fatal`` the node must stop.
    ``on_snapshot_written(seconds)`` is called in pysyncobj's thread after each snapshot
    of its own written (in the background), with the time it took; it must be quick and
    thread-safe.
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
        self._snapshots_written = 0  # by this process (pysyncobj's thread counts)

        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        journal_path = str(data_dir / JOURNAL_FILE)
        snapshot_path = str(data_dir / SNAPSHOT_FILE)
        # Old journals and snapshots a crash left to be freed (see raftchan.retired_files).
        for path in (journal_path, snapshot_path):
            retired_files.remove_leftovers(path)
        self.journal = _MembershipJournal(
            journal_path,
            snapshot_path=snapshot_path,
            fsync=config.fsync == "always",
            record_synced=config.record_synced,
        )
        self.journal.track_changes()
        self._start_members = self._members_from_disk(data_dir, snapshot_path)
        # pysyncobj loads the snapshot file (if any) in its first tick: that call of the
        # deserializer restores this start; every later one installs a leader's snapshot.
        self._startup_load_pending = os.path.isfile(snapshot_path)
        self._segments = item_segments.SegmentBook(snapshot_path)
        self._capture: item_segments.Capture | None = None
        if not self._startup_load_pending:
            self._segments.remove_unused()  # a first snapshot cut short by a crash
        self._compaction = CompactionPolicy(
            snapshot_path,
            min_entries=config.raft.compaction_min_entries,
            min_time=config.raft.compaction_min_time,
            growth=config.raft.compaction_growth,
            min_bytes=config.raft.compaction_min_bytes,
        )
        journal_module.install_journal_factory()
        install_message_bound(peer_message_bytes(config.limits))
        journal_module.register_journal(journal_path, self.journal)

        tuning = config.raft
        conf = SyncObjConf(
            journalFile=journal_path,
            fullDumpFile=snapshot_path,
            # Never called: the serializer is replaced right below (BackgroundSnapshots).
            # Set, so that pysyncobj hands a serializer no pickle of its own state.
            serializer=_refuse_snapshot_write,
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
            # pysyncobj's 64 KiB socket buffers (and no kernel autotuning once they are
            # set) moved a large batch or snapshot a few hundred KiB per tick of the
            # leader. The kernel caps these at net.core.wmem_max / rmem_max.
            sendBufferSize=PEER_SOCKET_BUFFER_BYTES,
            recvBufferSize=PEER_SOCKET_BUFFER_BYTES,
            # Never reached: raftchan's compaction policy decides (see _RaftNode).
            logCompactionMinEntries=sys.maxsize,
            logCompactionMinTime=math.inf,
            # Without a leader, fail commands at once: the server turns that into
            # NoLeader and clients look elsewhere instead of hanging.
            commandsWaitLeader=False,
            bindAddress=config.peer_address,
            bindRetryTime=BIND_RETRY_S,
            maxBindRetries=BIND_ATTEMPTS,
            password=config.cluster_secret,
            onStateChanged=self._state_changed,
            dynamicMembershipChange=True,
        )
        self._transport_class = functools.partial(_SyncBeforeSendTransport, journal=self.journal)
        self._node = _RaftNode(
            self._apply,
            self.journal,
            self._compaction,
            selfNode=config.peer_address,
            otherNodes=[m for m in self._start_members if m != config.peer_address],
            conf=conf,
            transportClass=self._transport_class,
        )
        # This node's snapshots are written in the background (see raftchan.snapshot_writer).
        self._snapshots = BackgroundSnapshots(
            snapshot_path,
            conf.logCompactionBatchSize,
            self._capture_snapshot,
            self._read_snapshot,
            on_written=self._snapshot_written,
            on_failed=self._compaction.snapshot_failed,
            # Verified here, in the background: the journal checks the snapshot before it
            # trims itself, in pysyncobj's thread, and then finds it verified already.
            verify=snapshot_module.read_snapshot_anchor,
            held_peers=self._node.held_peers,
        )
        self._node._SyncObj__serializer = self._snapshots
        # Snapshots sent by a leader go through a receiver that installs only whole ones,
        # and not before a snapshot of this node's own has been written.
        self._snapshot_receiver = SnapshotReceiver(
            snapshot_path, before_install=self._snapshots.wait, retire=self._snapshots.retire
        )
        self._snapshots.setTransmissionData = self._snapshot_receiver.receive

    def _members_from_disk(self, data_dir: Path, snapshot_path: str) -> list[str]:
        """The membership at the end of this node's log: the snapshot's members (or the
        bootstrap list) with every membership entry of the journal after it applied."""
        config = self.config
        snap = snapshot_module.read_snapshot_meta(snapshot_path)
        if snap is None:
            base = membership.bootstrap_members(data_dir, config.peer_address, config.peers)
            after = 0
        else:
            # Written by earlier versions too: record the bootstrap list all the same.
            membership.bootstrap_members(data_dir, config.peer_address, config.peers)
            base, after = list(snap.node_ids), snap.last_entry[1]
        members = membership.apply_changes(base, self.journal.changes_after(after))
        if config.peer_address not in members:
            logger.warning(
                "this node (%s) is not a member of the cluster its log describes (%s): it "
                "was removed, or is to be added; it cannot vote or lead until it is added",
                config.peer_address,
                ",".join(members),
            )
        logger.info("raft members at start: %s", ",".join(members))
        return members

    # -- pysyncobj thread -------------------------------------------------------------------

    def _apply(self, command: bytes) -> list[Result]:
        # The leader's own copy must be on disk before any client hears "committed".
        self.journal.sync()
        with self.lock:
            results = self.state.apply(command)
            position = self.state.position
        self._call_in_loop(self._on_applied, position)
        return results

    def _capture_snapshot(self, data: Any) -> WriteSnapshot:
        # In pysyncobj's thread, which applies entries: the state now is the state at
        # the snapshot's last entry. The file is written on the snapshot writer's thread.
        # Only the state's fields are taken here (a copy of each item list, milliseconds);
        # they are encoded piece by piece as the file is written. Encoded here in one
        # call, 300 MB of items held the GIL, and so this thread and the client
        # connections, for 0.46 s: longer than the election timeout.
        # Items an earlier snapshot of this node wrote stay in its segment files; only
        # the new ones are taken (see raftchan.item_segments).
        last_entry, prev_entry, cluster = data
        # pysyncobj hands over the membership of the log's end; the snapshot must hold
        # the membership as of its own index, so undo the changes logged after it.
        current = [getattr(node, "id", str(node)) for node in cluster]
        node_ids = membership.undo_changes(current, self.journal.changes_after(last_entry[1]))
        with self.lock:
            capture = self._segments.capture(self.state, last_entry, prev_entry, node_ids)
        self._capture = capture
        return capture.write

    def _snapshot_written(self, seconds: float) -> None:
        self._snapshots_written += 1
        capture, self._capture = self._capture, None
        if capture is not None:
            self._segments.adopt(capture)
        self._compaction.snapshot_changed()
        logger.info(
            "snapshot written in %.3f s (%s): %d bytes, %d of them new, in %d segments; "
            "%d bytes of log before it",
            seconds,
            self._node.snapshot_started_by,
            self._compaction.snapshot_bytes,
            capture.new_bytes if capture is not None else 0,
            self._segments.segment_count,
            self.journal.log_bytes,
        )
        self._on_snapshot_written(seconds)

    def _read_snapshot(self, file_name: str) -> tuple[Any, Any, Any]:
        # At start, or installing a leader's snapshot: a new file to the compaction policy.
        self._compaction.snapshot_changed()
        try:
            snap = snapshot_module.read_snapshot(file_name)
            state, runs = item_segments.load_state(file_name, snap)
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
        if self._startup_load_pending:
            # At start the journal after the snapshot is kept: the membership is the one
            # computed from both before pysyncobj started.
            self._startup_load_pending = False
            members = self._start_members
            self._segments.restart(snap, runs, state)
        else:
            # A leader's snapshot replaces this node's whole log.
            members = list(snap.node_ids)
            self._segments.forget()
        # Ids without this node: pysyncobj compares the list with its own node object, not
        # its id, and a string id of itself would make it count itself twice (measured).
        others = [m for m in members if m != self.config.peer_address]
        return snap.last_entry, snap.prev_entry, others

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

        self._node.submit_command(command, on_done)
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
        """True if this node leads, or heard from its leader within the longest election
        timeout.

        pysyncobj starts no election while a node has no peer connection at all, so such
        a node keeps naming its old leader for ever (and a node asking for pre-votes keeps
        naming it too); the time of the leader's last message tells a live leader from a
        remembered one. A leader whose process died is also given up at once: the kernel
        closes its connection, while the time would keep naming it for a timeout more.
        """
        if self.is_leader:
            return True
        return self._node.hears_leader_within(self._node._getConf().raftMaxTimeout)

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
        """This node's view of the cluster (values may lag by a tick; no I/O but a stat of
        the snapshot file after it changed)."""
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
            "leader_known": self.hears_leader(),
            "ready": self.is_ready,
            "position": position,
            "channels": channels,
            "sessions": sessions,
            "journal_synced_bytes": self.journal.synced_length,
            "log_bytes": self.journal.log_bytes,
            "snapshot_bytes": self._compaction.snapshot_bytes,
            "snapshots_written": self._snapshots_written,
            "snapshot_wish": self._node.snapshot_wish.name.lower(),
            "retired_files_removed": retired_files.removed(),
            "unsent_bytes": self.unsent_bytes(),
            "members": self.members(),
        }

    def unsent_bytes(self) -> dict[str, int]:
        """For each peer connection, the bytes waiting for its socket to take them: on a
        leader, what it queued for a follower still catching up (bounded by
        raftchan.peer_backlog.MAX_UNSENT_BYTES plus one message)."""
        connections = list(self._node._SyncObj__transport._connections.items())
        return {str(node.id): connection.unsent_bytes() for node, connection in connections}

    # -- membership (asyncio side) ------------------------------------------------------

    def members(self) -> list[str]:
        """The Raft addresses of the cluster as this node has it now (sorted; this node
        included). On the leader, this includes a change not yet committed."""
        others = self._node.otherNodes  # a copy, taken atomically
        return sorted({self.config.peer_address, *(node.id for node in others)})

    def leader_ready(self) -> bool:
        """True on a leader that has applied the no-op of its term: only then may it change
        membership (Raft's rule against a change racing one from an earlier term)."""
        noop = self._node._SyncObj__noopIDx
        applied = self._node._SyncObj__raftLastApplied
        return bool(self.is_leader and noop is not None and applied >= noop)

    def change_pending(self) -> bool:
        """True while this node's log holds a membership entry it has not applied yet."""
        applied = self._node._SyncObj__raftLastApplied
        return bool(self.journal.last_change_index > applied)

    def change_members(self, kind: str, address: str, timeout: float) -> asyncio.Future[None]:
        """Append one membership change on the leader; resolves once it is committed.

        ``kind`` is :data:`~raftchan.membership.ADD` or :data:`~raftchan.membership.REMOVE`.
        Fails with :class:`MembershipChangeInProgress` (an earlier change not applied yet,
        or this leader's first entry not yet committed), :class:`MemberExists` or
        :class:`MemberNotFound` (checked again by pysyncobj at the append), all of which
        change nothing; with :class:`NotLeader`/:class:`NoLeader` when it was not appended;
        and with :class:`CommitUnknown` when it may still commit (leader changed, or no
        answer within ``timeout`` seconds).
        """
        future: asyncio.Future[None] = self._loop.create_future()

        def settle(error: RaftchanError | None) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        def on_done(result: Any, reason: int) -> None:  # runs in pysyncobj's thread
            if reason == FAIL_REASON.SUCCESS:
                error = None
            elif reason == FAIL_REASON.REQUEST_DENIED:
                error = self._refusal(kind, address, self._node.raftchan_refusal)
            else:
                error = self._failure(reason)
            self._call_in_loop(settle, error)

        if kind == membership.ADD:
            self._node.addNodeToCluster(address, callback=on_done)
        else:
            self._node.removeNodeFromCluster(address, callback=on_done)
        self._loop.call_later(
            timeout,
            settle,
            CommitUnknown(f"membership change not confirmed within {timeout:.1f} s"),
        )
        return future

    @staticmethod
    def _refusal(kind: str, address: str, why: str | None) -> RaftchanError:
        if why == "in_progress":
            return MembershipChangeInProgress(
                "an earlier membership change is not committed yet; nothing changed"
            )
        if why == "leader_not_ready":
            return MembershipChangeInProgress(
                "the new leader has not committed an entry of its term yet; nothing changed"
            )
        if kind == membership.ADD:
            return MemberExists(f"{address} is already a member of the cluster", address=address)
        if why == "no_change":
            return MemberNotFound(f"{address} is not a member (or is the leader itself)")
        return MembershipError(f"membership change refused: {why}")

    def set_blocked_peers(self, peers: set[str]) -> None:
        """Drop all Raft messages to these peers (fault injection for the test harness)."""
        transport = self._node._SyncObj__transport
        transport.blocked = set(peers)

    def wait_bound(self) -> None:
        """Block until pysyncobj listens on the Raft address: at once if its first attempt
        worked, else up to about ``BIND_ATTEMPTS * BIND_RETRY_S`` seconds.

        Raises :class:`ConfigError` naming the address and the system's reason (in use,
        not an address of this host) if it never could; the node cannot take part in Raft.
        """
        try:
            self._node.waitBinded()
        except SyncObjException:
            address = self.config.peer_address
            raise ConfigError(
                f"cannot listen on the Raft address {address} (--peer-address): "
                f"{_bind_failure(address)}"
            ) from None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the Raft thread and sync the journal; waits up to ``timeout`` seconds."""
        if self._closed:
            return
        self._closed = True
        self._node.destroy()
        deadline = time.monotonic() + timeout
        while self._node.tick_thread_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._snapshot_receiver.close()
        self._snapshots.wait(max(0.0, deadline - time.monotonic()))
        self.journal.sync()


def _bind_failure(address: str) -> str:
    """Why ``address`` cannot be bound now, in the system's words (pysyncobj keeps them)."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return f"it was busy for {BIND_ATTEMPTS * BIND_RETRY_S:g} s"
