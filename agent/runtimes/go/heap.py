"""A Go process's own sampled heap, mutex and block profiles, read from /proc/PID/mem.

Every Go program samples its allocations (one per ``runtime.MemProfileRate`` bytes on
average) into the bucket list ``runtime.mbuckets``; mutex and block events, when the
program enabled them, go to ``runtime.xbuckets`` and ``runtime.bbuckets``. Each bucket
(runtime/mprof.go, linux/amd64) is

    header:  next, allnext, typ, hash, size, nstk       (6 words; 1.19 - 1.27 alike)
    stack:   nstk return PCs
    record:  memRecord = active + future[3], each a memRecordCycle:
                 allocs, frees, alloc_bytes, free_bytes  (4 words, Go 1.19 - 1.26)
                 allocs, frees                           (2 words, Go 1.27: bytes = count x size)
             or blockRecord = count float64, cycles int64 (mutex, block)

and none of it is written after the bucket is created except the record. What
``runtime.MemProfile`` returns (and so ``runtime/pprof``'s heap profile) is ``active`` plus
``future[cycle % 3]`` when that cycle is not flushed yet (``runtime.mProfCycle``: cycle << 1
| flushed): the heap as of the last completed GC cycle. ``read_heap`` computes exactly that
without writing to the process; see docs/design/heap.md.

Addresses of the runtime variables come from the ELF symbol table; a stripped binary
(``-ldflags=-s``) has none, and for the releases checked in tests they are found from the
runtime code that uses them (``agent.runtimes.go.heap_code``); otherwise it is not read (the caller
counts and logs it). Versions without a layout below are not read either. Every bucket's
type must match its list (mbuckets: memProfile, bbuckets: blockProfile, xbuckets:
mutexProfile), so a wrong address is a read failure, never a wrong profile. Reads are bounded and checked (bucket count,
stack depth, pointer alignment, loops); the process keeps running while we read, so a
read that sees the profile cycle change is retried, then given up (``InconsistentRead``).
Blocking file reads: call from a worker thread. No library reads Go's runtime memory:
hand-written.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

from agent.elf_symbols import find_symbols
from agent.process.memory import ProcessMemory
from agent.runtimes.go.buildinfo import go_version, is_go_binary
from agent.runtimes.go.heap_code import CHECKED_MINORS, NotFoundInCode, find_from_code
from agent.runtimes.go.layout import go_minor
from agent.runtimes.go.load_bias import first_load_address

WORD = 8
BUCKET_HEADER = struct.Struct("<QQqQQQ")  # next, allnext, typ, hash, size, nstk
MEM_PROFILE, BLOCK_PROFILE, MUTEX_PROFILE = 1, 2, 3  # runtime.bucketType
BUCKET_TYPES = {"runtime.mbuckets": MEM_PROFILE, "runtime.bbuckets": BLOCK_PROFILE,
                "runtime.xbuckets": MUTEX_PROFILE}
MAX_STACK_DEPTH = 1024  # runtime.maxProfStackDepth: a larger nstk is corrupt data
MAX_BUCKETS = 200_000
FUTURE_CYCLES = 3
READ_ATTEMPTS = 3
# What one bucket read fetches at once: header, a 32-deep stack and the record (one pread
# for most buckets; deeper stacks take a second).
FIRST_READ = BUCKET_HEADER.size + 64 * WORD + 4 * 4 * WORD
RUNTIME_PREFIXES = ("runtime.", "internal/runtime/")  # the frames pprof hides at the leaf

SYMBOLS = ("runtime.mbuckets", "runtime.bbuckets", "runtime.xbuckets", "runtime.MemProfileRate",
           "runtime.mProfCycle", "runtime.ticks")


@dataclass(frozen=True, slots=True)
class MprofLayout:
    """What changes between Go versions: words per memRecordCycle, offset of ticks.val."""

    cycle_words: int
    ticks_val: int | None  # None: block/mutex delays cannot be converted to time


# From each release's runtime/mprof.go and runtime/runtime.go (ticksType). 1.20, 1.22 and
# 1.24 are not installed here: their memRecordCycle is taken from the releases either side
# (identical), their ticks layout only where both sides agree (1.24).
MPROF_LAYOUTS: dict[int, MprofLayout] = {
    19: MprofLayout(4, 16),  # ticks: lock, pad u32, val u64
    20: MprofLayout(4, None),
    21: MprofLayout(4, 8),   # ticks: lock, val atomic.Int64
    22: MprofLayout(4, None),
    23: MprofLayout(4, 24),  # ticks: lock, startTicks, startTime, val
    24: MprofLayout(4, 24),
    25: MprofLayout(4, 24),
    26: MprofLayout(4, 24),
    27: MprofLayout(2, 24),  # memRecordCycle lost alloc_bytes/free_bytes
}


class InconsistentRead(Exception):
    """The profile changed under every attempt to read it (a GC cycle ended meanwhile)."""


@dataclass(frozen=True, slots=True)
class MemBucket:
    """One heap profile record as runtime.MemProfile gives it."""

    address: int
    size: int
    pcs: tuple[int, ...]  # return PCs, leaf first, one per logical (inline-expanded) frame
    allocs: int
    frees: int
    alloc_bytes: int
    free_bytes: int


@dataclass(frozen=True, slots=True)
class BlockBucket:
    """One mutex or block profile record (count and cycles already scaled by the runtime)."""

    address: int
    pcs: tuple[int, ...]
    count: float
    cycles: int


@dataclass(frozen=True, slots=True)
class HeapSnapshot:
    rate: int  # runtime.MemProfileRate
    buckets: list[MemBucket]


def scale_heap_sample(count: int, nbytes: int, rate: int) -> tuple[int, int]:
    """runtime/pprof's scaleHeapSample: (objects, bytes) that ``count`` sampled objects of
    ``nbytes`` in all stand for, truncated to integers as pprof does."""
    if count == 0 or nbytes == 0:
        return 0, 0
    if rate <= 1:
        return count, nbytes
    scale = 1 / (1 - math.exp(-(nbytes / count) / rate))
    return int(count * scale), int(nbytes * scale)


def find_runtime_symbols(elf: ELFFile) -> dict[str, int]:
    """Addresses (link-time) of the runtime variables in ``SYMBOLS`` from ``.symtab``; {} when
    stripped. A Go binary has tens of thousands of symbols and only six names matter."""
    return {name: value for name, (value, _size) in find_symbols(elf, SYMBOLS, (".symtab",)).items()}


@dataclass(frozen=True, slots=True)
class GoProfileSymbols:
    """What reading one Go binary's profiles needs; from ``profile_symbols``."""

    version: str
    layout: MprofLayout
    addresses: dict[str, int]  # link-time; add the load bias for PIE
    pie: bool
    first_load: int = 0  # page-aligned vaddr of the first PT_LOAD (file offset 0)
    source: str = "symtab"  # or "code": found from the runtime's code (stripped binary)


