"""The caches' one memory budget (agent/memory_budget.py): fed far more distinct stacks,
addresses and frames than their shares hold, the caches stay within their shares, every
eviction is counted, and what comes out after an eviction is still right: a re-symbolized
frame equals the first answer (the target program's own addresses and lines), a CPU stack
evicted from the actor is symbolized again to the same frames, and every wire message after
a dictionary eviction decodes, through the aggregator's intake, to the frames sent.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.actors.base import ActorContext
from agent.bpf.layouts import DedupFlags
from agent.bpf.sample_records import KNOWN_STACK_HEAD
from agent.clock import MonotonicToUnix
from agent.memory_budget import LOW_WATER, MemoryBudget, PerProcessEntries
from agent.process.procmaps import read_maps
from agent.publish.publisher import Publisher
from agent.settings import AgentSettings
from agent.symbols import Symbolizer
from agent.symbols.symbolizer import FRAME_ENTRY_BYTES
from aggregator.delivery.intake import Intake
from shared.counters import Counters
from shared.model import Frame, FrameType, Mapping, Sample
from shared.profile_types import ProfileType
from shared.wire import DecodedSamples, StreamEncoder
from tests.test_stack_dedup import FakeKernelCpuActor, header, stack_event
from tests.test_symbols import Target, build


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = Target(build(tmp_path))
    yield t
    t.stop()


def test_per_process_entries_empty_the_least_recently_used_processes_first() -> None:
    counters = Counters()
    share = MemoryBudget(10_000, counters, {"frames": 1.0}).share("frames")
    owners: dict[str, dict[int, int]] = {"old": {}, "middle": {}, "new": {}}  # in LRU order
    entries = PerProcessEntries(share, 1_000, lambda: list(owners.values()))
    for name, n in (("old", 4), ("middle", 3), ("new", 3)):
        for i in range(n):
            owners[name][i] = i
            entries.added()
    assert share.used == 10_000 and counters.get("cache_evictions") == 0  # full, not over
    owners["new"][3] = 3
    entries.added()  # 11 entries: over; down to LOW_WATER (7,500 B) oldest first
    assert [len(d) for d in owners.values()] == [0, 3, 4]
    assert share.used == 7_000 <= LOW_WATER * share.limit
    assert counters.get("cache_evictions", cache="frames") == 4
    entries.dropped(owners.pop("middle"))  # its process exited: released, not an eviction
    assert share.used == 4_000 and counters.get("cache_evictions") == 4


def test_symbolizer_caches_stay_within_their_shares_and_answer_the_same(target: Target) -> None:
    counters = Counters()
    budget = MemoryBudget(32 * 1024, counters)
    sym = Symbolizer(budget=budget)
    leaf_addr, leaf_line = target.truth["leaf_function"]
    (first,) = sym.symbolize_user(target.pid, [leaf_addr])
    assert (first.function, first.line) == ("leaf_function", leaf_line)
    # 1,500 distinct addresses in the target's C library: many times what the shares hold.
    libc = next(e for e in read_maps(target.pid) if "libc" in e.path and "x" in e.perms)
    flood = random.Random(7).sample(range(libc.start, libc.end), 1_500)
    frames_share, addresses_share = budget.share("symbol_frames"), budget.share("symbol_addresses")
    for address in flood:
        sym.symbolize_user(target.pid, [address])
        assert frames_share.used <= frames_share.limit and addresses_share.used <= addresses_share.limit
    assert sym.stats["frames_cached"] * FRAME_ENTRY_BYTES <= frames_share.limit
    assert counters.get("cache_evictions", cache="symbol_frames") >= 1_500 - frames_share.limit // FRAME_ENTRY_BYTES
    assert counters.get("cache_evictions", cache="symbol_addresses") > 0
    (again,) = sym.symbolize_user(target.pid, [leaf_addr])
    assert again == first


def test_cpu_stacks_stay_within_their_share_and_come_back_the_same(target: Target) -> None:
    counters = Counters()
    budget = MemoryBudget(64 * 1024, counters)
    ctx = ActorContext(AgentSettings(cpu_stack_dedup=True), Symbolizer(budget=budget), ThreadPoolExecutor(1),
                       None,  # type: ignore[arg-type]
                       counters, MonotonicToUnix(), budget=budget)
    actor = FakeKernelCpuActor(ctx)
    leaf, _ = target.truth["leaf_function"]
    caller, _ = target.truth["caller_function"]
    pid = target.pid
    share = budget.share("cpu_stacks")
    first = None

    def user(stack_id: int) -> list[int]:
        return [leaf] + [caller + 1] * (2 + stack_id % 38)

    for stack_id in range(1, 1_001):  # 1,000 distinct stacks of 3 to 40 frames
        event = stack_event(pid, pid, user(stack_id))
        (sample,) = actor.to_samples([header(stack_id, stack_id, 1, pid, pid, 0, DedupFlags.NEW, b"t") + event])
        if first is None:
            first = sample.frames
        assert share.used <= share.limit
    assert counters.get("cache_evictions", cache="cpu_stacks") > 0
    # Stack 1 left the actor's cache long ago: its id record is resolved again from the
    # kernel's map, to the same frames.
    actor.known[1] = KNOWN_STACK_HEAD.pack(1, 0) + stack_event(pid, pid, user(1))
    (again,) = actor.to_samples([header(9, 1, 1, pid, pid, 0, DedupFlags.ID_ONLY, b"t")])
    assert actor.lookups >= 1 and again.frames == first


# Names as the symbolizer hands them out: one string object per function and file.
_FUNCTIONS = [f"function_{i}" for i in range(5_000)]
_FILES = [f"src/module_{i}.c" for i in range(500)]


def _stack(rng: random.Random, mappings: list[Mapping], n: int) -> tuple[Frame, ...]:
    return tuple(Frame(rng.choice(_FUNCTIONS), rng.choice(_FILES), rng.randrange(1, 900),
                       rng.randrange(1 << 20), FrameType.NATIVE, rng.choice(mappings)) for _ in range(n))


async def test_wire_dictionaries_evicted_by_the_budget_still_decode_end_to_end() -> None:
    """Batches of new stacks far beyond the dictionaries' share: each eviction starts a new
    epoch between batches, and the aggregator's intake decodes every samples message to the
    very frames that were sent."""
    counters = Counters()
    budget = MemoryBudget(256 * 1024, counters)
    publisher = Publisher(AgentSettings(host_name="h1"), counters, budget)
    delivered: list[DecodedSamples] = []

    async def resync(host: str, ptype: ProfileType, reason: str) -> None:
        raise AssertionError(f"no resync should be needed: {reason}")

    intake = Intake(Counters(), delivered.append, resync, max_parked=100, park_timeout_s=0.0)
    rng = random.Random(3)
    mappings = [Mapping(0, 1 << 20, 0, f"/lib/l{i}.so", f"{i:040x}") for i in range(8)]
    share = budget.share("wire_dictionaries")
    sent: list[list[tuple[Frame, ...]]] = []
    for batch in range(60):
        for ptype in (ProfileType.CPU, ProfileType.WALL):
            stacks = [_stack(rng, mappings, rng.randrange(3, 30)) for _ in range(20)]
            samples = [Sample(batch * 1000 + i, 0, 7, 7, "t", "p", s, (1,) if ptype is ProfileType.CPU else (1, 2))
                       for i, s in enumerate(stacks)]
            await publisher.submit(ptype, samples, 1)
            assert share.used <= share.limit
            if ptype is ProfileType.CPU:
                sent.append(stacks)
    evictions = counters.get("cache_evictions", cache="wire_dictionaries")
    epochs = sum(counters.get("dictionary_epochs", type=t.value, reason="memory_budget")
                 for t in (ProfileType.CPU, ProfileType.WALL))
    assert evictions > 0 and epochs >= 2
    assert publisher.encoder(ProfileType.CPU).epoch > 1
    while publisher.outbox:
        item = publisher.outbox.pop()
        handler = intake.on_dict if ".dict." in item.subject else None
        if handler is not None:
            await handler(item.subject, item.payload)
        else:
            await intake.on_samples(item.subject, item.payload)
    cpu = [d for d in delivered if d.stream.profile_type is ProfileType.CPU]
    assert [[s.frames for s in d.samples] for d in cpu] == sent


def test_encoder_estimate_follows_tracemalloc() -> None:
    """The encoder's estimated bytes are within 30 % of what tracemalloc sees it allocate
    (stacks, their frames and rows made by this test and held only by the encoder)."""
    rng = random.Random(5)
    mappings = [Mapping(0, 1 << 20, 0, f"/lib/l{i}.so", f"{i:040x}") for i in range(8)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        enc = StreamEncoder("h", ProfileType.CPU, "a", 1_000_000)
        for batch in range(8):
            enc.encode([Sample(batch, 0, 1, 1, "t", "p", _stack(rng, mappings, rng.randrange(3, 40)), (1,))
                        for _ in range(100)], 1)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.7 * grown <= enc.estimated_bytes <= 1.3 * grown, (enc.estimated_bytes, grown)
