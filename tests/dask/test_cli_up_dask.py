"""``raftchan up --dask``: a local Dask scheduler and workers beside the nodes, and the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster.ports import free_base_port

#: Bounds the whole run: Dask start-up, three node start-ups, an election, both demos, stop.
UP_TIMEOUT = 180.0


def test_up_dask_runs_the_future_demo(tmp_path: Path) -> None:
    base = free_base_port(3)
    data_dir = tmp_path / "data"
    command = [sys.executable, "-m", "raftchan", "up", "--dask", "--base-port", str(base)]
    command += ["--data-dir", str(data_dir), "--exit-after-demo"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=UP_TIMEOUT, stdin=subprocess.DEVNULL
    )
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, report
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith("DASK_SCHEDULER_ADDRESS=tcp://")], report
    assert "demo: another Dask client reads it back: result() = 42" in lines, report


def test_up_refuses_both_dask_options(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "raftchan", "up", "--dask", "--dask-scheduler", "tcp://x:1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--dask" in done.stderr
