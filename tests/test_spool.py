"""The agent's optional disk spool: bounded like the memory outbox, and what it holds when the
agent stops with NATS away is delivered, in order, by the next agent start (real nats-server)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from agent.publish.disk_outbox import DiskOutbox
from agent.publish.memory_outbox import Outgoing
from agent.publish.publisher import Publisher
from agent.settings import AgentSettings
from shared.counters import Counters
from shared.model import Frame, FrameType, Sample
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer


def outgoing(n: int, size: int = 100) -> Outgoing:
    return Outgoing("cpu", "s", bytes([n % 256]) * size, f"id-{n}", 10)


def test_spool_is_bounded_ordered_and_survives_reopening(tmp_path: Path) -> None:
    counters = Counters()
    spool = DiskOutbox(tmp_path, max_messages=3, max_bytes=1_000_000, counters=counters)
    for i in range(5):
        spool.append(outgoing(i))
    assert len(spool) == 3 and counters.get("samples_dropped", type="cpu", reason="outgoing_queue_full") == 20
    head = spool.pop()
    assert head.msg_id == "id-2"
    spool.push_back(head)  # a failed publish returns to the front
    assert spool.shutdown() == 0  # nothing dropped: it stays on disk
    again = DiskOutbox(tmp_path, max_messages=3, max_bytes=250, counters=counters)
    assert len(again) == 3 and again.bytes == 300
    assert counters.get("spooled_messages_recovered") == 3
    again.append(outgoing(5))  # over 250 bytes: the two oldest go
    assert [again.pop().msg_id for _ in range(len(again))] == ["id-4", "id-5"]
    again.shutdown()


def cpu_samples(n: int) -> list[Sample]:
    frames = (Frame("leaf", "app.c", 3, 0x1000, FrameType.NATIVE),)
    now = time.time_ns()
    return [Sample(now + i, 0, 7, 7, "w", "app", frames, (10_000_000,)) for i in range(n)]


async def stored_msg_ids(url: str) -> list[str]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe("stackfleet.v1.>", stream="STACKFLEET", config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
    ids: list[str] = []
    try:
        while True:
            ids += [(m.headers or {}).get("Nats-Msg-Id", "") for m in await sub.fetch(100, timeout=1)]
    except TimeoutError:
        pass
    await nc.close()
    return ids


async def test_spooled_messages_are_sent_by_the_next_agent_start(tmp_path: Path) -> None:
    store, spool_dir = tmp_path / "js", tmp_path / "spool"
    server = NatsServer(store_dir=str(store)).start()
    settings = AgentSettings(nats=NatsSettings(url=server.url), host_name="spooler", spool_dir=spool_dir)
    first = Publisher(settings, Counters())
    await first.start()
    await first.submit(ProfileType.CPU, cpu_samples(5), 10_000_000)
    while len(first.outbox):  # delivered while NATS is up
        await asyncio.sleep(0.05)
    await asyncio.to_thread(server.stop)
    for _ in range(3):  # NATS away: these wait in the spool
        await first.submit(ProfileType.CPU, cpu_samples(5), 10_000_000)
    await first.close(timeout_s=1.0)
    assert first.counters.get("messages_dropped") == 0

    server = NatsServer(port=server.port, store_dir=str(store)).start()
    try:
        second_counters = Counters()
        second = Publisher(settings, second_counters)
        await second.start()
        deadline = time.monotonic() + 30
        while len(second.outbox) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert second_counters.get("samples_published") == 15, "spool not sent while running"
        await second.close()
        assert second_counters.get("spooled_messages_recovered") == 3
        ids = await stored_msg_ids(server.url)
    finally:
        server.stop()
    # The first agent's dict + samples, then its three spooled samples messages, in order.
    assert ids == [f"{first.agent_id}-{n}" for n in range(1, 6)], ids
