"""Durability under process faults, against real node processes (no mocks).

Every test writes numbered items (0, 1, 2, ...) to a channel from a client, breaks the
cluster (SIGKILL of the leader, of every node at once, of a node in the middle of a
compaction, or an emulated power loss), mends it, and then demands the exact contents:
every item a returned ``flush()`` acknowledged is there, once, in order. The writers flush
until they succeed before the final read, so the expected contents are exactly the items
appended: a loss shows as a gap and a duplicated retry as a repeat.

Snapshots are made frequent wherever the fault can meet a compaction, and the tests check
from the snapshot files or the node logs that the compaction they rely on really happened,
so that none of them passes vacuously.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import raftchan
from cluster.faultrun import contents_of_every_node
from cluster.harness import COMPACTION_BY_ENTRIES_ALONE, LocalCluster
from cluster.writer import Writer
from raftchan.journal import TEST_PAUSE_ENV, read_synced_length
from raftchan.replica import JOURNAL_FILE, SNAPSHOT_FILE
from raftchan.snapshot import read_snapshot_anchor

# The machine running these may be shared and slow: every wait is generous, and each is
# a bound on a failure, not the expected duration.
READY_TIMEOUT = 90.0
FAILOVER_TIMEOUT = 30.0
CONVERGE_TIMEOUT = 90.0
FLUSH_TIMEOUT = 90.0
CLIENT_TIMEOUT = 60.0
LOG_WAIT_TIMEOUT = 60.0

#: A snapshot whenever a node's log holds more than 2 entries: nearly every Raft entry
#: (each flushed batch of a writer is one or more) is followed by a compaction, so a kill
#: right after an acknowledgement often lands between pysyncobj renaming the new snapshot
#: into place and trimming the journal a tick later. A journal that does not reconcile
#: itself with the snapshot on restart loses acknowledged items there within a few rounds.
FREQUENT_COMPACTION = ["--compaction-min-entries", "2", *COMPACTION_BY_ENTRIES_ALONE]
#: A snapshot only when a node's log holds more than 20 entries: the tests that pause a
#: compaction need the cluster to work until they have written that much.
COMPACTION_BY_SIZE = ["--compaction-min-entries", "20", *COMPACTION_BY_ENTRIES_ALONE]

#: What the journal logs (WARNING) when its compaction test pause begins.
PAUSE_LINE = "compaction paused for tests"
#: What a restarted journal logs when it finds the new journal of a compaction unrenamed.
LEFTOVER_LINE = "removing leftover"
#: What a restarted journal logs when it trims a log the snapshot already covers.
RECONCILE_LINE = "(interrupted compaction)"


# ---------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def running_cluster(base_dir: Path, **options: Any) -> Iterator[LocalCluster]:
    """A started 3-node cluster with a leader; every node's log tail is printed (and so
    shown in the failure report) if the block raises, and every node is killed after it."""
    cluster = LocalCluster(3, base_dir=base_dir, **options)
    try:
        cluster.start()
        cluster.wait_ready(timeout=READY_TIMEOUT)
        yield cluster
    except BaseException:
        cluster.dump_logs(lines=60)
        raise
    finally:
        cluster.close()


def assert_contents(chan: raftchan.Channel, count: int) -> None:
    """The channel holds exactly items 0 .. count-1, in order (a linearizable read)."""
    data = list(chan.data)
    expected = list(range(count))
    if data != expected:
        missing = sorted(set(expected) - set(data))
        repeated = sorted({x for x in data if data.count(x) > 1})
        raise AssertionError(
            f"channel {chan.name!r}: {len(data)} items, expected {count}; "
            f"missing {missing[:20]}, repeated {repeated[:20]}, "
            f"in order: {data == sorted(data)}"
        )
    assert len(chan) == count


def wait_converged(cluster: LocalCluster, timeout: float = CONVERGE_TIMEOUT) -> list[dict]:
    """Wait until every node answers, one of them leads, every node is ready, and all have
    applied the same log index and reached the same state position. Call when idle."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = cluster.status()
        roles = [s.get("role") for s in statuses]
        if (
            "unreachable" not in roles
            and roles.count("leader") == 1
            and all(s.get("ready") for s in statuses)
            and len({s.get("position") for s in statuses}) == 1
            and len({s.get("applied_index") for s in statuses}) == 1
        ):
            return statuses
        if time.monotonic() >= deadline:
            seen = [
                {k: s.get(k) for k in ("name", "role", "ready", "position", "applied_index")}
                for s in statuses
            ]
            raise AssertionError(f"nodes did not converge within {timeout} s: {seen}")
        time.sleep(0.2)