class UnsupportedBinary(Exception):
    """This binary's profiles cannot be read; ``reason`` is a counter label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def profile_symbols(path: str) -> GoProfileSymbols | None:
    """The layout and runtime variable addresses for the file at ``path``: None when it is
    not a Go binary; raises UnsupportedBinary (reason ``version``, ``stripped``) when the
    profile cannot be read. One pass over the ELF headers and ``.symtab``, or the pclntab and
    a few functions' code when stripped (milliseconds: no DWARF, unlike the goroutine
    profile's facts)."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if not is_go_binary(elf):
            return None
        version = go_version(elf)
        minor = go_minor(version)
        layout = MPROF_LAYOUTS.get(minor) if minor is not None else None
        if layout is None:
            raise UnsupportedBinary("version", f"no runtime/mprof.go layout for Go version {version!r}")
        addresses, source = find_runtime_symbols(elf), "symtab"
        missing = [name for name in SYMBOLS[:5] if name not in addresses]
        if missing:
            if minor not in CHECKED_MINORS:
                raise UnsupportedBinary("stripped", f"no symbol table entries for {', '.join(missing)}, and "
                                        f"finding them from code is not checked for {version}")
            try:
                addresses, source = find_from_code(elf, layout.ticks_val), "code"
            except NotFoundInCode as exc:
                raise UnsupportedBinary("stripped", f"no symbol table, and not found from code: {exc}") from exc
            except Exception as exc:  # a malformed pclntab or code section: reported, not a crash
                raise UnsupportedBinary("stripped", f"no symbol table, and its code cannot be read: {exc!r}") from exc
        pie = elf["e_type"] == "ET_DYN"
        first_load = first_load_address(elf)
    return GoProfileSymbols(version, layout, addresses, pie, first_load, source)


