"""The ``/metrics`` (Prometheus text, rendered by prometheus-client) and ``/healthz`` endpoint.

The exposition format comes from prometheus-client: every stackfleet counter becomes a
``counter`` family ``<namespace>_<name>_total`` with HELP and TYPE lines, and the library's
process collector adds ``process_*`` (CPU seconds, resident memory, open file descriptors).
The HTTP side stays on asyncio streams on purpose: two GET routes do not justify a web
framework in the agent (which runs on every host), and it keeps the endpoint on the one
event loop (prometheus-client's own server would add a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from shared.counters import Counters

log = logging.getLogger(__name__)


class CountersCollector(Collector):
    """Presents a :class:`Counters` as Prometheus counter families, read at each scrape."""

    def __init__(self, counters: Counters, namespace: str) -> None:
        self.counters = counters
        self.namespace = namespace

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for name, labels, value in self.counters.series():
            family = families.get(name)
            if family is None:
                full = f"{self.namespace}_{name}"
                # One counter may be incremented with different label sets (e.g. with and
                # without ``reason``): samples are added one by one, not through a fixed label list.
                family = families[name] = Metric(full, f"stackfleet counter {name.replace('_', ' ')}", "counter")
            family.add_sample(f"{family.name}_total", dict(labels), float(value))
        yield from families.values()


def metrics_registry(counters: Counters, namespace: str) -> CollectorRegistry:
    """A registry with the counters and the process metrics (its own, not the library's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CountersCollector(counters, namespace))
    ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """Serves ``registry`` at /metrics and ``health()`` (ok, detail) at /healthz."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 health: Callable[[], tuple[bool, str]]) -> None:
        self.host, self.port = host, port
        self.registry = registry
        self.health = health
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            first = request.split(b"\r\n", 1)[0].decode("latin-1").split()
            path = first[1] if len(first) >= 2 else "/"
            if path.startswith("/metrics"):
                # generate_latest reads /proc/self (a few small files): cheap enough for the loop.
                status, data, ctype = "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
            elif path.startswith("/healthz"):
                ok, detail = self.health()
                status = "200 OK" if ok else "503 Service Unavailable"
                data, ctype = (detail + "\n").encode(), "text/plain"
            else:
                status, data, ctype = "404 Not Found", b"not found\n", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``":port"``) -> (host, port); host defaults to loopback."""
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)
