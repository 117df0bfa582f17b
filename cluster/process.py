"""One node's operating-system process, as the harness starts, signals and reaps it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeSpec:
    """Where one node lives: its name, its two addresses, its data folder and its log file."""

    name: str
    client_address: str
    raft_address: str
    data_dir: Path
    log_path: Path


class NodeProcess:
    """A node process started in a process group of its own.

    Signals go to the whole group (``killpg``), so whatever the node starts goes with
    it, and a terminal's Ctrl-C reaches only the program that owns the harness, which then
    stops its nodes itself.

    Signals are sent only while the harness has not yet reaped the node: until then its
    pid, and so its group id, cannot have been handed to another process. Once reaped,
    every signalling method does nothing. Not thread-safe: drive it from one thread.
    """

    def __init__(self, spec: NodeSpec, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.spec = spec
        self.command = list(command)
        self.env = dict(env)
        self.paused = False
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the current (or last) process, ``None`` before the first start."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the process exists (a paused process is running)."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last process once it ended; negative: killed by that signal."""
        return None if self._process is None else self._process.poll()

    def start(self) -> None:
        """Start the node, its output appended to its log file. Raises if already running."""
        if self.running:
            raise RuntimeError(f"node {self.spec.name} is already running (pid {self.pid})")
        self.spec.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.spec.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            header = f"===== harness: start {self.starts} of {self.spec.name} at {stamp} =====\n"
            log.write(header.encode())
            log.flush()
            # The child keeps its own copy of the log descriptor; ours closes right here.
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.paused = False

    def send_signal(self, sig: int) -> bool:
        """Send ``sig`` to the node's process group; False if the node was already reaped."""
        process = self._process
        if process is None or process.returncode is not None:
            return False
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group emptied between our check and the signal
            return False
        return True

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the process to end; its exit status, or None."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return None

    def kill(self, timeout: float = 10.0) -> int | None:
        """SIGKILL the node's group and reap it; ``timeout`` bounds the wait for the exit.

        Returns the exit status (None if it never ran); TimeoutError if it outlived the wait.
        """
        if self._process is None:
            return None
        self.send_signal(signal.SIGKILL)
        code = self.wait(timeout)
        if code is None:
            raise TimeoutError(
                f"node {self.spec.name} (pid {self.pid}) survived SIGKILL for {timeout} s"
            )
        self.paused = False
        return code

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the node (its clean shutdown); SIGKILL it if it is still there after ``timeout``.

        Returns the exit status (None if it never ran).
        """
        if self._process is None:
            return None
        if self.send_signal(signal.SIGTERM):
            # A stopped process only acts on SIGTERM once it runs again.
            self.send_signal(signal.SIGCONT)
        code = self.wait(timeout)
        if code is None:
            return self.kill()
        self.paused = False
        return code

    def pause(self) -> None:
        """SIGSTOP the node's group: it keeps its sockets but answers nothing."""
        if not self.send_signal(signal.SIGSTOP):
            raise RuntimeError(f"node {self.spec.name} is not running")
        self.paused = True

    def resume(self) -> None:
        """SIGCONT the node's group after :meth:`pause`."""
        if not self.send_signal(signal.SIGCONT):
            raise RuntimeError(f"node {self.spec.name} is not running")
        self.paused = False

    def log_text(self) -> str:
        """Everything the node wrote to its log file so far (all its starts)."""
        try:
            return self.spec.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
