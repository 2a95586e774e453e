"""The CPU profile's deduplicated sample records (bpf/stack_dedup.h) turned into samples.

Records are built here in the C layouts (checked against agent/bpf/layouts.py) for a real
running process whose function addresses it prints itself; the kernel's known_stacks map
is replaced by a dictionary. Known answers: which frames each sample gets, which records
are resolved from where, and which are counted as dropped instead of being guessed.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.actors.base import ActorContext
from agent.actors.cpu import CpuActor
from agent.actors.sources import SlotRingSource
from agent.bpf.layouts import MAX_STACK_DEPTH, PY_MAX_FRAMES, STACK_COPY_BYTES, DedupFlags, KnownStack, SampleRecord
from agent.bpf.records import EVENT_SIZE
from agent.bpf.sample_records import KNOWN_STACK_HEAD, SAMPLE_RECORD, decode_batch
from agent.clock import MonotonicToUnix
from agent.runtimes.python.frames import PythonProcesses, PythonStacks
from agent.settings import AgentSettings
from agent.symbols import Symbolizer
from shared.counters import Counters
from tests.test_symbols import Target, build


def stack_event(pid: int, tid: int, user: list[int], copy: bytes = b"", user_len: int | None = None) -> bytes:
    """A struct stack_event (bpf/stack_event.h) as BPF writes it."""
    head = struct.pack("<QQQIIIiiI16s", 1, 1000, 0, pid, tid, 0,
                       len(user) * 8 if user_len is None else user_len, 0, 0, b"thread")
    stacks = struct.pack(f"<{MAX_STACK_DEPTH}Q", *user, *[0] * (MAX_STACK_DEPTH - len(user)))
    stacks += b"\0" * (MAX_STACK_DEPTH * 8)
    tail = struct.pack("<QII", 0, len(copy), 0) + copy.ljust(STACK_COPY_BYTES, b"\0")
    py = struct.pack("<Ii", 0, 0) + b"\0" * (PY_MAX_FRAMES * 24)
    raw = head + stacks + tail + py
    assert len(raw) == EVENT_SIZE
    return raw


def header(ts: int, stack_id: int, serial: int, pid: int, tid: int, cpu: int, flags: int, comm: bytes) -> bytes:
    return SAMPLE_RECORD.pack(ts, stack_id, serial, pid, tid, cpu, flags, comm)


class FakeKernelCpuActor(CpuActor):
    """The CPU actor with known_stacks replaced by a dictionary (stack id -> map value)."""

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx)
        self.known: dict[int, bytes] = {}
        self.lookups = 0

    def lookup_known_stack(self, stack_id: int) -> bytes | None:
        self.lookups += 1
        return self.known.get(stack_id)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = Target(build(tmp_path))
    yield t
    t.stop()


def _fake_kernel_actor(**settings: Any) -> FakeKernelCpuActor:
    """The actor with stack dedup on (and ``settings``), no sink: tests call to_samples."""
    ctx = ActorContext(AgentSettings(cpu_stack_dedup=True, **settings), Symbolizer(), ThreadPoolExecutor(1),
                       None,  # type: ignore[arg-type]
                       Counters(), MonotonicToUnix())
    return FakeKernelCpuActor(ctx)


@pytest.fixture
def actor() -> FakeKernelCpuActor:
    return _fake_kernel_actor()


def test_layouts_match_the_struct_formats() -> None:
    assert SAMPLE_RECORD.size == ctypes.sizeof(SampleRecord) == 56
    assert KNOWN_STACK_HEAD.size == KnownStack.ev.offset == 16
    assert SampleRecord.comm.offset == 40 and SampleRecord.flags.offset == 36


def test_same_stack_twice_full_record_then_id_record(target: Target, actor: FakeKernelCpuActor) -> None:
    """A new stack's record carries it; the next sample of it is 56 bytes and gets the same
    frames without a symbolizer lookup, with its own time, cpu, tid and thread name."""
    leaf, _ = target.truth["leaf_function"]
    caller, _ = target.truth["caller_function"]
    pid = target.pid
    full = header(5_000, 77, 3, pid, pid, 1, DedupFlags.NEW, b"first\0") + stack_event(pid, pid, [leaf, caller + 1])
    (first,) = actor.to_samples([full])
    lookups = actor.ctx.symbolizer.stats["lookups"]
    (second,) = actor.to_samples([header(9_000, 77, 3, pid, pid + 1, 0, DedupFlags.ID_ONLY, b"second\0")])
    assert [f.function for f in first.frames] == ["leaf_function", "caller_function"]
    assert second.frames is first.frames
    assert actor.ctx.symbolizer.stats["lookups"] == lookups
    offset = actor.ctx.clock.to_unix_ns(0)
    assert (first.timestamp_ns, first.cpu, first.tid, first.thread_name) == (5_000 + offset, 1, pid, "first")
    assert (second.timestamp_ns, second.cpu, second.tid, second.thread_name) == (9_000 + offset, 0, pid + 1, "second")
    assert first.values == second.values == (actor.period(),)
    assert actor.lookups == 0 and actor.ctx.counters.get("events_dropped") == 0


def test_id_record_before_its_stack_in_one_batch(target: Target, actor: FakeKernelCpuActor) -> None:
    """Within a batch the order does not matter: stacks are keyed by (id, serial)."""
    leaf, _ = target.truth["leaf_function"]
    pid = target.pid
    records = [header(2, 5, 1, pid, pid, 0, DedupFlags.ID_ONLY, b"t"),
               header(1, 5, 1, pid, pid, 0, DedupFlags.NEW, b"t") + stack_event(pid, pid, [leaf])]
    samples = actor.to_samples(records)
    assert [[f.function for f in s.frames] for s in samples] == [["leaf_function"]] * 2
    assert actor.lookups == 0


def test_unknown_stack_resolved_from_the_kernel_map_or_counted(target: Target, actor: FakeKernelCpuActor) -> None:
    """An id the actor does not hold is read from known_stacks if the serial there is the
    record's; a replaced entry (another serial) or a missing one is a counted drop."""
    caller, _ = target.truth["caller_function"]
    pid = target.pid
    actor.known[11] = KNOWN_STACK_HEAD.pack(4, 0) + stack_event(pid, pid, [caller])
    (sample,) = actor.to_samples([header(1, 11, 4, pid, pid, 0, DedupFlags.ID_ONLY, b"t")])
    assert [f.function for f in sample.frames] == ["caller_function"]
    assert actor.ctx.counters.get("cpu_stacks_from_kernel") == 1
    # Evicted in the kernel and stored again (serial 9): the record's serial-4 stack is gone.
    actor.known[12] = KNOWN_STACK_HEAD.pack(9, 0) + stack_event(pid, pid, [caller])
    assert actor.to_samples([header(1, 12, 4, pid, pid, 0, DedupFlags.ID_ONLY, b"t"),
                             header(1, 13, 1, pid, pid, 0, DedupFlags.ID_ONLY, b"t")]) == []
    assert actor.ctx.counters.get("events_dropped", type="cpu", reason="stack_unknown") == 2


