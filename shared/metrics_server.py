"""A tiny HTTP endpoint for ``/metrics`` (Prometheus text) and ``/healthz``.

Hand-written on asyncio streams on purpose: two GET routes do not justify a web framework
in the agent (which runs on every host), and it keeps everything on the one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("stackfleet.metrics")


class MetricsServer:
    """Serves ``render_metrics()`` at /metrics and ``health()`` (ok, detail) at /healthz."""

    def __init__(self, host: str, port: int, render_metrics: Callable[[], str],
                 health: Callable[[], tuple[bool, str]]) -> None:
        self.host, self.port = host, port
        self.render_metrics = render_metrics
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
                status, body, ctype = "200 OK", self.render_metrics(), "text/plain; version=0.0.4"
            elif path.startswith("/healthz"):
                ok, detail = self.health()
                status, body, ctype = ("200 OK" if ok else "503 Service Unavailable"), detail + "\n", "text/plain"
            else:
                status, body, ctype = "404 Not Found", "not found\n", "text/plain"
            data = body.encode()
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