def current_log(cluster: LocalCluster, i: int) -> str:
    """Node ``i``'s log since its latest start (the harness writes a header per start)."""
    node = cluster.nodes[i]
    text = node.log_text()
    marker = f"===== harness: start {node.starts} of {node.spec.name} "
    at = text.rfind(marker)
    return text[at:] if at >= 0 else ""


def wait_for_log(
    cluster: LocalCluster, nodes: Sequence[int], needle: str, count: int, timeout: float
) -> list[int]:
    """Wait until ``needle`` is in the current log of at least ``count`` of ``nodes``;
    returns those nodes."""
    deadline = time.monotonic() + timeout
    while True:
        found = [i for i in nodes if needle in current_log(cluster, i)]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, (
            f"{needle!r} logged by nodes {found} only, within {timeout} s"
        )
        time.sleep(0.05)


def snapshot_index(cluster: LocalCluster, i: int) -> int:
    """Log index of node ``i``'s snapshot anchor; 0 if it has none."""
    anchor = read_snapshot_anchor(cluster.nodes[i].spec.data_dir / SNAPSHOT_FILE)
    return 0 if anchor is None else anchor[1]


def emulate_power_loss(data_dir: Path) -> int:
    """Make ``data_dir`` look as it would after a power loss of the machine: cut the
    journal back to the last length the node fsynced (recorded by ``--record-synced``) and
    drop the temporary files, whose names were never made durable. Returns the bytes cut.

    Everything else the node writes (meta, snapshot) it fsyncs before relying on it.
    """
    journal = data_dir / JOURNAL_FILE
    synced = read_synced_length(journal)
    assert synced is not None, f"{journal} has no synced length: --record-synced not in effect?"
    size = journal.stat().st_size
    # Never extend: the record may predate a compaction that made the file shorter.
    if synced < size:
        os.truncate(journal, synced)
    for leftover in data_dir.glob("*.tmp"):
        leftover.unlink()
    return max(0, size - synced)


# ---------------------------------------------------------------------------------------
# Tests


def test_leaders_killed_mid_stream_lose_and_repeat_nothing(cluster: LocalCluster) -> None:
    """SIGKILL the leader while a client streams pipelined appends, three times over (each
    killed node restarted before the next kill): the client moves to the new leader by
    itself, and every item lands exactly once, in order. Requests in flight at a kill
    were often stored by the followers but never answered, so their retries must be
    recognised as repeats. Each killed node, restarted from its data folder, catches up."""
    kills = 3
    with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
        chan = client.channel("failover")
        # The short pause between flushes leaves the CPU to the nodes on a small machine.
        writer = Writer(chan, batch=1, flush_every=100, pause=0.02)
        writer.start()
        try:
            for _ in range(kills):
                old = cluster.wait_leader(timeout=FAILOVER_TIMEOUT)
                writer.wait_acked(writer.acked + 300, timeout=FLUSH_TIMEOUT)
                cluster.kill(old)
                new = cluster.wait_leader(timeout=FAILOVER_TIMEOUT)
                assert new != old
                # Acknowledgements resume: the retries reached the new leader.
                writer.wait_acked(writer.appended + 1, timeout=FLUSH_TIMEOUT)
                cluster.restart(old)
                cluster.wait_ready(timeout=READY_TIMEOUT)
        finally:
            writer.finish()
        print(f"{kills} leaders killed; {writer.appended} items")
        assert_contents(chan, writer.appended)

        wait_converged(cluster)
        # The contents did not change while the last restarted node caught up.
        assert_contents(chan, writer.appended)


