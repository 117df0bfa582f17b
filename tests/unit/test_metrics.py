"""Metrics, the health rule, the HTTP endpoint, JSON log lines and the status table.

The endpoint is tornado on a real loopback socket; group-commit figures come from the real
Committer over the real state machine (the Raft step is the only thing left out).
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import io
import json
import logging
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from raftchan.cli import format_table, lags
from raftchan.committer import Committer
from raftchan.config import ConfigError, NodeConfig, split_address
from raftchan.http_endpoint import HttpEndpoint, health_report
from raftchan.limits import DEFAULT_LIMITS
from raftchan.logs import JsonFormatter, configure_logging
from raftchan.metrics import NodeMetrics, NodeSample
from raftchan.state import ChannelState, Result

#: Bounds one HTTP request in these tests.
HTTP_TIMEOUT = 5.0
#: Bounds each test's event loop run.
TEST_TIMEOUT = 30.0

SAMPLE = NodeSample(
    name="n1",
    client_address="127.0.0.1:7101",
    raft_address="127.0.0.1:7201",
    role="follower",
    term=4,
    commit_index=120,
    applied_index=118,
    ready=True,
    leader_known=True,
    leader="127.0.0.1:7102",
    channels=3,
    sessions=2,
    waiting_polls=5,
    pinned_futures=7,
)


def run(test: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(test, TEST_TIMEOUT))


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


# -- metrics -----------------------------------------------------------------------------


def test_gauges_are_read_from_the_sample_at_each_scrape() -> None:
    current = [SAMPLE]
    metrics = NodeMetrics(lambda: current[0], process=False)

    seen = samples(metrics)
    assert seen[("raftchan_commit_index", ())] == 120
    assert seen[("raftchan_applied_index", ())] == 118
    assert seen[("raftchan_term", ())] == 4
    assert seen[("raftchan_channels", ())] == 3
    assert seen[("raftchan_sessions", ())] == 2
    assert seen[("raftchan_waiting_polls", ())] == 5
    assert seen[("raftchan_pinned_futures", ())] == 7
    assert seen[("raftchan_ready", ())] == 1
    assert seen[("raftchan_leader_known", ())] == 1
    assert seen[("raftchan_role", (("role", "follower"),))] == 1
    assert seen[("raftchan_role", (("role", "leader"),))] == 0
    info = (
        ("client_address", "127.0.0.1:7101"),
        ("name", "n1"),
        ("raft_address", "127.0.0.1:7201"),
    )
    assert seen[("raftchan_node_info", info)] == 1

    current[0] = dataclasses.replace(SAMPLE, role="leader", commit_index=130, ready=False)
    seen = samples(metrics)
    assert seen[("raftchan_commit_index", ())] == 130
    assert seen[("raftchan_ready", ())] == 0
    assert seen[("raftchan_role", (("role", "leader"),))] == 1
    assert seen[("raftchan_role", (("role", "follower"),))] == 0


def test_each_node_has_a_registry_of_its_own() -> None:
    first = NodeMetrics(lambda: SAMPLE, process=False)
    second = NodeMetrics(lambda: SAMPLE, process=False)
    first.count_appends(3)
    first.count_appends(0)
    first.observe_snapshot(0.25)

    assert samples(first)[("raftchan_appends_committed_total", ())] == 3
    assert samples(second)[("raftchan_appends_committed_total", ())] == 0
    assert samples(first)[("raftchan_snapshot_duration_seconds_count", ())] == 1
    assert samples(first)[("raftchan_snapshot_duration_seconds_sum", ())] == 0.25
    assert ("process_cpu_seconds_total", ()) not in samples(first)


def test_process_metrics_are_included_by_default() -> None:
    assert ("process_cpu_seconds_total", ()) in samples(NodeMetrics(lambda: SAMPLE))


def test_group_commit_batches_and_apply_latency_are_observed() -> None:
    run(_group_commit_batches_and_apply_latency_are_observed())


async def _group_commit_batches_and_apply_latency_are_observed() -> None:
    state = ChannelState()
    loop = asyncio.get_running_loop()
    held: list[tuple[bytes, asyncio.Future[list[Result]]]] = []

    def replicate(command: bytes, timeout: float) -> asyncio.Future[list[Result]]:
        # Commands commit when the test says so, so that later ops pile up into one batch.
        future: asyncio.Future[list[Result]] = loop.create_future()
        held.append((command, future))
        return future

    def commit_held() -> None:
        for command, future in held:
            future.set_result(state.apply(command))
        held.clear()

    metrics = NodeMetrics(lambda: SAMPLE, process=False)
    committer: Committer
    submit = metrics.instrument_submit(replicate, lambda: committer.ops_submitted)
    committer = Committer(submit, DEFAULT_LIMITS, max_inflight=1)

    first = committer.submit_op(["open", "c", None])  # submitted at once, alone
    rest = [committer.submit_op(["open", f"c{i}", None]) for i in range(5)]  # wait: one batch
    commit_held()
    await first
    commit_held()
    await asyncio.gather(*rest)

    seen = samples(metrics)
    assert seen[("raftchan_commit_batch_ops_count", ())] == 2
    assert seen[("raftchan_commit_batch_ops_sum", ())] == 6
    assert seen[("raftchan_commit_batch_ops_bucket", (("le", "1.0"),))] == 1
    assert seen[("raftchan_commit_batch_ops_bucket", (("le", "8.0"),))] == 2
    assert seen[("raftchan_commit_batch_bytes_count", ())] == 2
    assert seen[("raftchan_apply_latency_seconds_count", ())] == 2


def test_a_failed_commit_is_not_counted_as_applied() -> None:
    run(_a_failed_commit_is_not_counted_as_applied())


async def _a_failed_commit_is_not_counted_as_applied() -> None:
    loop = asyncio.get_running_loop()

    def refuse(command: bytes, timeout: float) -> asyncio.Future[list[Result]]:
        future: asyncio.Future[list[Result]] = loop.create_future()
        future.set_exception(RuntimeError("no leader"))
        return future

    metrics = NodeMetrics(lambda: SAMPLE, process=False)
    committer: Committer
    committer = Committer(
        metrics.instrument_submit(refuse, lambda: committer.ops_submitted), DEFAULT_LIMITS
    )
    with pytest.raises(RuntimeError):
        await committer.submit_op(["open", "c", None])
    seen = samples(metrics)
    assert seen[("raftchan_commit_batch_ops_count", ())] == 1
    assert seen[("raftchan_apply_latency_seconds_count", ())] == 0


# -- health ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ready", "leader_known", "expected"),
    [(True, True, 200), (False, True, 503), (True, False, 503), (False, False, 503)],
)
def test_health_needs_a_ready_node_that_hears_its_leader(
    ready: bool, leader_known: bool, expected: int
) -> None:
    status, body = health_report(
        dataclasses.replace(SAMPLE, ready=ready, leader_known=leader_known)
    )
    assert status == expected
    assert body == {
        "name": "n1",
        "role": "follower",
        "ready": ready,
        "leader_known": leader_known,
        "leader": "127.0.0.1:7102",
        "term": 4,
        "commit_index": 120,
        "applied_index": 118,
    }


# -- the HTTP endpoint -------------------------------------------------------------------


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[HttpEndpoint, list[NodeSample]]]:
    """An endpoint on a free loopback port serving the sample in the yielded list."""
    current = [SAMPLE]
    metrics = NodeMetrics(lambda: current[0], process=False)
    endpoint = HttpEndpoint("127.0.0.1:0", sample=lambda: current[0], render=metrics.render)
    endpoint.start()
    try:
        yield endpoint, current
    finally:
        await endpoint.close()


async def get(address: str, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    def request() -> tuple[int, str, bytes]:
        host, port = split_address(address)
        connection = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type") or "", response.read()
        finally:
            connection.close()

    # In a thread: the endpoint answers on this test's own loop.
    return await asyncio.to_thread(request)


def test_endpoint_serves_health_and_metrics() -> None:
    run(_endpoint_serves_health_and_metrics())


async def _endpoint_serves_health_and_metrics() -> None:
    async with serving() as (server, current):
        assert server.bound_address is not None
        assert split_address(server.bound_address)[1] != 0

        status, content_type, body = await get(server.bound_address, "/health")
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body)["commit_index"] == 120

        current[0] = dataclasses.replace(SAMPLE, leader_known=False)
        status, _, body = await get(server.bound_address, "/health")
        assert status == 503
        assert json.loads(body)["leader_known"] is False

        status, content_type, body = await get(server.bound_address, "/metrics")
        assert status == 200
        assert content_type.startswith("text/plain")
        assert b"raftchan_leader_known 0.0" in body


def test_endpoint_refuses_what_it_does_not_serve() -> None:
    run(_endpoint_refuses_what_it_does_not_serve())


async def _endpoint_refuses_what_it_does_not_serve() -> None:
    async with serving() as (server, _):
        assert server.bound_address is not None
        assert (await get(server.bound_address, "/"))[0] == 404
        assert (await get(server.bound_address, "/health/x"))[0] == 404
        assert (await get(server.bound_address, "/health", method="DELETE"))[0] == 405

        def send_garbage() -> bytes:
            host, port = split_address(server.bound_address or "")
            with socket.create_connection((host, port), timeout=HTTP_TIMEOUT) as sock:
                sock.sendall(b"\xff\xfe garbage\r\n\r\n")
                try:
                    return sock.recv(4096)
                except OSError:
                    return b""

        answer = await asyncio.to_thread(send_garbage)
        assert not answer.startswith(b"HTTP/1.1 200")
        assert (await get(server.bound_address, "/health"))[0] == 200


def test_endpoint_reports_a_taken_port() -> None:
    run(_endpoint_reports_a_taken_port())


async def _endpoint_reports_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = HttpEndpoint(
            f"127.0.0.1:{port}", sample=lambda: SAMPLE, render=lambda: (b"", "text/plain")
        )
        with pytest.raises(OSError):
            endpoint.start()
        await endpoint.close()


def test_http_address_may_ask_for_any_free_port() -> None:
    base = NodeConfig("n1", "127.0.0.1:1", "127.0.0.1:2", ("127.0.0.1:3",), data_dir=Path("."))
    dataclasses.replace(base, http_address="127.0.0.1:0").validate()
    with pytest.raises(ConfigError):
        dataclasses.replace(base, http_address="nowhere").validate()
    with pytest.raises(ConfigError):
        dataclasses.replace(base, client_address="127.0.0.1:0").validate()


# -- JSON log lines ----------------------------------------------------------------------


def test_json_log_lines_hold_one_record_each() -> None:
    formatter = JsonFormatter("n7")
    logger = logging.getLogger("raftchan.test")
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        record = logger.makeRecord(
            "raftchan.test", logging.ERROR, __file__, 1, "failed %s", ("twice",), _exc_info()
        )
    line = formatter.format(record)

    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "raftchan.test"
    assert entry["message"] == "failed twice"
    assert entry["node"] == "n7"
    assert entry["time"].endswith("+00:00")
    assert "ValueError: broken\nacross lines" in entry["exception"]


def _exc_info() -> Any:
    import sys

    return sys.exc_info()


def test_configure_logging_switches_the_root_handler() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        configure_logging("WARNING", "json", "n2")
        stream = io.StringIO()
        [handler] = root.handlers
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        logging.getLogger("raftchan.x").warning("hello %d", 5)
        logging.getLogger("raftchan.x").info("not shown")
        assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == [
            "hello 5"
        ]
        with pytest.raises(ValueError):
            configure_logging("INFO", "xml")
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        logging.captureWarnings(False)


# -- the status table ----------------------------------------------------------------------


def test_status_table_shows_each_node_and_its_lag() -> None:
    nodes: list[dict[str, Any]] = [
        {"name": "n1", "client_address": "127.0.0.1:1", "role": "follower", "term": 3,
         "commit_index": 7, "applied_index": 4, "ready": True},
        {"name": "n2", "client_address": "127.0.0.1:2", "role": "leader", "term": 3,
         "commit_index": 9, "applied_index": 9, "ready": True},
        {"name": "n3", "client_address": "127.0.0.1:3", "role": "candidate", "term": 5,
         "commit_index": 2, "applied_index": 2, "ready": False},
        {"client_address": "127.0.0.1:4", "role": "unreachable"},
    ]  # fmt: skip

    assert lags(nodes) == [5, 0, 7, None]
    table = format_table(nodes).splitlines()
    assert table[0].split() == [
        "NAME", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG", "READY", "CLIENT", "ADDRESS",
    ]  # fmt: skip
    assert table[1].split() == ["n1", "follower", "3", "7", "4", "5", "yes", "127.0.0.1:1"]
    assert table[3].split() == ["n3", "candidate", "5", "2", "2", "7", "no", "127.0.0.1:3"]
    assert table[4].split() == ["-", "unreachable", "-", "-", "-", "-", "-", "127.0.0.1:4"]


def test_lag_is_unknown_without_a_leader_and_never_negative() -> None:
    follower = {"role": "follower", "commit_index": 5, "applied_index": 5}
    assert lags([follower, follower]) == [None, None]
    old = {"role": "leader", "term": 1, "commit_index": 3, "applied_index": 3}
    new = {"role": "leader", "term": 2, "commit_index": 6, "applied_index": 6}
    ahead = {"role": "follower", "commit_index": 8, "applied_index": 8}
    assert lags([old, new, ahead]) == [3, 0, 0]
