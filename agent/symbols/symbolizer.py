"""The host symbolizer: raw addresses of a live process -> Frames with function, file, line.

Caches, all bounded (LRU):
- per process instance (ProcessKey: pid, start time, executable): its executable
  mappings, re-read when an address falls outside them (dlopen, exec) at most once per ``maps_ttl_s``;
- per file (FileKey: device, inode, size, mtime): parsed ELF symbols and lines, shared by
  every process mapping the file — libc is parsed once for the whole host;
- per (FileKey, vaddr): the resulting (function, file, line), since the same hot
  addresses recur sample after sample.

Files are opened through ``/proc/PID/map_files/`` first, which works for files inside
containers' mount namespaces and for deleted-but-mapped binaries. Stripped files get their
names and lines from distribution debug files when present (:mod:`agent.symbols.debuginfo`).

Frames of file-backed code are *module-relative*: a Frame's ``address`` is the file offset of
the instruction and its Mapping is the mapped part of the file in file-offset space (start =
file offset, offset = file offset), not the process's load address. Address randomisation
gives every process its own load addresses; module-relative frames make the same code the
same Location in every process and on every host, named or not, and a consumer still finds
the file offset the usual way (address - start + offset). Frames outside any file (JIT,
anonymous memory) keep their absolute address and no mapping.
"""

from __future__ import annotations

import bisect
import io
import logging
import os
import struct
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import IO, cast

from agent.memory_budget import BudgetShare, MemoryBudget, PerProcessEntries
from agent.process.capture import ProcessCaptures
from agent.process.procmaps import (
    YOUNG_PROCESS_S,
    FileKey,
    MapEntry,
    ProcessKey,
    RecentFileStats,
    age_s,
    file_key,
    map_files_path,
    read_comm,
    read_maps,
    root_view_path,
    stat_identity,
)
from agent.runtimes.go.pclntab import GoFrame
from agent.symbols.debuginfo import DEFAULT_DEBUG_DIRECTORIES, DebugFileFinder
from agent.symbols.dwarf_lines import CuLineIndex
from agent.symbols.elf import ElfSymbols
from agent.symbols.file_ids import kernel_build_id, kernel_htlhash, read_file_ids
from agent.symbols.kallsyms import KernelSymbols
from shared.model import KERNEL_FILENAME, KERNEL_MAPPING, Frame, FrameType, Mapping

log = logging.getLogger(__name__)

# The kernel's vDSO (clock_gettime, gettimeofday, ...) is an ELF image mapped into every
# process but backed by no file: it is read from the process's memory, and is the same image
# for every process of one size (64-bit or compat), so its key is its size.
VDSO = "[vdso]"
YOUNG_MAPS_TTL_S = 0.25
MAX_VDSO_BYTES = 64 * 1024
IDENTITY_CHECK_S = 1.0
MAX_KERNEL_FRAMES = 16_384  # distinct kernel addresses kept symbolized (~200 B each)
MAX_CACHED_CODE = 32_768  # code bytes before candidate return addresses (~150 B each)
# A process gone from /proc this long (since its key was last confirmed) is forgotten.
EXITED_GRACE_S = 10.0
# Cached ELF files unused for this long are closed (Symbolizer.sweep_idle_files).
FILE_IDLE_S = 600.0
MAX_FILE_IDS = 4096  # files whose Go build id and htlhash are kept (~200 B each)
# Estimated bytes of one cached address and one cached process frame, charged to the cache
# budget (agent/memory_budget.py). Measured with tracemalloc: 20,000 new addresses of libc
# and python3.11 symbolized in a live process, then the frame dicts and the address cache
# emptied one after the other: 237 B a frame entry (its int key, a 1-tuple, the Frame,
# the dict slot) and 293 B an address entry (its key tuple, the row tuple, the dict and
# LRU links; the names are shared with the file's own tables).
FRAME_ENTRY_BYTES = 240
ADDRESS_ENTRY_BYTES = 300


