"""The metrics/health endpoint answers real HTTP requests."""

from __future__ import annotations

import asyncio

from shared.counters import Counters
from shared.metrics_server import MetricsServer


async def fetch(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = (await reader.read()).decode()
    writer.close()
    head, _, body = data.partition("\r\n\r\n")
    return head.split("\r\n", 1)[0], body


async def test_metrics_and_health() -> None:
    counters = Counters()
    counters.inc("samples_collected", 5, type="cpu")
    counters.inc("events_dropped", 2, type="cpu", reason="ringbuf_full")
    healthy = [True]
    server = MetricsServer("127.0.0.1", 0, lambda: counters.prometheus("stackfleet_agent"),
                           lambda: (healthy[0], "actors: cpu=running"))
    await server.start()
    try:
        status, body = await fetch(server.port, "/metrics")
        assert "200" in status
        assert 'stackfleet_agent_samples_collected{type="cpu"} 5' in body
        assert 'stackfleet_agent_events_dropped{reason="ringbuf_full",type="cpu"} 2' in body
        status, body = await fetch(server.port, "/healthz")
        assert "200" in status and "cpu=running" in body
        healthy[0] = False
        status, _ = await fetch(server.port, "/healthz")
        assert "503" in status
        status, _ = await fetch(server.port, "/nope")
        assert "404" in status
    finally:
        await server.close()
