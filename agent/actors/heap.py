"""Heap actor: sampled native allocations and live memory per stack (bpf/heap.bpf.c).

The mode is chosen per process:

- Go programs: never probed; their runtime's own sampled profiles are read from memory
  (``GoHeapProfiles``, below).
- Sampled (native, always on): a process that loaded the preload library
  ``agent/heap_sampler`` (``LD_PRELOAD``) samples its own allocations and calls a no-op
  function for each sampled allocation and each free of a sampled block; only those calls
  trap into the kernel, so the cost follows the sampled allocations (benchmarks/heap_overhead.py).
  The probes are attached per library file for all processes (``SamplerProbes``): every
  process that maps the library is profiled, selected or not; loading it is the opt-in.
- Precise (native, opt-in): uprobes trap on every malloc/free of the process (measured cost
  in benchmarks/), so only processes matched by the selectors (``target_pids``,
  ``target_comm``, ``target_cgroup``) without the library get them; with no selector
  nothing is probed this way. Uprobes go on the process's own libc (malloc, calloc,
  realloc, free, posix_memalign, aligned_alloc, memalign; return probes where the address
  is needed) and BPF samples with the same geometric countdown.

Values, like pprof's heap profile: ``alloc_objects``/``alloc_space`` are allocations since
the previous report (deltas), ``inuse_objects``/``inuse_space`` what is live now (a
snapshot). A sampled allocation of ``s`` bytes with mean sampling distance ``N`` stands for
``1 / (1 - exp(-s/N))`` allocations of that size (the estimator tcmalloc and Go use); in
sampled mode ``N`` is the library's, read from each sample.
In-use figures count from the moment a process was probed: memory allocated before (or
before an agent restart) is not seen; ``heap.inuse_since`` on every sample says from when.
Go processes are never probed: their heap (and mutex/block) profiles are read from the
runtime's own records in memory, every process on the host or those the selectors match
(agent/runtimes/go/heap_profiles.py, docs/design/heap.md), in-use memory included.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from agent.actors.base import ActorContext, BpfActor
from agent.actors.parts import PythonFrames
from agent.actors.sources import RingBufferSource
from agent.bpf.layouts import HEAP_NEG_LOG_ENTRIES, HeapCounter, HeapEventKind
from agent.bpf.loader import BCC_LOCK
from agent.bpf.records import RawStackEvent
from agent.heap_sampler import is_sampler_library
from agent.heap_sampler.attach import SamplerProbes
from agent.process.procmaps import age_s, start_time
from agent.process.selectors import ProcessSelector
from agent.runtimes.go.heap_profiles import GoHeapProfiles
from agent.unwind import ActorUnwinding, chain_stages
from shared.model import Frame, Sample
from shared.profile_types import ProfileType

log = logging.getLogger(__name__)
MAX_LIVE = 262144
# How long a sampled process that exited is kept, so records still in the ring are counted.
SAMPLED_EXIT_GRACE_S = 3.0
_PROBES = (
    ("malloc", "on_malloc", True),
    ("calloc", "on_calloc", True),
    ("realloc", "on_realloc", True),
    ("posix_memalign", "on_posix_memalign", True),
    ("aligned_alloc", "on_aligned", True),
    ("memalign", "on_aligned", True),
    ("free", "on_free", False),
)


def sample_weight(size: int, mean_bytes: int) -> float:
    """How many allocations of ``size`` one sample stands for (Poisson sampling estimator)."""
    if size <= 0:
        return 1.0
    return 1.0 / -math.expm1(-size / mean_bytes)


def neg_log_table(mean_bytes: int, n: int = HEAP_NEG_LOG_ENTRIES) -> list[int]:
    """-ln(u) x mean for u evenly spread over (0, 1): exponential draws for the BPF sampler."""
    return [max(1, int(-math.log((i + 0.5) / n) * mean_bytes)) for i in range(n)]


@dataclass
class _HeapProcess:
    libc: str  # the probed file: libc, or the Go executable
    since_ns: int
    comm: str
    sample_bytes: int = 0  # sampled mode: the library's mean sampling distance
    live: dict[int, tuple[int, float, tuple[Frame, ...]]] = field(default_factory=dict)  # addr -> size, weight, stack
    alloc: dict[tuple[Frame, ...], list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    reported: set[tuple[Frame, ...]] = field(default_factory=set)


class HeapActor(BpfActor[bytes]):
    """Samples allocations of selected processes and tracks their sampled live set; records
    through a ring buffer, stacks with CPython frames. Selection happens by attaching per
    process (the selectors, matched by the shared process watcher), not in BPF."""

    profile_type = ProfileType.HEAP
    bpf_source = "heap.bpf.c"
    # New processes matching a selector are probed from the next refresh on (at most this late).
    TARGET_SCAN_INTERVAL_S = 1.0

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx, RingBufferSource.of(ctx, self.profile_type), PythonFrames(ctx, self.profile_type))
        self.selector = ProcessSelector.from_settings(ctx.settings)
        # User stacks unwound from DWARF CFI with the tables the other profiles share.
        self.unwinding = ActorUnwinding(self.ctx.unwinding, self.ctx.counters, self.profile_type.value)
        self.mean_bytes = self.ctx.settings.heap_sample_bytes
        self._processes: dict[int, _HeapProcess] = {}  # selected processes (precise mode, Go)
        self._sampled: dict[int, _HeapProcess] = {}  # processes with the sampler library
        self._sampled_live = 0  # live sampled blocks tracked over all of _sampled
        self._left_to_sampler: set[int] = set()  # selected processes that have the library
        self._gone_since: dict[int, float] = {}  # sampled processes seen exited, and since when
        self.sampler = SamplerProbes(self.ctx.counters)
        self._scanned = 0.0
        self._refreshing = False  # this flush's process refresh is under way (the two steps below)
        self._wanted: set[int] = set()
        self._warned_no_selector = False
        # Go: runtime profiles read from memory, no probes (a separate module, see the docstring).
        self.go_heap = GoHeapProfiles(self.ctx.symbolizer, self.ctx.counters, self.selector,
                                      self.ctx.settings.heap_go_interval_s, processes=ctx.processes)

    def period(self) -> int:
        return self.mean_bytes

    def bpf_defines(self) -> dict[str, int | str]:
        return {**super().bpf_defines(), "SAMPLE_BYTES": self.mean_bytes, "MAX_LIVE": MAX_LIVE,
                "AGENT_TGID": os.getpid()}

    def attach(self, bpf: Any) -> None:
        from bcc import BPF

        # Stage 2 of every record with stacks (bpf/heap.bpf.c), wired before any probe fires.
        chain_stages(bpf, "heap_stages", [("heap_record_stacks", BPF.KPROBE)])
        table = bpf["neg_log_table"]
        for i, value in enumerate(neg_log_table(self.mean_bytes)):
            table[ctypes.c_int(i)] = ctypes.c_uint64(value)
        self.sampler.attach_built_library(bpf)

    # -- per-process probes ---------------------------------------------------------------------
    def track_started_processes(self) -> None:
        """Find the Go processes to read (when a read is due), and probe the selected processes
        not probed yet (every TARGET_SCAN_INTERVAL_S)."""
        if self.bpf is None:
            return
        self.go_heap.discover()
        now = time.monotonic()
        if now - self._scanned < self.TARGET_SCAN_INTERVAL_S:
            return
        self._scanned = now
        self._refreshing = True
        if not self.selector.filters:
            if not self._warned_no_selector:
                log.info(
                    "heap actor: no process selector set (STACKFLEET_TARGET_PIDS / _COMM / _CGROUP): "
                    "native processes are profiled only with the sampler library (sampled mode); "
                    "Go processes are read from memory")
                self._warned_no_selector = True
            return
        self._wanted = set(self.ctx.processes.current(self.TARGET_SCAN_INTERVAL_S).selected or ()) - {os.getpid()}
        self._left_to_sampler &= self._wanted
        for pid in self._wanted - set(self._processes) - self._left_to_sampler:
            self._probe(pid)

    def forget_exited_processes(self) -> None:
        """After the records are reported: detach from processes no longer selected, forget
        exited sampled processes, and let the sampler's probes look at new library users (its
        scan also forgets exited pids, so it runs here, after the conversion needed them)."""
        if not self._refreshing:
            return
        self._refreshing = False
        self.sampler.scan(self.bpf, self.ctx.processes.current(self.TARGET_SCAN_INTERVAL_S).alive)
        self._forget_exited_sampled()
        if self.selector.filters:
            for pid in set(self._processes) - self._wanted:
                self._unprobe(pid)

    def _probe(self, pid: int) -> None:
        """A selected process: Go is read from memory, never probed; else sampled mode if it has
        the library, else precise mode."""
        if self.go_heap.is_go(pid):
            return  # read from memory by self.go_heap
        if self.sampler.library_of(pid, self.bpf) is not None:
            self._left_to_sampler.add(pid)  # its library's probes already cover it
            return
        self._probe_precise(pid)

    def _probe_precise(self, pid: int) -> None:
        libc = _libc_path(pid)
        if libc is None:
            self.ctx.counters.inc("heap_processes_skipped", reason="no_libc")
            return
        try:
            with BCC_LOCK:
                for sym, fn, has_return in _PROBES:
                    self.bpf.attach_uprobe(name=libc, sym=sym, fn_name=fn, pid=pid)
                    if has_return:
                        self.bpf.attach_uretprobe(name=libc, sym=sym, fn_name="on_alloc_return", pid=pid)
        except Exception as exc:
            self.ctx.counters.inc("heap_processes_skipped", reason=type(exc).__name__)
            return
        self._processes[pid] = _HeapProcess(libc, time.time_ns(), self.ctx.symbolizer.process_name(pid))
        self.ctx.counters.inc("heap_processes_probed")

    def _unprobe(self, pid: int) -> None:
        proc = self._processes.pop(pid)
        with BCC_LOCK:
            for sym, _fn, has_return in _PROBES:
                for detach in ([self.bpf.detach_uprobe, self.bpf.detach_uretprobe] if has_return
                               else [self.bpf.detach_uprobe]):
                    try:
                        detach(name=proc.libc, sym=sym, pid=pid)
                    except Exception:
                        pass  # the process is gone and the kernel already dropped the probe

    # -- events -----------------------------------------------------------------------------------
    def read_bpf_counters(self) -> None:
        delta = self.counter_deltas()
        self.count_drops(delta, {HeapCounter.RING_FULL: "ringbuf_full", HeapCounter.LIVE_FULL: "live_map_full",
                                 HeapCounter.TAIL_CALL_FAILED: "tail_call_failed"})
        if delta and delta[HeapCounter.ALLOCATIONS]:
            self.ctx.counters.inc("heap_allocations_seen", delta[HeapCounter.ALLOCATIONS])

    def to_samples(self, records: list[bytes]) -> list[Sample]:
        if self.bpf is None:
            return []
        for ev in self.parsed(records):
            if ev.kind in (HeapEventKind.SAMPLED_ALLOC, HeapEventKind.SAMPLED_FREE):
                self._sampled_event(ev)
                continue
            proc = self._processes.get(ev.pid)
            if proc is None:
                continue
            if ev.kind == HeapEventKind.ALLOC:
                frames = self.frames(ev)
                weight = sample_weight(ev.value, self.mean_bytes)
                proc.live[ev.aux] = (ev.value, weight, frames)
                totals = proc.alloc[frames]
                totals[0] += weight
                totals[1] += weight * ev.value
            else:
                proc.live.pop(ev.aux, None)
        return self._report() + self.go_heap.collect(time.time_ns())

    # -- Go: mutex/block profiles read with the heap go out as the lock type ---------------------
    async def _flush(self, loop: asyncio.AbstractEventLoop, final: bool = False) -> None:
        await super()._flush(loop, final)
        lock_samples, self.go_heap.lock_samples = self.go_heap.lock_samples, []
        if lock_samples:
            await self.ctx.sink.submit(ProfileType.LOCK, lock_samples, 1)

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            self.go_heap.close()

    # -- sampled mode -----------------------------------------------------------------------------
    def _sampled_event(self, ev: RawStackEvent) -> None:
        """A record from the sampler library's probes: a sampled allocation or its free."""
        proc = self._sampled.get(ev.pid)
        if ev.kind == HeapEventKind.SAMPLED_FREE:
            if proc is not None and proc.live.pop(ev.aux, None) is not None:
                self._sampled_live -= 1
            return
        if proc is None:
            proc = self._new_sampled_process(ev.pid)
            if proc is None:
                return
        # The probe is called from the library's slow path, which keeps a frame pointer: the
        # frames a stack-copy scan could recover between the two are the library's own, dropped
        # anyway. Without the copy the symbolized stack is also cached by its raw addresses.
        ev.stack_copy = b""
        frames = _without_sampler_frames(self.frames(ev))
        weight = sample_weight(ev.value, proc.sample_bytes)
        if ev.aux not in proc.live:
            if self._sampled_live >= MAX_LIVE:
                self.ctx.counters.inc("events_dropped", type=self.profile_type.value, reason="sampled_live_full")
            else:
                self._sampled_live += 1
                proc.live[ev.aux] = (ev.value, weight, frames)
        else:
            proc.live[ev.aux] = (ev.value, weight, frames)  # its free was lost: the newer block wins
        totals = proc.alloc[frames]
        totals[0] += weight
        totals[1] += weight * ev.value

    def _new_sampled_process(self, pid: int) -> _HeapProcess | None:
        try:
            sample_bytes = int(self.bpf["sampler_mean"][ctypes.c_uint32(pid)].value)
        except KeyError:
            sample_bytes = 0
        if sample_bytes <= 0:  # written before every SAMPLED_ALLOC record: only a process gone since
            self.ctx.counters.inc("events_dropped", type=self.profile_type.value, reason="sampler_mean_unknown")
            return None
        library = self.sampler.library_of(pid, self.bpf)
        since_ns = library.attached_ns if library else time.time_ns()
        try:  # a process started after the attach is seen from its start
            since_ns = max(since_ns, time.time_ns() - int(age_s(start_time(pid)) * 1e9))
        except (OSError, ValueError, IndexError):
            pass
        proc = _HeapProcess(library.path if library else "", since_ns, self.ctx.symbolizer.process_name(pid),
                            sample_bytes=sample_bytes)
        self._sampled[pid] = proc
        self.ctx.counters.inc("heap_processes_sampled")
        return proc

    def _forget_exited_sampled(self) -> None:
        """Forget sampled processes gone for SAMPLED_EXIT_GRACE_S: records they made just before
        exiting may still be in the ring buffer (the poll thread lags on a loaded host), and
        they need the process's entry (its sampling mean) to be counted."""
        now = time.monotonic()
        gone = []
        for pid in self._sampled:
            if os.path.exists(f"/proc/{pid}"):
                continue
            if now - self._gone_since.setdefault(pid, now) >= SAMPLED_EXIT_GRACE_S:
                gone.append(pid)
        for pid in gone:
            self._gone_since.pop(pid, None)
            self._sampled_live -= len(self._sampled.pop(pid).live)
            try:
                del self.bpf["sampler_mean"][ctypes.c_uint32(pid)]
            except KeyError:
                pass

    def _report(self) -> list[Sample]:
        now = time.time_ns()
        out = []
        for pid, proc in [*self._processes.items(), *self._sampled.items()]:
            inuse: dict[tuple[Frame, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
            for size, weight, frames in proc.live.values():
                entry = inuse[frames]
                entry[0] += weight
                entry[1] += weight * size
            stacks = set(inuse) | set(proc.alloc) | proc.reported
            for frames in stacks:
                ao, aspace = proc.alloc.get(frames, (0.0, 0.0))
                io, ispace = inuse.get(frames, (0.0, 0.0))
                out.append(Sample(now, 0, pid, pid, proc.comm, proc.comm, frames,
                                  (round(ao), round(aspace), round(io), round(ispace)),
                                  {"heap.inuse_since": str(proc.since_ns)}))
            proc.reported = set(inuse)
            proc.alloc.clear()
        return out


def _without_sampler_frames(frames: tuple[Frame, ...]) -> tuple[Frame, ...]:
    """The stack from the function that called the allocator: the library's frames (its
    probe function and the wrapper that called it) are dropped from the leaf end."""
    i = 0
    while i < len(frames) - 1:
        mapping = frames[i].mapping
        if mapping is None or not is_sampler_library(mapping.filename):
            break
        i += 1
    return frames[i:]


def _libc_path(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and ("/libc.so" in parts[5] or "/libc-" in parts[5]):
                    return f"/proc/{pid}/root{parts[5]}"
    except OSError:
        return None
    return None