def test_whole_cluster_killed_after_each_flush_keeps_everything(tmp_path: Path) -> None:
    """Five rounds of: write with frequent compaction, SIGKILL all nodes the moment a flush
    returns, restart them all. Every acknowledged item survives every round, and a fresh
    snapshot was taken during each round's writes."""
    rounds, batches, batch = 5, 30, 4
    with (
        running_cluster(tmp_path / "cluster", extra_args=FREQUENT_COMPACTION) as cluster,
        raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client,
    ):
        # One client for the whole test: its session must survive the restarts too.
        chan = client.channel("kill-all")
        total = 0
        last_snapshot = 0
        for round_no in range(rounds):
            for _ in range(batches):
                chan.extend(range(total, total + batch))
                total += batch
                chan.flush(timeout=FLUSH_TIMEOUT)
            cluster.kill_all()

            snapshot = max(snapshot_index(cluster, i) for i in range(cluster.size))
            assert snapshot > last_snapshot, f"no compaction during round {round_no}"
            last_snapshot = snapshot

            cluster.restart_all()
            cluster.wait_ready(timeout=READY_TIMEOUT)
            assert_contents(chan, total)
        wait_converged(cluster)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_whole_cluster_killed_at_random_moments_under_load(tmp_path: Path) -> None:
    """Twenty rounds of SIGKILL of every node at a random moment of a stream of writes,
    with frequent compaction, then a restart: every item acknowledged before the kill is
    there, and the appends left unanswered by the kill land exactly once after it."""
    rounds = 20
    seed = int(os.environ.get("RAFTCHAN_TEST_SEED", "20240611"))
    rng = random.Random(seed)
    print(f"seed {seed} (set RAFTCHAN_TEST_SEED to repeat another)")
    finished: list[tuple[str, int]] = []
    with running_cluster(tmp_path / "cluster", extra_args=FREQUENT_COMPACTION) as cluster:
        for round_no in range(rounds):
            with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
                chan = client.channel(f"round-{round_no}")
                writer = Writer(chan, batch=rng.randint(1, 8), flush_every=rng.randint(1, 20))
                writer.start()
                try:
                    writer.wait_acked(1, timeout=FLUSH_TIMEOUT)
                    time.sleep(rng.uniform(0.0, 2.0))
                    acked_before_kill = writer.acked
                    cluster.kill_all()
                    cluster.restart_all()
                    cluster.wait_ready(timeout=READY_TIMEOUT)
                finally:
                    writer.finish()
                assert writer.acked >= acked_before_kill
                assert_contents(chan, writer.appended)
                finished.append((chan.name, writer.appended))
        # Every earlier round's channel went through later kills as well.
        with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
            for name, count in finished:
                assert_contents(client.channel(name), count)
        snapshots = [snapshot_index(cluster, i) for i in range(cluster.size)]
        assert all(snapshots), f"some node never compacted: snapshot indexes {snapshots}"
        wait_converged(cluster)


