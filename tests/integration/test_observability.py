"""The operators' view of real node processes: /metrics, /health, JSON logs, status table.

Each node is started with ``--http-address 127.0.0.1:0`` and reports the port it got in
its status (``http_address``), so the harness needs no port of its own for it.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import raftchan
from cluster.fixtures import started_cluster
from cluster.harness import COMPACTION_BY_ENTRIES_ALONE, LocalCluster
from raftchan.cli import cli
from raftchan.config import split_address

#: Bounds one HTTP request to a node (connect, send, answer).
HTTP_TIMEOUT = 5.0
#: Bounds each wait for the cluster to reach an awaited state.
WAIT_TIMEOUT = 60.0

NODE_ARGS = ["--http-address", "127.0.0.1:0", "--log-format", "json"]
#: A snapshot once a node's log holds more than 5 entries, so a short test sees some.
FREQUENT_SNAPSHOTS = ["--compaction-min-entries", "5", *COMPACTION_BY_ENTRIES_ALONE]

T = TypeVar("T")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(name="observed")
def observed_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """A running 3-node cluster serving HTTP endpoints, logging JSON, with partitions."""
    with started_cluster(
        request, tmp_path / "cluster", extra_args=NODE_ARGS, fault_injection=True
    ) as local:
        yield local


@pytest.fixture(name="snapshotting")
def snapshotting_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """Like ``observed``, with a snapshot every few log entries."""
    with started_cluster(
        request, tmp_path / "cluster", extra_args=[*NODE_ARGS, *FREQUENT_SNAPSHOTS]
    ) as local:
        yield local


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = WAIT_TIMEOUT) -> T:
    """Call ``probe`` until it returns something other than None (or False); bounded by
    ``timeout`` seconds, after which the test fails naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except OSError as exc:  # a node busy with an election may drop a connection
            last = exc
        else:
            if last is not None and last is not False:
                return last
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not reached within {timeout} s (last: {last!r})")
        time.sleep(0.2)


def http_addresses(cluster: LocalCluster) -> list[str]:
    statuses = cluster.status()
    addresses = [status.get("http_address") for status in statuses]
    assert all(isinstance(a, str) for a in addresses), statuses
    return [str(a) for a in addresses]


def http_get(address: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    host, port = split_address(address)
    connection = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def health(address: str) -> tuple[int, dict[str, Any]]:
    status, body = http_get(address, "/health")
    return status, dict(json.loads(body))


def scrape(address: str) -> Samples:
    """Every sample of the node's /metrics, keyed by (sample name, sorted labels)."""
    status, body = http_get(address, "/metrics")
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def status_table(cluster: LocalCluster) -> dict[str, dict[str, str]]:
    """``raftchan status`` (run in this process) as its rows by node name."""
    result = CliRunner().invoke(cli, ["status", "--address", cluster.addresses])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if not line.startswith("leader:")]
    # Columns are separated by two spaces or more; no cell holds two spaces.
    header = [cell.strip() for cell in lines[0].split("  ") if cell.strip()]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.split("  ") if cell.strip()]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def is_healthy(address: str) -> Callable[[], bool]:
    return lambda: health(address)[0] == 200


def has_applied(address: str, index: float) -> Callable[[], bool]:
    return lambda: value(scrape(address), "raftchan_applied_index") >= index


def test_metrics_follow_appends_snapshots_and_waiting_readers(
    snapshotting: LocalCluster,
) -> None:
    observed = snapshotting
    addresses = http_addresses(observed)
    leader = observed.leader()
    assert leader is not None
    befores = [scrape(address) for address in addresses]
    before = befores[leader]
    assert value(before, "raftchan_role", role="leader") == 1
    assert value(before, "raftchan_pinned_futures") == 0  # no --dask-scheduler
    for i, address in enumerate(addresses):
        if i != leader:
            assert value(scrape(address), "raftchan_role", role="follower") == 1

    with raftchan.Client(observed.addresses) as client:
        chan = client.channel("metered")
        for i in range(200):
            chan.append({"i": i})
        chan.flush()

        after = scrape(addresses[leader])
        # Counted by whichever node led when each append committed (the leader, unless
        # an election happened meanwhile).
        appended = sum(
            value(scrape(a), "raftchan_appends_committed_total")
            - value(b, "raftchan_appends_committed_total")
            for a, b in zip(addresses, befores, strict=True)
        )
        assert appended >= 200
        assert value(after, "raftchan_commit_index") > value(before, "raftchan_commit_index")
        assert value(after, "raftchan_applied_index") > value(before, "raftchan_applied_index")
        assert value(after, "raftchan_channels") >= 1
        for histogram in ("raftchan_commit_batch_ops", "raftchan_apply_latency_seconds"):
            assert value(after, f"{histogram}_count") > value(before, f"{histogram}_count")
        # The open and at least one append request (the client sends many items in one)
        # went through the leader's group commit.
        ops = value(after, "raftchan_commit_batch_ops_sum")
        assert ops >= value(before, "raftchan_commit_batch_ops_sum") + 2
        for i in range(10):
            chan.put(i)  # one commit each: enough log entries for a snapshot
        wait_for(
            "a snapshot timed on some node",
            lambda: any(
                value(scrape(a), "raftchan_snapshot_duration_seconds_count") >= 1 for a in addresses
            ),
        )
        commit = value(scrape(addresses[leader]), "raftchan_commit_index")
        for address in addresses:
            wait_for(
                f"{address} applies up to {commit}",
                has_applied(address, commit),
            )

        # A reader following the channel waits in a long poll on some node.
        seen: list[Any] = []
        reader = threading.Thread(target=lambda: seen.extend(chan), daemon=True)
        reader.start()
        wait_for(
            "a waiting long poll",
            lambda: sum(value(scrape(a), "raftchan_waiting_polls") for a in addresses) >= 1,
        )
        chan.stop()
        reader.join(WAIT_TIMEOUT)
        assert not reader.is_alive()
        assert len(seen) == 210


