"""The channel contract against a real 3-node cluster: order, exactly-once, stop, maxlen."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

import raftchan
from cluster.faultrun import contents_of_every_node
from cluster.harness import LocalCluster, receive_message
from raftchan import protocol

#: Seconds any single client operation may take on a loaded test machine.
OP_TIMEOUT = 60.0
#: Seconds a reader thread may take to see the end of its channel.
READER_TIMEOUT = 90.0


def follower_first(cluster: LocalCluster, follower: int) -> str:
    """An address list that puts one follower first, so its long polls go there."""
    addresses = cluster.client_addresses
    ordered = [addresses[follower]] + [a for i, a in enumerate(addresses) if i != follower]
    return ",".join(ordered)


def followers(cluster: LocalCluster) -> list[int]:
    leader = cluster.leader()
    assert leader is not None
    return [i for i in range(cluster.size) if i != leader]


class Reader(threading.Thread):
    """Iterates one channel in a thread of its own and keeps what it saw."""

    def __init__(self, address: str, channel: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.channel = channel
        self.items: list[Any] = []
        self.error: BaseException | None = None
        self.started_iterating = threading.Event()

    def run(self) -> None:
        try:
            with raftchan.Client(self.address, timeout=OP_TIMEOUT, poll_wait=1.0) as client:
                chan = client.channel(self.channel)
                self.started_iterating.set()
                for item in chan:
                    self.items.append(item)
        except BaseException as exc:  # handed to the test thread, which re-raises it
            self.error = exc
        finally:
            self.started_iterating.set()

    def result(self) -> list[Any]:
        self.join(READER_TIMEOUT)
        assert not self.is_alive(), f"iteration did not end; saw {len(self.items)} items"
        if self.error is not None:
            raise self.error
        return self.items


def test_concurrent_writers_give_every_reader_one_order(cluster: LocalCluster) -> None:
    per_writer = 400

    def write(tag: str) -> None:
        with raftchan.Client(cluster.addresses, timeout=OP_TIMEOUT) as client:
            chan = client.channel("shared")
            for i in range(per_writer):
                chan.append([tag, i])
                if i % 50 == 49:
                    chan.flush()
            chan.flush()

    writers = [threading.Thread(target=write, args=(tag,)) for tag in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(READER_TIMEOUT)
        assert not writer.is_alive()

    snapshots = []
    for follower in range(cluster.size):
        address = follower_first(cluster, follower)
        with raftchan.Client(address, timeout=OP_TIMEOUT) as client:
            chan = client.channel("shared")
            snapshots.append([tuple(item) for item in chan.data])
            snapshots.append([tuple(item) for item in chan.read(start=0)])
    first = snapshots[0]
    assert all(snapshot == first for snapshot in snapshots)
    assert len(first) == 2 * per_writer
    for tag in ("a", "b"):
        assert [i for t, i in first if t == tag] == list(range(per_writer))
    # Every node's own replica (read locally, not through the leader) holds the same order.
    for name, contents in contents_of_every_node(cluster, ["shared"]).items():
        assert [tuple(item) for item in contents["shared"]] == first, name


def test_stop_ends_iterations_on_followers_and_refuses_appends(cluster: LocalCluster) -> None:
    polls_before = {i: cluster.status()[i].get("polls_answered", 0) for i in range(cluster.size)}
    readers = [Reader(follower_first(cluster, i), "jobs") for i in followers(cluster)]
    readers.append(Reader(cluster.client_addresses[cluster.leader() or 0], "jobs"))
    with raftchan.Client(cluster.addresses, timeout=OP_TIMEOUT) as client:
        chan = client.channel("jobs")
        for reader in readers:
            reader.start()
            assert reader.started_iterating.wait(OP_TIMEOUT)
        expected = [{"job": i} for i in range(200)]
        for i, item in enumerate(expected):
            chan.append(item)
            if i % 40 == 0:
                chan.flush()
        chan.stop()
        for reader in readers:
            assert reader.result() == expected

        with pytest.raises(raftchan.ChannelStopped):
            chan.append("late")
            chan.flush()
    # A fresh client learns of the stop when it opens the channel ...
    with raftchan.Client(cluster.addresses, timeout=OP_TIMEOUT) as other:
        late = other.channel("jobs")
        with pytest.raises(raftchan.ChannelStopped):
            late.append("late")
        assert list(late.data) == expected
        assert list(late) == expected  # a new iteration of a stopped channel ends too

    # ... and the cluster itself refuses an append sent without asking first.
    leader = cluster.client_addresses[cluster.leader() or 0]
    session = os.urandom(protocol.SESSION_ID_BYTES)
    refused = call(leader, protocol.Append(1, "jobs", session, 1, [msgpack.packb("late")]))
    assert refused["ok"] is False and refused["error"]["code"] == "channel_stopped"

    statuses = cluster.status()
    for i in followers(cluster):
        assert statuses[i]["polls_answered"] > polls_before[i], "no poll reached follower"


def test_maxlen_keeps_newest_and_names_the_gap(cluster: LocalCluster) -> None:
    with raftchan.Client(cluster.addresses, timeout=OP_TIMEOUT) as client:
        chan = client.channel("recent", maxlen=5)
        chan.extend(range(20))
        chan.flush()
        assert list(chan.data) == [15, 16, 17, 18, 19]
        assert len(chan) == 5
        info = chan.info()
        assert (info.first, info.next, info.maxlen) == (15, 20, 5)
        assert chan.read(start=17) == [17, 18, 19]

        with pytest.raises(raftchan.TrimmedGap) as caught:
            chan.read(start=3)
        assert caught.value.details == {"channel": "recent", "requested": 3, "first": 15}
        assert "3" in str(caught.value) and "15" in str(caught.value)

        iteration = chan.iterate(start=10)
        with pytest.raises(raftchan.TrimmedGap):
            next(iteration)
        iteration.close()
        assert list(chan.data) == [15, 16, 17, 18, 19]  # the failed reads changed nothing


# ---------------------------------------------------------------------------------------
# Exactly once: the same (session, seq) sent again, as a client does after a dropped
# connection, is answered with the first result and not stored again.


@contextmanager
def raw_connection(address: str) -> Iterator[socket.socket]:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=OP_TIMEOUT)
    try:
        sock.sendall(protocol.encode_frame(protocol.hello_request()))
        protocol.check_hello(receive_message(sock))
        yield sock
    finally:
        sock.close()


def call(address: str, request: protocol.Request) -> dict[str, Any]:
    with raw_connection(address) as sock:
        sock.sendall(protocol.encode_frame(request.to_wire()))
        return receive_message(sock)


def test_a_repeated_append_is_stored_once(cluster: LocalCluster) -> None:
    leader = cluster.client_addresses[cluster.leader() or 0]
    assert call(leader, protocol.Open(1, "once"))["ok"]
    session = os.urandom(protocol.SESSION_ID_BYTES)
    items = [msgpack.packb(x) for x in ("a", "b", "c")]
    append = protocol.Append(1, "once", session, 1, items)

    first = call(leader, append)
    assert first["ok"], first
    # The answer was "lost": the client dials again and sends the very same request.
    again = call(leader, append)
    assert again["ok"] and again["duplicate"] and not first["duplicate"]
    assert again["indexes"] == first["indexes"] == [0, 1, 2]
    following = call(leader, protocol.Append(1, "once", session, 4, [msgpack.packb("d")]))
    assert following["ok"], following

    with raftchan.Client(cluster.addresses, timeout=OP_TIMEOUT) as client:
        assert list(client.channel("once").data) == ["a", "b", "c", "d"]


def test_async_client_appends_reads_and_iterates(cluster: LocalCluster) -> None:
    async def scenario() -> list[Any]:
        async with raftchan.AsyncClient(cluster.addresses, timeout=OP_TIMEOUT) as client:
            chan = await client.channel("async")
            chan.append({"x": 123})
            chan.extend([1, "two", [3]])
            await chan.flush(timeout=OP_TIMEOUT)
            assert list(await chan.data()) == [{"x": 123}, 1, "two", [3]]
            assert await chan.len() == 4
            await chan.stop()
            return [item async for item in chan]

    assert asyncio.run(scenario()) == [{"x": 123}, 1, "two", [3]]


def test_put_returns_the_index_each_item_was_stored_at(cluster: LocalCluster) -> None:
    with raftchan.Client(cluster.addresses, timeout=OP_TIMEOUT) as client:
        chan = client.channel("indexed")
        chan.extend(["a", "b"])  # queued before the put: the put waits for them too
        assert chan.put("c") == 2
        with raftchan.Client(cluster.addresses, timeout=OP_TIMEOUT) as other:
            assert other.channel("indexed").put("d") == 3
        assert chan.put("e") == 4
        assert list(chan.data) == ["a", "b", "c", "d", "e"]
        chan.stop()
        with pytest.raises(raftchan.ChannelStopped):
            chan.put("late")


def _stopped_elsewhere(cluster: LocalCluster, name: str) -> None:
    """Stop channel ``name`` through another client: the writers' client does not know."""
    with raftchan.Client(cluster.addresses, timeout=OP_TIMEOUT) as other:
        other.channel(name).stop()


