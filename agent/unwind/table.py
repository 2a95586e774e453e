"""One compact, sorted unwind table per ELF file, built once per file identity.

A table is the merged row list of every FDE of the file: row ``i`` covers
``[pcs[i], pcs[i+1])``. Gaps between FDEs get a ``NONE`` row so that a lookup never
borrows the rule of a preceding function. Addresses are ELF virtual addresses; the BPF
copy stores them relative to ``base`` as u32 (see :meth:`UnwindTable.bpf_image`).

In BPF the rows are preceded by a bucket index: the code is cut into buckets of
``2**shift`` bytes and bucket entry ``j`` holds the (absolute) index of the row covering
the bucket's first byte. A lookup reads entries ``j`` and ``j+1`` and binary-searches only
the rows between them, at most ``2**BUCKET_STEPS``: 8 steps instead of ~18 over the whole
table, which halves both the per-frame cost and the verifier's work per frame.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
from array import array
from collections.abc import Iterator
from typing import IO

from agent.bpf.layouts import UnwindRow, struct_format
from agent.unwind.cfi import NO_INFO, CfiError, CfiRows, Fde, Rule, parse_cfi_rows
from agent.unwind.elfread import ElfHeaders, LoadSegment, NotUsableElf

log = logging.getLogger(__name__)

# struct unwind_row (bpf/unwind.h, described in agent/bpf/layouts.py): pc, cfa_offset, rbp_offset, kind
ROW = struct_format(UnwindRow)
# Binary-search steps within one bucket (UNWIND_BUCKET_STEPS in bpf/unwind.h).
BUCKET_STEPS = 8
_MAX_SHIFT, _MIN_SHIFT = 16, 7  # 64 KiB .. 128 bytes of code per bucket
# Text spans beyond this do not fit the u32 row address (none seen in practice).
MAX_SPAN = 0xFFFF_FFFF


class UnwindTable:
    """Rows of one file; ``rule_at`` is the agent-side lookup, ``packed_rows`` the BPF copy."""

    def __init__(self, name: str, build_id: str, segments: list[LoadSegment], pcs: array[int],
                 rules: list[Rule]) -> None:
        self.name = name
        self.build_id = build_id
        self.segments = segments
        self.pcs = pcs
        self.rules = rules
        self.row_count = len(pcs)
        self.base = pcs[0] if pcs else 0
        self.span = pcs[-1] - pcs[0] if pcs else 0
        self.rows_dropped = False
        # What BPF-resident copies are keyed by; TableCache sets it to the build id or file identity.
        self.key: object = name
        self._shift: int | None = None

    def __len__(self) -> int:
        return self.row_count

    def drop_rows(self) -> None:
        """Keep only what the loader needs once the rows are in BPF (shape, segments, key).

        A resident table's rows live in the kernel; holding a second copy would cost the agent
        16 bytes a row (libc 0.5 MB, python3.11 1 MB). A table needed again after eviction is
        rebuilt from its file."""
        self.bucket_shift()
        self.pcs, self.rules, self.rows_dropped = array("Q"), [], True

    def rule_at(self, vaddr: int) -> Rule:
        """The rule covering ``vaddr`` (``NONE`` outside every FDE)."""
        i = bisect.bisect_right(self.pcs, vaddr) - 1
        return self.rules[i] if i >= 0 else NO_INFO

    def vaddr_bias(self, map_start: int, map_offset: int) -> int | None:
        """``address - vaddr`` for a mapping of this file at ``map_start`` with file offset ``map_offset``.

        PIE executables and shared libraries load at a random base; the segment containing
        the mapping's file offset gives the ELF vaddr of the mapping's first byte.
        """
        for seg in self.segments:
            if seg.offset <= map_offset < seg.offset + max(seg.filesz, 1):
                return map_start - (map_offset - seg.offset + seg.vaddr)
        return None

    def bucket_shift(self) -> int:
        """The coarsest bucket size (log2 bytes) whose buckets need at most 2**BUCKET_STEPS rows searched."""
        if self._shift is None:
            rel = array("Q", (pc - self.base for pc in self.pcs))
            self._shift = _MIN_SHIFT
            for shift in range(_MAX_SHIFT, _MIN_SHIFT - 1, -1):
                # Rows starting in each bucket, from the sorted pcs; candidates of a bucket are
                # those plus the row covering its first byte.
                firsts = [bisect.bisect_left(rel, j << shift) for j in range((self.span >> shift) + 2)]
                if max(b - a for a, b in itertools.pairwise(firsts)) + 1 <= 1 << BUCKET_STEPS:
                    self._shift = shift
                    break
        return self._shift

    def bucket_count(self) -> int:
        return (self.span >> self.bucket_shift()) + 1 if self.row_count else 0

    def bpf_len(self) -> int:
        """Slots the table takes in ``unwind_rows``: bucket entries (plus a sentinel), then rows."""
        return self.bucket_count() + 1 + self.row_count if self.row_count else 0

    def bpf_image(self, first_slot: int) -> bytes:
        """The table as ``struct unwind_row`` slots for ``unwind_rows[first_slot:]``.

        Bucket entries are rows whose ``pc`` is the absolute slot of a row; row pcs are
        relative to ``base``.
        """
        if self.rows_dropped:
            raise ValueError(f"{self.name}: rows were dropped after upload; rebuild the table")
        shift, buckets = self.bucket_shift(), self.bucket_count()
        rows_at = first_slot + buckets + 1
        rel = array("Q", (pc - self.base for pc in self.pcs))
        out = bytearray(ROW.size * self.bpf_len())
        pack = ROW.pack_into
        for j in range(buckets + 1):
            covering = bisect.bisect_right(rel, j << shift) - 1
            pack(out, j * ROW.size, rows_at + covering, 0, 0, 0)
        for i, (pc, rule) in enumerate(zip(rel, self.rules, strict=True)):
            pack(out, (buckets + 1 + i) * ROW.size, pc, rule.cfa_offset, rule.rbp_offset, rule.kind)
        return bytes(out)


class TableTooLarge(CfiError):
    """The file's CFI would take more rows than one file may use (see ``max_rows``)."""


