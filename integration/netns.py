"""A multi-host test bed on one machine: network namespaces on a bridge, and a NATS cluster.

Each "host" is a network namespace with its own address on a Linux bridge in the root
namespace (veth pairs), so its agent reaches NATS over a real network path and sees only
its own network. The kernel is shared, which is why agents here run with
``process_scope=network_namespace`` (each keeps only its own host's processes).

The NATS cluster is three real nats-server processes with routes between them and clustered
JetStream, listening on the bridge address: agents get all three URLs and fail over.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from stackfleet.nats_server import find_nats_server, free_port


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class NetnsTestBed:
    """``n_hosts`` namespaces ``<prefix>-hN`` at 10.<net>.0.(10+N) on bridge ``<prefix>br``."""

    n_hosts: int = 3
    prefix: str = field(default_factory=lambda: "sf" + secrets.token_hex(2))
    net: int = field(default_factory=lambda: 100 + secrets.randbelow(100))
    hosts: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (where the NATS cluster listens)."""
        return f"10.{self.net}.0.1"

    def address(self, host: str) -> str:
        return f"10.{self.net}.0.{10 + self.hosts.index(host)}"

    def create(self) -> NetnsTestBed:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.n_hosts):
            ns, veth = f"{self.prefix}-h{i}", f"{self.prefix}v{i}"
            _ip("netns", "add", ns)
            self.hosts.append(ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"10.{self.net}.0.{10 + i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def destroy(self) -> None:
        for i, ns in enumerate(self.hosts):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", f"{self.prefix}v{i}")
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.bridge)
        self.hosts.clear()

    def popen(self, host: str, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside ``host``'s network namespace (only that namespace changes).

        Not ``ip netns exec``: it also remounts /sys for the namespace, which hides tracefs
        and debugfs from the agent.
        """
        return subprocess.Popen(["nsenter", f"--net=/var/run/netns/{host}", "--", *argv],  # type: ignore[call-overload]
                                **kwargs)

    def __enter__(self) -> NetnsTestBed:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


@dataclass
class NatsNode:
    name: str
    address: str
    client_port: int
    cluster_port: int
    monitor_port: int
    store_dir: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.address}:{self.client_port}"


@dataclass
class NatsCluster:
    """Three (or ``size``) clustered nats-servers with JetStream, on ``address``."""

    address: str
    size: int = 3
    nodes: list[NatsNode] = field(default_factory=list)
    work_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="stackfleet-nats-cluster-"))

    @property
    def urls(self) -> str:
        """All client URLs, comma separated (the form NatsSettings.url takes)."""
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout_s: float = 30.0) -> NatsCluster:
        for i in range(self.size):
            store = os.path.join(self.work_dir, f"n{i}")
            Path(store).mkdir(parents=True, exist_ok=True)
            self.nodes.append(NatsNode(f"n{i}", self.address, free_port(self.address),
                                       free_port(self.address), free_port(self.address), store))
        for node in self.nodes:
            self.start_node(node)
        self.wait_ready(timeout_s)
        return self

    def start_node(self, node: NatsNode) -> None:
        routes = ",".join(f"nats://{n.address}:{n.cluster_port}" for n in self.nodes if n is not node)
        args = [find_nats_server(), "-a", node.address, "-p", str(node.client_port),
                "-m", str(node.monitor_port), "-n", node.name, "--cluster_name", "stackfleet",
                "--cluster", f"nats://{node.address}:{node.cluster_port}", "--routes", routes,
                "-js", "-sd", node.store_dir]
        log = open(os.path.join(self.work_dir, f"{node.name}.log"), "ab")  # noqa: SIM115 (child keeps it)
        node.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        """Until every live node answers /healthz?js-enabled-only... and JetStream has a leader."""
        import urllib.request

        deadline = time.monotonic() + timeout_s
        pending = [n for n in self.nodes if n.process and n.process.poll() is None]
        while pending and time.monotonic() < deadline:
            node = pending[0]
            try:
                with urllib.request.urlopen(f"http://{node.address}:{node.monitor_port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        pending.pop(0)
                        continue
            except OSError:
                pass
            time.sleep(0.2)
        if pending:
            raise TimeoutError(f"NATS nodes not healthy within {timeout_s}s: {[n.name for n in pending]}")

    def kill(self, node: NatsNode) -> None:
        """Hard stop, as a crashed node."""
        if node.process and node.process.poll() is None:
            node.process.kill()
            node.process.wait()

    def stop(self) -> None:
        for node in self.nodes:
            if node.process and node.process.poll() is None:
                node.process.terminate()
                try:
                    node.process.wait(5)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