def test_a_refusal_reaches_the_thread_that_made_the_append(cluster: LocalCluster) -> None:
    with raftchan.Client(cluster.addresses, timeout=OP_TIMEOUT) as client:
        stopped, open_ = client.channel("refused-in-a-thread"), client.channel("open-one")
        _stopped_elsewhere(cluster, stopped.name)
        appended, flushed_by_other = threading.Event(), threading.Event()
        seen: list[BaseException | None] = []

        def maker() -> None:
            stopped.append("refused")
            appended.set()
            flushed_by_other.wait(OP_TIMEOUT)
            try:
                stopped.flush()
                seen.append(None)
            except raftchan.RaftchanError as exc:
                seen.append(exc)

        thread = threading.Thread(target=maker)
        thread.start()
        assert appended.wait(OP_TIMEOUT)
        open_.append("fine")
        # This thread's flush covers the other's append too (every earlier append of
        # the client): it raises the refusal once ...
        with pytest.raises(raftchan.ChannelStopped):
            open_.flush()
        open_.flush()
        flushed_by_other.set()
        thread.join(OP_TIMEOUT)
        # ... and the thread that made the append learns of it all the same.
        assert len(seen) == 1 and isinstance(seen[0], raftchan.ChannelStopped), seen
        assert list(open_.data) == ["fine"]


