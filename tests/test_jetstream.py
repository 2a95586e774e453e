"""The profile stream against a real nats-server: idempotent creation, limits, counted discards;
and the agent's outbox bounds."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from agent.publish.memory_outbox import MemoryOutbox, Outgoing
from aggregator.delivery import ack_ledger, consumers
from shared.counters import Counters
from shared.jetstream import StreamSettings, ensure_stream
from stackfleet.nats_server import NatsServer


@pytest.fixture
def js_server() -> NatsServer:
    with NatsServer() as server:
        yield server  # type: ignore[misc]


async def test_either_side_creates_the_stream_once_and_the_aggregator_owns_its_limits(js_server: NatsServer) -> None:
    agent_nc, agg_nc = await nats.connect(js_server.url), await nats.connect(js_server.url)
    agent_js, agg_js = agent_nc.jetstream(), agg_nc.jetstream()
    # Both start at the same moment: one creates, the other finds it; neither fails.
    await asyncio.gather(ensure_stream(agent_js, StreamSettings(), authoritative=False),
                         ensure_stream(agg_js, StreamSettings(), authoritative=True))
    info = await agg_js.stream_info("STACKFLEET")
    assert sorted(info.config.subjects or []) == ["stackfleet.v1.dict.>", "stackfleet.v1.samples.>"]
    assert info.config.max_bytes == StreamSettings().max_bytes
    # An agent with other limits leaves the stream alone; the aggregator's limits win.
    await ensure_stream(agent_js, StreamSettings(max_age_s=60), authoritative=False)
    assert (await agg_js.stream_info("STACKFLEET")).config.max_age == 3600
    await ensure_stream(agg_js, StreamSettings(max_age_s=120, max_bytes=2 * 1024 * 1024), authoritative=True)
    cfg = (await agg_js.stream_info("STACKFLEET")).config
    assert (cfg.max_age, cfg.max_bytes) == (120, 2 * 1024 * 1024)
    await agent_nc.close()
    await agg_nc.close()


async def test_messages_discarded_by_the_stream_before_consumption_are_counted(
        js_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    nc = await nats.connect(js_server.url)
    js = nc.jetstream()
    await ensure_stream(js, StreamSettings(max_bytes=1024 * 1024), authoritative=True)
    await js.add_consumer("STACKFLEET", ConsumerConfig(durable_name="aggs", ack_policy=AckPolicy.EXPLICIT,
                                                       filter_subject="stackfleet.v1.samples.>"))
    for _ in range(300):  # 3 MB into a 1 MiB stream, nobody consuming
        await js.publish("stackfleet.v1.samples.cpu.h", b"x" * 10_000)
    first_seq = (await js.stream_info("STACKFLEET")).state.first_seq
    assert first_seq > 1
    counters = Counters()
    monkeypatch.setattr(consumers, "STREAM_WATCH_INTERVAL_S", 0.1)
    watcher = asyncio.create_task(consumers._watch_stream_limits(js, "STACKFLEET", "aggs", counters))
    await asyncio.sleep(1.0)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    # Counted exactly once although the watcher looked several times.
    assert counters.get("messages_dropped", reason="stream_limit") == first_seq - 1
    await nc.close()


def outgoing(n: int, size: int, samples: int = 10) -> Outgoing:
    return Outgoing("cpu", "s", b"x" * size, f"id-{n}", samples)


def test_outbox_drops_oldest_beyond_either_bound_and_counts_samples() -> None:
    counters = Counters()
    box = MemoryOutbox(max_messages=3, max_bytes=10_000, counters=counters)
    for i in range(5):
        box.append(outgoing(i, 100))
    assert [box.pop().msg_id for _ in range(len(box))] == ["id-2", "id-3", "id-4"]
    assert counters.get("messages_dropped", type="cpu", reason="outgoing_queue_full") == 2
    assert counters.get("samples_dropped", type="cpu", reason="outgoing_queue_full") == 20
    for i in range(3):
        box.append(outgoing(i, 4_000))  # the third would exceed 10,000 bytes: the first goes
    assert len(box) == 2 and box.bytes == 8_000
    item = box.pop()
    box.push_back(item)  # a failed publish goes back in front, order kept
    assert box.pop() is item


def _delivery(stream_seq: int, delivered: int) -> Msg:
    """A samples message as the pull consumer hands it over (the ack subject carries its sequences)."""
    reply = (f"$JS.ACK.STACKFLEET.stackfleet-aggregators.{delivered}.{stream_seq}.{stream_seq + 100}"
             ".1700000000000000000.0")
    return Msg(_client=None, subject="stackfleet.v1.samples.cpu.h", reply=reply, data=b"")  # type: ignore[arg-type]


def test_a_redelivery_of_a_held_message_is_recognised_until_the_export_acks_it() -> None:
    ledger = ack_ledger.AckLedger(Counters())
    first = _delivery(17, delivered=1)
    ledger.finished(first)
    again, other = _delivery(17, delivered=2), _delivery(18, delivered=1)
    assert ledger.holds(again) and not ledger.holds(other)
    ledger.finished(again)
    assert ledger.take() == [first, again]  # both deliveries are acked after the export
    assert not ledger.holds(_delivery(17, delivered=3))  # acked: a later delivery is new work
    assert not ledger.holds(Msg(_client=None, subject="s", reply="", data=b""))  # type: ignore[arg-type]
