"""The walk of bpf/unwind.h in Python, over registers and a copy of the stack.

The agent never unwinds in Python (BPF does it per sample). This exists so the tables and
the walk's rules can be checked against real programs in unit tests (tests/test_unwind.py
stops a process with ptrace, copies its stack, and compares) and a table can be debugged
offline. It follows the BPF code step for step: keep the two in step.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from agent.process.procmaps import read_maps
from agent.unwind.cache import VDSO, TableCache, file_ref
from agent.unwind.cfi import RowKind
from agent.unwind.table import BUCKET_STEPS, ROW, UnwindTable

_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class MappedTable:
    """An executable mapping and its file's table (None: no CFI, frame pointers)."""

    start: int
    end: int
    load_bias: int  # address - ELF vaddr
    table: UnwindTable | None


@dataclass(frozen=True, slots=True)
class StackCopy:
    """Bytes of a thread's stack starting at ``base`` (normally its sp)."""

    base: int
    data: bytes

    def read_u64(self, address: int) -> int | None:
        offset = address - self.base
        if offset < 0 or offset + 8 > len(self.data):
            return None
        return int(_U64.unpack_from(self.data, offset)[0])


def process_tables(pid: int, cache: TableCache) -> list[MappedTable]:
    """The executable mappings of a live process with their tables, sorted by start."""
    out = []
    for entry in read_maps(pid):
        table = None
        bias = 0
        if entry.file_backed or entry.path == VDSO:
            ref = file_ref(pid, entry)
            table = cache.get(ref) if ref is not None else None
            if table is not None:
                load_bias = table.vaddr_bias(entry.start, entry.offset)
                if load_bias is None:
                    table = None
                else:
                    bias = load_bias
        out.append(MappedTable(entry.start, entry.end, bias, table))
    return out


def unwind(ip: int, sp: int, bp: int, mappings: list[MappedTable], stack: StackCopy,
           max_frames: int = 127) -> tuple[list[int], str]:
    """Frames (leaf first) and why the walk ended: "complete", "unsupported_rule",
    "read_failed", "bad_frame" or "truncated" (the names of the agent's counters)."""
    starts = [m.start for m in mappings]
    frames: list[int] = []
    for depth in range(max_frames):
        frames.append(ip)
        i = bisect.bisect_right(starts, ip) - 1
        mapping = mappings[i] if i >= 0 and ip < mappings[i].end else None
        kind, cfa_offset, rbp_offset = RowKind.NONE, 0, 0
        if mapping is not None and mapping.table is not None and len(mapping.table):
            # Return addresses point after the call: look up the call instruction.
            rule = mapping.table.rule_at(ip - mapping.load_bias - (1 if depth else 0))
            kind, cfa_offset, rbp_offset = RowKind(rule.kind), rule.cfa_offset, rule.rbp_offset
        if kind == RowKind.CFA_RSP:
            cfa = sp + cfa_offset
        elif kind == RowKind.CFA_RBP:
            cfa = bp + cfa_offset
        elif kind == RowKind.PLT:
            cfa = sp + 8 + (8 if (ip & 15) >= cfa_offset else 0)
        elif kind == RowKind.CFA_DEREF_RBP:
            value = stack.read_u64(bp + cfa_offset)
            if value is None:
                return frames, "read_failed"
            cfa = value
        elif kind == RowKind.NONE:
            if bp < sp or bp & 7:
                return frames, "complete" if bp == 0 else "bad_frame"
            cfa, rbp_offset = bp + 16, -16
        elif kind == RowKind.END:
            return frames, "complete"
        else:
            return frames, "unsupported_rule"
        if cfa <= sp:
            return frames, "bad_frame"
        ra = stack.read_u64(cfa - 8)
        if ra is None:
            return frames, "read_failed"
        if rbp_offset:
            saved = stack.read_u64(cfa + rbp_offset)
            if saved is None:
                return frames, "read_failed"
            bp = saved
        sp, ip = cfa, ra
        if ip == 0:
            return frames, "complete"
    return frames, "truncated"


MAX_MAPPINGS, MAPPING_STEPS = 256, 8  # bpf/unwind.h UNWIND_MAX_MAPPINGS, UNWIND_MAPPING_STEPS
_U64_MASK = (1 << 64) - 1


def bpf_mapping_lookup(mappings: list[tuple[int, ...]], ip: int) -> int | None:
    """bpf/unwind.h's unwind_find_mapping over a process's (start, end, ...) mappings as the
    loader writes them, with its unsigned 64-bit branch-free compare: the index of the
    mapping holding ``ip``, or None."""
    lo, length = 0, min(len(mappings), MAX_MAPPINGS)
    for _ in range(MAPPING_STEPS):
        half = length >> 1
        mid = (lo + half) & (MAX_MAPPINGS - 1)
        start = mappings[mid][0] if mid < len(mappings) else 0  # slots past count are zero
        lo += half * (1 - (((ip - start) & _U64_MASK) >> 63))  # unwind_le(start, ip)
        length -= half
    index = lo & (MAX_MAPPINGS - 1)
    start, end = (mappings[index][0], mappings[index][1]) if index < len(mappings) else (0, 0)
    return index if start <= ip < end else None


def bpf_row_lookup(image: bytes, first_slot: int, buckets: int, shift: int, pc: int) -> tuple[int, int, int] | None:
    """bpf/unwind.h's bucketed search over a table image (``UnwindTable.bpf_image``), returning
    (kind, cfa_offset, rbp_offset) of the row covering relative ``pc``, or None (no row)."""

    def slot(i: int) -> tuple[int, int, int, int]:
        return ROW.unpack_from(image, (i - first_slot) * ROW.size)

    bucket = pc >> shift
    if bucket >= buckets:
        return None
    lo = slot(first_slot + bucket)[0]
    length = slot(first_slot + bucket + 1)[0] - lo + 1
    for _ in range(BUCKET_STEPS):
        half = length >> 1
        lo += half * (1 if slot(lo + half)[0] <= pc else 0)
        length -= half
    row_pc, cfa_offset, rbp_offset, kind = slot(lo)
    return (kind, cfa_offset, rbp_offset) if row_pc <= pc else None
