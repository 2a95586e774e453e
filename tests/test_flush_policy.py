"""When a BPF actor flushes (agent/actors/flush.py), through its real run loop.

The actor here loads no program: its record source is fed by the test, one poll's batch at a
time, and its sink keeps what is published. Known answers: how many publications a known
stream of records gives, and that every record is in exactly one of them, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from agent.actors.base import ActorContext, BpfActor, SampleSink
from agent.actors.cpu import CpuActor
from agent.actors.flush import PublicationHold
from agent.actors.sources import RecordSource
from agent.actors.wall import WallActor
from agent.clock import MonotonicToUnix
from agent.settings import AgentSettings
from agent.symbols import Symbolizer
from shared.counters import Counters
from shared.model import Sample
from shared.profile_types import ProfileType

# What each fed record counts for in the backlog the source reports (sources report bytes).
RECORD_BYTES = 512


class FedSource(RecordSource[int]):
    """Records handed in by the test, as a poll thread would: append, then report the backlog
    in bytes, ``RECORD_BYTES`` a record."""

    def __init__(self) -> None:
        self.waiting: list[int] = []
        self.on_buffered: Callable[[int], None] | None = None

    def start(self, on_buffered: Callable[[int], None] | None = None) -> None:
        self.on_buffered = on_buffered

    def push(self, records: list[int]) -> None:
        self.waiting.extend(records)
        if self.on_buffered is not None:
            self.on_buffered(len(self.waiting) * RECORD_BYTES)

    def drain(self) -> list[int]:
        out, self.waiting = self.waiting, []
        return out


class Published(SampleSink):
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.arrived = asyncio.Event()

    async def submit(self, profile_type: ProfileType, samples: Sequence[Sample], period: int) -> None:
        self.batches.append([s.values[0] for s in samples])
        self.arrived.set()


class FedActor(BpfActor[int]):
    """A CPU-type actor without a program: record n becomes a sample of value n."""

    profile_type = ProfileType.CPU
    bpf_source = "none"

    def _load_and_attach(self) -> None:
        self.bpf = object()

    def _teardown(self, bpf: Any) -> None:
        pass

    def attach(self, bpf: Any) -> None:
        pass

    def period(self) -> int:
        return 1

    def to_samples(self, records: list[int]) -> Sequence[Sample]:
        return [Sample(n, 0, 1, 1, "t", "p", (), (n,)) for n in records]


def context(sink: SampleSink, **settings: Any) -> ActorContext:
    return ActorContext(AgentSettings(**settings), Symbolizer(), ThreadPoolExecutor(1), sink, Counters(),
                        MonotonicToUnix())


A = TypeVar("A", bound="FedActor")


async def _started(actor_type: type[A], **settings: Any) -> tuple[Published, FedSource, A, asyncio.Task[None]]:
    """An actor fed by hand, publishing into a recording sink, running once its source started."""
    sink, source = Published(), FedSource()
    actor = actor_type(context(sink, **settings), source)
    task = asyncio.create_task(actor.run())
    while source.on_buffered is None:
        await asyncio.sleep(0)
    return sink, source, actor, task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_records_faster_than_the_interval_flush_at_the_backlog_and_none_is_lost() -> None:
    """2 CPUs at 100 Hz polled every 250 ms: 50 records a poll, 40 polls (10 s of samples).
    With a flush interval far away and a backlog of 100 records' bytes (half of 200's), every second
    poll brings a flush: 20 publications of exactly 100 records, all 2,000 once, in order."""
    sink, source, actor, task = await _started(FedActor, flush_interval_s=60, max_pending_bytes=200 * RECORD_BYTES)
    try:
        for poll in range(40):
            arrived = len(sink.batches)
            source.push(list(range(poll * 50, poll * 50 + 50)))
            if poll % 2 == 1:  # 100 waiting: the flush comes without the interval
                while len(sink.batches) == arrived:
                    sink.arrived.clear()
                    await asyncio.wait_for(sink.arrived.wait(), 30)
    finally:
        await _stop(task)
    assert [len(b) for b in sink.batches] == [100] * 20
    assert [n for b in sink.batches for n in b] == list(range(2000))
    assert actor.flush_signal.early_flushes == 20


async def test_records_slower_than_the_interval_wait_for_it() -> None:
    """30 records, far below the backlog: published by the interval's flush, all of them."""
    sink, source, actor, task = await _started(FedActor, flush_interval_s=0.05, max_pending_bytes=200 * RECORD_BYTES)
    try:
        source.push(list(range(30)))
        await asyncio.wait_for(sink.arrived.wait(), 30)
    finally:
        await _stop(task)
    assert [n for b in sink.batches for n in b] == list(range(30))
    assert actor.flush_signal.early_flushes == 0