def test_unstored_records_are_never_cached(target: Target, actor: FakeKernelCpuActor) -> None:
    """A collision, a stack copy or an error comes whole and unstored: its sample is kept,
    and an id record naming the same (id, serial) does not resolve to it."""
    leaf, _ = target.truth["leaf_function"]
    pid = target.pid
    unstored = header(1, 21, 2, pid, pid, 0, DedupFlags.UNSTORED, b"t") + stack_event(pid, pid, [leaf])
    (sample,) = actor.to_samples([unstored])
    assert [f.function for f in sample.frames] == ["leaf_function"]
    assert actor.to_samples([header(2, 21, 2, pid, pid, 0, DedupFlags.ID_ONLY, b"t")]) == []
    assert actor.ctx.counters.get("events_dropped", type="cpu", reason="stack_unknown") == 1


def test_evicted_from_the_agent_cache_resolved_from_the_kernel(target: Target, actor: FakeKernelCpuActor) -> None:
    """With room for one stack per generation, older stacks leave the actor's cache; their
    id records are then resolved from the kernel map, with the same frames."""
    leaf, _ = target.truth["leaf_function"]
    caller, _ = target.truth["caller_function"]
    pid = target.pid
    actor._stack_capacity = 1
    stacks = {31: [leaf], 32: [caller], 33: [leaf, caller + 1]}
    for stack_id, user in stacks.items():
        event = stack_event(pid, pid, user)
        actor.known[stack_id] = KNOWN_STACK_HEAD.pack(1, 0) + event
        actor.to_samples([header(1, stack_id, 1, pid, pid, 0, DedupFlags.NEW, b"t") + event])
    samples = actor.to_samples([header(2, 31, 1, pid, pid, 0, DedupFlags.ID_ONLY, b"t")])
    assert [[f.function for f in s.frames] for s in samples] == [["leaf_function"]]
    assert actor.lookups == 1


