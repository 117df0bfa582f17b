"""Configuration of one node, and the address helpers every entry point shares."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from raftchan import errors
from raftchan.compaction import DEFAULT_GROWTH, DEFAULT_MIN_BYTES
from raftchan.limits import DEFAULT_LIMITS, Limits

#: Environment variable holding the comma-separated client addresses of a cluster.
ADDRESS_ENV = "RAFTCHAN_ADDRESS"


# Defined with the other errors (every error derives from RaftchanError); the entry
# points import it from here.
ConfigError = errors.ConfigError


def split_address(address: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) to ``(host, port)``; ConfigError if malformed.

    ``allow_zero`` accepts port 0 (a listener that lets the system pick a free port).
    """
    host, sep, port = address.strip().rpartition(":")
    lowest = 0 if allow_zero else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ConfigError(f"address {address!r} is not HOST:PORT")
    if "/" in host:
        # tcp://H:P, as Dask writes its scheduler's address, would become a host name
        # that no resolver knows, and every call would wait out its timeout.
        raise ConfigError(f"address {address!r} is not HOST:PORT (no scheme or path)")
    return host.strip("[]"), int(port)


def parse_addresses(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Addresses from a comma-separated string or a list; ``None`` reads $RAFTCHAN_ADDRESS.

    Raises ConfigError when nothing is given anywhere or an entry is malformed.
    """
    if value is None:
        value = os.environ.get(ADDRESS_ENV) or _dask_config_address()
    if value is None:
        raise ConfigError(
            f"no cluster address: pass one, or set ${ADDRESS_ENV} "
            "(or the dask config key raftchan.address)"
        )
    items = value.split(",") if isinstance(value, str) else list(value)
    addresses = [item.strip() for item in items if item.strip()]
    if not addresses:
        raise ConfigError("the cluster address list is empty")
    for address in addresses:
        split_address(address)
    return addresses


def _dask_config_address() -> str | None:
    try:
        import dask.config
    except ImportError:  # dask is a dependency, but the client must not need it to start
        return None
    value = dask.config.get("raftchan.address", default=None)
    return value if isinstance(value, str) and value else None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RaftTuning:
    """Raft timing. Defaults suit a LAN: a leader whose process dies is replaced within
    0.1 s of its connections closing (measured 0.04-0.10 s from SIGKILL to the next
    acknowledged append on loopback, 0.18 s median within a full benchmark run); one cut
    off or hung without its connections closing, within an election timeout (clients
    leave it once a ping goes unanswered, ``RetryPolicy.probe_timeout``: 2.05-2.11 s
    from a SIGSTOP of the leader to the next acknowledged append). Raise the timeouts
    together for links with more latency or nodes prone to long pauses.

    ``min_timeout``/``max_timeout`` bound the randomised election timeout (seconds);
    ``append_entries_period`` is the heartbeat; ``leader_fallback_timeout`` is how long a
    leader that hears from no majority keeps believing it leads (it cannot commit
    anything meanwhile, so it cannot serve linearizable reads either);
    ``connection_retry`` is how soon a lost peer connection is dialled again.

    A snapshot is taken once the log holds ``compaction_growth`` times the last
    snapshot's bytes and also more than ``compaction_min_entries`` entries or
    ``compaction_min_bytes`` bytes; and ``compaction_min_time`` seconds after the last
    one whatever the log holds (see raftchan.compaction; a snapshot writes the items
    appended since the last one, raftchan.item_segments).
    """

    min_timeout: float = 0.3
    max_timeout: float = 0.6
    append_entries_period: float = 0.075
    leader_fallback_timeout: float = 2.0
    connection_retry: float = 0.3
    compaction_min_entries: int = 5000
    compaction_min_time: float = 300.0
    compaction_growth: float = DEFAULT_GROWTH
    compaction_min_bytes: int = DEFAULT_MIN_BYTES


@dataclass(frozen=True)
class NodeConfig:
    """Everything one node needs to start.

    Attributes:
        name: a label for logs and ``raftchan status``.
        client_address: ``HOST:PORT`` the client listener binds.
        peer_address: ``HOST:PORT`` this node's Raft port binds (and only that address).
        peers: the other nodes' Raft addresses.
        data_dir: where the journal, snapshot and meta files live.
        cluster_secret: pysyncobj's password: encrypts and authenticates Raft traffic.
            Required whenever the peer address is not loopback.
        fsync: ``"always"`` (default) fsyncs the journal before the node acknowledges an
            entry or sends any Raft message; ``"never"`` relies on the page cache (survives
            a process kill, not a power loss).
        dask_scheduler: address of the Dask scheduler whose futures this cluster keeps.
        record_synced: test aid; the journal records its last fsynced length beside it so
            a test can emulate power loss.
        fault_injection: test aid; the node obeys ``fault`` requests that cut its Raft
            traffic to chosen peers (network partitions on one machine).
        unsafe_local_reads: a deliberately broken build for testing the fault suite:
            ``data``/``len``/``read`` skip the read barrier, so a deposed leader serves
            stale reads. Never use it for anything else.
        http_address: ``HOST:PORT`` of the operators' HTTP endpoint (``/health``,
            ``/metrics``); ``None`` serves none. Port 0 picks a free port, which
            ``raftchan status --json`` reports as ``http_address``.
        tls_cert_file, tls_key_file: the client listener serves TLS with this certificate
            chain and key (both or neither).
        tokens: when not empty, a client's hello must carry one of these tokens, or the
            connection is refused before any request is read.
    """

    name: str
    client_address: str
    peer_address: str
    peers: tuple[str, ...]
    data_dir: Path
    cluster_secret: bytes | None = None
    fsync: str = "always"
    dask_scheduler: str | None = None
    limits: Limits = DEFAULT_LIMITS
    raft: RaftTuning = field(default_factory=RaftTuning)
    record_synced: bool = False
    fault_injection: bool = False
    unsafe_local_reads: bool = False
    http_address: str | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tokens: tuple[bytes, ...] = ()

    def validate(self) -> None:
        """Raise ConfigError for a configuration that is unsafe or cannot work."""
        for address in (self.client_address, self.peer_address, *self.peers):
            split_address(address)
        if self.http_address is not None:
            split_address(self.http_address, allow_zero=True)
        if self.peer_address in self.peers:
            raise ConfigError("--peers must list the OTHER nodes, not this node's own address")
        if self.fsync not in ("always", "never"):
            raise ConfigError("fsync must be 'always' or 'never'")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("--tls-cert-file and --tls-key-file go together: give both")
        hosts = [split_address(a)[0] for a in (self.peer_address, *self.peers)]
        if self.cluster_secret is None and not all(is_loopback(h) for h in hosts):
            raise ConfigError(
                "refusing to start: a non-loopback peer address needs a cluster secret "
                "(--cluster-secret-file); without it anyone who reaches the Raft port can "
                "join the cluster and run code on this node"
            )