def test_the_aggregating_actors_drain_at_least_every_second() -> None:
    """Wall's in-kernel maps hold one second of aggregates: its flush interval is capped there,
    while the CPU profile waits the configured five seconds."""
    ctx = context(Published(), flush_interval_s=5.0)
    assert CpuActor(ctx).flush_signal.interval_s == 5.0
    assert WallActor(ctx).flush_signal.interval_s == 1.0
    assert AgentSettings().flush_interval_s == 10.0


def _sample(n: int) -> Sample:
    return Sample(n, 0, 1, 1, "t", "p", (), (n,))


def test_a_hold_publishes_a_drain_a_second_at_the_flush_interval() -> None:
    """Drains every second, a 10 s flush interval: the first drain's samples wait 9 s more,
    then all ten drains' samples go out together, in order; the next drain starts a new hold."""
    hold = PublicationHold(flush_interval_s=10.0, drain_interval_s=1.0, max_samples=1000)
    published = [list(hold.take([_sample(t)], now=float(t))) for t in range(10)]
    assert published[:9] == [[]] * 9
    assert [s.values[0] for s in published[9]] == list(range(10))
    assert list(hold.take([_sample(10)], now=10.0)) == [] and len(hold) == 1


def test_a_hold_starts_with_its_first_sample_not_with_empty_drains() -> None:
    hold = PublicationHold(flush_interval_s=10.0, drain_interval_s=1.0, max_samples=1000)
    assert list(hold.take([], now=0.0)) == []
    assert list(hold.take([_sample(1)], now=5.0)) == []
    assert list(hold.take([], now=13.9)) == []
    assert [s.values[0] for s in hold.take([], now=14.0)] == [1]


def test_a_hold_lets_go_at_its_bound_and_on_the_final_flush() -> None:
    hold = PublicationHold(flush_interval_s=10.0, drain_interval_s=1.0, max_samples=3)
    assert list(hold.take([_sample(1), _sample(2)], now=0.0)) == []
    assert [s.values[0] for s in hold.take([_sample(3)], now=1.0)] == [1, 2, 3]
    big = [_sample(n) for n in range(3)]
    assert hold.take(big, now=2.0) is big  # nothing held: a full batch passes as it is
    assert list(hold.take([_sample(4)], now=3.0)) == []
    assert [s.values[0] for s in hold.take([], now=3.5, final=True)] == [4]
    assert len(hold) == 0


def test_an_actor_draining_at_the_flush_interval_holds_nothing() -> None:
    """CPU drains at the flush interval: its batches (columns) go out as they are."""
    hold = CpuActor(context(Published(), flush_interval_s=5.0)).hold
    batch = [_sample(1)]
    assert hold.hold_s == 0 and hold.take(batch, now=0.0) is batch


class FastDrainingActor(FedActor):
    """Drains every 20 ms, as the aggregating actors drain every second."""

    MAX_FLUSH_INTERVAL_S = 0.02


async def test_held_samples_go_out_together_and_all_of_them_when_the_actor_stops() -> None:
    """A 60 s flush interval and drains every 20 ms: five pushes, each drained on its own, are
    not published while the actor runs; stopping it publishes them in one batch, in order."""
    sink, source, actor, task = await _started(FastDrainingActor, flush_interval_s=60)
    try:
        for push in range(5):
            source.push(list(range(push * 10, push * 10 + 10)))
            while source.waiting:  # drained by the next flush
                await asyncio.sleep(0.005)
        await asyncio.wait_for(_until(lambda: len(actor.hold) == 50), 30)  # the last drain's conversion
        assert sink.batches == []
    finally:
        await _stop(task)
    assert sink.batches == [list(range(50))]


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


class FailingAtStopActor(FastDrainingActor):
    """Its conversion fails once ``failing`` is set."""

    failing = False

    def to_samples(self, records: list[int]) -> Sequence[Sample]:
        if self.failing:
            raise RuntimeError("conversion failed")
        return super().to_samples(records)


async def test_held_samples_go_out_when_the_final_conversion_fails() -> None:
    """Ten records held, then the actor stops and its last conversion fails: the ten are
    published all the same, and the failure is the actor's outcome."""
    sink, source, actor, task = await _started(FailingAtStopActor, flush_interval_s=60)
    source.push(list(range(10)))
    await asyncio.wait_for(_until(lambda: len(actor.hold) == 10), 30)
    actor.failing = True
    source.push([10])  # a record for the failing conversion to take
    task.cancel()
    with pytest.raises(RuntimeError, match="conversion failed"):
        await task
    assert sink.batches == [list(range(10))]
