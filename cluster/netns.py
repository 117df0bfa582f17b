"""Hosts on one Linux machine: network namespaces on a private bridge, and cutting them off.

Each :class:`Host` is a network namespace with one veth link to a bridge in this
process's own namespace, and one address of a private /24 on it. The bridge holds the
subnet's first address, so this process (the test, the harness) reaches every host too.
Cutting a host sets the bridge end of its veth down: its packets then vanish silently,
both ways, as when a machine's cable is pulled; its processes keep running. Needs root
and iproute2 (``ip``); :func:`namespaces_unavailable` says whether they are here::

    network = VirtualNetwork()
    try:
        network.create()
        a, b = network.add_host("a"), network.add_host("b")
        network.run(a, ["ip", "-brief", "addr"], timeout=10)
        network.cut(b)
        network.restore(b)
    finally:
        network.destroy()

Everything is named with a random suffix (interface names stay within Linux's 15
characters), so runs at the same time do not meet; :meth:`VirtualNetwork.destroy` removes
exactly what this object made. Processes started in a host are the caller's to stop.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

#: The /24 networks tried in turn for a new :class:`VirtualNetwork`: private, and unlikely
#: to be used by anything else; one already routed here (by another run) is skipped.
CANDIDATE_SUBNETS = tuple(f"10.213.{third}.0/24" for third in range(77, 93))

#: Bound on each ``ip`` command; they normally take milliseconds.
IP_TIMEOUT = 10.0

#: Linux's limit on the length of an interface name.
IFNAME_MAX = 15


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message holds the command and what it printed."""


def ip(*args: str, timeout: float = IP_TIMEOUT) -> str:
    """Run ``ip ARGS``; its standard output. NetnsError if it fails or outlives ``timeout``."""
    command = ["ip", *args]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(command)}: {exc}") from exc
    if done.returncode != 0:
        raise NetnsError(
            f"{' '.join(command)} exited with status {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()}"
        )
    return done.stdout


def namespaces_unavailable() -> str | None:
    """None if this process can create network namespaces, else why not.

    Finds out by creating one (and deleting it at once), not by guessing from the user
    id: a container may refuse root, and a capability may allow it without root.
    """
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"rcprobe{secrets.token_hex(4)}"
    try:
        ip("netns", "add", name)
    except NetnsError as exc:
        return f"cannot create a network namespace ({exc})"
    try:
        ip("netns", "delete", name)
    except NetnsError as exc:
        return f"created a network namespace but could not delete it ({exc})"
    return None


@dataclass(frozen=True)
class Host:
    """One namespace on the bridge: ``address`` is its only address besides loopback,
    on the interface ``eth0`` inside it; ``veth`` is the bridge end of its link."""

    label: str
    namespace: str
    address: str
    veth: str

    def prefix(self) -> list[str]:
        """Words that run a command in this host: ``ip netns exec NAMESPACE``.

        ``ip netns exec`` execs the command, so the pid a caller sees is the command's.
        """
        return ["ip", "netns", "exec", self.namespace]


