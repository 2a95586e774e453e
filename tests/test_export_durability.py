"""The aggregator across a collector outage: intake goes on, local files get every export, and
the collector gets the queued exports once it is up — real nats-server, real gRPC server,
a real agent publisher fed synthetic samples (no BPF needed for this)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from agent.publish.publisher import Publisher
from agent.settings import AgentSettings
from aggregator.otlp.decode import merge_request
from aggregator.profile import FleetProfiles
from aggregator.service import run_aggregator
from aggregator.settings import AggregatorSettings
from shared.counters import Counters
from shared.model import Frame, FrameType, Sample
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer, free_port
from tests.otlp_server import OtlpTestServer

PERIOD = 10_101_010


def cpu_samples(n: int) -> list[Sample]:
    frames = (Frame("leaf", "app.c", 3, 0x1000, FrameType.NATIVE), Frame("main", "app.c", 9, 0x2000, FrameType.NATIVE))
    now = time.time_ns()
    return [Sample(now + i, 0, 42, 42, "w", "app", frames, (PERIOD,)) for i in range(n)]


def samples_in(request: ExportProfilesServiceRequest) -> int:
    fleet = FleetProfiles(start_ns=0, end_ns=0)
    merge_request(fleet, request, ProfileType.CPU)
    return sum(len(s.timestamps_ns) for p in fleet.hosts.values() for s in p.samples.values())


async def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def test_collector_outage_costs_no_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")  # each failed attempt gives up sooner
    otlp_port = free_port()
    counters, agent_counters = Counters(), Counters()
    with NatsServer() as nats:
        nats_settings = NatsSettings(url=nats.url)
        settings = AggregatorSettings(nats=nats_settings, otlp_endpoint=f"http://127.0.0.1:{otlp_port}",
                                      output_dir=tmp_path, export_interval_s=0.5, max_export_queue=100)
        stop = asyncio.Event()
        aggregator = asyncio.create_task(run_aggregator(settings, stop, counters))
        publisher = Publisher(AgentSettings(nats=nats_settings, host_name="synthetic"), agent_counters)
        await publisher.start()

        async def feed(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                await publisher.submit(ProfileType.CPU, cpu_samples(20), PERIOD)
                await asyncio.sleep(0.2)

        await feed(4.0)  # collector down
        assert await wait_for(lambda: counters.get("otlp_exports", result="failed") >= 1, 30), counters.snapshot()
        received_while_down = counters.get("samples_received")
        assert received_while_down > 0, "intake stopped while the collector was down"
        assert counters.get("otlp_exports", result="ok") == 0
        with OtlpTestServer(otlp_port) as collector:
            await feed(2.0)
            await publisher.close()
            published = agent_counters.get("samples_published")
            assert await wait_for(lambda: counters.get("samples_received") >= published, 30)
            exported = counters.get("exports")
            assert await wait_for(lambda: len(collector.requests) >= exported, 60), counters.snapshot()
            stop.set()
            await asyncio.wait_for(aggregator, 60)
            requests = list(collector.requests)
    assert counters.get("exports_dropped") == 0
    files = sorted(tmp_path.glob("*.otlp.pb"))
    assert len(files) == counters.get("exports") == len(requests)
    from_files = 0
    for f in files:
        req = ExportProfilesServiceRequest()
        req.ParseFromString(f.read_bytes())
        from_files += samples_in(req)
    assert from_files == published == sum(samples_in(r) for r in requests) == agent_counters.get("samples_encoded")


async def test_core_nats_mode_without_jetstream_still_delivers(tmp_path: Path) -> None:
    """``nats.jetstream = false`` against a server without JetStream: the plain subscriptions."""
    counters, agent_counters = Counters(), Counters()
    with NatsServer(jetstream=False) as nats:
        nats_settings = NatsSettings(url=nats.url, jetstream=False)
        stop = asyncio.Event()
        aggregator = asyncio.create_task(run_aggregator(
            AggregatorSettings(nats=nats_settings, otlp_endpoint="", output_dir=None, export_interval_s=0.5),
            stop, counters))
        await asyncio.sleep(0.5)  # core NATS keeps nothing for late subscribers
        publisher = Publisher(AgentSettings(nats=nats_settings, host_name="core"), agent_counters)
        await publisher.start()
        for _ in range(5):
            await publisher.submit(ProfileType.CPU, cpu_samples(20), PERIOD)
        await publisher.close()
        assert await wait_for(lambda: counters.get("samples_received") >= 100, 30), counters.snapshot()
        stop.set()
        await asyncio.wait_for(aggregator, 30)
    assert agent_counters.get("samples_published") == counters.get("samples_received") == 100
