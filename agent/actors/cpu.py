"""CPU actor: on-CPU stacks of every process, sampled at a fixed frequency on every CPU.

BPF side: bpf/cpu.bpf.c on a software ``cpu-clock`` perf event (hardware counters are not
assumed to exist, e.g. in VMs). Each sample's value is the sampling period in nanoseconds,
so summed values are CPU time.

With ``native_unwinding`` on, the program also unwinds user stacks from DWARF CFI tables
(bpf/unwind.h) that the agent's shared unwinder (agent/unwind/sharing.py) loads per process.

Stacks are deduplicated in the kernel (bpf/stack_dedup.h, docs/design/stack-dedup.md): a
sample of a stack BPF stored before is a 56-byte record carrying (stack id, serial). The
actor keeps symbolized stacks by (ProcessKey, stack id, serial); a batch's id records become
columns (shared.model.SampleColumns): each distinct stack, thread name and process of the
batch is looked up once, no Python step per sample. A record whose stack the actor does not
hold is resolved from the kernel's ``known_stacks`` map (serial checked) or counted as
dropped (``events_dropped{reason=stack_unknown}``): never guessed.

The agent's own samples are kept one in ``cpu_self_sample_one_in`` (at random, in BPF), each
weighing that many periods: nearly every one of them is a new stack (its CPython frames move
at every sample), and symbolizing them was a quarter of the agent's own cost at 999 Hz
(docs/design/overhead.md, "Fixed work and the agent's own samples").
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.actors.base import ActorContext, BpfActor
from agent.actors.parts import PythonFrames
from agent.actors.sources import SlotRingSource, wakeup_bytes
from agent.bpf.layouts import CpuCounter, DedupFlags, SampleRecord, StackEvent
from agent.bpf.records import RawStackEvent
from agent.bpf.ring_reader import RingItem, SlotRun, ring_records
from agent.bpf.sample_records import (
    KNOWN_STACK_SIZE,
    SAMPLE_RECORD,
    STACK_KEY,
    IdColumns,
    decode_batch,
    parse_known_stack,
    record_pids,
    thread_name,
)
from agent.runtimes.python.frames import PY_STATUS, UNKNOWN_FRAME
from agent.stacks.assembly import event_frames
from agent.unwind import ActorUnwinding, chain_stages
from shared.model import Coded, Column, Frame, Sample, SampleColumns, numbering
from shared.profile_types import ProfileType

# Where the pid is in every record: id records and whole stacks alike (bpf/stack_dedup.h,
# bpf/stack_event.h), so the poll thread reads it without telling them apart.
_PID_AT = SampleRecord.pid.offset
if StackEvent.pid.offset != _PID_AT:
    raise ImportError("sample_record and stack_event must keep pid at the same offset")

# Counter slots folded into ``cpu_stacks{result=...}`` (how well stacks deduplicate).
_STACK_RESULTS = {
    CpuCounter.STACKS_STORED: "stored",
    CpuCounter.STACKS_KNOWN: "known",
    CpuCounter.STACK_COLLISIONS: "collision",
    CpuCounter.STACK_STORE_FAILED: "store_failed",
    CpuCounter.STACKS_WITH_COPY: "with_copy",
    CpuCounter.STACKS_WITH_ERROR: "with_error",
}


@dataclass(slots=True)
class _Stack:
    """A symbolized stack; ``raw`` is kept while some frame is unknown, to try again later
    (at most ``retries_left`` more times)."""

    frames: tuple[Frame, ...]
    py_status: int
    raw: RawStackEvent | None
    retry_at: float
    retries_left: int
    nbytes: int = 0  # estimated, charged to the cache budget (_stack_bytes)


# Estimated bytes of one cached stack, charged to the cache budget (agent/memory_budget.py).
# Measured with tracemalloc on 10,000 entries made as the actor makes them: 462 B for a
# 20-frame stack without its record (key tuple with two large ints, the _Stack, the dict
# slot, the frames tuple; the Frames are the symbolizer's); a kept record with 20 user,
# 10 kernel addresses and 10 Python frames 3,200 B (~40 B an address, ~140 B a Python frame).
_STACK_BYTES, _STACK_FRAME_BYTES = 300, 8
_RAW_BYTES, _RAW_ADDRESS_BYTES, _RAW_PYTHON_BYTES = 600, 40, 140


def _stack_bytes(frames: tuple[Frame, ...], raw: RawStackEvent | None) -> int:
    nbytes = _STACK_BYTES + _STACK_FRAME_BYTES * len(frames)
    if raw is not None:
        nbytes += (_RAW_BYTES + _RAW_ADDRESS_BYTES * (len(raw.user) + len(raw.kernel))
                   + _RAW_PYTHON_BYTES * len(raw.python) + len(raw.stack_copy))
    return nbytes


class CpuActor(BpfActor[RingItem]):
    """Samples on-CPU stacks with a perf_event BPF program; records through a ring buffer."""

    profile_type = ProfileType.CPU
    bpf_source = "cpu.bpf.c"
    # A stack with an unknown frame (a process whose maps or code objects were not readable
    # yet) is symbolized again from its raw addresses at most this often.
    STACK_RETRY_S: ClassVar[float] = 2.0
    # ... and at most this many times: a frame still unknown after ~10 s (JIT code, anonymous
    # memory, a process whose maps stayed unreadable) stays unknown, and retrying it kept its
    # parsed record (address lists, Python frame tuples: ~3 KB) and cost a symbolization
    # every 2 s for as long as the stack was sampled (half of the agent's cached stacks held
    # one on a busy shared host, docs/design/overhead.md).
    STACK_RETRIES: ClassVar[int] = 5
    THREAD_NAMES_MAX: ClassVar[int] = 65536
    # A process image's first whole record wakes the poll thread at once, at most this often
    # (bpf/ring_wakeup.h ring_wakeup_first_flag), so the process is read before it may exit
    # (agent/process/capture.py); its later whole records (new stacks) and id records wait in
    # the ring for the next wakeup or flush.
    NEW_RECORD_WAKEUP_S: ClassVar[float] = 0.2

    def __init__(self, ctx: ActorContext) -> None:
        # Id records are drained in runs (agent/bpf/ring_reader.py drain_batch).
        source = self._ring = SlotRingSource.of(ctx, self.profile_type, SAMPLE_RECORD.size,
                                                on_records=self._note_processes)
        super().__init__(ctx, source, PythonFrames(ctx, self.profile_type))
        self.unwinding = ActorUnwinding(ctx.unwinding, ctx.counters, self.profile_type.value)
        self.dedup = ctx.settings.cpu_stack_dedup
        if not self.dedup:
            self.bpf_source = "cpu_records.bpf.c"  # type: ignore[misc]
        # Symbolized stacks in two generations (a cheap approximate LRU): hits in the old one
        # move to the new one; when the new one holds `_stack_capacity` stacks or half of the
        # actor's share of the cache budget, the old is dropped (counted as evictions).
        # At least the kernel map's size, so a stack the kernel still refers to is normally here.
        self._stack_capacity = ctx.settings.cpu_known_stacks
        self._stacks: dict[tuple[Any, int, int], _Stack] = {}
        self._stacks_old: dict[tuple[Any, int, int], _Stack] = {}
        self._share = ctx.budget.share("cpu_stacks")
        self._young_bytes = 0  # of _stacks; the share's ``used`` is both generations
        self._thread_names: dict[bytes, str] = {}
        self._known_buffer = ctypes.create_string_buffer(KNOWN_STACK_SIZE)
        self._own_pid = os.getpid()

    def _note_processes(self, items: Sequence[RingItem]) -> None:
        # As records leave the ring (poll thread, or a flush's drain). Only whole records (a new
        # stack, a copy, an error) need anything here: an id record's stack came whole before,
        # in this image of its process (an exec or a reused pid starts a new generation of ids,
        # bpf/cpu.bpf.c). Id records come in runs (SlotRun); whole ones each as their bytes.
        whole = [r for r in items if not isinstance(r, SlotRun) and len(r) != SAMPLE_RECORD.size]
        if not whole:
            return
        # The agent's own records need neither: it is never unwound in BPF and outlives them.
        pids = record_pids(whole) - {self._own_pid}
        if not pids:
            return
        # A process not scanned yet is read now, while it lives (the scan may have backed off).
        self.ctx.processes.nudge(pids)
        # A whole record is what a sample that made an unwind request looks like: the worker
        # is woken for it instead of polling often (agent/unwind/loader.py IDLE_POLL_INTERVAL_S),
        # if BPF did leave one (it writes the request before the record): most whole records
        # are a known process's new stacks, and an idle round of the worker costs ~0.2 ms.
        # Those of a process image already read wake nobody (bpf/ring_wakeup.h): a request
        # of theirs (a library loaded late) waits for this or the worker's idle poll.
        self.unwinding.nudge_if_requested()
        # A process that exits before its records are symbolized is still symbolized from
        # what was read now (agent/process/capture.py).
        captures = self.ctx.symbolizer.captures
        if captures is None:
            return
        for pid in pids:
            captures.note(pid)

    def period(self) -> int:
        return 1_000_000_000 // self.ctx.settings.frequency_hz

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "SAMPLE_PERIOD_NS": self.period(),
                "KNOWN_STACK_ENTRIES": self.ctx.settings.cpu_known_stacks,
                "WAKEUP_BYTES": wakeup_bytes(self._ring.ring_bytes), "CPU_SELF_TGID": self._own_pid,
                "SELF_SAMPLE_ONE_IN": self.ctx.settings.cpu_self_sample_one_in,
                "NEW_RECORD_WAKEUP_NS": int(self.NEW_RECORD_WAKEUP_S * 1e9)}

    def attach(self, bpf: Any) -> None:
        from bcc import BPF, PerfSWConfig, PerfType

        # Later stages of every sample (see bpf/cpu.bpf.c): loaded and wired before attaching.
        if self.dedup:
            chain_stages(bpf, "cpu_stages", [("cpu_sample_stacks", BPF.PERF_EVENT),
                                             ("cpu_sample_emit", BPF.PERF_EVENT)])
        else:
            chain_stages(bpf, "cpu_stages", [("cpu_sample_stacks", BPF.PERF_EVENT)])
        bpf.attach_perf_event(
            ev_type=PerfType.SOFTWARE,
            ev_config=PerfSWConfig.CPU_CLOCK,
            fn_name="on_cpu_sample",
            sample_freq=self.ctx.settings.frequency_hz,
        )

    def read_bpf_counters(self) -> None:
        deltas = self.counter_deltas()
        self.count_drops(deltas, {CpuCounter.RING_FULL: "ringbuf_full",
                                  CpuCounter.TAIL_CALL_FAILED: "tail_call_failed"})
        if len(deltas) > CpuCounter.SELF_NOT_KEPT and deltas[CpuCounter.SELF_NOT_KEPT]:
            # Not a loss: the kept ones weigh for them (cpu_self_sample_one_in).
            self.ctx.counters.inc("cpu_self_samples_not_kept", deltas[CpuCounter.SELF_NOT_KEPT])
        for slot, result in _STACK_RESULTS.items():
            if slot < len(deltas) and deltas[slot]:
                self.ctx.counters.inc("cpu_stacks", deltas[slot], result=result)

    # -- records to samples ---------------------------------------------------------------
    def to_samples(self, records: Sequence[RingItem]) -> SampleColumns:
        """Samples of a drain's records, as columns.

        Id records are decoded together and turned into columns without a Python step per
        sample: each distinct (pid, stack id, serial), thread name and pid of the batch is
        resolved once, and the columns are mapped from those in C (stacks, thread and process
        names dictionary-encoded: shared.model.Coded). Records with a whole stack (new stacks,
        copies, errors: few) become samples one by one, first, so that id records of their
        stacks find them; their samples come after the id records' in the batch."""
        if not self.dedup:
            return SampleColumns.from_samples(self._whole_records_to_samples(ring_records(records)))
        ctx = self.ctx
        type_name = self.profile_type.value
        batch = decode_batch(records)
        if batch.malformed:
            ctx.counters.inc("events_dropped", batch.malformed, type=type_name, reason="malformed_record")
        offset = ctx.clock.to_unix_ns(0)
        values = (self.period(),)
        weights = self._self_values()
        now = time.monotonic()
        processes = self._processes(batch.pids())
        fresh: dict[tuple[int, int], RawStackEvent] = {}
        statuses: Counter[int] = Counter()
        whole: list[Sample] = []
        for head, ev in batch.full:
            ts, stack_id, serial, pid, tid, cpu, flags, comm = head
            process_key, process_name = processes[pid]
            if flags == DedupFlags.NEW:
                fresh[(stack_id, serial)] = ev
                stack = self._stack(process_key, pid, stack_id, serial, fresh, now, statuses)
                frames = stack.frames if stack is not None else self.frames(ev)
            else:  # not stored in BPF (a stack copy, an error, a collision): this record only
                frames = self.frames(ev)
            name = self._thread_name(comm)
            whole.append(Sample(ts + offset, cpu, pid, tid, name, process_name or name, frames,
                                weights.get(pid, values)))
        # The id records' columns first, the few whole records' samples after them: appending a
        # block of encoded columns to others renumbers its codes (shared.model.Coded.concat).
        parts = [self._id_columns(block, processes, fresh, now, statuses, offset, values, weights)
                 for block in batch.id_blocks]
        out = parts[0] if parts else SampleColumns.from_samples(whole)
        for part in parts[1:]:
            out.concat(part)
        if parts and whole:
            out.concat(SampleColumns.from_samples(whole))
        for status, n in statuses.items():
            if status and self.python is not None:
                ctx.counters.inc("python_stacks", n, type=type_name, status=PY_STATUS.get(status, "other"))
        return out

    def _id_columns(self, ids: IdColumns, processes: dict[int, tuple[Any, str]],
                    fresh: dict[tuple[int, int], RawStackEvent], now: float, statuses: Counter[int], offset: int,
                    values: tuple[int, ...], weights: dict[int, tuple[int, ...]]) -> SampleColumns:
        """The samples of decoded id records, column by column."""
        keys, pids = ids.stack, ids.pid
        # A key is a record's (stack id, serial, pid), exact: each distinct one of the batch
        # is resolved once, and no record can take another process's stack.
        stacks: dict[bytes, _Stack | None] = {}
        key_pids = []
        for key in dict.fromkeys(keys):
            stack_id, serial, pid = STACK_KEY.unpack(key)
            key_pids.append(pid)
            process_key, _name = processes[pid]
            stacks[key] = self._stack(process_key, pid, stack_id, serial, fresh, now, statuses)
        # _stack() counted each key's first sample; the rest are counted only where it matters
        # (an unknown stack, a Python status other than none), which needs the counts.
        unknown = 0
        if None in stacks.values() or (self.python is not None and any(s.py_status for s in stacks.values() if s)):
            for key, n in Counter(keys).items():
                stack = stacks[key]
                if stack is None:
                    unknown += n
                elif n > 1:
                    statuses[stack.py_status] += n - 1
        # The stack, thread and process columns dictionary-encoded (shared.model.Coded), their
        # values in the order of first samples: the encoder looks each value up once.
        distinct = list(stacks.values())
        stack_codes = list(map(numbering(stacks).__getitem__, keys))
        comms = dict.fromkeys(ids.comm)
        known_names = self._thread_names
        thread_names = [known_names.get(comm) or self._thread_name(comm) for comm in comms]
        thread_codes = list(map(numbering(comms).__getitem__, ids.comm))
        # A pid's first sample is its first key's: the keys' pids in order are the pids' order.
        batch_pids = dict.fromkeys(key_pids)
        process_names = [processes[pid][1] for pid in batch_pids]
        process_codes = list(map(numbering(batch_pids).__getitem__, pids))
        if not all(process_names):  # a process without a name is named by its thread
            named = [p or t for p, t in zip(map(process_names.__getitem__, process_codes),
                                            map(thread_names.__getitem__, thread_codes), strict=True)]
            process_column: Column[str] = named
        else:
            process_column = Coded(process_names, process_codes)
        sample_values = [values] * len(pids)
        for pid, own_values in weights.items():  # the agent's own samples weigh more (_self_values)
            if pid in batch_pids:
                at = -1
                with contextlib.suppress(ValueError):
                    while True:
                        at = pids.index(pid, at + 1)
                        sample_values[at] = own_values
        frames = Coded([s.frames if s else () for s in distinct], stack_codes)
        columns = SampleColumns(list(map(offset.__add__, ids.ts)), ids.cpu, pids, ids.tid,
                                Coded(thread_names, thread_codes), process_column, frames, sample_values)
        if unknown:
            self.ctx.counters.inc("events_dropped", unknown, type=self.profile_type.value, reason="stack_unknown")
            known = [s is not None for s in distinct]
            columns = columns.select(list(map(known.__getitem__, stack_codes)))
        return columns

    def _whole_records_to_samples(self, records: list[bytes]) -> list[Sample]:
        """Samples from whole ``struct stack_event`` records (bpf/cpu_records.bpf.c)."""
        ctx = self.ctx
        out = []
        for ev in self.parsed(records):
            out.append(Sample(
                timestamp_ns=ctx.clock.to_unix_ns(ev.ts_mono_ns),
                cpu=ev.cpu,
                pid=ev.pid,
                tid=ev.tid,
                thread_name=ev.thread_name,
                process_name=ctx.symbolizer.process_name(ev.pid) or ev.thread_name,
                frames=self.frames(ev),
                values=(ev.value,),
            ))
        return out

    def _self_values(self) -> dict[int, tuple[int, ...]]:
        """{agent pid: values} for the agent's own samples, which BPF keeps one in
        ``cpu_self_sample_one_in`` and which weigh that many periods (bpf/cpu_sample_entry.h)."""
        return {self._own_pid: (self.period() * self.ctx.settings.cpu_self_sample_one_in,)}

    def _processes(self, pids: list[int]) -> dict[int, tuple[Any, str]]:
        """{pid: (ProcessKey, name)} of a batch's processes, the CPython ones announced first
        (announce_python; the symbolizer's look at a process is a stat of every mapped file,
        tens of ms on a loaded host)."""
        self.announce_python(pids)
        symbolizer = self.ctx.symbolizer
        return {pid: (symbolizer.process_key(pid), symbolizer.process_name(pid)) for pid in pids}

    def _thread_name(self, comm: bytes) -> str:
        names = self._thread_names
        if len(names) >= self.THREAD_NAMES_MAX:
            names.clear()
        name = names[comm] = thread_name(comm)
        return name

    def _stack(self, process_key: Any, pid: int, stack_id: int, serial: int,
               fresh: dict[tuple[int, int], RawStackEvent], now: float, statuses: Counter[int]) -> _Stack | None:
        """The symbolized stack (stack_id, serial) of ``pid``: cached, else symbolized from this
        batch's records or the kernel's known_stacks map; None if neither has it."""
        key = (process_key, stack_id, serial)
        stack = self._stacks.get(key)
        if stack is None:
            stack = self._stacks_old.pop(key, None)
            if stack is not None:
                self._share.release(stack.nbytes)
                self._remember(key, stack)
        if stack is not None and (stack.raw is None or now < stack.retry_at):
            statuses[stack.py_status] += 1
            return stack
        raw = stack.raw if stack is not None else fresh.get((stack_id, serial)) or self._kernel_stack(stack_id, serial)
        if raw is None or raw.pid != pid:
            return None
        # splice() counts the Python status of this sample itself.
        frames = event_frames(raw, self.ctx.symbolizer, self.ctx.counters, self.profile_type.value, self.python)
        complete = all((f.function or f.mapping is not None) and f.function != UNKNOWN_FRAME for f in frames)
        retries_left = self.STACK_RETRIES if stack is None else stack.retries_left - 1
        keep = not complete and retries_left > 0
        if stack is not None:  # retried: replaced below
            self._share.release(stack.nbytes)
            self._young_bytes -= stack.nbytes
            del self._stacks[key]
        kept = raw if keep else None
        stack = _Stack(frames, raw.py_status, kept, now + self.STACK_RETRY_S, retries_left, _stack_bytes(frames, kept))
        self._remember(key, stack)
        return stack

    def _remember(self, key: tuple[Any, int, int], stack: _Stack) -> None:
        """Keep ``stack`` in the young generation (a new stack, or one moved from the old)."""
        share = self._share
        if len(self._stacks) >= self._stack_capacity or self._young_bytes + stack.nbytes > share.limit // 2:
            share.evicted(len(self._stacks_old), share.used - self._young_bytes)
            self._stacks_old = self._stacks
            self._stacks = {}
            self._young_bytes = 0
        self._stacks[key] = stack
        self._young_bytes += stack.nbytes
        share.charge(stack.nbytes)

    def _kernel_stack(self, stack_id: int, serial: int) -> RawStackEvent | None:
        """The stack stored in BPF under ``stack_id`` if it is still the one stored as ``serial``."""
        raw = self.lookup_known_stack(stack_id)
        if raw is None:
            return None
        try:
            stored_serial, ev = parse_known_stack(raw)
        except ValueError:
            return None
        if stored_serial != serial:
            return None  # evicted and stored again since: not the stack this record refers to
        self.ctx.counters.inc("cpu_stacks_from_kernel")
        return ev

    def lookup_known_stack(self, stack_id: int) -> bytes | None:
        """The raw ``known_stacks`` value of ``stack_id`` (None: not in the map)."""
        if self.bpf is None:
            return None
        from bcc.libbcc import lib

        key = ctypes.c_uint64(stack_id)
        if lib.bpf_lookup_elem(self.bpf["known_stacks"].map_fd, ctypes.byref(key), self._known_buffer) != 0:
            return None
        return self._known_buffer.raw