def test_stack_of_another_process_is_never_borrowed(target: Target, actor: FakeKernelCpuActor) -> None:
    """Stacks are cached per process identity: an id record naming another pid than the
    stack's is not given that stack (stack ids include the pid, so this only happens with
    corrupt input), and is counted."""
    leaf, _ = target.truth["leaf_function"]
    pid = target.pid
    event = stack_event(pid, pid, [leaf])
    actor.known[41] = KNOWN_STACK_HEAD.pack(1, 0) + event
    actor.to_samples([header(1, 41, 1, pid, pid, 0, DedupFlags.NEW, b"t") + event])
    assert actor.to_samples([header(2, 41, 1, 1, 1, 0, DedupFlags.ID_ONLY, b"t")]) == []
    assert actor.ctx.counters.get("events_dropped", type="cpu", reason="stack_unknown") == 1


def test_a_serial_with_two_owners_in_one_batch_is_not_shared(target: Target, actor: FakeKernelCpuActor) -> None:
    """Id records are keyed by their serial alone (it names one store of one process's
    stack), checked against the pid and stack id each record carries: a batch where a serial
    comes with another pid or another stack id (corrupt input) gives those records nothing,
    counted, and the others their stack."""
    leaf, _ = target.truth["leaf_function"]
    pid = target.pid
    event = stack_event(pid, pid, [leaf])
    actor.known[51] = KNOWN_STACK_HEAD.pack(7, 0) + event
    actor.to_samples([header(1, 51, 7, pid, pid, 0, DedupFlags.NEW, b"t") + event])
    samples = actor.to_samples([header(2, 51, 7, pid, pid, 0, DedupFlags.ID_ONLY, b"t"),
                                header(3, 51, 7, 1, 1, 0, DedupFlags.ID_ONLY, b"t"),  # another pid
                                header(4, 52, 7, pid, pid, 0, DedupFlags.ID_ONLY, b"t"),  # another stack id
                                header(5, 51, 7, pid, pid, 1, DedupFlags.ID_ONLY, b"t")])
    offset = actor.ctx.clock.to_unix_ns(0)
    assert [(s.timestamp_ns - offset, s.pid, [f.function for f in s.frames]) for s in samples] == [
        (2, pid, ["leaf_function"]), (5, pid, ["leaf_function"])]
    assert actor.ctx.counters.get("events_dropped", type="cpu", reason="stack_unknown") == 2


def test_malformed_records_counted() -> None:
    batch = decode_batch([b"\0" * 40, b"\0" * 56, b"\0" * 100])
    assert batch.malformed == 2 and len(list(batch.ids)) == 1 and batch.full == []


