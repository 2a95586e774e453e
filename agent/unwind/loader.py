"""Feeding the in-BPF unwinder (bpf/unwind.h): tables into ``unwind_rows``, processes into
``unwind_procs``, on request.

BPF asks for a process the first time it samples it (``unwind_requests``: pid -> reason
and pc), for a file's table the first time a sample lands in a mapping marked pending, and
again for the process when it meets a pc outside every mapping it was given (dlopen, JIT,
exec). Processes the wall, lock and heap selectors pick are loaded when picked (``preload``),
with their executable's table. One worker thread serves the requests: reads ``/proc/PID/maps``, gets tables from
the :class:`TableCache` (built once per file, cached by build id) only for files that
samples actually land in, copies tables not yet resident into free row ranges with one
batch syscall, and writes the process's mapping list. Until then that process's samples
keep bpf_get_stack()'s frame-pointer stacks. Nothing here runs per sample.

Rows of a table stay resident while any live process maps the file, and after that until
their space is needed (libc is loaded once per agent, not once per process). A periodic
sweep drops processes that exited or exec'd.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.bpf.layouts import (
    UNWIND_MAPPING_PENDING,
    UNWIND_MAX_MAPPINGS,
    UNWIND_REQUEST_REASON_SHIFT,
    UnwindCpu,
    UnwindMapping,
    UnwindProc,
    UnwindRequestReason,
    UnwindStat,
    struct_format,
)
from agent.process.procmaps import (
    FileKey,
    MapEntry,
    ProcessKey,
    RecentFileStats,
    map_files_path,
    read_maps,
    root_view_path,
)
from agent.thread_names import name_os_thread
from agent.unwind.cache import VDSO, FileRef, TableCache, file_ref
from agent.unwind.table import ROW, UnwindTable

log = logging.getLogger(__name__)

# bpf/unwind.h's layouts and enums, from their one description (agent/bpf/layouts.py).
MAX_MAPPINGS = UNWIND_MAX_MAPPINGS
_MAPPING = struct_format(UnwindMapping)  # start, end, bias, table slot, buckets, shift, flags
MAPPING_PENDING = UNWIND_MAPPING_PENDING
_PROC_HEADER = struct_format(UnwindProc, "count", "flags")
_MAPPINGS_AT = UnwindProc.mappings.offset
PROC_SIZE = ctypes.sizeof(UnwindProc)
REQUEST_NEW, REQUEST_UNKNOWN_ADDRESS, REQUEST_TABLE = (
    UnwindRequestReason.NEW, UnwindRequestReason.UNKNOWN_ADDRESS, UnwindRequestReason.TABLE)
_REASON_SHIFT = UNWIND_REQUEST_REASON_SHIFT
_IP_MASK = (1 << _REASON_SHIFT) - 1
# How a stack ended, as the unwind_stacks counter's label.
STOP_NAMES = {UnwindStat.END: "complete", UnwindStat.UNSUPPORTED: "unsupported_rule",
              UnwindStat.READ_FAILED: "read_failed", UnwindStat.BAD_FRAME: "bad_frame",
              UnwindStat.TRUNCATED: "truncated"}
STAT_SLOTS = len(UnwindStat)
_CPU_COUNTERS = struct_format(UnwindCpu, "counters", "counters")
CPU_STATE_SIZE = ctypes.sizeof(UnwindCpu)
_PREWARM_PREFIXES = ("libc.so", "ld-linux", "libm.so", "libstdc++.so", "libgcc_s.so")
# Building tables for binaries new to the agent is bounded to this share of one core on
# average, after a burst (start-up: the binaries already running). On hosts that start new
# programs all the time (CI, build machines) tables then arrive later instead of costing more.
TABLE_CPU_SHARE = 0.005
TABLE_CPU_BURST_S = 3.0


# bpf/unwind.h compares addresses without branches (unwind_le), which holds below 2^63 only.
# The one mapping above, [vsyscall] (0xffffffffff600000, kernel text no user stack returns
# into), is left out of a process's list: listed last, it compared as "at or below" every pc
# and drew the mapping search onto itself, so pcs in the mapping before it (the dynamic
# loader, in most processes) were unknown to the walk and fell back to frame pointers.
BPF_ADDRESS_LIMIT = 1 << 63


# When no request came for a while the worker polls the request map this rarely (and publishes
# BPF's unwind counters, and sweeps exited processes): a CPU sample that makes a request (a new
# process, an unknown address, a missing table) is a new stack, whose record wakes the worker at
# once (``nudge``, from the CPU profile's poll thread), and every actor's flush wakes it if a
# request waits (``nudge_if_requested``: the wall and lock programs' requests, served within a
# flush interval). Each wake-up of an idle worker costs ~100-300 µs of CPU on a VM.
IDLE_POLL_INTERVAL_S = 5.0


class UnwindMaps(Protocol):
    """The four BPF maps of bpf/unwind.h (a fake stands in for them in unit tests)."""

    def write_rows(self, start: int, packed: bytes) -> None: ...
    def write_process(self, pid: int, entry: bytes) -> None: ...
    def delete_process(self, pid: int) -> None: ...
    def take_requests(self) -> list[tuple[int, int]]: ...
    def has_requests(self) -> bool: ...
    def read_counters(self) -> list[int]: ...
    def close(self) -> None: ...


class BccUnwindMaps:
    """:class:`UnwindMaps` over a loaded bcc program that includes bpf/unwind.h.

    It holds duplicates of the map fds, so the maps outlive the program's ``cleanup()``
    until :meth:`close`: the worker thread never races the actor's teardown.
    """

    def __init__(self, bpf: Any) -> None:
        from bcc import libbcc
        from bcc.utils import get_possible_cpus

        self._lib = libbcc.lib
        self._rows = os.dup(bpf["unwind_rows"].map_fd)
        self._procs = os.dup(bpf["unwind_procs"].map_fd)
        self._requests = os.dup(bpf["unwind_requests"].map_fd)
        self._cpus = os.dup(bpf["unwind_cpus"].map_fd)
        self._ncpus = len(get_possible_cpus())

    def close(self) -> None:
        for fd in (self._rows, self._procs, self._requests, self._cpus):
            os.close(fd)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def write_rows(self, start: int, packed: bytes) -> None:
        n = len(packed) // ROW.size
        step = 65536
        for first in range(0, n, step):
            count = min(step, n - first)
            keys = array("I", range(start + first, start + first + count)).tobytes()
            chunk = packed[first * ROW.size : (first + count) * ROW.size]
            written = ctypes.c_uint32(count)
            self._check(self._lib.bpf_update_batch(self._rows, ctypes.create_string_buffer(keys, len(keys)),
                                                   ctypes.create_string_buffer(chunk, len(chunk)),
                                                   ctypes.byref(written)), "writing unwind rows")

    def write_process(self, pid: int, entry: bytes) -> None:
        key = ctypes.c_uint32(pid)
        value = ctypes.create_string_buffer(entry, len(entry))
        self._check(self._lib.bpf_update_elem(self._procs, ctypes.byref(key), value, 0), "writing unwind process")

    def delete_process(self, pid: int) -> None:
        key = ctypes.c_uint32(pid)
        self._lib.bpf_delete_elem(self._procs, ctypes.byref(key))

    def take_requests(self) -> list[tuple[int, int]]:
        out = []
        key, next_key, value = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint64()
        first = True
        while self._lib.bpf_get_next_key(self._requests, None if first else ctypes.byref(key),
                                         ctypes.byref(next_key)) == 0:
            first = False
            key.value = next_key.value
            if self._lib.bpf_lookup_elem(self._requests, ctypes.byref(key), ctypes.byref(value)) == 0:
                out.append((key.value, value.value))
        for pid, _ in out:
            k = ctypes.c_uint32(pid)
            self._lib.bpf_delete_elem(self._requests, ctypes.byref(k))
        return out

    def has_requests(self) -> bool:
        # One system call: the map's first key, if it has any.
        first = ctypes.c_uint32()
        return bool(self._lib.bpf_get_next_key(self._requests, None, ctypes.byref(first)) == 0)

    def read_counters(self) -> list[int]:
        # A per-CPU lookup returns one value per possible CPU (each 8-byte aligned).
        size = CPU_STATE_SIZE
        buf = ctypes.create_string_buffer(size * self._ncpus)
        key = ctypes.c_uint32(0)
        self._check(self._lib.bpf_lookup_elem(self._cpus, ctypes.byref(key), buf), "reading unwind counters")
        totals = [0] * STAT_SLOTS
        for cpu in range(self._ncpus):
            for i, v in enumerate(_CPU_COUNTERS.unpack_from(buf.raw, cpu * size + UnwindCpu.counters.offset)):
                totals[i] += v
        return totals


class RowAllocator:
    """First-fit allocation of row ranges in the fixed-size ``unwind_rows`` array."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, length), sorted, coalesced

    @property
    def free_rows(self) -> int:
        return sum(length for _, length in self._free)

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                return start
        return None

    def free(self, start: int, n: int) -> None:
        self._free.append((start, n))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self._free = merged


