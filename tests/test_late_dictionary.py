"""JetStream: a samples message whose dictionary comes late is handed back for redelivery,
not dropped (as when the dictionary consumer waits for a new leader after a NATS node died)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats

from aggregator.service import run_aggregator
from aggregator.settings import AggregatorSettings
from shared.counters import Counters
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType
from shared.subjects import dict_subject, samples_subject
from shared.wire import StreamEncoder, new_agent_id
from stackfleet.nats_server import NatsServer
from tests.test_export_durability import PERIOD, cpu_samples, wait_for


async def test_samples_waiting_for_a_late_dictionary_are_redelivered_not_dropped(tmp_path: Path) -> None:
    encoder = StreamEncoder("late-host", ProfileType.CPU, new_agent_id(), 1000)
    dict_msg, samples_msg = encoder.encode(cpu_samples(25), PERIOD)
    assert dict_msg is not None and samples_msg is not None
    with NatsServer() as server:
        counters, stop = Counters(), asyncio.Event()
        aggregator = asyncio.create_task(run_aggregator(AggregatorSettings(
            nats=NatsSettings(url=server.url), otlp_endpoint="", output_dir=tmp_path / "out",
            export_interval_s=0.5, park_timeout_s=1.0, web_address=""), stop, counters))
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await asyncio.sleep(1.0)  # the aggregator has created the stream
        await js.publish(samples_subject(ProfileType.CPU, "late-host"), samples_msg)
        # The dictionary is late: past the park timeout the message goes back to the stream.
        assert await wait_for(lambda: counters.get("messages_deferred") >= 1, 20), counters.snapshot()
        await js.publish(dict_subject(ProfileType.CPU, "late-host"), dict_msg)
        assert await wait_for(lambda: counters.get("samples_received") == 25, 30), counters.snapshot()
        await nc.close()
        stop.set()
        await asyncio.wait_for(aggregator, 30)
    assert counters.get("messages_dropped") == 0, counters.snapshot()


async def test_a_message_is_handed_back_only_a_bounded_number_of_times() -> None:
    from aggregator.delivery.consumers import MAX_DEFERRED_DELIVERIES, defer_redelivery
    from tests.test_exactly_once import js_msg

    assert not await defer_redelivery(js_msg(5, delivered=MAX_DEFERRED_DELIVERIES))  # then dropped, counted
    assert not await defer_redelivery(object())  # core NATS: nothing to hand back


async def test_messages_handed_back_and_not_yet_redelivered_are_counted_at_shutdown() -> None:
    """Nothing leaves the aggregator uncounted: a deferred message that has not come back by
    shutdown is in the stream (released), one that came back is handled again."""
    from aggregator.delivery.intake import Intake

    encoder = StreamEncoder("late-host", ProfileType.CPU, new_agent_id(), 1000)
    _dict_msg, samples_msg = encoder.encode(cpu_samples(5), PERIOD)
    assert samples_msg is not None
    counters = Counters()

    async def hand_back(token: object) -> bool:
        return True

    async def no_resync(host: str, ptype: ProfileType, reason: str) -> None:
        pass

    intake = Intake(counters, lambda decoded: None, no_resync, park_timeout_s=0.0,
                    on_expired=hand_back, message_id=lambda token: token)
    subject = samples_subject(ProfileType.CPU, "late-host")
    for token in ("seq-1", "seq-2"):
        await intake.on_samples(subject, samples_msg, token)
    await intake.sweep()
    assert counters.get("messages_deferred") == 2
    await intake.on_samples(subject, samples_msg, "seq-2")  # redelivered: parked again
    assert intake.release_parked() == 2
    assert counters.get("messages_released", reason="shutdown_parked", host="late-host") == 1  # seq-2
    assert counters.get("messages_released", reason="shutdown_deferred", host="late-host") == 1  # seq-1
