"""Heap (and mutex/block) profiles of every Go process, from the runtime's own records.

On each flush (symbolization thread) the heap actor calls ``GoHeapProfiles.discover`` before
converting its records and ``GoHeapProfiles.collect`` with them. Every ``interval_s`` the
first finds the Go processes (all of them, or those the process selectors match when any is
set) and the second reads each one's profile buckets (agent.runtimes.go.heap) and turns them
into samples. No probe is attached to a Go process: the cost is a /proc scan and one
``pread`` per bucket (a few hundred microseconds for a typical program).

Values, as runtime/pprof's heap profile of the same moment (as of the last completed GC,
scaled with ``scaleHeapSample`` and the process's ``runtime.MemProfileRate``, leading
runtime frames hidden): ``alloc_*`` are what the scaled cumulative counts grew since the
previous read (deltas, as every heap sample of stackfleet); ``inuse_*`` the current
value. A process that started after this collector began is reported from its start (the
first read's deltas are its whole history, so the sum over reports equals pprof's
``alloc_space``); one already running is read once as a baseline, so an agent restart does
not count history twice.

Mutex and block profiles, when the program enabled them (``SetMutexProfileFraction``,
``SetBlockProfileRate``), become ``lock`` samples (contentions, delay ns: the runtime's
counts scaled as pprof scales them) with ``lock.source`` = ``go.mutex`` or ``go.block``.

Processes that cannot be read are counted per reason under ``go_heap_processes_skipped``
and logged once per binary: stripped (no symbol table, and the runtime variables cannot
be found from code either: see agent.runtimes.go.heap_code), unknown Go version, memory profiling
off (``MemProfileRate`` 0: the linker turns it off in programs that never reference
``runtime.MemProfile``, e.g. ones without runtime/pprof), unreadable memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import defaultdict
from functools import lru_cache

from agent.process.procmaps import FileKey, file_key, start_time
from agent.process.selectors import ProcessSelector
from agent.process.watcher import ProcessWatcher, running_pids
from agent.runtimes.go.heap import (
    RUNTIME_PREFIXES,
    BlockBucket,
    GoProfileReader,
    GoProfileSymbols,
    InconsistentRead,
    UnsupportedBinary,
    profile_symbols,
    scale_heap_sample,
)
from agent.runtimes.go.load_bias import load_bias
from agent.symbols import Symbolizer
from shared.counters import Counters
from shared.model import Frame, FrameType, Sample

log = logging.getLogger(__name__)
StackKey = tuple[Frame, ...]
MAX_NOT_GO = 16_384
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class _GoProcess:
    reader: GoProfileReader
    comm: str
    exe_path: str
    version: str
    start_unix_ns: int
    report_history: bool  # started after the collector: its first read counts in full
    frames: dict[int, StackKey] = dataclasses.field(default_factory=dict)  # bucket address -> frames
    alloc_seen: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # bucket -> scaled cumulative
    lock_seen: dict[tuple[str, int], tuple[int, int]] = dataclasses.field(default_factory=dict)
    reported_inuse: set[StackKey] = dataclasses.field(default_factory=set)
    read_once: bool = False
    rate_zero_counted: bool = False


@lru_cache(maxsize=1024)
def _symbols(path: str, identity: FileKey) -> GoProfileSymbols | UnsupportedBinary | None:
    """Per binary (``identity`` keys the cache): its profile symbols, why there are none
    (logged once), or None when it is not Go."""
    try:
        symbols = profile_symbols(path)
        if symbols is not None and symbols.source != "symtab":
            log.info("Go heap profile of %s: runtime variables found from %s (no symbol table)", path, symbols.source)
        return symbols
    except UnsupportedBinary as exc:
        log.warning("Go heap profile of %s cannot be read (%s): %s", path, exc.reason, exc)
        return exc
    except Exception as exc:  # unreadable or malformed file: not profiled, logged once (cached)
        log.info("cannot inspect %s: %s", path, exc)
        return None


def go_identity(pid: int) -> tuple[str, FileKey] | None:
    """(/proc path, file identity) of ``pid``'s executable, None when it has none."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return f"/proc/{pid}/exe", file_key(st)


