"""The current stack of every goroutine of a live Go process, read from /proc/PID/mem.

What the runtime's own goroutine profile shows, without stopping the process: walk
``runtime.allgs``, skip goroutines that are idle or dead, and unwind each parked one from
its saved scheduling context (``g.sched.pc/sp``). Unwinding uses the pclntab's SP-delta
table, as the runtime's ``gentraceback`` does on amd64 (return address at
``sp + spdelta``, caller's SP just above it): it also works for goroutines in system calls,
whose saved ``bp`` Go 1.19 does not record, and needs nothing but the stack bytes.

The process keeps running while we read, so a goroutine may change under us: every value
is checked (stack bounds, PCs inside Go text, SP strictly growing), a walk that fails a
check ends there and is counted as truncated, never raises. Reads are bounded
(``max_goroutines``, ``max_depth``, ``max_stack_bytes``). Blocking file reads: call from a
worker thread, never the event loop. Running goroutines have no valid saved context (the
runtime stops the world for them, we do not): they are reported by state without a stack.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from agent.process.memory import ProcessMemory
from agent.runtimes.go.layout import GLayout
from agent.runtimes.go.load_bias import load_bias
from agent.runtimes.go.pclntab import GoSymbolTable

# runtime/runtime2.go's _G* states; 10 and 11 are new in Go 1.26 (unused before): _Gleaked, a
# goroutine the GC found blocked forever (still counted by NumGoroutine), and _Gdeadextra, a
# dead g kept for cgo callbacks.
STATUS_NAMES = {0: "idle", 1: "runnable", 2: "running", 3: "syscall", 4: "waiting", 5: "moribund", 6: "dead",
                7: "enqueue", 8: "copystack", 9: "preempted", 10: "leaked", 11: "deadextra"}
G_SCAN = 0x1000  # _Gscan bit: being scanned by the GC, the rest of the status still holds
SKIPPED_STATES = ("idle", "dead", "moribund", "deadextra")  # not goroutines the runtime's profile counts
MAX_ALLGS_LEN = 1 << 24


@dataclass(frozen=True, slots=True)
class Goroutine:
    goid: int
    state: str
    pcs: tuple[int, ...]  # leaf first; the leaf is a return address too (saved by mcall / entersyscall)
    start: str  # start function: the frame below runtime.goexit, else from g.startpc, else ""
    truncated: bool
    start_pc: int = 0  # g.startpc (a run-time address) when its offset is known


@dataclass(slots=True)
class ReadStats:
    goroutines: int = 0
    skipped: int = 0
    truncated: int = 0
    unreadable: int = 0
    over_limit: int = 0


class GoroutineReader:
    """Reads one process's goroutines; opened once, ``read`` called periodically."""

    def __init__(self, pid: int, table: GoSymbolTable, layout: GLayout, allgs_candidates: tuple[int, ...],
                 max_goroutines: int = 10_000, max_depth: int = 64, max_stack_bytes: int = 64 * 1024) -> None:
        self.pid, self.table, self.layout = pid, table, layout
        self.max_goroutines, self.max_depth, self.max_stack_bytes = max_goroutines, max_depth, max_stack_bytes
        self._memory = ProcessMemory(pid)
        # PIE builds run away from their link-time addresses, which the table and the allgs
        # candidates use: ``bias`` is added to those, subtracted from what memory holds.
        self.bias = load_bias(pid)
        self._candidates = tuple(address + self.bias for address in allgs_candidates)
        self.allgs: int | None = None
        self._text = (table.entries[0] + self.bias, table.entries[-1] + self.bias)

    def close(self) -> None:
        self._memory.close()

    def _slice(self, address: int) -> tuple[int, int] | None:
        ptr, length, cap = struct.unpack("<QQQ", self._memory.read(address, 24))
        if ptr == 0 or not 0 < length <= cap <= MAX_ALLGS_LEN:
            return None
        return ptr, length

    def locate_allgs(self) -> int | None:
        """The first candidate that holds a []*g whose first g is the main goroutine (goid 1)."""
        if self.allgs is not None:
            return self.allgs
        for address in self._candidates:
            try:
                found = self._slice(address)
                if found is None:
                    continue
                first = self._memory.word(found[0])
                if first and self._memory.word(first + self.layout.goid) == 1:
                    self.allgs = address
                    return address
            except OSError:
                continue
        return None

    def read(self, stats: ReadStats) -> list[Goroutine]:
        """Every counted goroutine now; raises OSError only if the process is gone, allgs is
        unknown, or its binary changed under its Go table (agent/file_region.py)."""
        allgs = self.locate_allgs()
        if allgs is None:
            raise OSError("runtime.allgs not found")
        found = self._slice(allgs)
        if found is None:
            return []
        ptr, length = found
        if length > self.max_goroutines:
            stats.over_limit += length - self.max_goroutines
            length = self.max_goroutines
        pointers = struct.unpack(f"<{length}Q", self._memory.read(ptr, 8 * length))
        out = []
        for gp in pointers:
            try:
                g = self._goroutine(gp, stats)
            except (ValueError, IndexError, struct.error):  # its pcs met a corrupt part of the Go table
                stats.unreadable += 1
                continue
            if g is not None:
                out.append(g)
        return out

    def _goroutine(self, gp: int, stats: ReadStats) -> Goroutine | None:
        lay = self.layout
        try:
            raw = self._memory.read(gp, lay.read_size)
        except OSError:
            stats.unreadable += 1
            return None
        (status,) = struct.unpack_from("<I", raw, lay.atomicstatus)
        state = STATUS_NAMES.get(status & ~G_SCAN, "unknown")
        if state in SKIPPED_STATES:
            stats.skipped += 1
            return None
        (goid,) = struct.unpack_from("<q", raw, lay.goid)
        lo, hi, sp, pc = (struct.unpack_from("<Q", raw, off)[0]
                          for off in (lay.stack_lo, lay.stack_hi, lay.sched_sp, lay.sched_pc))
        start_pc = struct.unpack_from("<Q", raw, lay.startpc)[0] if lay.startpc is not None else 0
        start = self._name(start_pc) if start_pc else ""
        stats.goroutines += 1
        if state == "running":  # saved context is stale while it runs
            return Goroutine(goid, state, (), start, False, start_pc)
        pcs, reached_goexit = self._unwind(pc, sp, lo, hi)
        if reached_goexit and len(pcs) >= 1:
            start = self._name(pcs[-1] - 1) or start
        if not reached_goexit:
            stats.truncated += 1
        return Goroutine(goid, state, pcs, start, not reached_goexit, start_pc)

    def _name(self, pc: int) -> str:
        frame = self.table.lookup(pc - self.bias)
        return frame.function if frame is not None else ""

    def _unwind(self, pc: int, sp: int, lo: int, hi: int) -> tuple[tuple[int, ...], bool]:
        """Return PCs leaf first, and whether the walk ended cleanly at runtime.goexit."""
        if not (lo <= sp < hi) or hi - lo > 1 << 30:
            return (), False
        size = min(hi - sp, self.max_stack_bytes)
        try:
            stack = self._memory.read(sp, size)
        except OSError:
            return (), False
        base, text_lo, text_hi = sp, *self._text
        pcs: list[int] = []
        while len(pcs) < self.max_depth and text_lo <= pc < text_hi:
            name = self._name(pc)
            if name == "runtime.goexit":
                return tuple(pcs), True
            pcs.append(pc)
            delta = self.table.sp_delta(pc - self.bias)
            if delta is None:
                break
            fp = sp + delta + 8  # caller's SP: above the frame and the return address
            if not (sp < fp <= base + size):
                break
            pc = int(struct.unpack_from("<Q", stack, fp - 8 - base)[0])
            sp = fp
        return tuple(pcs), False
