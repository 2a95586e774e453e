"""Agent and aggregator started before NATS: they wait for it instead of exiting, the agent
keeps its batches meanwhile, and everything arrives once the server comes up."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from agent.publish.publisher import Publisher
from agent.settings import AgentSettings
from aggregator.service import run_aggregator
from aggregator.settings import AggregatorSettings
from shared.counters import Counters
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer, free_port
from stackfleet.top import NatsUnreachable, run_top
from tests.test_export_durability import PERIOD, cpu_samples, wait_for


async def test_services_started_before_nats_wait_for_it_and_lose_nothing(tmp_path: Path) -> None:
    port = free_port()
    settings = NatsSettings(url=f"nats://127.0.0.1:{port}")
    switch_interval = sys.getswitchinterval()
    agent_counters, agg_counters = Counters(), Counters()
    stop = asyncio.Event()
    aggregator = asyncio.create_task(run_aggregator(
        AggregatorSettings(nats=settings, otlp_endpoint="", output_dir=tmp_path / "out", export_interval_s=0.5,
                           web_address=""), stop, agg_counters))
    publisher = Publisher(AgentSettings(nats=settings, host_name="early"), agent_counters)
    await asyncio.wait_for(publisher.start(), 5)  # returns although nothing listens on the port
    for _ in range(10):  # sampled while NATS is not there
        await publisher.submit(ProfileType.CPU, cpu_samples(10), PERIOD)
    await asyncio.sleep(2.0)
    assert not aggregator.done(), "the aggregator gave up on NATS"
    assert agent_counters.get("nats_errors") > 0 and agg_counters.get("nats_errors") > 0  # counted attempts
    assert agent_counters.get("samples_published") == 0 and agent_counters.get("samples_dropped") == 0
    with NatsServer(port=port):
        assert await wait_for(lambda: agent_counters.get("samples_published") == 100, 30), agent_counters.snapshot()
        assert await wait_for(lambda: agg_counters.get("samples_received") == 100, 30), agg_counters.snapshot()
        assert sys.getswitchinterval() == 0.0005  # while it runs (aggregator/gil_policy.py)
        await publisher.close()
        stop.set()
        await asyncio.wait_for(aggregator, 30)
    assert sys.getswitchinterval() == switch_interval  # an embedding process gets its own back


async def test_an_aggregator_stopped_before_nats_ever_came_returns() -> None:
    settings = NatsSettings(url=f"nats://127.0.0.1:{free_port()}")
    stop = asyncio.Event()
    task = asyncio.create_task(run_aggregator(AggregatorSettings(nats=settings, otlp_endpoint="", web_address=""),
                                              stop, Counters()))
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_top_says_nats_is_unreachable_instead_of_waiting() -> None:
    settings = NatsSettings(url=f"nats://127.0.0.1:{free_port()}", connect_timeout_s=0.5)
    with pytest.raises(NatsUnreachable, match="is nats-server"):
        await asyncio.wait_for(run_top(settings, ProfileType.CPU, None, 5, 5.0, asyncio.Event()), 10)