class GoProfileReader:
    """Reads one process's profile buckets; opened once, the ``read_*`` methods called periodically."""

    def __init__(self, pid: int, symbols: GoProfileSymbols, bias: int = 0, mem_path: str | None = None) -> None:
        """``mem_path`` replaces /proc/PID/mem (tests read a memory image from a file)."""
        self.pid, self.layout = pid, symbols.layout
        self._addr = {name: value + bias for name, value in symbols.addresses.items()}
        self._memory = ProcessMemory(pid, mem_path)
        self._record_words = FUTURE_CYCLES * self.layout.cycle_words + self.layout.cycle_words

    def close(self) -> None:
        self._memory.close()

    def _word(self, name: str, fmt: str = "<Q") -> int:
        return int(struct.unpack(fmt, self._memory.read(self._addr[name], struct.calcsize(fmt)))[0])

    def memprofile_rate(self) -> int:
        return self._word("runtime.MemProfileRate", "<q")

    def ticks_per_second(self) -> int | None:
        """runtime.ticks.val (CPU ticks per second, for block/mutex delays); None if unknown or unset."""
        if self.layout.ticks_val is None or "runtime.ticks" not in self._addr:
            return None
        value = int(struct.unpack("<q", self._memory.read(self._addr["runtime.ticks"] + self.layout.ticks_val, 8))[0])
        return value if 10**6 <= value <= 10**12 else None

    def _buckets(self, head_name: str, record_words: int) -> list[tuple[int, int, tuple[int, ...], bytes]]:
        """(address, size, pcs, record bytes) of every bucket on the list at ``head_name``."""
        bucket_type = BUCKET_TYPES[head_name]
        head = self._word(head_name)
        out: list[tuple[int, int, tuple[int, ...], bytes]] = []
        seen: set[int] = set()
        record_size = record_words * WORD
        address = head
        while address:
            if address % WORD or address in seen or len(out) >= MAX_BUCKETS:
                raise OSError(f"bucket list of {head_name} is corrupt at {address:#x}")
            seen.add(address)
            try:
                data = self._memory.read(address, FIRST_READ)
            except OSError:  # at the end of a mapping: the exact size instead
                data = self._memory.read(address, BUCKET_HEADER.size)
            _next, allnext, typ, _hash, size, nstk = BUCKET_HEADER.unpack_from(data)
            if typ != bucket_type:
                raise OSError(f"bucket at {address:#x} on {head_name} has type {typ}, not {bucket_type}")
            if nstk > MAX_STACK_DEPTH:
                raise OSError(f"bucket at {address:#x} claims {nstk} frames")
            need = BUCKET_HEADER.size + nstk * WORD + record_size
            if len(data) < need:
                data = self._memory.read(address, need)
            pcs = struct.unpack_from(f"<{nstk}Q", data, BUCKET_HEADER.size)
            out.append((address, size, pcs, data[need - record_size:need]))
            address = allnext
        return out

    def read_heap(self) -> HeapSnapshot:
        """The heap profile as runtime.MemProfile would return it now (see the module doc)."""
        words = self.layout.cycle_words
        for _ in range(READ_ATTEMPTS):
            before = self._word("runtime.mProfCycle", "<I")
            rate = self.memprofile_rate()
            raw = self._buckets("runtime.mbuckets", self._record_words)
            if self._word("runtime.mProfCycle", "<I") == before:
                break
        else:
            raise InconsistentRead("runtime.mProfCycle changed during every read")
        cycle, flushed = before >> 1, before & 1
        cycles = []
        for address, size, pcs, record in raw:
            values = struct.unpack(f"<{4 * words}Q", record)
            per_cycle = [values[i * words:(i + 1) * words] for i in range(4)]  # active, future[0..2]
            cycles.append((address, size, pcs, per_cycle))
        pending = 1 + cycle % FUTURE_CYCLES

        def total(per_cycle: list[tuple[int, ...]], parts: range | tuple[int, ...]) -> list[int]:
            return [sum(per_cycle[i][k] for i in parts) for k in range(words)]

        sums = [total(pc, (0,) if flushed else (0, pending)) for *_, pc in cycles]
        if all(s[0] == 0 and s[1] == 0 for s in sums):
            # No GC has completed yet: MemProfile then publishes every cycle (mprof.go, "clear").
            sums = [total(pc, range(4)) for *_, pc in cycles]
        buckets = []
        for (address, size, pcs, _), s in zip(cycles, sums, strict=True):
            allocs, frees = s[0], s[1]
            alloc_bytes, free_bytes = (s[2], s[3]) if words == 4 else (allocs * size, frees * size)
            buckets.append(MemBucket(address, size, pcs, allocs, frees, alloc_bytes, free_bytes))
        return HeapSnapshot(rate, buckets)

    def read_contention(self, kind: str) -> list[BlockBucket]:
        """The ``mutex`` (runtime.xbuckets) or ``block`` (runtime.bbuckets) profile now."""
        head = "runtime.xbuckets" if kind == "mutex" else "runtime.bbuckets"
        if head not in self._addr:
            return []
        out: list[BlockBucket] = []
        for address, _size, pcs, record in self._buckets(head, 2):
            count, cycles = struct.unpack("<dq", record)
            if math.isfinite(count) and count >= 0 and cycles >= 0:
                out.append(BlockBucket(address, pcs, count, cycles))
        return out
