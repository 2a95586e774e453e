"""The metrics/health endpoint answers real HTTP requests; /metrics is read back with
prometheus-client's own text parser (what a Prometheus scrape would see)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from shared.counters import Counters
from shared.metrics_server import MetricsServer, metrics_registry


async def fetch(port: int, path: str) -> tuple[str, str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = (await reader.read()).decode()
    writer.close()
    head, _, body = data.partition("\r\n\r\n")
    return head.split("\r\n", 1)[0], head, body


def own_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_metrics_parse_as_prometheus_text_and_health() -> None:
    counters = Counters()
    counters.inc("samples_collected", 5, type="cpu")
    counters.inc("events_dropped", 2, type="cpu", reason="ringbuf_full")
    counters.inc("events_dropped", 1)  # the same counter without labels
    healthy = [True]
    server = MetricsServer("127.0.0.1", 0, metrics_registry(counters, "stackfleet_agent"),
                           lambda: (healthy[0], "actors: cpu=running"))
    await server.start()
    try:
        status, head, body = await fetch(server.port, "/metrics")
        assert "200" in status and f"Content-Type: {CONTENT_TYPE_LATEST}" in head
        families = {f.name: f for f in text_string_to_metric_families(body)}
        collected = families["stackfleet_agent_samples_collected"]
        assert collected.type == "counter" and "samples collected" in collected.documentation
        assert [(s.name, s.labels, s.value) for s in collected.samples] == [
            ("stackfleet_agent_samples_collected_total", {"type": "cpu"}, 5.0)]
        dropped = families["stackfleet_agent_events_dropped"]
        assert dropped.type == "counter"
        assert sorted((tuple(sorted(s.labels.items())), s.value) for s in dropped.samples) == [
            ((), 1.0), ((("reason", "ringbuf_full"), ("type", "cpu")), 2.0)]
        assert "# HELP stackfleet_agent_samples_collected_total" in body
        assert "# TYPE stackfleet_agent_samples_collected_total counter" in body
        # process metrics from the library's process collector: this very process
        rss = families["process_resident_memory_bytes"].samples[0].value
        assert 0.5 * own_rss_bytes() < rss < 2 * own_rss_bytes()
        fds = families["process_open_fds"].samples[0].value
        assert abs(fds - len(os.listdir("/proc/self/fd"))) <= 2  # the listing itself opens one

        counters.inc("samples_collected", 3, type="cpu")  # read at every scrape
        _, _, body = await fetch(server.port, "/metrics")
        again = {f.name: f for f in text_string_to_metric_families(body)}
        assert again["stackfleet_agent_samples_collected"].samples[0].value == 8.0

        status, _, body = await fetch(server.port, "/healthz")
        assert "200" in status and "cpu=running" in body
        healthy[0] = False
        status, _, _ = await fetch(server.port, "/healthz")
        assert "503" in status
        status, _, _ = await fetch(server.port, "/nope")
        assert "404" in status
    finally:
        await server.close()