def test_a_put_raises_only_its_own_refusal(cluster: LocalCluster) -> None:
    with raftchan.Client(cluster.addresses, timeout=OP_TIMEOUT) as client:
        stopped, kept = client.channel("refused-before-a-put"), client.channel("put-after")
        _stopped_elsewhere(cluster, stopped.name)
        stopped.append("refused")
        # Stored: the put says so, and leaves the other append's refusal to flush (had
        # it raised, a caller retrying the put would store "important" twice).
        assert kept.put("important") == 0
        with pytest.raises(raftchan.ChannelStopped):
            client.flush()
        assert list(kept.data) == ["important"]
        # Its own refusal, which only the cluster knows, it does raise, and only once.
        late = client.channel("stopped-under-a-put")
        _stopped_elsewhere(cluster, late.name)
        with pytest.raises(raftchan.ChannelStopped):
            late.put("refused too")
        client.flush()


def test_a_client_never_closed_ends_quietly_at_exit(cluster: LocalCluster) -> None:
    """A script that never closes its client (as short examples do) exits cleanly."""
    script = (
        "import sys, raftchan\n"
        "chan = raftchan.Client(sys.argv[1]).channel('never-closed')\n"
        "chan.append(1)\n"
        "chan.flush()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, cluster.addresses],
        capture_output=True,
        text=True,
        timeout=OP_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert "destroyed but it is pending" not in done.stderr, done.stderr


def test_an_iteration_on_a_cut_off_follower_moves_on_and_sees_the_stop(tmp_path: Path) -> None:
    local = LocalCluster(3, base_dir=tmp_path / "cluster", fault_injection=True)
    try:
        local.start()
        leader = local.wait_ready(timeout=60.0)
        follower = next(i for i in range(3) if i != leader)
        reader = Reader(follower_first(local, follower), "far")
        with raftchan.Client(local.addresses, timeout=OP_TIMEOUT) as client:
            chan = client.channel("far")
            reader.start()
            assert reader.started_iterating.wait(OP_TIMEOUT)
            chan.put("before")
            local.isolate(follower)
            chan.extend(["during", "the", "cut"])
            chan.stop()
            # The cut-off follower never hears of these; the reader must go elsewhere.
            assert reader.result() == ["before", "during", "the", "cut"]
    finally:
        local.close()


def test_appends_move_off_a_hung_leader_long_before_the_attempt_timeout(
    cluster: LocalCluster,
) -> None:
    # A stopped process keeps its sockets open and answers nothing: to its clients that
    # is what a node whose host lost power or was cut off the network looks like. The
    # flush's deadline comes long before the attempt timeout, so only the client's ping
    # of the quiet connection can take it to the new leader in time.
    retry = raftchan.RetryPolicy(timeout=OP_TIMEOUT / 2, attempt_timeout=OP_TIMEOUT * 2)
    with raftchan.Client(cluster.addresses, retry=retry) as client:
        chan = client.channel("hung")
        chan.put("before")  # the client now talks to the leader
        old = cluster.wait_leader(timeout=OP_TIMEOUT)
        cluster.pause(old)
        try:
            chan.append("after")
            chan.flush()
            assert list(chan.data) == ["before", "after"]
            assert cluster.wait_leader(timeout=OP_TIMEOUT) != old
        finally:
            cluster.resume(old)


def test_appends_that_keep_coming_do_not_keep_a_hung_leader(cluster: LocalCluster) -> None:
    # The stopped leader's kernel still takes every byte sent to it. Appends that go on
    # coming while the client waits (here one every 0.1 s, with room for 2,000 requests
    # in flight: 200 s of them) reach that kernel after the ping and must not count as
    # the node's answer: the flush has to end on the new leader within its 15 s, long
    # before the attempt timeout.
    retry = raftchan.RetryPolicy(timeout=15.0, attempt_timeout=OP_TIMEOUT * 4)
    with raftchan.Client(cluster.addresses, retry=retry, max_in_flight=2000) as client:
        chan = client.channel("hung-busy")
        chan.put("before")
        old = cluster.wait_leader(timeout=OP_TIMEOUT)
        stop = threading.Event()

        def keep_appending() -> None:
            for k in range(300):  # bounded: 30 s at most
                if stop.wait(0.1):
                    return
                chan.append(k)

        appender = threading.Thread(target=keep_appending, daemon=True)
        cluster.pause(old)
        try:
            chan.append("after")
            appender.start()
            chan.flush()
            stop.set()
            appender.join()
            chan.flush()
            items = list(chan.data)
            assert items[:2] == ["before", "after"]
            assert items[2:] == list(range(len(items) - 2))
            assert cluster.wait_leader(timeout=OP_TIMEOUT) != old
        finally:
            stop.set()
            cluster.resume(old)


def test_a_client_fits_its_batches_to_a_node_with_smaller_limits(tmp_path: Path) -> None:
    """Limits are node flags: a client with the default 4 MiB frames must not keep
    sending frames that a node allowing 64 KiB can only refuse."""
    small = ["--max-frame-bytes", "65536", "--max-item-bytes", "16384"]
    local = LocalCluster(3, base_dir=tmp_path / "cluster", extra_args=small)
    try:
        local.start()
        local.wait_ready(timeout=60.0)
        with raftchan.Client(local.addresses, timeout=OP_TIMEOUT) as client:
            chan = client.channel("small-frames")
            items = [f"{i:05d}-" + "x" * 1000 for i in range(600)]  # about 600 KB in all
            chan.extend(items)
            chan.flush()
            assert list(chan.data) == items  # read back page by page
            # Fits the client's own limit, not the node's: the node announced its bound,
            # so the append is refused at once.
            with pytest.raises(raftchan.LimitExceeded, match="max_item_bytes=16384"):
                chan.append("y" * 20_000)
            chan.flush()
            assert len(chan) == len(items)
    finally:
        local.close()