def test_health_and_status_table_show_a_cut_off_node(observed: LocalCluster) -> None:
    addresses = http_addresses(observed)
    for address in addresses:
        wait_for(f"{address} healthy", is_healthy(address))
    status, body = health(addresses[0])
    assert {"name", "role", "ready", "leader_known", "term", "commit_index", "applied_index"} <= (
        body.keys()
    )
    assert body["name"] == "n1" and body["ready"] and body["leader_known"]

    leader = observed.leader()
    assert leader is not None
    cut = (leader + 1) % observed.size
    observed.isolate(cut)
    body = wait_for("503 from the cut-off node", lambda: _unhealthy(addresses[cut]))
    assert body["leader_known"] is False
    with raftchan.Client(observed.addresses) as client:
        chan = client.channel("while-cut")
        for i in range(10):
            chan.append(i)
            chan.flush()  # one Raft entry at least per flush: the cut-off node falls behind
    for i, address in enumerate(addresses):
        if i != cut:
            assert health(address)[0] == 200

    rows = status_table(observed)
    assert list(rows) == observed.names
    assert int(rows[observed.names[cut]]["LAG"]) >= 10
    assert rows[observed.names[leader]]["ROLE"] == "leader"
    for name, row in rows.items():
        assert row["CLIENT ADDRESS"] == observed.client_addresses[observed.names.index(name)]
        assert row["READY"] in ("yes", "no")

    observed.heal()
    for address in addresses:
        wait_for(f"{address} healthy after the heal", is_healthy(address))

    def caught_up() -> dict[str, dict[str, str]] | None:
        rows = status_table(observed)
        return rows if all(row["LAG"] == "0" for row in rows.values()) else None

    wait_for("every node at lag 0 in the status table", caught_up)


def _unhealthy(address: str) -> dict[str, Any] | None:
    status, body = health(address)
    return body if status == 503 else None


def test_json_logs_and_bad_http_requests(observed: LocalCluster) -> None:
    addresses = http_addresses(observed)
    address = addresses[0]
    assert http_get(address, "/nope")[0] == 404
    assert http_get(address, "/metrics", method="POST")[0] == 405
    host, port = split_address(address)
    for garbage in (
        b"\x00\x01\x02 not http at all\r\n\r\n",
        b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    ):
        with socket.create_connection((host, port), timeout=HTTP_TIMEOUT) as sock:
            sock.sendall(garbage)
            try:
                answer = sock.recv(4096)
            except OSError:  # refused by closing: fine too
                answer = b""
            assert not answer.startswith(b"HTTP/1.1 200"), answer
    # A request that never ends must not hold up the others.
    with socket.create_connection((host, port), timeout=HTTP_TIMEOUT) as stalled:
        stalled.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        wait_for("health while a request stalls", lambda: health(address)[0] == 200)
    with raftchan.Client(observed.addresses) as client:
        assert client.channel("after-garbage").put("still serving") == 0

    observed.stop()  # the logs then hold the shutdown lines too
    for name, text in observed.logs().items():
        records = []
        for line in text.splitlines():
            if not line.strip() or line.startswith("===== harness:"):
                continue
            records.append(json.loads(line))  # every line the node wrote is one JSON object
        assert records, f"node {name} logged nothing"
        for record in records:
            assert {"time", "level", "logger", "message", "node"} <= record.keys(), record
            assert record["node"] == name
        messages = [record["message"] for record in records]
        assert any(m.startswith(f"node {name} ready") for m in messages)
        assert any(m == f"node {name} stopped" for m in messages)
