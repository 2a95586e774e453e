"""Two aggregator replicas on one JetStream stream (real nats-server): every sample batch goes to
exactly one of them, both decode what they get (each has every dictionary), none is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.publish.publisher import Publisher
from agent.settings import AgentSettings
from aggregator.service import run_aggregator
from aggregator.settings import AggregatorSettings
from shared.counters import Counters
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer
from tests.test_export_durability import PERIOD, cpu_samples, wait_for


async def test_two_replicas_share_samples_and_both_have_every_dictionary(tmp_path: Path) -> None:
    with NatsServer() as nats:
        nats_settings = NatsSettings(url=nats.url)
        replicas = [Counters(), Counters()]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(run_aggregator(
            AggregatorSettings(nats=nats_settings, otlp_endpoint="", output_dir=tmp_path / f"r{i}",
                               export_interval_s=0.5), stop, c)) for i, c in enumerate(replicas)]
        agent_counters = Counters()
        publishers = [Publisher(AgentSettings(nats=nats_settings, host_name=f"host-{i}"), agent_counters)
                      for i in range(3)]
        for p in publishers:
            await p.start()
        for _ in range(40):
            for p in publishers:
                await p.submit(ProfileType.CPU, cpu_samples(10), PERIOD)
            await asyncio.sleep(0.02)
        for p in publishers:
            await p.close()
        published = agent_counters.get("samples_published")
        assert published == 3 * 40 * 10
        assert await wait_for(lambda: sum(c.get("samples_received") for c in replicas) >= published, 30)
        stop.set()
        await asyncio.gather(*tasks)
    received = [c.get("samples_received") for c in replicas]
    assert sum(received) == published, received  # each batch exactly once
    assert all(r > 0 for r in received), f"one replica got no samples: {received}"
    assert all(c.get("messages_dropped") == 0 and c.get("messages_rejected") == 0 for c in replicas)