# Measured on Debian's libc, libstdc++, python3.11 and libLLVM: 5.3-6.4 bytes of .eh_frame per
# merged row. Dividing by a little less over-estimates rows, so oversized files are refused
# before spending seconds parsing them.
_EH_FRAME_BYTES_PER_ROW = 5


def build_table(stream: IO[bytes], name: str, max_rows: int | None = None) -> UnwindTable:
    """Read an ELF file's ``.eh_frame`` (else ``.debug_frame``) into an :class:`UnwindTable`.

    Raises TableTooLarge beyond ``max_rows``, CfiError/ELFError-derived exceptions for files
    that are not usable ELF.
    """
    try:
        elf = ElfHeaders(stream)
    except NotUsableElf as exc:
        raise CfiError(f"{name}: {exc}") from None
    fdes = CfiRows()
    for section_name in (".eh_frame", ".debug_frame"):
        section = elf.sections.get(section_name)
        if section is None:
            continue
        if max_rows is not None and section.size // _EH_FRAME_BYTES_PER_ROW > max_rows:
            raise TableTooLarge(f"{name}: {section.size} bytes of {section_name}, over {max_rows} rows")
        data = elf.data(section_name)
        if data is None:
            continue
        if section_name == ".eh_frame":
            fdes = parse_cfi_rows(data, section.addr, is_eh_frame=True)
        else:
            fdes = parse_cfi_rows(data, 0, is_eh_frame=False)
        if fdes:
            break
    pcs, rules = merge_cfi_rows(fdes)
    if max_rows is not None and len(pcs) > max_rows:
        raise TableTooLarge(f"{name}: {len(pcs)} rows, over {max_rows}")
    if pcs and pcs[-1] - pcs[0] > MAX_SPAN:
        raise CfiError(f"{name}: code spans more than 4 GiB")
    return UnwindTable(name, elf.build_id(), elf.segments, pcs, rules)


def merge_fdes(fdes: list[Fde]) -> tuple[array[int], list[Rule]]:
    """``merge_cfi_rows`` for FDEs given as tuples."""
    flat = CfiRows()
    for begin, end, rows in fdes:
        for address, rule in rows:
            flat.addresses.append(address)
            flat.rules.append(rule)
        flat.add(begin, end)
    return merge_cfi_rows(flat)


# More ascending stretches of FDEs than this are sorted as one list instead of merged.
MAX_MERGED_RUNS = 64


def _fde_order(fdes: CfiRows) -> Iterator[int]:
    """Indices of the FDEs that cover code, by (begin, end), section order at equal ranges.

    ``.eh_frame`` is nearly sorted: its ascending stretches are merged lazily, so no list of
    an entry per FDE is made (that burst pinned allocator arenas, docs/design/overhead.md)."""
    begins, ends = fdes.begins, fdes.ends
    runs, previous = [0], (0, 0)
    for i in range(len(begins)):
        key = (begins[i], ends[i])
        if key < previous:
            runs.append(i)
        previous = key

    def run(lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        for i in range(lo, hi):
            if ends[i] > begins[i]:
                yield begins[i], ends[i], i

    if len(runs) <= MAX_MERGED_RUNS:
        bounds = [*runs, len(begins)]
        merged: Iterator[tuple[int, int, int]] = heapq.merge(*(run(lo, hi) for lo, hi in itertools.pairwise(bounds)))
    else:
        merged = iter(sorted(run(0, len(begins))))
    return (i for _, _, i in merged)


def merge_cfi_rows(fdes: CfiRows) -> tuple[array[int], list[Rule]]:
    """Sorted, non-overlapping rows from FDEs; equal neighbours merged, gaps marked ``NONE``.

    One pass with local appends: this runs once per row of every table (python3.11: 300k)."""
    begins, ends, firsts, addresses, fde_rules = fdes.begins, fdes.ends, fdes.firsts, fdes.addresses, fdes.rules
    raw_pcs: array[int] = array("Q")  # not a list: an int object per row would be ~30 MB for libLLVM
    raw_rules: list[Rule] = []
    order = _fde_order(fdes)
    current = next(order, None)
    while current is not None:
        following = next(order, None)
        begin, end = begins[current], ends[current]
        if following is not None:
            end = min(end, begins[following])  # overlapping FDEs: the later one wins from its start
        lo, hi = firsts[current], firsts[current + 1]
        for k in range(lo, hi):
            address = addresses[k]
            if address >= end:
                break
            raw_pcs.append(max(address, begin))
            raw_rules.append(fde_rules[k])
        if lo == hi:
            raw_pcs.append(begin)
            raw_rules.append(NO_INFO)
        if following is None or begins[following] > end:
            raw_pcs.append(end)
            raw_rules.append(NO_INFO)
        current = following
    pcs: array[int] = array("Q")
    rules: list[Rule] = []
    interned: dict[Rule, Rule] = {}
    for pc, rule in zip(raw_pcs, raw_rules, strict=True):
        if pcs and pcs[-1] == pc:  # a later row at the same address replaces the earlier one
            pcs.pop()
            rules.pop()
        if rules and rules[-1] == rule:
            continue
        pcs.append(pc)
        rules.append(interned.setdefault(rule, rule))
    return pcs, rules
