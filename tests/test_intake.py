"""Aggregator intake: out-of-order dictionaries, resync, stale epochs, hostile senders."""

from __future__ import annotations

import msgpack
import pytest

from aggregator.delivery.intake import Intake
from aggregator.merge import Merger
from shared.counters import Counters
from shared.model import Frame, FrameType, Sample
from shared.profile_types import ProfileType
from shared.subjects import dict_subject, samples_subject
from shared.wire import DecodedSamples, StreamEncoder


def make_sample(ts: int, fn: str) -> Sample:
    frames = (Frame(fn, "a.c", 3, 0x1000, FrameType.NATIVE), Frame("main", "a.c", 9, 0x2000, FrameType.NATIVE))
    return Sample(ts, 0, 42, 43, "t", "p", frames, (10,))


class Harness:
    def __init__(self) -> None:
        self.counters = Counters()
        self.delivered: list[DecodedSamples] = []
        self.resyncs: list[tuple[str, ProfileType, str]] = []

        async def resync(host: str, ptype: ProfileType, reason: str) -> None:
            self.resyncs.append((host, ptype, reason))

        self.intake = Intake(self.counters, self.delivered.append, resync, max_parked=100, park_timeout_s=0.0)


@pytest.fixture
def h() -> Harness:
    return Harness()


async def test_samples_before_their_dictionary_are_parked_then_delivered(h: Harness) -> None:
    enc = StreamEncoder("web-1", ProfileType.CPU, "ag1")
    d, s = enc.encode([make_sample(1, "f")], 10)
    assert d and s
    await h.intake.on_samples(samples_subject(ProfileType.CPU, "web-1"), s)
    assert not h.delivered and len(h.intake.parked) == 1
    await h.intake.on_dict(dict_subject(ProfileType.CPU, "web-1"), d)
    assert len(h.delivered) == 1 and not h.intake.parked
    assert h.delivered[0].samples[0].frames[0].function == "f"


async def test_lost_dictionary_triggers_resync_and_recovers(h: Harness) -> None:
    enc = StreamEncoder("web-1", ProfileType.CPU, "ag1")
    enc.encode([make_sample(1, "f")], 10)  # lost in transit
    d2, s2 = enc.encode([make_sample(2, "g")], 10)
    assert d2 and s2
    await h.intake.on_dict(dict_subject(ProfileType.CPU, "web-1"), d2)  # gap: base > known
    assert h.counters.get("dictionary_gaps") == 1
    assert h.resyncs and h.resyncs[0][0] == "web-1"
    await h.intake.on_samples(samples_subject(ProfileType.CPU, "web-1"), s2)
    assert not h.delivered
    enc.request_full()
    full = enc.flush_dictionary()
    assert full
    await h.intake.on_dict(dict_subject(ProfileType.CPU, "web-1"), full)
    assert [s.frames[0].function for b in h.delivered for s in b.samples] == ["g"]


async def test_parked_messages_expire_counted(h: Harness) -> None:
    enc = StreamEncoder("web-1", ProfileType.CPU, "ag1")
    _, s = enc.encode([make_sample(1, "f")], 10)
    assert s
    await h.intake.on_samples(samples_subject(ProfileType.CPU, "web-1"), s)
    await h.intake.sweep()
    assert h.counters.get("messages_dropped", reason="dictionary_missing", host="web-1") == 1
    assert not h.intake.parked


async def test_hostile_sender_is_counted_and_does_not_disturb_others(h: Harness) -> None:
    good = StreamEncoder("good", ProfileType.CPU, "ag1")
    d, s = good.encode([make_sample(1, "f")], 10)
    assert d and s
    await h.intake.on_dict(dict_subject(ProfileType.CPU, "good"), d)
    bad_subject = samples_subject(ProfileType.CPU, "evil")
    payloads = [b"\x00garbage", msgpack.packb({"v": 1}), msgpack.packb({"v": 1, "kind": "samples", "host": "good",
                "type": "cpu", "agent": "ag1", "epoch": 1, "seq": 9})]  # claims to be "good" on evil's subject
    for p in payloads:
        await h.intake.on_samples(bad_subject, p)
    assert h.counters.get("messages_rejected") == 3
    assert h.counters.get("messages_rejected", reason="subject_mismatch", sender="evil") == 1
    await h.intake.on_samples(samples_subject(ProfileType.CPU, "good"), s)
    assert len(h.delivered) == 1


async def test_merger_merges_identical_samples_across_batches(h: Harness) -> None:
    merger = Merger()
    enc = StreamEncoder("web-1", ProfileType.CPU, "ag1")
    for ts in (1, 2, 3):
        d, s = enc.encode([make_sample(ts, "f")], 10)
        if d:
            await h.intake.on_dict(dict_subject(ProfileType.CPU, "web-1"), d)
        assert s
        await h.intake.on_samples(samples_subject(ProfileType.CPU, "web-1"), s)
    for batch in h.delivered:
        merger.add(batch)
    fleet = merger.rotate()
    (profile,) = fleet.hosts.values()
    (agg,) = profile.samples.values()
    assert agg.values == [30] and agg.timestamps_ns == [1, 2, 3]