class _Lru(OrderedDict[object, object]):
    """OrderedDict with a size bound; ``hit`` moves a key to the young end."""

    def __init__(self, capacity: int, close_evicted: bool = True, max_bytes: int | None = None,
                 share: BudgetShare | None = None, entry_bytes: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self.evictions = 0
        self.close_evicted = close_evicted
        # Entries that know their size (estimated_bytes) are also bounded in total; sizes grow
        # after insertion (line tables are built lazily), so the sum is taken at each insert.
        self.max_bytes = max_bytes
        # Or: every new key charges ``entry_bytes`` to a share of the agent's cache budget,
        # and the least recently used keys go while the share is spent (counted there).
        self.share = share
        self.entry_bytes = entry_bytes

    def put(self, key: object, value: object) -> None:
        share = self.share
        if share is not None and key not in self:
            share.charge(self.entry_bytes)
        self[key] = value
        self.move_to_end(key)
        # Summed once per insert, then reduced by what each eviction frees.
        total = sum(_estimated_bytes(v) for v in self.values()) if self.max_bytes is not None else 0
        while share is not None and share.over and len(self) > 1:
            self.popitem(last=False)
            self.evictions += 1
            share.evicted(1, self.entry_bytes)
        while len(self) > self.capacity or (self.max_bytes is not None and len(self) > 1 and total > self.max_bytes):
            _, evicted = self.popitem(last=False)
            total -= _estimated_bytes(evicted)
            self.evictions += 1
            if share is not None:
                share.release(self.entry_bytes)
            close = getattr(evicted, "close", None)
            # A file shared by several keys (same build) is left to the garbage collector.
            if close is not None and self.close_evicted and not getattr(evicted, "shared", False):
                close()

    def hit(self, key: object) -> object | None:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


def _estimated_bytes(value: object) -> int:
    """Memory an entry says it holds (ElfSymbols.estimated_bytes); 0 for entries that do not say."""
    estimate = getattr(value, "estimated_bytes", None)
    return int(estimate()) if estimate is not None else 0


@dataclass
class _Region:
    """An executable mapping with what symbolizing it needs."""

    entry: MapEntry
    mapping: Mapping
    file_key: FileKey | None
    # The file as opened while the process lived (agent.process.capture), for one that has exited.
    captured: IO[bytes] | None = None


def _read_vdso(pid: int, entry: MapEntry) -> IO[bytes]:
    """The vDSO image of a process, copied from its memory."""
    size = entry.end - entry.start
    if size > MAX_VDSO_BYTES:
        raise OSError(f"vdso of {size} bytes is over {MAX_VDSO_BYTES}")
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        data = os.pread(mem.fileno(), size, entry.start)
    if len(data) != size:
        raise OSError(f"short read of the vdso ({len(data)} of {size} bytes)")
    return io.BytesIO(data)


@dataclass
class _Process:
    key: ProcessKey
    comm: str
    regions: list[_Region]
    starts: list[int]
    refreshed: float
    checked: float = 0.0
    # Resolved frames by ``address << 1 | is_leaf``: a plain dict per process instance, so a
    # cached frame costs one int-keyed lookup (no key tuple, no LRU bookkeeping); bounded by
    # the Symbolizer's share of the cache budget over all processes. Kept across maps
    # refreshes of the same ProcessKey.
    frames: dict[int, tuple[Frame, ...]] = field(default_factory=dict)
    # time.monotonic() until which the process counts as young (see _maps_ttl); None: not known.
    young_until: float | None = None


class Symbolizer:
    """Symbolizes user and kernel addresses; never raises for dead processes or bad files."""

    def __init__(self, max_files: int = 512, max_processes: int = 4096, maps_ttl_s: float = 5.0,
                 max_cached_addresses: int = 50_000, max_file_bytes: int = 64 * 1024 * 1024,
                 debug_directories: Sequence[str] = DEFAULT_DEBUG_DIRECTORIES,
                 budget: MemoryBudget | None = None) -> None:
        # Bounds chosen so the caches level off well under 150 MB on a busy host (measured:
        # ~0.5 MiB of tables per typical library); the address and frame caches are bounded in
        # bytes by their shares of the agent's cache budget, and in count.
        budget = budget or MemoryBudget()
        self.maps_ttl_s = maps_ttl_s
        self._processes = _Lru(max_processes)
        # Names of processes whose maps were not needed (process_name): pid -> (comm, read at).
        self._names: dict[int, tuple[str, float]] = {}
        self._max_names = max_processes
        self._files = _Lru(max_files, max_bytes=max_file_bytes)
        self._addresses = _Lru(max_cached_addresses, share=budget.share("symbol_addresses"),
                               entry_bytes=ADDRESS_ENTRY_BYTES)
        # Resolved frames per process instance (_Process.frames): hot addresses recur every
        # sample, and handing out the same Frame object also makes downstream hashing cheaper.
        # Over their share, the least recently used processes' frames are dropped.
        self._frame_entries = PerProcessEntries(
            budget.share("symbol_frames"), FRAME_ENTRY_BYTES,
            lambda: [p.frames for p in self._processes.values() if isinstance(p, _Process)])
        self._bad_files: set[FileKey] = set()
        # Each mapped file's key, stat'ed at most every FILE_STAT_TTL_S (agent.process.procmaps)
        self._file_stats: RecentFileStats[FileKey] = RecentFileStats(max_processes)
        # (build id, size) -> weak reference to an ElfSymbols, see _share_by_build_id: only an
        # index, so a file evicted from _files is freed rather than kept alive here.
        self._builds = _Lru(max_files, close_evicted=False)
        # When each cached file was last looked up (see sweep_idle_files).
        self._file_used: dict[object, float] = {}
        self._debug_files = DebugFileFinder(debug_directories)
        self._kernel: KernelSymbols | None = None
        self._kernel_mapping = KERNEL_MAPPING
        # (Go build id, htlhash) per file, computed when the file is opened (see file_ids)
        self._file_ids: dict[FileKey, tuple[str, str]] = {}
        self._kernel_frames: dict[int, Frame] = {}
        self._code: dict[tuple[FileKey, int, int], bytes] = {}  # see code_before
        # Processes read when their first record arrived: the fallback for one that exited
        # before it was first symbolized (agent/process/capture.py), filled by the actors'
        # record threads; None: no fallback.
        self.captures: ProcessCaptures | None = ProcessCaptures()
        self._stats = dict.fromkeys(
            ("lookups", "unknown_frames", "unreadable_processes", "exited_before_read", "read_from_capture",
             "elf_errors", "go_table_errors", "file_cache_hits",
             "file_cache_misses", "maps_reads", "build_id_shares"), 0)

    # -- public API ----------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        debug = self._debug_files.stats
        evictions = self._processes.evictions + self._files.evictions + self._addresses.evictions
        frames = sum(len(p.frames) for p in self._processes.values() if isinstance(p, _Process))
        return {**self._stats, "frames_cached": frames, "debug_files_found": debug["found"],
                "debug_files_missing": debug["not_found"],
                "debug_files_rejected": debug["rejected"], "evictions": evictions,
                "files_cached": len(self._files), "processes_cached": len(self._processes)}

    def symbolize_kernel(self, addresses: Sequence[int]) -> tuple[Frame, ...]:
        # Kernel stacks repeat (timer interrupt, syscall entry, scheduler): one dict lookup per
        # address instead of a bisect, a name decode and a new Frame every sample.
        cache = self._kernel_frames
        frames = []
        for a in addresses:
            frame = cache.get(a)
            if frame is None:
                frame = self._kernel_frame(a)
                if len(cache) >= MAX_KERNEL_FRAMES:
                    cache.clear()  # a kernel has a bounded set of hot addresses: rarely reached
                cache[a] = frame
            frames.append(frame)
        return tuple(frames)

    def _kernel_frame(self, address: int) -> Frame:
        if self._kernel is None:
            self._kernel = KernelSymbols()
            if self._kernel.text_start < self._kernel.text_end:
                build_id = kernel_build_id()
                self._kernel_mapping = Mapping(0, self._kernel.text_end - self._kernel.text_start, 0,
                                               KERNEL_FILENAME, build_id, "", kernel_htlhash(build_id))
        kernel = self._kernel
        name = kernel.lookup(address) if kernel.usable else ""
        if kernel.text_start <= address < kernel.text_end:  # as an offset into the kernel's text
            return Frame(name, "", 0, address - kernel.text_start, FrameType.KERNEL, self._kernel_mapping)
        return Frame(name, "", 0, address, FrameType.KERNEL, KERNEL_MAPPING)  # modules, BPF programs

    def symbolize_user(self, pid: int, addresses: Sequence[int]) -> tuple[Frame, ...]:
        """Leaf-first frames for leaf-first ``addresses``. A Go address inside inlined code
        gives several frames (the inlined callees innermost first, then the real function),
        all with the same address, so the result can be longer than ``addresses``."""
        process = self._process(pid)
        self._stats["lookups"] += len(addresses)
        if process is None:
            self._stats["unknown_frames"] += len(addresses)
            return tuple(Frame("", "", 0, address, FrameType.NATIVE, None) for address in addresses)
        cache = process.frames
        # Every address but the leaf is a return address (is_leaf is the key's low bit).
        keys = [addresses[0] << 1 | 1, *(a << 1 for a in addresses[1:])] if addresses else []
        found = list(map(cache.get, keys))
        if None in found:  # resolve the missing ones (new leaves, new call sites) one by one
            for depth, key in enumerate(keys):
                if found[depth] is None:
                    found[depth] = self._resolve(pid, process, key >> 1, depth)
        return tuple(chain.from_iterable(cast(list[tuple[Frame, ...]], found)))

    def _resolve(self, pid: int, process: _Process, address: int, depth: int) -> tuple[Frame, ...]:
        """The frames of one address not cached yet; cached when named or inside a mapping."""
        found = self._frame(pid, process, address, depth)
        if found is None:
            self._stats["unknown_frames"] += 1
            return (Frame("", "", 0, address, FrameType.NATIVE, None),)
        if found[0].function or found[0].mapping is not None:
            current = self._processes.get(pid)  # _frame may have re-read the maps
            target = current if isinstance(current, _Process) and current.key == process.key else process
            target.frames[address << 1 | (depth == 0)] = found
            self._frame_entries.added()
        return found

    def code_before(self, pid: int, address: int, size: int) -> bytes | None:
        """The ``size`` bytes of file-backed executable code just before ``address`` in ``pid``.

        None when ``address`` is not inside an executable file mapping (a stack word that is
        not a code pointer). Read from the mapped file, not the process, so it is cheap and
        works after the process exits.
        """
        process = self._process(pid)
        if process is None:
            return None
        region = self._find_region(process, address)
        if region is None or region.file_key is None or address - size < region.entry.start:
            return None
        offset = address - size - region.entry.start + region.entry.offset
        # The same return addresses sit on the stacks of every sample of a thread: a file read
        # (seek + read) per candidate word per new stack would be the stack scan's main cost.
        key = (region.file_key, offset, size)
        code = self._code.get(key)
        if code is not None:
            return code
        elf = self._elf(pid, region)
        if elf is None:
            return None
        try:
            code = elf.read(offset, size)
        except OSError:
            return None
        if len(self._code) >= MAX_CACHED_CODE:
            self._code.clear()
        self._code[key] = code
        return code

    def has_frame_pointer_prologue(self, pid: int, address: int) -> bool | None:
        """Whether the function containing ``address`` starts with ``push rbp; mov rbp, rsp``.

        Code built with frame pointers does; Debian's libc does not. None when unknown (no
        symbol). Cached per (file, function start).
        """
        process = self._process(pid)
        region = self._find_region(process, address) if process else None
        if region is None or region.file_key is None:
            return None
        elf = self._elf(pid, region)
        if elf is None:
            return None
        vaddr = elf.file_offset_to_vaddr(address - region.entry.start + region.entry.offset)
        start = elf.function_start(vaddr) if vaddr is not None else None
        if start is None:
            return None
        key = ("fp", region.file_key, start)
        cached = self._addresses.hit(key)
        if cached is None:
            offset = elf.vaddr_to_file_offset(start)
            code = elf.read(offset, 8) if offset is not None else b""
            # endbr64 (f3 0f 1e fa) may precede the prologue in CET-enabled builds.
            if code.startswith(b"\xf3\x0f\x1e\xfa"):
                code = code[4:] + elf.read(offset + 8, 4) if offset is not None else code
            cached = code.startswith((b"\x55\x48\x89\xe5", b"\x55\x48\x8b\xec"))
            self._addresses.put(key, cached)
        return bool(cached)

    def process_key(self, pid: int) -> ProcessKey | None:
        """The process's key as last confirmed (at most a second old), or None for a process
        never readable: what symbolized results of ``pid`` may be cached under."""
        process = self._process(pid)
        return process.key if process else None

    def process_name(self, pid: int) -> str:
        """The process's name (comm), as current as its identity (re-read at most once a
        second). A process whose maps were read gives the name it was read with; any other is
        named from one read of /proc/PID/stat, not its maps: the wall and lock profiles name
        every process that switched or waited, and most of those never need a stack symbolized."""
        if isinstance(self._processes.get(pid), _Process):
            process = self._process(pid)
            return process.comm if process else ""
        now = time.monotonic()
        named = self._names.get(pid)
        if named is not None and now - named[1] < IDENTITY_CHECK_S:
            return named[0]
        try:
            _, comm = stat_identity(pid)
        except (OSError, ValueError, IndexError):
            if named is not None:
                return named[0]  # gone: the name it had (the sample predates the exit)
            process = self._process(pid)  # the capture made when its first record arrived, if any
            return process.comm if process else ""
        if len(self._names) >= self._max_names:
            self._names.clear()
        self._names[pid] = (comm, now)
        return comm

    def forget(self, pid: int) -> None:
        self._processes.pop(pid, None)
        self._names.pop(pid, None)

    def sweep_exited(self, grace_s: float = EXITED_GRACE_S) -> int:
        """Drop the maps of processes that exited more than ``grace_s`` ago; returns how many.

        Without this a host that runs many short-lived processes keeps up to ``max_processes``
        dead processes' maps (tens of KB each) until the LRU pushes them out. The grace covers
        samples taken just before an exit that are still on their way (ring buffer, flush).
        """
        now = time.monotonic()
        # A name is re-read after IDENTITY_CHECK_S anyway: older ones only take memory.
        self._names = {pid: named for pid, named in self._names.items() if now - named[1] <= grace_s}
        gone = [pid for pid, p in self._processes.items()
                if isinstance(p, _Process) and now - p.checked > grace_s and not os.path.exists(f"/proc/{pid}")]
        for pid in gone:  # their resolved frames go with them
            process = self._processes.pop(pid)
            if isinstance(process, _Process):
                self._frame_entries.dropped(process.frames)
        return len(gone)

    def sweep_idle_files(self, idle_s: float = FILE_IDLE_S) -> int:
        """Close the files no lookup has needed for ``idle_s``; returns how many.

        The byte bound alone keeps whatever was loaded until something pushes it out: the
        compiler libraries the agent samples itself in while it compiles its BPF programs at
        start (megabytes of C++ names), a tool that ran once, a binary since upgraded. Hot
        addresses are answered from the frame cache without touching their file, so an
        evicted file that is needed again is simply read again. The debug sections kept for
        decoding lines one CU at a time go after a quieter while (CuLineIndex.forget_idle_dwarf).
        """
        now = time.monotonic()
        CuLineIndex.forget_idle_dwarf()
        idle = [key for key, used in self._file_used.items() if now - used > idle_s]
        for key in idle:
            del self._file_used[key]
            elf = self._files.pop(key, None)
            if isinstance(elf, ElfSymbols) and not elf.shared:
                elf.close()
        # Keys the size/count bound evicted meanwhile.
        if len(self._file_used) > len(self._files):
            self._file_used = {k: t for k, t in self._file_used.items() if k in self._files}
        return len(idle)

    # -- processes -------------------------------------------------------------------------
    def _process(self, pid: int, force: bool = False) -> _Process | None:
        cached = self._processes.hit(pid)
        now = time.monotonic()
        # The key (pid reuse, exec) is re-checked at most once a second per process: one /proc read
        # per sample would dominate the cost of symbolizing.
        if isinstance(cached, _Process) and not force and now - cached.checked < IDENTITY_CHECK_S:
            return cached
        try:
            # The key holds the executable as well: exec keeps pid and start time, and a process
            # first seen between fork and exec must not keep its parent's maps.
            key = ProcessKey.read(pid)
        except (OSError, ValueError, IndexError):
            # Gone: keep using what we read while it lived (the sample predates the exit).
            return cached if isinstance(cached, _Process) else self._from_capture(pid, now)
        if isinstance(cached, _Process) and cached.key == key and not force:
            cached.checked = now
            return cached
        try:
            entries = read_maps(pid)
            comm = read_comm(pid)
        except OSError:
            self._stats["unreadable_processes"] += 1
            return cached if isinstance(cached, _Process) and cached.key == key else None
        self._stats["maps_reads"] += 1
        regions = [self._region(pid, e) for e in entries]
        process = _Process(key, comm, regions, [r.entry.start for r in regions], now, now)
        if isinstance(cached, _Process):
            if cached.key == key:  # the same process instance, maps re-read: its frames stay
                process.frames = cached.frames
                process.young_until = cached.young_until
            else:
                self._frame_entries.dropped(cached.frames)
        self._processes.put(pid, process)
        return process

    def _from_capture(self, pid: int, now: float) -> _Process | None:
        """A process that exited before it was first read, as captured when its first record
        arrived; None (counted: its frames stay unnamed) without a capture."""
        captured = self.captures.get(pid) if self.captures is not None else None
        if captured is None:
            self._stats["exited_before_read"] += 1
            return None
        self._stats["read_from_capture"] += 1
        regions = []
        for entry in captured.entries:
            region = self._region(pid, entry)
            if region.file_key is None:
                region.file_key = captured.keys.get((entry.start, entry.end))
            if region.file_key is not None and region.file_key == captured.executable_key:
                region.captured = captured.executable
            regions.append(region)
        process = _Process(captured.key, captured.comm, regions, [r.entry.start for r in regions], now, now)
        self._processes.put(pid, process)
        return process

    def _maps_ttl(self, process: _Process) -> float:
        """How soon an address outside the known maps may trigger a re-read.

        A process in its first seconds is still mapping libraries (its maps may have been read
        by ld.so's first instructions): re-read it within YOUNG_MAPS_TTL_S. Older processes
        wait ``maps_ttl_s``, so stray addresses (stack-scan guesses) cannot make us re-read
        maps on every sample.
        """
        now = time.monotonic()
        if process.young_until is None:  # once per process: reading the boot-time clock costs
            process.young_until = now + YOUNG_PROCESS_S - age_s(process.key.start_ticks)
        return YOUNG_MAPS_TTL_S if now < process.young_until else self.maps_ttl_s

    def _region(self, pid: int, entry: MapEntry) -> _Region:
        file_key = None
        if entry.path == VDSO:
            file_key = (-1, 0, entry.end - entry.start, 0)
        elif entry.file_backed:
            file_key = self._file_key(pid, entry)
        # Module-relative (see the module docstring): the mapping in file-offset space.
        size = entry.end - entry.start
        mapping = Mapping(entry.offset, entry.offset + size, entry.offset, entry.path or "[anon]", "")
        return _Region(entry, mapping, file_key)

    def _file_key(self, pid: int, entry: MapEntry) -> FileKey | None:
        """(dev, inode, size, mtime) of a mapped file, stat'ed at most every FILE_STAT_TTL_S."""
        cached = self._file_stats.get(entry)
        if cached is not None:
            return cached
        try:
            st = os.stat(self._open_path(pid, entry))
        except OSError:
            return None
        key = file_key(st)
        self._file_stats.put(entry, key)
        return key

    @staticmethod
    def _open_path(pid: int, entry: MapEntry) -> str:
        by_range = map_files_path(pid, entry)
        return by_range if os.path.exists(by_range) else root_view_path(pid, entry.path)

    def _find_region(self, process: _Process, address: int) -> _Region | None:
        i = bisect.bisect_right(process.starts, address) - 1
        if i >= 0 and address < process.regions[i].entry.end:
            return process.regions[i]
        return None

    # -- frames ----------------------------------------------------------------------------
    def _frame(self, pid: int, process: _Process, address: int, depth: int) -> tuple[Frame, ...] | None:
        region = self._find_region(process, address)
        if region is None and time.monotonic() - process.refreshed > self._maps_ttl(process):
            # A library loaded after we read the maps (dlopen) or the process exec'd.
            refreshed = self._process(pid, force=True)
            if refreshed is not None:
                process = refreshed
                region = self._find_region(process, address)
        if region is None:
            return None
        file_offset = address - region.entry.start + region.entry.offset
        elf = self._elf(pid, region)
        if elf is None:
            return (Frame("", "", 0, file_offset, FrameType.NATIVE, region.mapping),)
        go_build_id, htlhash = self._ids_of(pid, region)
        mapping = region.mapping
        if (mapping.build_id, mapping.go_build_id, mapping.htlhash) != (elf.build_id, go_build_id, htlhash):
            mapping = Mapping(mapping.start, mapping.limit, mapping.offset, mapping.filename, elf.build_id,
                              go_build_id, htlhash)
        region.mapping = mapping
        # Return addresses point after the call instruction, which may already belong to the
        # next line or even the next function: look up the call site (address - 1) instead.
        lookup = address if depth == 0 else address - 1
        vaddr = elf.file_offset_to_vaddr(lookup - region.entry.start + region.entry.offset)
        if vaddr is None:
            return (Frame("", "", 0, file_offset, FrameType.NATIVE, mapping),)
        key = (region.file_key, vaddr)
        resolved = self._addresses.hit(key)
        if resolved is None:
            go_frames = self._go_frames(elf, vaddr)
            if go_frames:
                resolved = tuple((g.function, g.file, g.line, FrameType.GO) for g in go_frames)
            else:
                function = elf.function(vaddr)
                filename, line = elf.line(vaddr)
                resolved = ((function, filename, line, FrameType.NATIVE),)
            self._addresses.put(key, resolved)
        rows = cast(tuple[tuple[str, str, int, FrameType], ...], resolved)
        if not rows[0][0]:
            self._stats["unknown_frames"] += 1
        last = len(rows) - 1  # rows before the last are inlined into the one after them
        return tuple(Frame(function, filename, line, file_offset, frame_type, mapping, i < last)
                     for i, (function, filename, line, frame_type) in enumerate(rows))

    def _go_frames(self, elf: ElfSymbols, vaddr: int) -> tuple[GoFrame, ...]:
        """Go frames for ``vaddr`` from the file's pclntab; () for other files. The table reads
        the file as lookups need it: when that fails (the file rewritten in place since, no
        descriptor left, a corrupt table), the failure is counted and logged, and the file
        drops its table and is named from its ELF symbols from then on."""
        try:
            go = elf.go_table()
            return go.lookup_inline(vaddr) if go is not None else ()
        except (OSError, ValueError, IndexError, struct.error) as exc:
            self._stats["go_table_errors"] += 1
            log.warning("%s: cannot read its Go symbol table (at %#x): %s; ELF symbols from now on",
                        elf.path, vaddr, exc)
            elf.drop_go_table()
            return ()

    def _ids_of(self, pid: int, region: _Region) -> tuple[str, str]:
        """(Go build id, htlhash) of a region's file: computed when the file was opened, read
        again if the bounded table has let it go since."""
        key = region.file_key
        if key is None:
            return "", ""
        ids = self._file_ids.get(key)
        if ids is None:
            ids = ("", "")
            if region.entry.path != VDSO:
                try:
                    with open(self._open_path(pid, region.entry), "rb") as f:
                        ids = read_file_ids(f)
                except OSError:
                    pass
            self._remember_ids(key, ids)
        return ids

    def _remember_ids(self, key: FileKey, ids: tuple[str, str]) -> None:
        if len(self._file_ids) >= MAX_FILE_IDS:
            del self._file_ids[next(iter(self._file_ids))]  # the oldest
        self._file_ids[key] = ids

    def _elf(self, pid: int, region: _Region) -> ElfSymbols | None:
        key = region.file_key
        if key is None or key in self._bad_files:
            return None
        cached = self._files.hit(key)
        if isinstance(cached, ElfSymbols):
            self._stats["file_cache_hits"] += 1
            self._file_used[key] = time.monotonic()
            return cached
        self._stats["file_cache_misses"] += 1
        try:
            if region.entry.path == VDSO:
                stream = _read_vdso(pid, region.entry)
            elif region.captured is not None:  # the process has exited: its capture's open file
                stream = os.fdopen(os.dup(region.captured.fileno()), "rb")  # ValueError if closed
            else:
                stream = open(self._open_path(pid, region.entry), "rb")  # noqa: SIM115 - kept open for lazy DWARF
        except (OSError, ValueError) as exc:
            self._stats["elf_errors"] += 1
            log.info("cannot open %s of pid %d: %s", region.entry.path, pid, exc)
            return None
        self._remember_ids(key, read_file_ids(stream))
        try:
            elf = ElfSymbols(stream, region.entry.path)
        except Exception as exc:  # pyelftools raises many types on unusual files
            stream.close()
            self._stats["elf_errors"] += 1
            if len(self._bad_files) > 10_000:
                self._bad_files.clear()
            self._bad_files.add(key)
            log.warning("cannot parse %s: %s (its frames stay unsymbolized)", region.entry.path, exc)
            return None
        shared = self._share_by_build_id(elf, stream)
        if shared is elf and elf.wants_debug_file and region.entry.path != VDSO:
            root = root_view_path(pid, "")
            elf.set_debug_source(lambda e: self._open_debug_file(e, region.entry.path, root))
        elf = shared
        self._files.put(key, elf)
        self._file_used[key] = time.monotonic()
        return elf

    def _open_debug_file(self, elf: ElfSymbols, path: str, root: str) -> tuple[IO[bytes], str] | None:
        """The debug file of ``elf`` (mapped at ``path`` in a process whose root view is
        ``root``), opened, with its path; None when there is none."""
        found = self._debug_files.find(elf.build_id, elf.debuglink, path, root)
        if found is None:
            return None
        try:
            return open(found, "rb"), found
        except OSError as exc:
            log.info("cannot open debug file %s: %s", found, exc)
            return None

    def _share_by_build_id(self, elf: ElfSymbols, stream: IO[bytes]) -> ElfSymbols:
        """The already parsed copy of the same build, if any, instead of ``elf``.

        The same library is often installed many times under different paths (one per venv or
        container image): its lazily built DWARF line table costs up to seconds of CPU, once
        per build is enough. Same build id *and* size, so a stripped copy never borrows an
        unstripped one's tables or the reverse (they share the build id but not the size).
        """
        if not elf.build_id:
            return elf
        try:
            size = os.fstat(stream.fileno()).st_size
        except OSError:
            return elf
        build = (elf.build_id, size)
        ref = self._builds.hit(build)
        shared = ref() if isinstance(ref, weakref.ref) else None
        if isinstance(shared, ElfSymbols) and not shared.closed:
            stream.close()
            shared.shared = True
            self._stats["build_id_shares"] += 1
            return shared
        self._builds.put(build, weakref.ref(elf))
        return elf
