"""Nodes slow at their own work keep their leader, and followers catch up with it.

The nodes here run with hooks that slow them where a large state slows a node:

- writing a snapshot takes longer than an election timeout. pysyncobj wrote it in the
  thread that sends heartbeats: a leader went silent at every compaction, and lost its
  leadership.
- storing each received snapshot chunk takes a while, so the whole transfer outlasts
  the leader's connection timeout. The leader used to hear nothing until the last chunk,
  close the connection halfway and start over; the follower never caught up.
- handling one heartbeat takes longer than an election timeout, once. pysyncobj decides
  to stand at the start of its next round, before it reads: the follower stood against
  its live leader with the leader's heartbeats waiting unread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import raftchan
from cluster.fixtures import started_cluster
from cluster.harness import COMPACTION_BY_ENTRIES_ALONE, LocalCluster
from raftchan.config import RaftTuning
from raftchan.peer_backlog import MAX_UNSENT_BYTES
from raftchan.snapshot import stored_bytes
from raftchan.snapshot_turns import UNCOORDINATED_FACTOR

#: The nodes' own election timing (0.3-0.6 s; their connection timeout is then 1 s).
DEFAULTS = RaftTuning()
#: What storing one received 64 KiB snapshot chunk takes on the slow follower.
CHUNK_DELAY_S = 0.01
#: Items (64 KiB each) in the snapshot: 320 chunks, 3.2 s of transfer at CHUNK_DELAY_S.
#: What the leader wrote into its socket (up to 8 MiB where the kernel allows) reaches
#: the follower even after the leader closed the connection: the rest must be far more.
ITEMS = 320
#: How far the slow follower reads ahead of what it handled: its socket's receive
#: buffer and the part of a connection's read buffer it fills before it parses (the
#: bound of one message otherwise, tens of MiB, would hold the whole snapshot).
READ_AHEAD_BYTES = 256 * 1024
ITEM_BYTES = 64 * 1024
#: The log entries after which a follower of the compacting cluster is due for a
#: snapshot. Its leader waits for twice as many (raftchan.snapshot_turns): the entries it
#: sends after its snapshot, one item each, can then come in one message that large.
MIN_ENTRIES = 20
LEADER_LOG_BYTES = int(UNCOORDINATED_FACTOR * MIN_ENTRIES * ITEM_BYTES)
#: How long the stalled follower takes over one heartbeat: longer than its largest
#: election timeout, shorter than the leader's connection timeout.
STALL_S = DEFAULTS.max_timeout + 0.15
#: What writing one snapshot takes on every node of the slow-snapshot cluster.
SNAPSHOT_WRITE_S = 3 * DEFAULTS.max_timeout
#: Bounds each wait for the cluster to reach an awaited state.
WAIT_TIMEOUT = 60.0

# Both hooks leave a file named after the process, so the test can see that the node
# loaded it.
_SLOW_CHUNKS_HOOK = f"""\
import os
import pathlib
import time

import raftchan.peer_connection
import raftchan.replica
import raftchan.snapshot_transfer

_receive = raftchan.snapshot_transfer.SnapshotReceiver.receive
_process_read = raftchan.peer_connection.BoundedTcpConnection._TcpConnection__processRead


def _short_read(self):
    return _process_read(self) and len(self._read_buffer()) < {READ_AHEAD_BYTES!r}


def _slow_receive(self, transmission):
    time.sleep({CHUNK_DELAY_S!r})
    return _receive(self, transmission)


raftchan.snapshot_transfer.SnapshotReceiver.receive = _slow_receive
raftchan.peer_connection.BoundedTcpConnection._TcpConnection__processRead = _short_read
raftchan.replica.PEER_SOCKET_BUFFER_BYTES = {READ_AHEAD_BYTES!r}
(pathlib.Path(__file__).parent / f"loaded-{{os.getpid()}}").touch()
"""
# Stalls the handling of the next heartbeat once a file named "stall" appears beside it.
_STALL_ONCE_HOOK = f"""\
import os
import pathlib
import time

import raftchan.replica

_here = pathlib.Path(__file__).parent
_on_message = raftchan.replica._RaftNode._SyncObj__onMessageReceived


def _stalling_on_message(self, node, message):
    _on_message(self, node, message)
    if message.get("type") == "append_entries" and not message.get("entries"):
        try:
            (_here / "stall").unlink()
        except FileNotFoundError:
            return
        time.sleep({STALL_S!r})
        (_here / "stalled").touch()


raftchan.replica._RaftNode._SyncObj__onMessageReceived = _stalling_on_message
(_here / f"loaded-{{os.getpid()}}").touch()
"""
# Slows every snapshot write (wherever the node does it).
_SLOW_SNAPSHOT_HOOK = f"""\
import os
import pathlib
import time

import raftchan.snapshot

_write_snapshot = raftchan.snapshot.write_snapshot


def _slow_write_snapshot(*args, **kwargs):
    time.sleep({SNAPSHOT_WRITE_S!r})
    _write_snapshot(*args, **kwargs)
    (pathlib.Path(__file__).parent / f"wrote-{{os.getpid()}}-{{time.monotonic_ns()}}").touch()


raftchan.snapshot.write_snapshot = _slow_write_snapshot
(pathlib.Path(__file__).parent / f"loaded-{{os.getpid()}}").touch()
"""
#: What a node logs when it loads a snapshot (at start, or one its leader sent).
LOADED_LINE = "loaded snapshot at log index"
#: What a node logs when it stands for election.
STOOD_LINE = "raft role follower -> candidate"


@pytest.fixture(name="local")
def local_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """A running 3-node cluster on the nodes' default timing that compacts often."""
    with started_cluster(
        request,
        tmp_path / "cluster",
        tuning=None,
        extra_args=["--compaction-min-entries", str(MIN_ENTRIES), *COMPACTION_BY_ENTRIES_ALONE],
    ) as local:
        yield local