class VirtualNetwork:
    """A bridge in this namespace and hosts (network namespaces) attached to it.

    Args:
        subnets: /24 networks to try, in order; the first that nothing here routes yet
            is used. :attr:`subnet` is the chosen one once :meth:`create` returns.
        tag: up to four letters or digits at the start of every name made, to tell
            whose they are.

    Not thread-safe. Every name made is recorded before anything else can fail, so
    :meth:`destroy` finds it.
    """

    def __init__(self, subnets: Sequence[str] = CANDIDATE_SUBNETS, tag: str = "rc") -> None:
        if not (tag.isalnum() and tag.isascii() and len(tag) <= 4):
            raise ValueError("tag must be at most 4 ASCII letters or digits")
        self.subnets = list(subnets)
        self.tag = tag
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: list[Host] = []
        # Six hex digits: the longest name, tag + "v" + suffix + host number, stays
        # within Linux's 15 characters for up to 999 hosts.
        self._suffix = secrets.token_hex(3)
        self._bridge_made = False
        self._namespaces: list[str] = []
        self._veths: list[str] = []

    @property
    def bridge(self) -> str:
        """The bridge's interface name."""
        return f"{self.tag}br{self._suffix}"

    @property
    def gateway(self) -> str:
        """This namespace's address on the bridge (the subnet's first address)."""
        return str(self._network().network_address + 1)

    def create(self) -> VirtualNetwork:
        """Make the bridge, up, with :attr:`gateway` on it. Returns self, for chaining.

        Tries each of ``subnets`` in turn and takes one no other interface here holds
        (checked again after taking it, so that two runs starting together do not share
        one). NetnsError if none is free or ``ip`` fails; call :meth:`destroy` either way.
        """
        # STP off and no forwarding delay: a port brought back up forwards at once.
        ip("link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self._bridge_made = True
        ip("link", "set", self.bridge, "up")
        for candidate in self.subnets:
            network = ipaddress.IPv4Network(candidate)
            if _routed_here(network):
                continue
            self.subnet = network
            ip("addr", "add", f"{self.gateway}/{network.prefixlen}", "dev", self.bridge)
            if not _routed_here(network, besides=self.bridge):
                return self
            # Another run took it at the same moment: leave it to that run.
            ip("addr", "flush", "dev", self.bridge)
            self.subnet = None
        raise NetnsError(f"every candidate subnet is in use here: {', '.join(self.subnets)}")

    def add_host(self, label: str) -> Host:
        """A new namespace, linked to the bridge, with the next free address; loopback and
        its link are up. ``label`` (a few letters) goes into its names."""
        network = self._network()
        number = len(self.hosts) + 1
        # .1 is the gateway; hosts get .11, .12, ... so addresses read as host numbers.
        address = str(network.network_address + 10 + number)
        namespace = f"{self.tag}{self._suffix}-{label}"
        veth = f"{self.tag}v{self._suffix}{number}"
        if len(veth) > IFNAME_MAX:
            raise NetnsError(f"too many hosts: interface name {veth!r} would be too long")
        ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        # The namespace end is made inside the namespace, so its name cannot clash here.
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        self._veths.append(veth)
        ip("link", "set", veth, "master", self.bridge, "up")
        ip("-n", namespace, "addr", "add", f"{address}/{network.prefixlen}", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        host = Host(label=label, namespace=namespace, address=address, veth=veth)
        self.hosts.append(host)
        return host

    def host(self, label: str) -> Host:
        """The host added with ``label``; KeyError if there is none."""
        for host in self.hosts:
            if host.label == label:
                return host
        raise KeyError(label)

    def run(
        self, host: Host, command: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in ``host`` to its end (at most ``timeout`` seconds, then
        TimeoutExpired); its status and output, which the caller checks."""
        return subprocess.run(
            [*host.prefix(), *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def cut(self, host: Host) -> None:
        """Cut ``host`` off: every packet to or from it is dropped, silently, until
        :meth:`restore`. Its processes and their sockets live on."""
        ip("link", "set", host.veth, "down")

    def restore(self, host: Host) -> None:
        """Undo :meth:`cut`: ``host`` is on the bridge again."""
        ip("link", "set", host.veth, "up")

    def is_cut(self, host: Host) -> bool:
        """True while ``host``'s link to the bridge is down."""
        links = json.loads(ip("-j", "link", "show", "dev", host.veth))
        return "UP" not in links[0].get("flags", [])

    def destroy(self, timeout: float = 30.0) -> None:
        """Remove every veth, namespace and the bridge this object made. Idempotent.

        Tries every removal even when one fails, then raises NetnsError naming what was
        left behind. Stop the processes started in the hosts first: a namespace with
        processes still in it is unnamed here but lives on until they exit. ``timeout``
        bounds the wait for the kernel to drop the interfaces.
        """
        problems: list[str] = []
        links = [*self._veths, *([self.bridge] if self._bridge_made else [])]
        namespaces = list(self._namespaces)
        for veth in list(self._veths):
            # Deleting one end of a veth deletes the other, inside its namespace.
            if _link_exists(veth):
                _collect(problems, "link", "delete", veth)
            self._veths.remove(veth)
        for namespace in list(self._namespaces):
            _collect(problems, "netns", "delete", namespace)
            self._namespaces.remove(namespace)
        if self._bridge_made:
            _collect(problems, "link", "delete", self.bridge)
            self._bridge_made = False
        deadline = time.monotonic() + timeout
        while True:
            left = [name for name in links if _link_exists(name)]
            left += sorted(set(namespaces) & _namespace_names())
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if left:
            problems.append(f"still present after {timeout} s: {', '.join(left)}")
        if problems:
            raise NetnsError("cleaning up the virtual network: " + "; ".join(problems))

    def describe(self) -> str:
        """Each host's label, namespace, address and whether it is cut: for failure reports."""
        gateway = self.gateway if self.subnet is not None else "none"
        lines = [f"bridge {self.bridge}, subnet {self.subnet}, gateway {gateway}"]
        for host in self.hosts:
            state = "cut" if _link_exists(host.veth) and self.is_cut(host) else "linked"
            lines.append(f"{host.label}: {host.address} in {host.namespace} ({state})")
        return "\n".join(lines)

    def __enter__(self) -> VirtualNetwork:
        return self.create()

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def _network(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise RuntimeError("the network has no subnet yet: call create() first")
        return self.subnet


def _routed_here(network: ipaddress.IPv4Network, besides: str | None = None) -> bool:
    """True if an address of this namespace on any interface but ``besides`` lies in
    ``network``, or a route other than the default (through any interface but
    ``besides``) covers part of it."""
    for link in json.loads(ip("-j", "-4", "addr", "show")):
        if link.get("ifname") == besides:
            continue
        for info in link.get("addr_info", []):
            interface = ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
            if interface.network.overlaps(network):
                return True
    for route in json.loads(ip("-j", "-4", "route", "show", "table", "all")):
        destination = route.get("dst", "default")
        if destination == "default" or route.get("dev") == besides:
            continue
        if ipaddress.IPv4Network(destination, strict=False).overlaps(network):
            return True
    return False


def _link_exists(name: str) -> bool:
    try:
        ip("link", "show", "dev", name)
    except NetnsError:
        return False
    return True


def _namespace_names() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def _collect(problems: list[str], *args: str) -> None:
    try:
        ip(*args)
    except NetnsError as exc:
        problems.append(str(exc))