def _receive(actor: FakeKernelCpuActor, record: bytes) -> None:
    """Hand ``record`` to the actor's ring-buffer source as its poll thread does with a batch."""
    source = actor.source
    assert isinstance(source, SlotRingSource) and source.on_records is not None
    source.on_records([record])
    source._pending.append(record)


def test_process_gone_before_its_records_are_symbolized(target: Target, actor: FakeKernelCpuActor) -> None:
    """Symbolizing runs behind the kernel (seconds on a busy host): a process that exits
    before its first record is symbolized is named from what was read when the record
    arrived, its main executable included (the file is gone from /proc with the process)."""
    leaf, _ = target.truth["leaf_function"]
    caller, _ = target.truth["caller_function"]
    pid = target.pid
    _receive(actor, header(1, 51, 1, pid, pid, 0, DedupFlags.NEW, b"t") + stack_event(pid, pid, [leaf, caller + 1]))
    target.stop()
    assert not Path(f"/proc/{pid}").exists()
    (sample,) = actor.to_samples(actor.source.drain())
    assert [f.function for f in sample.frames] == ["leaf_function", "caller_function"]
    assert sample.process_name == "target"
    assert actor.ctx.symbolizer.stats["read_from_capture"] == 1


def test_process_gone_unseen_is_counted(target: Target, actor: FakeKernelCpuActor) -> None:
    """Without a capture (its record never passed the poll thread), such a process's frames
    stay unnamed, and that is counted rather than silent."""
    leaf, _ = target.truth["leaf_function"]
    pid = target.pid
    target.stop()
    (sample,) = actor.to_samples([header(1, 52, 1, pid, pid, 0, DedupFlags.NEW, b"t") + stack_event(pid, pid, [leaf])])
    assert [f.function for f in sample.frames] == [""]
    assert actor.ctx.symbolizer.stats["exited_before_read"] >= 1


def test_a_stack_with_an_unknown_frame_is_retried_a_bounded_number_of_times(target: Target,
                                                                              actor: FakeKernelCpuActor) -> None:
    """A frame in no mapping (0x1000) stays unknown: the stack is symbolized again on later
    samples (here every one: no retry delay) STACK_RETRIES times, then kept as it is and its
    raw record let go; every sample keeps the frames."""
    leaf, _ = target.truth["leaf_function"]
    pid = target.pid
    actor.STACK_RETRY_S = 0.0  # type: ignore[misc]
    full = header(1, 31, 1, pid, pid, 0, DedupFlags.NEW, b"t") + stack_event(pid, pid, [leaf, 0x1000])
    (first,) = actor.to_samples([full])
    assert [f.function for f in first.frames] == ["leaf_function", ""]
    symbolized = []
    for i in range(actor.STACK_RETRIES + 3):
        before = actor.ctx.symbolizer.stats["lookups"]
        (sample,) = actor.to_samples([header(2 + i, 31, 1, pid, pid, 0, DedupFlags.ID_ONLY, b"t")])
        assert [f.function for f in sample.frames] == ["leaf_function", ""]
        symbolized.append(actor.ctx.symbolizer.stats["lookups"] > before)
    assert symbolized == [True] * actor.STACK_RETRIES + [False] * 3
    (stack,) = actor._stacks.values()
    assert stack.raw is None


def test_the_agents_own_samples_weigh_the_share_bpf_kept(target: Target) -> None:
    """BPF keeps one in ``cpu_self_sample_one_in`` of the agent's own samples
    (bpf/cpu_sample_entry.h): each of them, whole or id record, weighs that many periods;
    every other process's sample weighs one period."""
    actor = _fake_kernel_actor(cpu_self_sample_one_in=8)
    leaf, _ = target.truth["leaf_function"]
    own, other = os.getpid(), target.pid
    records = [header(1, 21, 1, own, own, 0, DedupFlags.NEW, b"me") + stack_event(own, own, [leaf]),
               header(2, 22, 1, other, other, 0, DedupFlags.NEW, b"it") + stack_event(other, other, [leaf]),
               header(3, 21, 1, own, own, 1, DedupFlags.ID_ONLY, b"me"),
               header(4, 22, 1, other, other, 1, DedupFlags.ID_ONLY, b"it")]
    samples = sorted(actor.to_samples(records), key=lambda s: s.timestamp_ns)
    period = actor.period()
    assert [(s.pid, s.values) for s in samples] == [(own, (8 * period,)), (other, (period,)),
                                                   (own, (8 * period,)), (other, (period,))]
    assert actor.bpf_defines()["SELF_SAMPLE_ONE_IN"] == 8