@dataclass
class _Resident:
    """A table whose BPF image (bucket entries, then rows) is in ``unwind_rows`` from ``first_slot``."""

    table: UnwindTable
    first_slot: int
    users: set[int] = field(default_factory=set)


@dataclass
class _Slot:
    """One executable mapping of a process and what BPF is told about it."""

    entry: MapEntry
    ref: FileRef | None
    resident: _Resident | None = None
    bias: int = 0
    pending: bool = False  # its file's table is not built yet: built when a sample lands here

    def encoded(self) -> tuple[int, int, int, int, int, int, int]:
        e = self.entry
        if self.resident is not None:
            table = self.resident.table
            return (e.start, e.end, self.bias, self.resident.first_slot, table.bucket_count(),
                    table.bucket_shift(), 0)
        return (e.start, e.end, 0, 0, 0, 0, MAPPING_PENDING if self.pending else 0)


@dataclass
class _Process:
    key: ProcessKey
    slots: list[_Slot]
    loaded_s: float


class NativeUnwinder:
    """Serves BPF's unwind requests from one worker thread; ``start``/``close`` bound its life."""

    def __init__(self, maps: UnwindMaps, counters: Any, max_rows: int, poll_interval_s: float = 0.02,
                 sweep_interval_s: float = 5.0, reload_after_s: float = 2.0, tables: TableCache | None = None,
                 table_cpu_share: float = TABLE_CPU_SHARE, table_cpu_burst_s: float = TABLE_CPU_BURST_S,
                 idle_poll_interval_s: float = IDLE_POLL_INTERVAL_S) -> None:
        self.maps = maps
        self.counters = counters
        # One file may take a quarter of the rows: a huge C++ library (libLLVM: ~950k rows)
        # must not crowd out libc and the programs actually running.
        self.tables = tables or TableCache(max_rows_per_file=max_rows // 4)
        self.allocator = RowAllocator(max_rows)
        self.poll_interval_s = poll_interval_s
        self.idle_poll_interval_s = idle_poll_interval_s
        self.sweep_interval_s = sweep_interval_s
        self.reload_after_s = reload_after_s
        self._resident: OrderedDict[object, _Resident] = OrderedDict()
        self._processes: dict[int, _Process] = {}
        self._retry_after: dict[int, float] = {}
        # Each mapped file's identity and whether map_files opened it: every new process maps
        # the same libraries, and a stat per mapping of each short-lived process would be most of
        # loading it (kept FILE_STAT_TTL_S, as in the symbolizer).
        self._file_keys: RecentFileStats[tuple[FileKey | str, bool]] = RecentFileStats(4096)
        self._bpf_counters_seen: list[int] = []
        self._build_ms_published = 0
        self._worker_ms_published = 0
        self._tables_published = (0, 0, 0)
        self._upload_cpu_s = 0.0
        # Token bucket of CPU seconds for building tables on request (see TABLE_CPU_SHARE).
        self.table_cpu_share = table_cpu_share
        self.table_cpu_burst_s = table_cpu_burst_s
        self._table_tokens_s = table_cpu_burst_s
        self._tokens_at = time.monotonic()
        # Processes selected for the event-driven profiles (wall, lock, heap), to load before
        # their first event: added from other threads (preload), taken by the worker.
        self._preloads: set[int] = set()
        self._preload_lock = threading.Lock()
        self._preloaded: set[int] = set()  # handled once (every actor with a selector asks)
        self._stop = threading.Event()
        self._wake = threading.Event()  # a nudge, or the stop
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="unwind-tables", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the worker and release the maps (idempotent); the last counts are published."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self._closed:
            self._closed = True
            try:
                self.publish_counters()
            except OSError:
                pass
            self.maps.close()

    def _run(self) -> None:
        name_os_thread()
        next_sweep = next_counters = time.monotonic()
        interval = self.poll_interval_s
        try:
            self.prewarm()
            while not self._stop.is_set():
                # Poll fast while requests come (a new process asks for itself, then for a
                # table per file it runs in), back off when idle: each wake-up costs ~60 µs of
                # CPU, 0.3 % of a core at a steady 50 Hz. A nudge ends the wait at once.
                if self.serve_requests():
                    interval = self.poll_interval_s
                else:
                    interval = min(interval * 2, self.idle_poll_interval_s)
                now = time.monotonic()
                if now >= next_counters:
                    self.publish_counters()
                    next_counters = now + 1.0
                if now >= next_sweep:
                    self.sweep()
                    next_sweep = now + self.sweep_interval_s
                if self._wake.wait(interval):
                    self._wake.clear()
        except Exception as exc:  # seen by the actor (``failure``) and in the log, never silent
            self.failure = exc
            log.exception("native unwinder stopped")
            self.counters.inc("unwind_worker_failures")

    def prewarm(self) -> None:
        """Load the tables nearly every process needs (libc, the dynamic loader, the vDSO)
        before the first request, from this process's own mappings: ~150 ms once, instead of
        the first seconds of every early process falling back to frame pointers."""
        try:
            entries = read_maps(os.getpid())
        except OSError:
            return
        for entry in entries:
            name = os.path.basename(entry.path)
            if entry.path == VDSO or name.startswith(_PREWARM_PREFIXES):
                ref = file_ref(os.getpid(), entry)
                if ref is not None:
                    self._resident_for(os.getpid(), entry, ref)

    # -- requests --------------------------------------------------------------------------
    def preload(self, pids: set[int]) -> None:
        """Load these processes before their first sample asks for them (thread-safe; served by
        the worker).

        BPF asks for a process at its first event, and that event and the others until the
        worker has served it keep frame-pointer stacks. A process selected for wall, lock or
        heap profiling can have been started long before it does anything traced (a service
        waiting for work): its first moments of work then had partial stacks, and a flush
        window's sums shared over them (docs/design/wall-and-lock.md, "Stacks before the
        tables")."""
        with self._preload_lock:
            self._preloads |= pids
        self.nudge()

    def nudge(self) -> None:
        """Look at the request map now rather than at the next idle poll (thread-safe, cheap:
        callers nudge whenever they see something new)."""
        if not self._wake.is_set():  # set() takes the event's lock every time
            self._wake.set()

    def nudge_if_requested(self) -> None:
        """Wake the worker if BPF left a request it has not taken (any thread; one map lookup
        and no wake-up when there is none). Every actor's flush calls it, so requests whose
        records wake nobody (the wall and lock programs') wait at most a flush interval, while
        an idle worker polls only every ``idle_poll_interval_s``."""
        if self._closed or self._wake.is_set():
            return
        try:
            requested = self.maps.has_requests()
        except OSError:  # the maps are going away with the worker
            return
        if requested:
            self._wake.set()

    def _serve_preloads(self) -> int:
        """Load the processes asked for by ``preload`` (once each; ``known``: a sample asked for
        it first), with their executable's table (the file every stack of theirs runs through)."""
        with self._preload_lock:
            pids, self._preloads = self._preloads - self._preloaded, set()
        served = 0
        for pid in pids:
            process = self._processes.get(pid)
            result = "known"
            if process is None:
                if not self.load_process(pid):
                    self.counters.inc("unwind_preloads", result="failed")
                    continue
                process, result = self._processes[pid], "loaded"
            for slot in process.slots:
                if slot.pending and slot.ref is not None and slot.ref.key == process.key.exe:
                    self.load_table(pid, process, slot.entry.start)
            self._preloaded.add(pid)
            self.counters.inc("unwind_preloads", result=result)
            served += 1
        return served

    def serve_requests(self) -> int:
        """Serve the preloads and the requests BPF made since the last call; returns how many
        led to work (those skipped by a rate limit or the table budget do not keep the poll fast)."""
        served = self._serve_preloads()
        requests = self.maps.take_requests()
        now = time.monotonic()
        for pid, value in requests:
            reason, ip = value >> _REASON_SHIFT, value & _IP_MASK
            if self._retry_after.get(pid, 0.0) > now:
                continue  # failed recently (map full, unreadable): BPF asks on every sample
            known = self._processes.get(pid)
            if known is not None and reason == REQUEST_TABLE:
                served += self.load_table(pid, known, ip)
            elif (known is not None and reason != REQUEST_NEW and now - known.loaded_s < self.reload_after_s
                  and not self._execd(pid, known)):
                continue  # rate limit: JIT regions appear faster than maps are worth re-reading
            else:
                self.load_process(pid)
                served += 1
        return served

    def _execd(self, pid: int, process: _Process) -> bool:
        """Whether ``pid`` runs another program, or is another process, than when it was loaded
        (False when it is gone or unreadable). A process loaded when selected can exec right
        after (a launcher script): its stale mappings give unknown addresses, walked by frame
        pointers, until it is reloaded, which must not wait for the rate limit."""
        try:
            return ProcessKey.read(pid) != process.key
        except (OSError, ValueError, IndexError):
            return False

    def load_process(self, pid: int) -> bool:
        """(Re)build ``pid``'s mapping list from /proc and hand it to BPF.

        Files whose tables are known are attached now; the others are marked pending and
        built only when a sample lands in them (``load_table``): a Python process maps a
        hundred extension modules and runs in a handful."""
        self._release(pid)
        try:
            key = ProcessKey.read(pid)
            entries = [e for e in read_maps(pid) if e.end <= BPF_ADDRESS_LIMIT]
        except (OSError, ValueError, IndexError):
            self.counters.inc("unwind_processes", result="gone")
            self._retry_after[pid] = time.monotonic() + self.reload_after_s
            return False
        slots = []
        for entry in entries:
            ref = self._file_ref(pid, entry) if entry.file_backed or entry.path == VDSO else None
            slot = _Slot(entry, ref)
            if ref is not None:
                known, table = self.tables.peek(ref)
                if not known:
                    slot.pending = True
                elif table is not None:
                    self._attach(pid, slot)
            slots.append(slot)
        process = _Process(key, slots, time.monotonic())
        if not self._write(pid, process):
            return False
        self._processes[pid] = process
        self.counters.inc("unwind_processes", result="loaded" if _useful(slots) else "no_tables")
        return True

    def load_table(self, pid: int, process: _Process, ip: int) -> bool:
        """Build and attach the table of the pending mapping a sample of ``pid`` landed in;
        False when there was nothing to do or the budget deferred it."""
        slot = next((s for s in process.slots if s.entry.start <= ip < s.entry.end), None)
        if slot is None or not slot.pending:
            return False  # already served (requests race the update) or the maps changed
        now = time.monotonic()
        self._table_tokens_s = min(self.table_cpu_burst_s,
                                   self._table_tokens_s + (now - self._tokens_at) * self.table_cpu_share)
        self._tokens_at = now
        assert slot.ref is not None
        if not self.tables.peek(slot.ref)[0] and self.tables.estimate_cpu_s(slot.ref) > self._table_tokens_s:
            # Over budget: BPF asks again on a later sample. Small files fit again within a
            # second; a large one waits until the bucket holds its estimated cost.
            self.counters.inc("unwind_tables_deferred")
            return False
        started = time.thread_time()
        self._attach(pid, slot)
        self._table_tokens_s -= time.thread_time() - started
        slot.pending = False
        self._write(pid, process)
        return True

    def _attach(self, pid: int, slot: _Slot) -> None:
        assert slot.ref is not None
        resident, bias = self._resident_for(pid, slot.entry, slot.ref)
        if resident is not None:
            slot.resident, slot.bias = resident, bias
            resident.users.add(pid)

    def _write(self, pid: int, process: _Process) -> bool:
        slots = process.slots
        if len(slots) > MAX_MAPPINGS:
            # Keep the mappings with tables, then pending ones: the rest walk by frame pointers anyway.
            self.counters.inc("unwind_mappings_dropped", len(slots) - MAX_MAPPINGS)
            slots = sorted(sorted(slots, key=lambda s: 0 if s.resident else 1 if s.pending else 2)[:MAX_MAPPINGS],
                           key=lambda s: s.entry.start)
        # Nothing to unwind with: BPF's own frame-pointer walk is as good and cheaper (count 0).
        entry_bytes = encode_process([s.encoded() for s in slots] if _useful(slots) else [])
        try:
            self.maps.write_process(pid, entry_bytes)
        except OSError as exc:
            self.counters.inc("unwind_processes", result="map_full")
            log.info("cannot register pid %d for unwinding: %s", pid, exc)
            self._retry_after[pid] = time.monotonic() + self.sweep_interval_s
            self._processes[pid] = process
            self._release(pid)
            return False
        return True

    def _resident_for(self, pid: int, entry: MapEntry, ref: FileRef) -> tuple[_Resident | None, int]:
        """The file's table in BPF (built and uploaded if need be) and the mapping's bias."""
        table = self.tables.get(ref)
        if table is None or not len(table):
            return None, 0
        load_bias = table.vaddr_bias(entry.start, entry.offset)
        if load_bias is None:
            return None, 0
        resident = self._resident.get(table.key)
        if resident is None:
            if table.rows_dropped:  # was resident, evicted since: read the file again
                table = self.tables.get(ref, with_rows=True)
                if table is None:
                    return None, 0
            resident = self._upload(table)
            if resident is None:
                return None, 0
        self._resident.move_to_end(table.key)
        return resident, load_bias + table.base

    def _upload(self, table: UnwindTable) -> _Resident | None:
        started = time.thread_time()
        try:
            return self._upload_rows(table)
        finally:
            self._upload_cpu_s += time.thread_time() - started

    def _upload_rows(self, table: UnwindTable) -> _Resident | None:
        start = self.allocator.alloc(table.bpf_len())
        while start is None and self._evict_one_unused():
            start = self.allocator.alloc(table.bpf_len())
        if start is None:
            self.counters.inc("unwind_rows_full")
            log.warning("unwind rows full: %s (%d rows) falls back to frame pointers; raise unwind_table_rows",
                        table.name, len(table))
            return None
        try:
            self.maps.write_rows(start, table.bpf_image(start))
        except OSError:
            self.allocator.free(start, table.bpf_len())
            raise
        table.drop_rows()
        resident = _Resident(table, start)
        self._resident[table.key] = resident
        self.counters.inc("unwind_rows_loaded", table.bpf_len())
        return resident

    def _evict_one_unused(self) -> bool:
        for key, resident in self._resident.items():  # oldest first
            if not resident.users:
                del self._resident[key]
                self.allocator.free(resident.first_slot, resident.table.bpf_len())
                return True
        return False

    def _file_ref(self, pid: int, entry: MapEntry) -> FileRef | None:
        """``file_ref`` for one mapping, stat'ing a file seen in other processes' maps at most
        every FILE_STAT_TTL_S (a file replaced in place keeps its inode: noticed after that)."""
        cached = self._file_keys.get(entry) if entry.path != VDSO else None
        if cached is not None:
            # Opened the way that worked for the process that was stat'ed (map_files needs
            # more privilege than the process's root view).
            key, via_map_files = cached
            open_path = map_files_path(pid, entry) if via_map_files else root_view_path(pid, entry.path)
            return FileRef(key, open_path, entry.path)
        ref = file_ref(pid, entry)
        if ref is not None and entry.path != VDSO:
            self._file_keys.put(entry, (ref.key, ref.open_path == map_files_path(pid, entry)))
        return ref

    def _release(self, pid: int) -> None:
        process = self._processes.pop(pid, None)
        if process is None:
            return
        for slot in process.slots:
            if slot.resident is not None:
                slot.resident.users.discard(pid)

    # -- housekeeping ----------------------------------------------------------------------
    def sweep(self) -> None:
        """Forget processes that exited (or whose pid was reused); reload those that exec'd."""
        now = time.monotonic()
        self._retry_after = {pid: t for pid, t in self._retry_after.items() if t > now}
        for pid, process in list(self._processes.items()):
            try:
                now_key: ProcessKey | None = ProcessKey.read(pid)
            except (OSError, ValueError, IndexError):
                now_key = None
            if now_key is None or now_key.start_ticks != process.key.start_ticks:  # exited, or pid reused
                self._release(pid)
                self.maps.delete_process(pid)
            elif now_key.exe != process.key.exe:  # exec'd
                self.load_process(pid)
        self._preloaded &= set(self._processes)

    def publish_counters(self) -> None:
        """Fold BPF's per-CPU unwind counters into the agent's counters (as deltas)."""
        values = self.maps.read_counters()
        seen = self._bpf_counters_seen or [0] * len(values)
        delta = [v - s for v, s in zip(values, seen, strict=True)]
        self._bpf_counters_seen = values
        if delta[UnwindStat.SAMPLES]:
            self.counters.inc("unwind_samples", delta[UnwindStat.SAMPLES])
        if delta[UnwindStat.CFI_FRAMES]:
            self.counters.inc("unwind_frames", delta[UnwindStat.CFI_FRAMES], method="cfi")
        if delta[UnwindStat.FP_FRAMES]:
            self.counters.inc("unwind_frames", delta[UnwindStat.FP_FRAMES], method="frame_pointer")
        if delta[UnwindStat.UNKNOWN_ADDR]:
            self.counters.inc("unwind_unknown_addresses", delta[UnwindStat.UNKNOWN_ADDR])
        for slot, name in STOP_NAMES.items():
            if delta[slot]:
                self.counters.inc("unwind_stacks", delta[slot], end=name)
        if threading.current_thread() is self._thread:
            # All the agent-side CPU the unwinder costs: table builds, /proc reads, map writes.
            worker_ms = int(time.thread_time() * 1000)
            if worker_ms > self._worker_ms_published:
                self.counters.inc("unwind_worker_cpu_ms", worker_ms - self._worker_ms_published)
                self._worker_ms_published = worker_ms
        tables = (self.tables.built, self.tables.failed, self.tables.too_large)
        for result, now, before in zip(("built", "failed", "too_large"), tables, self._tables_published, strict=True):
            if now > before:
                self.counters.inc("unwind_tables", now - before, result=result)
        self._tables_published = tables
        # Building a table and loading it into BPF: paid once per binary.
        build_ms = int((self.tables.build_cpu_s + self._upload_cpu_s) * 1000)
        if build_ms > self._build_ms_published:
            self.counters.inc("unwind_table_build_ms", build_ms - self._build_ms_published)
            self._build_ms_published = build_ms

    @property
    def stats(self) -> dict[str, int]:
        return {"processes": len(self._processes), "resident_tables": len(self._resident),
                "free_rows": self.allocator.free_rows, "tables_built": self.tables.built,
                "tables_failed": self.tables.failed, "tables_too_large": self.tables.too_large}


def encode_process(mappings: list[tuple[int, int, int, int, int, int, int]]) -> bytes:
    """``struct unwind_proc`` for sorted (start, end, bias, table slot, buckets, shift, flags) mappings."""
    out = bytearray(PROC_SIZE)
    _PROC_HEADER.pack_into(out, 0, len(mappings), 0)
    for i, (start, end, bias, table, buckets, shift, flags) in enumerate(mappings):
        _MAPPING.pack_into(out, _MAPPINGS_AT + i * _MAPPING.size, start, end, bias & 0xFFFF_FFFF_FFFF_FFFF,
                           table, buckets, shift, flags)
    return bytes(out)


def encode_request(reason: int, ip: int = 0) -> int:
    """A value of ``unwind_requests`` as BPF writes it: reason in the top byte, then the pc."""
    return reason << _REASON_SHIFT | ip


def _useful(slots: list[_Slot]) -> bool:
    return any(s.resident is not None or s.pending for s in slots)