def test_node_killed_in_the_middle_of_a_compaction_recovers(tmp_path: Path) -> None:
    """A follower is SIGKILLed after its new snapshot is in place and its trimmed journal
    is written but not yet renamed over the old one (the journal's test pause holds its
    compaction thread there, while the node goes on appending to the old file).
    Restarted, it discards the unrenamed file, trims the old journal to the snapshot,
    and catches up; no acknowledged item is lost."""
    with running_cluster(tmp_path / "cluster", extra_args=COMPACTION_BY_SIZE) as cluster:
        leader = cluster.leader()
        assert leader is not None
        victim = next(i for i in range(cluster.size) if i != leader)
        # Arm the pause on one follower only: the other two keep a majority and go on.
        cluster.set_node_env(victim, TEST_PAUSE_ENV, "120")
        cluster.restart(victim)
        cluster.wait_ready(timeout=READY_TIMEOUT)

        with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
            chan = client.channel("mid-compaction")
            writer = Writer(chan, batch=4)
            writer.start()
            try:
                wait_for_log(cluster, [victim], PAUSE_LINE, 1, LOG_WAIT_TIMEOUT)
                # Acknowledgements go on (the paused follower's appends too).
                writer.wait_acked(writer.acked + 40, timeout=FLUSH_TIMEOUT)
                cluster.kill(victim)
                cluster.set_node_env(victim, TEST_PAUSE_ENV, None)
                writer.wait_acked(writer.acked + 40, timeout=FLUSH_TIMEOUT)
                cluster.restart(victim)
                cluster.wait_ready(timeout=READY_TIMEOUT)
            finally:
                writer.finish()
            assert_contents(chan, writer.appended)

            log = current_log(cluster, victim)
            assert LEFTOVER_LINE in log, "the killed compaction left no unrenamed journal"
            assert RECONCILE_LINE in log, "the restarted journal was not trimmed to the snapshot"
            wait_converged(cluster)
            assert_contents(chan, writer.appended)


def test_whole_cluster_killed_in_the_middle_of_compactions(tmp_path: Path) -> None:
    """Every node is SIGKILLed while at least a majority of them are held between writing
    their trimmed journal and renaming it, then all restart: the case that lost
    acknowledged entries with pysyncobj's own journal. Nothing acknowledged is lost."""
    with (
        running_cluster(
            tmp_path / "cluster", extra_args=COMPACTION_BY_SIZE, env={TEST_PAUSE_ENV: "120"}
        ) as cluster,
        raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client,
    ):
        chan = client.channel("all-mid-compaction")
        writer = Writer(chan, batch=4)
        writer.start()
        try:
            everyone = range(cluster.size)
            paused = wait_for_log(cluster, everyone, PAUSE_LINE, 2, LOG_WAIT_TIMEOUT)
            # The third node may be about to pause as well; give it a moment.
            with contextlib.suppress(AssertionError):
                paused = wait_for_log(cluster, everyone, PAUSE_LINE, 3, 3.0)
            acked_before_kill = writer.acked
            cluster.kill_all()
            for i in everyone:
                cluster.set_node_env(i, TEST_PAUSE_ENV, None)
            cluster.restart_all()
            cluster.wait_ready(timeout=READY_TIMEOUT)
        finally:
            writer.finish()
        print(f"nodes {paused} killed mid-compaction, {acked_before_kill} items acknowledged")
        assert acked_before_kill > 0
        assert_contents(chan, writer.appended)
        for i in paused:
            log = current_log(cluster, i)
            assert LEFTOVER_LINE in log, f"node {i}: no unrenamed journal after the kill"
            assert RECONCILE_LINE in log, f"node {i}: journal not trimmed to its snapshot"
        wait_converged(cluster)


def test_power_loss_keeps_every_acknowledged_item(tmp_path: Path) -> None:
    """Emulated power loss of the whole cluster, three times: SIGKILL every node under a
    stream of writes, cut each journal back to what the node had fsynced and drop its
    temporary files, restart. Every item acknowledged before the loss is there, in order,
    once; so are the unanswered ones the client then resends."""
    rng = random.Random(5)
    cut: list[int] = []
    finished: list[tuple[str, int]] = []
    with running_cluster(
        # Compaction rewrites and syncs the whole journal: not so often that no unsynced
        # tail is ever left to cut.
        tmp_path / "cluster",
        extra_args=["--record-synced", *COMPACTION_BY_SIZE],
    ) as cluster:
        for round_no in range(3):
            with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
                chan = client.channel(f"power-{round_no}")
                writer = Writer(chan, batch=1, flush_every=50)
                writer.start()
                try:
                    # At least 8 flushes, so at least 8 Raft entries, per round: the
                    # three rounds log more than the 20 that trigger a compaction.
                    writer.wait_acked(400, timeout=FLUSH_TIMEOUT)
                    time.sleep(rng.uniform(0.0, 0.5))
                    acked_before_loss = writer.acked
                    cluster.kill_all()
                    cut += [emulate_power_loss(node.spec.data_dir) for node in cluster.nodes]
                    cluster.restart_all()
                    cluster.wait_ready(timeout=READY_TIMEOUT)
                finally:
                    writer.finish()
                assert writer.acked >= acked_before_loss
                assert_contents(chan, writer.appended)
                finished.append((chan.name, writer.appended))
        print(f"unsynced journal bytes cut per node and round: {cut}")
        snapshots = [snapshot_index(cluster, i) for i in range(cluster.size)]
        assert all(snapshots), f"some node never compacted: snapshot indexes {snapshots}"
        wait_converged(cluster)
        # The earlier rounds' channels went through the later power losses as well.
        with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
            for name, count in finished:
                assert_contents(client.channel(name), count)


