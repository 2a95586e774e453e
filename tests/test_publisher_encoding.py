"""Where the publisher encodes: small batches on the event loop, large ones in a worker thread
that keeps the encoder to itself until it is done (a resync or a cancellation waits for it)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from agent.publish.publisher import INLINE_ENCODE_MAX_SAMPLES, Publisher
from agent.settings import AgentSettings
from shared.counters import Counters
from shared.model import Frame, FrameType, Mapping, Sample
from shared.profile_types import ProfileType
from shared.wire import StreamEncoder, resync_request, unpack

MAPPING = Mapping(0x400000, 0x500000, 0, "/usr/bin/app", "ab" * 20)
STACKS = [tuple(Frame(f"f{i}_{d}", "app.c", d + 1, 0x401000 + 16 * (i * 8 + d), FrameType.NATIVE, MAPPING)
                for d in range(4)) for i in range(3)]


def samples(n: int) -> list[Sample]:
    return [Sample(1_000_000 + i, i % 2, 42, 42, "worker", "app", STACKS[i % len(STACKS)], (10_101_010,))
            for i in range(n)]


class GatedEncode:
    """Wraps an encoder's ``encode``: records the thread of each call and, when ``gate`` is
    given, holds a call in ``encode`` until the test opens the gate."""

    def __init__(self, enc: StreamEncoder, gate: threading.Event | None = None) -> None:
        self.inner: Callable[..., Any] = enc.encode
        self.gate = gate
        self.threads: list[int] = []
        self.entered = threading.Event()
        self.finished = threading.Event()
        enc.encode = self  # type: ignore[method-assign,assignment]

    def __call__(self, batch: list[Sample], period: int) -> Any:
        self.threads.append(threading.get_ident())
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        try:
            return self.inner(batch, period)
        finally:
            self.finished.set()


def messages(publisher: Publisher) -> list[dict[str, Any]]:
    """Every queued message, unpacked, in order, emptying the outbox."""
    out = []
    while publisher.outbox:
        out.append(unpack(publisher.outbox.pop().payload))
    return out


def kinds(publisher: Publisher) -> list[tuple[str, bool]]:
    """(message kind, full dictionary) of every queued message, in order, emptying the outbox."""
    return [(m["kind"], bool(m.get("full"))) for m in messages(publisher)]


async def held_batch() -> tuple[Publisher, GatedEncode, threading.Event, asyncio.Task[None]]:
    """A publisher whose CPU encoder is busy in a worker thread with a 5,000-sample batch,
    held there until the test sets the returned gate."""
    gate = threading.Event()
    publisher = Publisher(AgentSettings(host_name="h1"), Counters())
    calls = GatedEncode(publisher.encoder(ProfileType.CPU), gate)
    submit = asyncio.create_task(publisher.submit(ProfileType.CPU, samples(5_000), 10_101_010))
    assert await asyncio.to_thread(calls.entered.wait, 10)
    return publisher, calls, gate, submit


async def test_small_batches_are_encoded_on_the_loop_and_large_ones_in_a_thread() -> None:
    publisher = Publisher(AgentSettings(host_name="h1"), Counters())
    calls = GatedEncode(publisher.encoder(ProfileType.CPU))
    loop_thread = threading.get_ident()
    await publisher.submit(ProfileType.CPU, samples(INLINE_ENCODE_MAX_SAMPLES), 10_101_010)
    await publisher.submit(ProfileType.CPU, samples(INLINE_ENCODE_MAX_SAMPLES + 1), 10_101_010)
    assert calls.threads[0] == loop_thread
    assert calls.threads[1] != loop_thread
    # The first batch brought the stacks: the second needs no dictionary message.
    assert kinds(publisher) == [("dict", False), ("samples", False), ("samples", False)]


async def test_the_loop_runs_while_a_large_batch_is_encoded() -> None:
    publisher, _calls, gate, submit = await held_batch()
    # The encode waits for the gate, and only this coroutine opens it: the loop must run it.
    await asyncio.sleep(0.01)
    assert not submit.done()
    gate.set()
    await asyncio.wait_for(submit, 10)
    assert kinds(publisher) == [("dict", False), ("samples", False)]


async def test_a_resync_waits_for_the_batch_being_encoded() -> None:
    """A resync that comes while a batch is being encoded re-sends the dictionary after that
    batch's messages, with the batch's new entries in it."""
    publisher, _calls, gate, submit = await held_batch()
    resync = asyncio.create_task(publisher._on_resync(
        SimpleNamespace(data=resync_request("h1", [ProfileType.CPU], "test"))))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not resync.done() and not publisher.outbox  # waiting for the batch's encoder
    gate.set()
    await asyncio.wait_for(asyncio.gather(submit, resync), 10)
    items = messages(publisher)
    assert [(m["kind"], bool(m.get("full"))) for m in items] == [("dict", False), ("samples", False),
                                                                ("dict", True)]
    delta, full = items[0], items[2]
    assert full["stacks"] == delta["stacks"] and full["locations"] == delta["locations"]
    assert full["stacks"][0] == 1 and len(full["stacks"][1]) == len(STACKS)


async def test_a_cancelled_batch_holds_the_encoder_until_its_thread_is_done() -> None:
    publisher, calls, gate, submit = await held_batch()
    submit.cancel()
    await asyncio.sleep(0.05)
    assert not submit.done()  # the thread still works on the encoder
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(submit, 10)
    assert calls.finished.is_set()
    # The next batch has the encoder to itself again.
    calls.gate = None
    await publisher.submit(ProfileType.CPU, samples(5_000), 10_101_010)
    assert [k for k, _ in kinds(publisher)][-1] == "samples"