def test_only_whole_records_make_the_poll_thread_read_their_processes(actor: FakeKernelCpuActor) -> None:
    """The poll thread's hook reads /proc (process captures) and asks the unwinder to look for
    requests for whole records only: an id record's stack came whole before, in the same image
    of its process."""
    noted: list[int] = []
    nudges: list[bool] = []

    class Captures:
        def note(self, pid: int) -> None:
            noted.append(pid)

    actor.ctx.symbolizer.captures = Captures()  # type: ignore[assignment]
    actor.unwinding.nudge_if_requested = lambda: nudges.append(True)  # type: ignore[method-assign]
    ids = [header(1, 5, 1, 100 + i, 100 + i, 0, DedupFlags.ID_ONLY, b"t") for i in range(3)]
    actor._note_processes(ids)
    assert noted == [] and nudges == []
    whole = header(2, 6, 1, 200, 200, 0, DedupFlags.NEW, b"t") + stack_event(200, 200, [0x1000])
    actor._note_processes([*ids, whole])
    assert noted == [200] and nudges == [True]
    own = os.getpid()  # the agent itself: never unwound in BPF, and it outlives its records
    actor._note_processes([header(3, 7, 1, own, own, 0, DedupFlags.NEW, b"t") + stack_event(own, own, [0x1000])])
    assert noted == [200] and nudges == [True]


def test_every_process_of_a_batch_is_announced_before_any_stack_is_symbolized(
        target: Target, actor: FakeKernelCpuActor) -> None:
    """BPF reads a CPython process's frames only once the actor has announced it (py_procs),
    and a first batch can take seconds to symbolize: so the batch's processes are all
    announced first, the one whose only record comes last included."""
    leaf, _ = target.truth["leaf_function"]
    own, other = os.getpid(), target.pid
    events: list[tuple[str, int]] = []

    class RecordingStacks(PythonStacks):
        def announce(self, pid: int) -> None:
            events.append(("announce", pid))
            super().announce(pid)

    assert actor.python_frames is not None
    actor.python_frames.stacks = RecordingStacks(PythonProcesses(actor.ctx.counters), None, actor.ctx.counters, "cpu")
    symbolizer = actor.ctx.symbolizer
    symbolize_user = symbolizer.symbolize_user

    def recording_symbolize_user(pid: int, addresses: Any) -> Any:
        events.append(("symbolize", pid))
        return symbolize_user(pid, addresses)

    symbolizer.symbolize_user = recording_symbolize_user  # type: ignore[method-assign]
    actor.known[31] = KNOWN_STACK_HEAD.pack(2, 0) + stack_event(own, own, [leaf])
    whole = header(1, 30, 1, other, other, 0, DedupFlags.NEW, b"it") + stack_event(other, other, [leaf])
    samples = actor.to_samples([whole, header(2, 31, 2, own, own, 0, DedupFlags.ID_ONLY, b"me")])
    assert len(samples) == 2
    first_symbolized = events.index(("symbolize", other))
    assert {pid for kind, pid in events[:first_symbolized] if kind == "announce"} == {own, other}, events
    # And the announcement took: this process runs CPython, the target does not.
    python = actor.python_frames.stacks.processes
    assert python.lookup(own) is not None and python.lookup(own).process is not None  # type: ignore[union-attr]
    assert python.lookup(other) is not None and python.lookup(other).process is None  # type: ignore[union-attr]
