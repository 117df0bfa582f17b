"""LocalCluster: a real raftchan cluster of node processes on this machine, and its faults.

Every node is ``python -m raftchan node ...`` in a process group of its own, with its data
in ``base_dir/<name>/`` and its output in ``base_dir/<name>.log``. The harness only ever
signals processes it started, by pid, and :meth:`LocalCluster.close` must run in a
``finally`` (or fixture teardown) so that no node outlives its test::

    cluster = LocalCluster(3, base_dir=tmp_path)
    try:
        cluster.start()
        old = cluster.wait_ready(timeout=60)
        cluster.kill(old)
        new = cluster.wait_leader(timeout=30)
        cluster.restart(old)
        cluster.wait_ready(timeout=60)
    finally:
        cluster.close()
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import raftchan
from cluster.ports import RAFT_PORT_OFFSET, accepts_connections, free_ports, port_is_free
from cluster.process import NodeProcess, NodeSpec
from raftchan import protocol
from raftchan.cli import RAFT_TUNING_FLAGS
from raftchan.config import RaftTuning, split_address
from raftchan.errors import RaftchanError

#: Raft timing for tests: elections settle and lost peers are redialled in well under a
#: second, so a killed leader is replaced in about one second.
FAST_TUNING = RaftTuning(
    min_timeout=0.3,
    max_timeout=0.6,
    append_entries_period=0.05,
    leader_fallback_timeout=2.0,
    connection_retry=0.3,
)

#: Node flags for tests that need a growing state compacted every few entries: the
#: entry count alone starts a snapshot (see raftchan.compaction; by default a snapshot
#: also waits until the log holds half the last one's size).
COMPACTION_BY_ENTRIES_ALONE = ("--compaction-growth", "0")

_POLL_INTERVAL = 0.1


class ClusterNotReady(TimeoutError):
    """The cluster did not reach the awaited state before the deadline; the message says
    what was seen last."""


class NodeExited(RuntimeError):
    """A node the harness had not stopped exited on its own (its log says why)."""


class PortInUse(RuntimeError):
    """A node's port is taken by another process; the node was not started."""


def agreed_leader(statuses: Iterable[Mapping[str, Any]], cluster_size: int) -> str | None:
    """The client address of the leader a majority of the cluster agrees on, else None.

    A node votes for the leader it names (a leader names itself). The named node must
    also report ``role == "leader"`` itself, so a dead or deposed leader that the others
    still remember does not count.
    """
    statuses = list(statuses)
    votes: Counter[str] = Counter()
    for status in statuses:
        role = status.get("role")
        named = status.get("client_address") if role == "leader" else status.get("leader")
        if role in ("leader", "follower") and isinstance(named, str):
            votes[named] += 1
    majority = cluster_size // 2 + 1
    for address, count in votes.items():
        claims = any(
            s.get("role") == "leader" and s.get("client_address") == address for s in statuses
        )
        if count >= majority and claims:
            return address
    return None