def _hook_path(hook_dir: Path, hook: str) -> str:
    """A PYTHONPATH that loads ``hook`` as ``sitecustomize`` ahead of raftchan itself."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(hook)
    source_root = Path(list(raftchan.__path__)[0]).resolve().parent
    return os.pathsep.join([str(hook_dir), str(source_root)])


def _wait_for(condition: str, check: Callable[[], bool], timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {condition}"
        time.sleep(0.05)


def _restart_with_hook(local: LocalCluster, i: int, hook_dir: Path, hook: str) -> None:
    local.set_node_env(i, "PYTHONPATH", _hook_path(hook_dir, hook))
    local.restart(i)
    marker = hook_dir / f"loaded-{local.nodes[i].pid}"
    _wait_for(f"{local.names[i]} loaded the hook", marker.exists, timeout=10.0)


def _this_start(log: str) -> str:
    """What a node logged since its latest start."""
    return log[log.rindex("harness: start") :]


def test_a_follower_slow_to_store_a_snapshot_gets_all_of_it(
    local: LocalCluster, tmp_path: Path
) -> None:
    leader = local.wait_leader(WAIT_TIMEOUT)
    follower = (leader + 1) % local.size
    local.kill(follower)
    with raftchan.Client(local.addresses, timeout=WAIT_TIMEOUT) as client:
        chan = client.channel("catch-up")
        for _ in range(ITEMS):
            chan.append(os.urandom(ITEM_BYTES))
            chan.flush()  # one log entry each: enough of them for compactions
    snapshot = local.nodes[leader].spec.data_dir / "raft.snapshot"
    _wait_for(
        "the leader compacted its log into a snapshot of most items",
        lambda: stored_bytes(snapshot) > ITEMS * ITEM_BYTES // 2,
    )
    target = local.status()[leader]["commit_index"]

    _restart_with_hook(local, follower, tmp_path / "hook", _SLOW_CHUNKS_HOOK)
    queued: list[int] = []  # what the leader had queued for the follower, each time asked

    def caught_up() -> bool:
        statuses = local.status()
        unsent = statuses[leader].get("unsent_bytes") or {}
        queued.append(unsent.get(local.raft_addresses[follower], 0))
        return (statuses[follower].get("applied_index") or 0) >= target

    _wait_for("the slow follower applied what the leader had committed", caught_up)
    log = _this_start(local.logs()[local.names[follower]])
    assert LOADED_LINE in log, "the follower caught up without the leader's snapshot"
    # The leader held the snapshot back while the follower was slow to take it, rather
    # than queue all of it (pysyncobj queued as much as it could pickle in each round):
    # once the queue reached the bound, at most one more message went in.
    assert max(queued) > 0, "the leader never had anything queued: nothing was measured"
    assert max(queued) <= MAX_UNSENT_BYTES + LEADER_LOG_BYTES + ITEM_BYTES * 2, queued


def test_a_follower_that_stalled_reads_its_leader_before_it_stands(
    local: LocalCluster, tmp_path: Path
) -> None:
    leader = local.wait_leader(WAIT_TIMEOUT)
    follower = (leader + 1) % local.size
    hook_dir = tmp_path / "hook"
    _restart_with_hook(local, follower, hook_dir, _STALL_ONCE_HOOK)
    local.wait_ready(WAIT_TIMEOUT)
    term = local.status()[leader]["term"]

    (hook_dir / "stall").touch()
    _wait_for("the follower stalled on a heartbeat", (hook_dir / "stalled").exists)
    time.sleep(2 * DEFAULTS.max_timeout)  # when it would have stood, and the vote after

    statuses = local.status()
    assert STOOD_LINE not in _this_start(local.logs()[local.names[follower]])
    assert [status["term"] for status in statuses] == [term] * local.size, statuses
    assert statuses[leader]["role"] == "leader", statuses


def test_a_leader_slow_to_write_its_snapshots_keeps_its_leadership(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    hook_dir = tmp_path / "hook"
    with started_cluster(
        request,
        tmp_path / "cluster",
        tuning=None,
        extra_args=["--compaction-min-entries", "20", *COMPACTION_BY_ENTRIES_ALONE],
        env={"PYTHONPATH": _hook_path(hook_dir, _SLOW_SNAPSHOT_HOOK)},
    ) as slow:
        for node in slow.nodes:
            assert (hook_dir / f"loaded-{node.pid}").exists(), f"{node.spec.name} has no hook"
        leader = slow.wait_leader(WAIT_TIMEOUT)
        term = slow.status()[leader]["term"]
        leader_writes = f"wrote-{slow.nodes[leader].pid}-*"
        deadline = time.monotonic() + WAIT_TIMEOUT
        with raftchan.Client(slow.addresses, timeout=WAIT_TIMEOUT) as client:
            chan = client.channel("compacted")
            n = 0
            while len(list(hook_dir.glob(leader_writes))) < 3:
                assert time.monotonic() < deadline, "the leader wrote too few snapshots"
                chan.append(n)
                chan.flush()  # one log entry each: a compaction every 20 or so
                n += 1
        statuses = slow.status()
    assert [status["term"] for status in statuses] == [term] * slow.size, statuses
    assert statuses[leader]["role"] == "leader", statuses