def test_power_loss_emulation_catches_a_journal_that_does_not_fsync(tmp_path: Path) -> None:
    """The negative control of the test above: with ``--fsync never`` a node records
    nothing as fsynced, so the same emulated power loss must take acknowledged items with
    it. If it did not, the power-loss test could not fail."""
    with running_cluster(
        tmp_path / "cluster", extra_args=["--record-synced", "--fsync", "never"]
    ) as cluster:
        with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
            chan = client.channel("unsynced")
            chan.extend(range(100))
            chan.flush()
            assert len(chan) == 100
        cluster.kill_all()
        cut = [emulate_power_loss(node.spec.data_dir) for node in cluster.nodes]
        assert all(cut), f"nothing unsynced to cut: {cut}"
        cluster.restart_all()
        cluster.wait_ready(timeout=READY_TIMEOUT)
        with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
            assert len(client.channel("unsynced")) < 100


def test_commands_near_128_kib_reach_every_follower(cluster: LocalCluster) -> None:
    """Commands across the 128 KiB boundary reach every follower, live and when a paused
    follower catches up. Sizes near it once left a follower stuck (pysyncobj 0.3.17 ended a
    chunked transfer by comparing against the command's length, not the pickled entry's;
    seen at 131,046 bytes), which is why the replica keeps every command below the chunk
    size. This sweep did not reproduce that with pysyncobj's own 64 KiB chunks either, so
    it guards large-entry replication in general, not that workaround in particular."""
    sizes = list(range(130_900, 131_100, 4))
    leader = cluster.leader()
    assert leader is not None
    lagging = (leader + 1) % cluster.size
    with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
        chan = client.channel("near-128k")
        chan.put(b"live")  # sent to every follower as it happens
        cluster.pause(lagging)  # ... and the rest it must fetch when it catches up
        try:
            for size in sizes:
                chan.put(b"x" * size)  # one at a time: each is a Raft command of its own
        finally:
            cluster.resume(lagging)
    sizes.insert(0, 4)
    wait_converged(cluster)
    for name, contents in contents_of_every_node(cluster, ["near-128k"]).items():
        assert [len(item) for item in contents["near-128k"]] == sizes, name


def test_binary_items_take_their_own_size_in_every_journal(cluster: LocalCluster) -> None:
    # pysyncobj pickles each command in protocol 2, which stores bytes as UTF-8 of
    # latin-1: random bytes took 1.5 times their size in the log (and on the wire).
    items = [os.urandom(64 * 1024) for _ in range(10)]
    journals = [cluster.base_dir / name / JOURNAL_FILE for name in cluster.names]
    with raftchan.Client(cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
        chan = client.channel("binary")
        chan.flush(FLUSH_TIMEOUT)
        before = [journal.stat().st_size for journal in journals]
        chan.extend(items)
        chan.flush(FLUSH_TIMEOUT)
        assert list(chan.data) == items
    wait_converged(cluster)
    grown = [journal.stat().st_size - size for journal, size in zip(journals, before, strict=True)]
    payload = sum(len(item) for item in items)
    for growth in grown:
        assert payload <= growth < 1.1 * payload, grown
