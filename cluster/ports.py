"""Finding TCP ports on this machine that nothing listens on.

A port found free can be taken by another process before a node binds it; the window is
short and the harness reports a node that fails to bind through its log, so tests see a
clear failure rather than a hang.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time

#: ``raftchan up`` puts node i's Raft port this far above its client port.
RAFT_PORT_OFFSET = 100


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports on ``host`` that the kernel hands out as free right now.

    All sockets are bound at once so the kernel cannot hand out the same port twice.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(_family(host), socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a listener could bind ``host:port`` right now.

    Like the nodes' listeners, the probe sets SO_REUSEADDR: connections of a node killed a
    moment ago linger in TIME_WAIT on its ports and must not make them look taken.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_base_port(
    nodes: int,
    host: str = "127.0.0.1",
    *,
    offset: int = RAFT_PORT_OFFSET,
    low: int = 20_000,
    high: int = 30_000,
    timeout: float = 10.0,
) -> int:
    """A base port B such that B..B+nodes-1 and B+offset..B+offset+nodes-1 are all free.

    This is the port layout of ``raftchan up --base-port B``. Candidates are drawn at
    random from ``[low, high)`` so parallel test runs rarely collide. ``timeout`` bounds
    the search; TimeoutError if no candidate was found in that time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        base = random.randrange(low, high)
        wanted = [base + i for i in range(nodes)] + [base + offset + i for i in range(nodes)]
        if all(port_is_free(port, host) for port in wanted):
            return base
    raise TimeoutError(f"found no free block of ports for {nodes} nodes within {timeout} s")


def accepts_connections(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts a TCP connection on ``host:port``; ``timeout`` bounds the try."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