class LocalCluster:
    """``n`` raftchan node processes on ``host``, started, broken and restarted on demand.

    Args:
        n: number of nodes (named n1..nN; methods take the 0-based index).
        base_dir: holds each node's data folder and log file; kept after :meth:`close`.
        host: loopback address every port binds.
        base_port: ``None`` picks free ports; otherwise node i uses client port
            ``base_port + i`` and Raft port ``base_port + 100 + i`` (``raftchan up``).
        tuning: Raft timing passed as flags to every node; ``None`` keeps the nodes'
            defaults. The default :data:`FAST_TUNING` suits tests.
        extra_args: more ``raftchan node`` arguments for every node (e.g. ``--fsync never``).
        log_level: the nodes' ``--log-level``.
        fault_injection: start the nodes with ``--fault-injection`` so that
            :meth:`partition` can cut their Raft traffic (test builds only).
        hosts: one address per node, in place of ``host`` for all (nodes in network
            namespaces of their own, say). Needs ``base_port``: free ports cannot be
            found on addresses this machine's own network does not hold.
        node_prefixes: per node, words put before its command, e.g. ``["ip", "netns",
            "exec", "ns1"]``. The prefix must exec the node (keep its pid) so that the
            harness's signals reach it. A prefixed node's ports are not checked before it
            starts: it may bind them in a network this process cannot see.
        env: environment variables for every node, on top of this process's own (e.g. the
            journal's ``RAFTCHAN_TEST_COMPACTION_PAUSE`` test aid). :meth:`set_node_env`
            changes one node's for its next start.

    Node indexes in the API are 0-based positions in :attr:`names`. Methods are not
    thread-safe. Network partitions (:meth:`partition`, :meth:`isolate`, :meth:`heal`)
    need ``fault_injection=True``, which starts the nodes with ``--fault-injection``.
    """

    def __init__(
        self,
        n: int = 3,
        base_dir: str | os.PathLike[str] = "raftchan-cluster",
        *,
        host: str = "127.0.0.1",
        base_port: int | None = None,
        tuning: RaftTuning | None = FAST_TUNING,
        extra_args: Sequence[str] = (),
        log_level: str = "INFO",
        env: Mapping[str, str] | None = None,
        fault_injection: bool = False,
        hosts: Sequence[str] | None = None,
        node_prefixes: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        node_hosts = [host] * n if hosts is None else list(hosts)
        prefixes = [[] for _ in range(n)] if node_prefixes is None else list(node_prefixes)
        if len(node_hosts) != n or len(prefixes) != n:
            raise ValueError("hosts and node_prefixes need one entry per node")
        if hosts is not None and base_port is None:
            raise ValueError("per-node hosts need a base_port")
        self.base_dir = Path(base_dir)
        self.host = host
        if base_port is None:
            ports = free_ports(2 * n, host)
            client_ports, raft_ports = ports[:n], ports[n:]
        else:
            client_ports = [base_port + i for i in range(n)]
            raft_ports = [base_port + RAFT_PORT_OFFSET + i for i in range(n)]
        specs = [
            NodeSpec(
                name=f"n{i + 1}",
                client_address=_join(node_hosts[i], client_ports[i]),
                raft_address=_join(node_hosts[i], raft_ports[i]),
                data_dir=self.base_dir / f"n{i + 1}",
                log_path=self.base_dir / f"n{i + 1}.log",
            )
            for i in range(n)
        ]
        self.fault_injection = fault_injection
        self._tuning = tuning
        self._extra_args = list(extra_args)
        self._log_level = log_level
        #: Nodes removed from the cluster for good: never started again (see retire()).
        self.retired: set[int] = set()
        self._closed = False
        self._cuts: dict[int, set[int]] = {}
        if fault_injection:
            extra_args = [*extra_args, "--fault-injection"]
        node_env = _node_environment()
        node_env.update(env or {})
        self._env = node_env
        self.nodes = [
            NodeProcess(
                spec,
                [*prefix, *_node_command(spec, specs, tuning, extra_args, log_level)],
                node_env,
            )
            for spec, prefix in zip(specs, prefixes, strict=True)
        ]
        self._unprobed = {i for i, prefix in enumerate(prefixes) if prefix}
        # Nodes the harness stopped on purpose; any other node that is not running crashed.
        self._stopped: set[int] = set(range(n))

    # -------------------------------------------------------------------------------------
    # Addresses and names

    @property
    def size(self) -> int:
        return len(self.nodes)

    @property
    def names(self) -> list[str]:
        return [node.spec.name for node in self.nodes]

    @property
    def client_addresses(self) -> list[str]:
        return [node.spec.client_address for node in self.nodes]

    @property
    def raft_addresses(self) -> list[str]:
        return [node.spec.raft_address for node in self.nodes]

    @property
    def addresses(self) -> str:
        """The client addresses as one comma-separated string (``$RAFTCHAN_ADDRESS`` form)."""
        return ",".join(self.client_addresses)

    def is_running(self, i: int) -> bool:
        """True while node ``i``'s process exists (paused counts as running)."""
        return self.nodes[i].running

    # -------------------------------------------------------------------------------------
    # Starting and waiting

    def start(self) -> LocalCluster:
        """Start every node that is not running. Returns the cluster, for chaining.

        Raises PortInUse, before starting any node, if one of their ports is taken:
        otherwise whatever listens there (another cluster, say) could answer for them.
        """
        self._check_not_closed()
        stopped = [
            i for i, node in enumerate(self.nodes) if not node.running and i not in self.retired
        ]
        for i in stopped:
            self._check_ports_free(i)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for i in stopped:
            self.nodes[i].start()
            self._stopped.discard(i)
        cut = [i for i in stopped if self._cuts.get(i)]
        if cut:
            self._apply_cuts(cut, 10.0)  # a partition outlives a restart
        return self

    def _check_not_closed(self) -> None:
        if self._closed:
            raise RuntimeError("this LocalCluster is closed: no node may start again")

    def _check_ports_free(self, i: int) -> None:
        if i in self._unprobed:
            return  # its ports may live in another network namespace
        spec = self.nodes[i].spec
        for address in (spec.client_address, spec.raft_address):
            host, port = split_address(address)
            if not port_is_free(port, host):
                raise PortInUse(f"node {spec.name} cannot start: {address} is in use")

    def status(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Each node's status, in node order, as ``raftchan.Client.status()`` reports it.

        Nodes that do not answer (stopped, paused) appear with ``role == "unreachable"``.
        ``timeout`` bounds each node's connect and answer; the nodes are asked together.
        """
        with raftchan.Client(self.addresses) as client:
            return [dict(entry) for entry in client.status(timeout=timeout)]

    def leader(self) -> int | None:
        """Index of the leader a majority of the cluster agrees on right now, else None."""
        return self._leader_index(self.status())

    def wait_ready(self, timeout: float = 60.0) -> int:
        """Wait until every node meant to run accepts client connections and a majority
        of the cluster agrees on one leader; returns the leader's index.

        ``timeout`` bounds the whole wait (start-up, election). Raises ClusterNotReady when
        it passes, and NodeExited at once if a node dies that the harness did not stop.
        """
        return self._wait_for_leader(timeout, every_port=True)

    def wait_leader(self, timeout: float = 30.0) -> int:
        """Wait until a majority agrees on a leader that is alive; returns its index.

        Use after killing or pausing the leader. ``timeout`` bounds the wait; raises
        ClusterNotReady when it passes, NodeExited if a node the harness did not stop dies.
        """
        return self._wait_for_leader(timeout, every_port=False)

    def _wait_for_leader(self, timeout: float, *, every_port: bool) -> int:
        deadline = time.monotonic() + timeout
        seen = "nothing yet"
        while True:
            self._raise_if_crashed()
            closed = self._closed_client_ports() if every_port else []
            if closed:
                seen = "client port not accepting on " + ", ".join(closed)
            else:
                try:
                    statuses = self.status()
                except (RaftchanError, OSError) as exc:
                    seen = f"status failed: {exc!r}"
                else:
                    index = self._leader_index(statuses)
                    if index is not None:
                        return index
                    seen = "no agreed leader; roles " + _roles(self.names, statuses)
            if time.monotonic() >= deadline:
                raise ClusterNotReady(f"cluster not ready after {timeout} s: {seen}")
            time.sleep(_POLL_INTERVAL)

    def _raise_if_crashed(self) -> None:
        for i, node in enumerate(self.nodes):
            if i not in self._stopped and not node.running:
                raise NodeExited(
                    f"node {node.spec.name} exited with status {node.returncode}; "
                    f"see {node.spec.log_path}"
                )

    def _closed_client_ports(self) -> list[str]:
        closed = []
        for i, node in enumerate(self.nodes):
            host, port = split_address(node.spec.client_address)
            if i not in self._stopped and not accepts_connections(host, port):
                closed.append(node.spec.name)
        return closed

    def _leader_index(self, statuses: Sequence[Mapping[str, Any]]) -> int | None:
        address = agreed_leader(statuses, self.size - len(self.retired))
        if address is None:
            return None
        if address in self.client_addresses:
            return self.client_addresses.index(address)
        # The node may spell its address differently (e.g. "localhost"): match its report.
        for i, status in enumerate(statuses):
            if status.get("client_address") == address and i < self.size:
                return i
        return None

    # -------------------------------------------------------------------------------------
    # Process faults

    def kill(self, i: int) -> int | None:
        """SIGKILL node ``i``'s process group (no clean shutdown) and reap it.

        Returns its exit status. Waits at most 10 s for the kernel to remove it.
        """
        self._stopped.add(i)
        return self.nodes[i].kill()

    def terminate(self, i: int, timeout: float = 10.0) -> int | None:
        """SIGTERM node ``i`` (clean shutdown); SIGKILL if it is still there after ``timeout``."""
        self._stopped.add(i)
        return self.nodes[i].terminate(timeout)

    def pause(self, i: int) -> None:
        """SIGSTOP node ``i``: its sockets stay open but it answers nothing (a hung node)."""
        self.nodes[i].pause()

    def resume(self, i: int) -> None:
        """SIGCONT node ``i`` after :meth:`pause`."""
        self.nodes[i].resume()
        if self.fault_injection:
            self._apply_cuts([i], 10.0)  # the partition may have changed while it slept

    def set_node_env(self, i: int, name: str, value: str | None) -> None:
        """Set (or with ``None`` remove) one environment variable of node ``i``.

        Takes effect at the node's next start: a running process keeps its environment.
        Lets a test arm a fault hook on one node only, or disarm it before a restart.
        """
        if value is None:
            self.nodes[i].env.pop(name, None)
        else:
            self.nodes[i].env[name] = value

    def restart(self, i: int, timeout: float = 10.0) -> None:
        """Start node ``i`` again on the same ports and data folder.

        A node still running is terminated first (``timeout`` bounds that, as in
        :meth:`terminate`). Does not wait for readiness: call :meth:`wait_ready`.
        """
        self._check_not_closed()
        node = self.nodes[i]
        if node.running:
            node.terminate(timeout)
        self._check_ports_free(i)
        node.start()
        self._stopped.discard(i)
        if self._cuts.get(i):
            self._apply_cuts([i], timeout)  # a partition outlives a restart

    def add_node(self, peers: Sequence[int] | None = None) -> int:
        """Start one more node (named n<size+1>) on free ports with an empty data folder;
        returns its index. It joins nothing by itself: add it with ``raftchan member add``
        (:meth:`raftchan.Client.add_member`), using its :attr:`raft_addresses` entry.

        ``peers`` are the indexes of the members it is told of (``--peers``); the default
        is every node not retired. Does not wait for readiness.
        """
        self._check_not_closed()
        i = self.size
        name = f"n{i + 1}"
        client_port, raft_port = free_ports(2, self.host)
        spec = NodeSpec(
            name=name,
            client_address=_join(self.host, client_port),
            raft_address=_join(self.host, raft_port),
            data_dir=self.base_dir / name,
            log_path=self.base_dir / f"{name}.log",
        )
        members = [j for j in range(self.size) if j not in self.retired] if peers is None else peers
        known = [self.nodes[j].spec for j in members]
        command = _node_command(
            spec, [*known, spec], self._tuning, self._extra_args, self._log_level
        )
        self.nodes.append(NodeProcess(spec, command, dict(self._env)))
        self._stopped.add(i)
        self.restart(i)
        return i

    def retire(self, i: int, timeout: float = 10.0) -> None:
        """Stop node ``i`` for good (SIGTERM, then SIGKILL after ``timeout``): a node removed
        from the cluster. :meth:`start`, :meth:`restart_all` and waits for a majority leave
        it out from then on."""
        self.retired.add(i)
        self.terminate(i, timeout)

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every node at the same moment (a whole-cluster crash), then reap them.

        ``timeout`` bounds the wait for all of them together.
        """
        self._stopped.update(range(self.size))
        for node in self.nodes:
            node.send_signal(signal.SIGKILL)
        self._reap_all(timeout)

    def restart_all(self, timeout: float = 10.0) -> None:
        """Start every node again together; running ones are terminated first (``timeout``)."""
        self.stop(timeout)
        self.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Shut every node down cleanly: SIGTERM all at once, SIGKILL those still there
        after ``timeout`` seconds."""
        self._stopped.update(range(self.size))
        for node in self.nodes:
            if node.send_signal(signal.SIGTERM):
                node.send_signal(signal.SIGCONT)  # a paused node must run to act on SIGTERM
        self._reap_all(timeout)

    def close(self) -> None:
        """SIGKILL whatever the harness started that still runs, and reap it. Idempotent.

        Data folders and logs stay in ``base_dir``. Afterwards nothing may start a node
        again: a fault thread still running would otherwise leave an orphan behind.
        """
        self._closed = True
        self.kill_all()

    def _reap_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.wait(deadline - time.monotonic()) is None and node.pid is not None:
                node.kill()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------
    # Logs

    def logs(self) -> dict[str, str]:
        """Each node's whole log (every start of it), by node name."""
        return {node.spec.name: node.log_text() for node in self.nodes}

    def log_tails(self, lines: int = 40) -> str:
        """The last ``lines`` lines of every node's log, each under a header naming the
        node, its state and its log file."""
        parts = []
        for node in self.nodes:
            tail = node.log_text().splitlines()[-lines:]
            parts.append(f"----- {node.spec.name} ({_describe(node)}): {node.spec.log_path} -----")
            parts.extend(tail or ["(empty)"])
        return "\n".join(parts)

    def dump_logs(self, lines: int = 40, file: IO[str] | None = None) -> None:
        """Print :meth:`log_tails` to ``file`` (default stdout)."""
        print(self.log_tails(lines), file=file or sys.stdout, flush=True)

    # -------------------------------------------------------------------------------------
    # Network faults
    #
    # A TCP proxy does not fit pysyncobj (nodes know each other by address and only one
    # side of each pair dials), so nodes started with ``fault_injection=True`` take
    # "fault" requests on their client port that make the replica's transport drop every
    # Raft message to chosen peers. A cut between two nodes is applied on both sides, so
    # neither hears the other; clients still reach every node, as in a real partition.

    def partition(self, groups: Sequence[Sequence[int]], timeout: float = 10.0) -> None:
        """Cut Raft traffic between nodes in different ``groups`` (nodes left out of every
        group form one more group). Replaces any earlier partition; :meth:`heal` ends it.

        Needs ``fault_injection=True``. ``timeout`` bounds telling each running node.
        """
        if not self.fault_injection:
            raise RuntimeError("partitions need LocalCluster(..., fault_injection=True)")
        side: dict[int, int] = {}
        for number, group in enumerate(groups):
            for i in group:
                side[i] = number
        for i in range(self.size):
            side.setdefault(i, len(groups))
        pairs = [(i, j) for i in range(self.size) for j in range(i) if side[i] != side[j]]
        self.cut_links(pairs, timeout)

    def cut_links(self, pairs: Iterable[tuple[int, int]], timeout: float = 10.0) -> None:
        """Cut Raft traffic between the two nodes of each pair, both ways; every other link
        works. Replaces any earlier partition: any shape can be drawn this way.

        Needs ``fault_injection=True``. ``timeout`` bounds telling each running node.
        """
        if not self.fault_injection:
            raise RuntimeError("partitions need LocalCluster(..., fault_injection=True)")
        cuts: dict[int, set[int]] = {i: set() for i in range(self.size)}
        for i, j in pairs:
            if i != j:
                cuts[i].add(j)
                cuts[j].add(i)
        self._cuts = cuts
        self._apply_cuts(range(self.size), timeout)

    def bridge(self, left: Sequence[int], right: Sequence[int], timeout: float = 10.0) -> None:
        """Cut ``left`` off from ``right``; nodes in neither group hear both sides (the
        bridge), as when one rack still reaches two others that lost each other."""
        self.cut_links([(i, j) for i in left for j in right], timeout)

    def isolate(self, i: int, timeout: float = 10.0) -> None:
        """Cut node ``i`` off from every other node (see :meth:`partition`)."""
        self.partition([[i]], timeout)

    def heal(self, timeout: float = 10.0) -> None:
        """End every partition: all nodes hear each other again."""
        if not self.fault_injection:
            return
        self._cuts = {}
        self._apply_cuts(range(self.size), timeout)

    @property
    def cuts(self) -> dict[int, set[int]]:
        """For each node, the nodes it cannot reach right now (empty when healed)."""
        return {i: set(self._cuts.get(i, ())) for i in range(self.size)}

    def _apply_cuts(self, nodes: Iterable[int], timeout: float) -> None:
        for i in nodes:
            node = self.nodes[i]
            if not node.running or node.paused:
                continue  # told again when it restarts; a paused node gets it on resume
            block = [self.nodes[j].spec.raft_address for j in sorted(self._cuts.get(i, ()))]
            send_fault(node.spec.client_address, block, timeout)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _node_command(
    spec: NodeSpec,
    specs: Sequence[NodeSpec],
    tuning: RaftTuning | None,
    extra_args: Sequence[str],
    log_level: str,
) -> list[str]:
    peers = ",".join(other.raft_address for other in specs if other is not spec)
    command = [
        sys.executable, "-m", "raftchan", "node",
        "--name", spec.name,
        "--client-address", spec.client_address,
        "--peer-address", spec.raft_address,
        "--peers", peers,
        "--data-dir", str(spec.data_dir),
        "--log-level", log_level,
    ]  # fmt: skip
    if tuning is not None:
        for field_name, flag in RAFT_TUNING_FLAGS.items():
            command += [flag, str(getattr(tuning, field_name))]
    return command + list(extra_args)


def _node_environment() -> dict[str, str]:
    env = dict(os.environ)
    # Node output goes to a file: unbuffered, so a log tail shows the last words of a
    # killed node.
    env["PYTHONUNBUFFERED"] = "1"
    # Run the very raftchan this process imported, even from a checkout not installed.
    source_root = str(Path(list(raftchan.__path__)[0]).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    return env


def _describe(node: NodeProcess) -> str:
    if node.pid is None:
        return "never started"
    if node.running:
        return f"pid {node.pid}, paused" if node.paused else f"pid {node.pid}, running"
    return f"pid {node.pid}, exited with status {node.returncode}"


def _roles(names: Sequence[str], statuses: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(
        f"{name}={status.get('role')}/term {status.get('term')}"
        for name, status in zip(names, statuses, strict=False)
    )


def send_fault(address: str, block: Sequence[str], timeout: float) -> None:
    """Tell the node at client ``address`` to drop its Raft traffic to ``block``.

    Retries until the node answers (it may be starting up) or ``timeout`` passes, then
    raises :class:`ClusterNotReady`.
    """
    host, port = split_address(address)
    request = protocol.Fault(1, list(block)).to_wire()
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2.0) as sock:
                sock.sendall(protocol.encode_frame(protocol.hello_request()))
                protocol.check_hello(receive_message(sock))
                sock.sendall(protocol.encode_frame(request))
                answer = receive_message(sock)
            error = protocol.response_error(answer)
            if error is None:
                return
            last = error
        except (OSError, RaftchanError) as exc:
            last = exc
        time.sleep(_POLL_INTERVAL)
    raise ClusterNotReady(f"node at {address} did not take the fault request: {last}")


def receive_message(sock: socket.socket) -> dict[str, Any]:
    """Read one frame from a blocking socket (bounded by the socket's own timeout)."""
    decoder = protocol.FrameDecoder()
    while True:
        for message in decoder.messages():
            return message
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the node closed the connection")
        decoder.feed(data)
