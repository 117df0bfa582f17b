"""``raftchan up`` as a person runs it: a real subprocess, real nodes, the demo, a clean exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster.ports import accepts_connections, free_base_port

#: Bounds the whole run: three node start-ups, an election, the demo and the shutdown.
UP_TIMEOUT = 180.0


def log_tails(data_dir: Path) -> str:
    parts = []
    for log in sorted(data_dir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-40:]
        parts.append(f"----- {log.name} -----\n" + "\n".join(lines))
    return "\n".join(parts)


def test_up_starts_a_cluster_runs_the_demo_and_stops(tmp_path: Path) -> None:
    base = free_base_port(3)
    data_dir = tmp_path / "data"
    command = [sys.executable, "-m", "raftchan", "up", "--nodes", "3", "--base-port", str(base)]
    command += ["--data-dir", str(data_dir), "--exit-after-demo"]

    done = subprocess.run(
        command, capture_output=True, text=True, timeout=UP_TIMEOUT, stdin=subprocess.DEVNULL
    )

    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}\n{log_tails(data_dir)}"
    assert done.returncode == 0, report
    lines = done.stdout.splitlines()
    expected = ",".join(f"127.0.0.1:{base + i}" for i in range(3))
    address_lines = [line for line in lines if line.startswith("RAFTCHAN_ADDRESS=")]
    assert address_lines == [f"RAFTCHAN_ADDRESS={expected}"], report
    assert "demo: list(chan.data) = ['hello', {'x': 123}, [1, 2, 3]]" in lines, report
    heads = [
        i for i, line in enumerate(lines) if line.startswith("demo: a client given only follower")
    ]
    assert len(heads) == 1, report
    assert lines[heads[0] + 1 : heads[0] + 4] == ["  'hello'", "  {'x': 123}", "  [1, 2, 3]"], (
        report
    )
    # Every node was stopped: nothing listens on the client or Raft ports any more.
    ports = [base + i for i in range(3)] + [base + 100 + i for i in range(3)]
    assert not [port for port in ports if accepts_connections("127.0.0.1", port)], report
    assert sorted(path.name for path in data_dir.iterdir()) == [
        "n1", "n1.log", "n2", "n2.log", "n3", "n3.log",
    ]  # fmt: skip
