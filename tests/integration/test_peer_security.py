"""What a stranger who reaches a node's Raft port can and cannot do.

pysyncobj buffers a peer frame of any declared length; raftchan bounds it (64 KiB until
a first message on the connection decodes, then the cluster's message bound), so a
connection that announces more is closed at once instead of filling the node's memory.
Each test runs against a real 3-node cluster that keeps serving afterwards.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import raftchan
from cluster.fixtures import started_cluster
from cluster.harness import LocalCluster
from raftchan.config import split_address
from raftchan.peer_connection import UNAUTHENTICATED_MESSAGE_BYTES

#: How long the stranger waits for the node to close its connection.
CLOSE_TIMEOUT = 10.0
#: What the stranger tries to push after its frame header.
JUNK_BYTES = 8 * 1024 * 1024


@pytest.fixture(name="secret_cluster", params=["with a cluster secret", "without a secret"])
def secret_cluster_fixture(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[LocalCluster]:
    extra: list[str] = []
    if request.param == "with a cluster secret":
        secret = tmp_path / "secret"
        secret.write_bytes(b"peer-security-test-secret")
        extra = ["--cluster-secret-file", str(secret)]
    with started_cluster(request, tmp_path / "cluster", extra_args=extra) as local:
        yield local


def push_until_closed(address: str, header: bytes) -> tuple[int, bool]:
    """Send ``header`` and then junk until the node closes the connection or the junk
    runs out; returns (junk bytes the node accepted, whether it closed the connection)."""
    host, port = split_address(address)
    sent = 0
    chunk = b"\x00" * 65536
    with socket.create_connection((host, port), timeout=CLOSE_TIMEOUT) as sock:
        sock.sendall(header)
        try:
            while sent < JUNK_BYTES:
                sent += sock.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return sent, True
        except TimeoutError:
            return sent, False  # the node stopped reading but kept the connection
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
    return sent, closed


def assert_cluster_serves(cluster: LocalCluster, name: str) -> None:
    with raftchan.Client(cluster.addresses, timeout=30) as client:
        chan = client.channel(name)
        chan.append("still serving")
        chan.flush()
        assert list(chan.data)[-1] == "still serving"
    assert cluster.leader() is not None


@pytest.mark.parametrize(
    "declared",
    [
        1 << 30,  # a gigabyte
        UNAUTHENTICATED_MESSAGE_BYTES + 1,  # just over the bound before authentication
        -1,  # a negative length
    ],
)
def test_a_stranger_announcing_a_huge_frame_is_cut_off(
    secret_cluster: LocalCluster, declared: int
) -> None:
    leader = secret_cluster.leader()
    assert leader is not None
    raft_address = secret_cluster.nodes[leader].spec.raft_address

    accepted, closed = push_until_closed(raft_address, struct.pack("i", declared))

    assert closed, "the node kept the connection open"
    # Socket buffers on both sides take a few megabytes before the close is seen; the
    # node itself dropped the connection at the header.
    assert accepted < JUNK_BYTES, f"the node took all {accepted} junk bytes"
    assert_cluster_serves(secret_cluster, f"after-{declared & 0xFFFFFFFF}")
    log = secret_cluster.nodes[leader].log_text()
    assert f"announced a {declared}-byte message" in log


def test_a_stranger_sending_frames_that_do_not_decode_is_cut_off(
    secret_cluster: LocalCluster,
) -> None:
    leader = secret_cluster.leader()
    assert leader is not None
    raft_address = secret_cluster.nodes[leader].spec.raft_address
    frame = b"not a pysyncobj message" * 100
    header = struct.pack("i", len(frame)) + frame

    accepted, closed = push_until_closed(raft_address, header)

    assert closed
    assert accepted < JUNK_BYTES
    assert_cluster_serves(secret_cluster, "after-garbage")
