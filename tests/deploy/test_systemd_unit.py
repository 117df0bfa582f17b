"""The systemd unit's ExecStart line, run as it is, starts a working cluster.

Three nodes are started with the unit's own command line; only the two paths that are
machine-specific are moved (the installed program, the config file), and each node's
config is deploy/systemd/node.toml with its addresses and folders changed to loopback
ports and the test's folder. The cluster must elect a leader, keep an appended item,
answer on its health endpoint, and stop cleanly on the unit's KillSignal within its
TimeoutStopSec.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import raftchan
from cluster.ports import free_ports
from cluster.process import NodeProcess, NodeSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # the backport raftchan itself uses on 3.10
    import tomli as tomllib

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNIT_FILE = SYSTEMD / "raftchan.service"
SAMPLE_CONFIG = SYSTEMD / "node.toml"

READY_TIMEOUT = 60.0
CLIENT_TIMEOUT = 30.0


def unit_settings() -> dict[str, str]:
    """The [Service] section's ``Key=value`` lines (the unit sets each key once)."""
    settings: dict[str, str] = {}
    section = None
    for raw in UNIT_FILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return str(value)


def node_configs(tmp_path: Path) -> list[Path]:
    """The sample config, once per node, with loopback addresses and the test's folders."""
    sample = tomllib.loads(SAMPLE_CONFIG.read_text())
    secret = tmp_path / "cluster.secret"
    secret.write_text("a shared secret for this test only\n")
    ports = free_ports(9)
    raft = [f"127.0.0.1:{port}" for port in ports[3:6]]
    paths = []
    for i in range(3):
        values = dict(sample)
        values |= {
            "name": f"node-{'abc'[i]}",
            "client-address": f"127.0.0.1:{ports[i]}",
            "peer-address": raft[i],
            "peers": [address for j, address in enumerate(raft) if j != i],
            "http-address": f"127.0.0.1:{ports[6 + i]}",
            "data-dir": str(tmp_path / f"node-{i}" / "data"),
            "cluster-secret-file": str(secret),
        }
        assert values.keys() == sample.keys(), "the sample config lost or gained a key"
        path = tmp_path / f"node-{i}.toml"
        path.write_text("".join(f"{key} = {toml_value(v)}\n" for key, v in values.items()))
        paths.append(path)
    return paths


def exec_start_for(config: Path) -> list[str]:
    """The unit's ExecStart with this environment's raftchan and ``config`` in place."""
    argv = shlex.split(unit_settings()["ExecStart"])
    program = Path(argv[0])
    assert program.name == "raftchan"
    at = argv.index("--config")
    argv[at + 1] = str(config)
    # The installed console script, as the unit's /opt/raftchan/venv/bin/raftchan is.
    return [str(Path(sys.executable).parent / "raftchan"), *argv[1:]]


@pytest.fixture(name="unit_nodes")
def unit_nodes_fixture(tmp_path: Path) -> Iterator[tuple[list[NodeProcess], list[dict]]]:
    configs = node_configs(tmp_path)
    values = [tomllib.loads(path.read_text()) for path in configs]
    nodes = []
    for path, config in zip(configs, values, strict=True):
        spec = NodeSpec(
            name=config["name"],
            client_address=config["client-address"],
            raft_address=config["peer-address"],
            data_dir=Path(config["data-dir"]),
            log_path=path.with_suffix(".log"),
        )
        nodes.append(NodeProcess(spec, exec_start_for(path), env={"PATH": "/usr/bin:/bin"}))
    try:
        for node in nodes:
            node.start()
        yield nodes, values
    finally:
        for node in nodes:
            node.kill()


def wait_for_leader(addresses: list[str], nodes: list[NodeProcess]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    seen: Any = None
    with raftchan.Client(addresses, timeout=CLIENT_TIMEOUT) as client:
        while time.monotonic() < deadline:
            for node in nodes:
                assert node.running, f"{node.spec.name} exited:\n{node.spec.log_path.read_text()}"
            seen = client.status(timeout=2.0)
            if sum(entry.get("role") == "leader" for entry in seen) == 1 and all(
                entry.get("ready") for entry in seen
            ):
                return
            time.sleep(0.2)
    raise AssertionError(f"no leader within {READY_TIMEOUT} s: {seen}")


@pytest.mark.timeout(180)
def test_three_nodes_started_by_the_units_command_line_form_a_working_cluster(
    unit_nodes: tuple[list[NodeProcess], list[dict]],
) -> None:
    nodes, configs = unit_nodes
    addresses = [config["client-address"] for config in configs]
    wait_for_leader(addresses, nodes)

    with raftchan.Client(addresses, timeout=CLIENT_TIMEOUT) as client:
        chan = client.channel("from-systemd")
        chan.append({"started": "by the unit"})
        chan.flush()
        assert list(chan.data) == [{"started": "by the unit"}]

    for config in configs:
        url = f"http://{config['http-address']}/health"
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.status == 200

    settings = unit_settings()
    stop_signal = getattr(signal, settings["KillSignal"])
    stop_timeout = float(settings["TimeoutStopSec"])
    for node in nodes:
        node.send_signal(stop_signal)
    for node in nodes:
        assert node.wait(stop_timeout) == 0, node.spec.log_path.read_text()