class GoHeapProfiles:
    """Finds Go processes and turns their runtime profiles into heap and lock samples."""

    def __init__(self, symbolizer: Symbolizer, counters: Counters, selector: ProcessSelector,
                 interval_s: float, processes: ProcessWatcher | None = None) -> None:
        """``processes``: the shared process watcher whose scans list (and match) the processes;
        without it /proc is listed here."""
        self.symbolizer, self.counters, self.selector = symbolizer, counters, selector
        self.processes = processes
        self.interval_s = interval_s
        self._processes: dict[int, _GoProcess] = {}
        self._skipped: set[int] = set()  # pids counted as not readable (until they exit)
        self._not_go: set[FileKey] = set()
        self._read_at = 0.0
        self._due = False  # discovered for a read that collect has not made yet
        self._started_boot_s = time.clock_gettime(time.CLOCK_BOOTTIME)
        self.lock_samples: list[Sample] = []  # mutex/block samples of the last read, for the lock type

    def is_go(self, pid: int) -> bool:
        """True for a Go process: the heap actor never probes those (they are read here)."""
        found = go_identity(pid)
        return found is not None and _symbols(*found) is not None

    def close(self) -> None:
        for proc in self._processes.values():
            proc.reader.close()
        self._processes.clear()

    # -- discovery ---------------------------------------------------------------------------
    def _discover(self) -> None:
        pids = self._running()
        pids.discard(os.getpid())
        for pid in set(self._processes) - pids:
            self._processes.pop(pid).reader.close()
        self._skipped &= pids
        for pid in pids - set(self._processes) - self._skipped:
            self._open(pid)

    def _running(self) -> set[int]:
        """The processes to read: all, or those the selectors match."""
        if self.processes is None:
            return self.selector.scan() if self.selector.filters else running_pids()
        snapshot = self.processes.current()
        if not self.selector.filters:
            return set(snapshot.alive)
        if snapshot.selected is not None and self.processes.selector == self.selector:
            return set(snapshot.selected)
        return {pid for pid in snapshot.alive if self.selector.matches(pid)}

    def _open(self, pid: int) -> None:
        found = go_identity(pid)
        if found is None or found[1] in self._not_go:  # the common case on a host: one stat per scan
            return  # gone, a kernel thread, or not Go
        symbols = _symbols(*found)
        if symbols is None:
            if len(self._not_go) >= MAX_NOT_GO:
                self._not_go.clear()
            self._not_go.add(found[1])
            return
        try:
            exe_path = os.path.realpath(f"/proc/{pid}/exe")
            start_ticks = start_time(pid)
        except (OSError, ValueError, IndexError):
            return
        if isinstance(symbols, UnsupportedBinary):
            self._skip(pid, symbols.reason)
            return
        try:
            bias = load_bias(pid, symbols.first_load) if symbols.pie else 0
            reader = GoProfileReader(pid, symbols, bias)
        except OSError:
            self._skip(pid, "mem_unreadable")
            return
        start_boot_s = start_ticks / CLOCK_TICKS
        start_unix_ns = time.time_ns() - int((time.clock_gettime(time.CLOCK_BOOTTIME) - start_boot_s) * 1e9)
        self._processes[pid] = _GoProcess(reader, self.symbolizer.process_name(pid), exe_path, symbols.version,
                                          start_unix_ns, start_boot_s >= self._started_boot_s)
        self.counters.inc("go_heap_processes_read")

    def _skip(self, pid: int, reason: str) -> None:
        self._skipped.add(pid)
        self.counters.inc("go_heap_processes_skipped", reason=reason)

    # -- reading -----------------------------------------------------------------------------
    def discover(self) -> bool:
        """When a read is due (every ``interval_s``): open readers for new Go processes and close
        those of processes gone. True when it was due: the next ``collect`` reads."""
        now = time.monotonic()
        if now - self._read_at < self.interval_s:
            return False
        self._read_at = now
        self._discover()
        self._due = True
        return True

    def collect(self, now_ns: int) -> list[Sample]:
        """Heap samples of every readable Go process, at most every ``interval_s`` ([] between);
        mutex/block samples of the same read are left in ``lock_samples``. Discovers first
        unless ``discover`` already did for this read."""
        self.lock_samples = []
        if not self._due and not self.discover():
            return []
        self._due = False
        out: list[Sample] = []
        for pid, proc in list(self._processes.items()):
            try:
                out.extend(self._heap(pid, proc, now_ns))
                self.lock_samples.extend(self._contention(pid, proc, now_ns))
                self.counters.inc("go_heap_reads")
            except InconsistentRead:
                self.counters.inc("go_heap_reads_failed", reason="inconsistent")
            except OSError:  # exited, or the list is corrupt: dropped, counted, never raised
                self.counters.inc("go_heap_reads_failed", reason="read")
                self._processes.pop(pid).reader.close()
                if os.path.exists(f"/proc/{pid}"):
                    self._skip(pid, "read_failed")
            proc.read_once = True
        return out

    def _frames(self, pid: int, proc: _GoProcess, address: int, pcs: tuple[int, ...], hide_runtime: bool) -> StackKey:
        """Bucket stacks never change, so each is symbolized once (by bucket address)."""
        frames = proc.frames.get(address)
        if frames is None:
            frames = proc.frames[address] = self._symbolize(pid, proc, pcs, hide_runtime)
        return frames

    def _symbolize(self, pid: int, proc: _GoProcess, pcs: tuple[int, ...], hide_runtime: bool) -> StackKey:
        """Frames for the bucket's return PCs, as runtime.CallersFrames reads them.

        The runtime stores one PC per logical frame: an inlined call's PC is followed by the
        PC of its call site in the caller (``parentPc`` + 1). Expanding every PC's inline tree
        would name those callers twice, so a PC whose outer frames are exactly the next PC's
        frames gives only its innermost frame. PCs not followed that way (mutex/block stacks
        of Go 1.23+ are partly physical, from frame pointers) are expanded in full.
        """
        per_pc = [self.symbolizer.symbolize_user(pid, [pc - 1]) for pc in pcs]
        frames: list[Frame] = []
        for i, expanded in enumerate(per_pc):
            following = per_pc[i + 1] if i + 1 < len(per_pc) else ()
            if len(expanded) > 1 and _same_frames(expanded[1:], following):
                frames.append(expanded[0])
            else:
                frames.extend(expanded)
        if hide_runtime:  # runtime/pprof's heap profile hides the allocator's own frames
            first_user = next((i for i, f in enumerate(frames) if not f.function.startswith(RUNTIME_PREFIXES)), 0)
            frames = frames[first_user:]
        return tuple(dataclasses.replace(f, frame_type=FrameType.GO)
                     if f.mapping is not None and f.mapping.filename == proc.exe_path else f for f in frames)

    def _heap(self, pid: int, proc: _GoProcess, now_ns: int) -> list[Sample]:
        snapshot = proc.reader.read_heap()
        if snapshot.rate <= 0:
            if not proc.rate_zero_counted:
                proc.rate_zero_counted = True
                self.counters.inc("go_heap_processes_skipped", reason="memprofile_disabled")
                log.info("Go process %d (%s): runtime.MemProfileRate is 0, no heap profile", pid, proc.comm)
            return []
        baseline = not proc.read_once and not proc.report_history
        values: dict[StackKey, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for b in snapshot.buckets:
            cumulative = scale_heap_sample(b.allocs, b.alloc_bytes, snapshot.rate)
            seen = proc.alloc_seen.get(b.address, (0, 0))
            proc.alloc_seen[b.address] = cumulative
            if baseline:
                continue
            inuse = scale_heap_sample(b.allocs - b.frees, b.alloc_bytes - b.free_bytes, snapshot.rate)
            if cumulative == seen and inuse == (0, 0):
                continue
            entry = values[self._frames(pid, proc, b.address, b.pcs, hide_runtime=True)]
            entry[0] += cumulative[0] - seen[0]
            entry[1] += cumulative[1] - seen[1]
            entry[2] += inuse[0]
            entry[3] += inuse[1]
        if baseline:
            return []
        attrs = {"heap.source": "go.runtime", "heap.inuse_since": str(proc.start_unix_ns),
                 "heap.sample_bytes": str(snapshot.rate), "process.runtime.version": proc.version}
        out = [Sample(now_ns, 0, pid, pid, proc.comm, proc.comm, frames, tuple(v), attrs)
               for frames, v in values.items()]
        inuse_now = {frames for frames, v in values.items() if v[2] or v[3]}
        for frames in proc.reported_inuse - set(values):  # nothing live there any more: 0 once
            out.append(Sample(now_ns, 0, pid, pid, proc.comm, proc.comm, frames, (0, 0, 0, 0), attrs))
        proc.reported_inuse = inuse_now
        return out

    def _contention(self, pid: int, proc: _GoProcess, now_ns: int) -> list[Sample]:
        """Mutex and block profile growth since the last read, as lock samples (contentions, delay ns)."""
        ticks = None
        out: list[Sample] = []
        for kind in ("mutex", "block"):
            buckets = proc.reader.read_contention(kind)
            if not buckets:
                continue
            if ticks is None:
                ticks = proc.reader.ticks_per_second()
                if ticks is None:
                    self.counters.inc("go_lock_profiles_skipped", reason="ticks_unknown")
                    return []
            totals: dict[StackKey, list[int]] = defaultdict(lambda: [0, 0])
            for b in buckets:
                cumulative = _contention_values(kind, b, ticks)
                seen = proc.lock_seen.get((kind, b.address), (0, 0))
                proc.lock_seen[(kind, b.address)] = cumulative
                if (not proc.read_once and not proc.report_history) or cumulative == seen:
                    continue
                entry = totals[self._frames(pid, proc, b.address, b.pcs, hide_runtime=False)]
                entry[0] += cumulative[0] - seen[0]
                entry[1] += cumulative[1] - seen[1]
            attrs = {"lock.source": f"go.{kind}", "process.runtime.version": proc.version}
            out.extend(Sample(now_ns, 0, pid, pid, proc.comm, proc.comm, frames, tuple(v), attrs)
                       for frames, v in totals.items())
        return out


def _contention_values(kind: str, bucket: BlockBucket, ticks_per_second: int) -> tuple[int, int]:
    """(contentions, delay ns) as runtime/pprof writes a mutex or block record."""
    count = int(bucket.count)
    if kind == "block" and count == 0:
        count = 1  # runtime.blockProfileInternal reports at least 1
    return count, int(bucket.cycles / (ticks_per_second / 1e9))


def _same_frames(a: tuple[Frame, ...], b: tuple[Frame, ...]) -> bool:
    return len(a) == len(b) and all(
        x.function == y.function and x.line == y.line and x.filename == y.filename for x, y in zip(a, b, strict=True))
