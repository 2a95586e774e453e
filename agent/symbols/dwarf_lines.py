"""DWARF line tables: decoded whole, or one compilation unit at a time for large files.

pyelftools decodes a line program at ~10 us and ~900 bytes of peak memory per row, so a
whole table is built only for line programs up to ``MAX_LINE_PROGRAM_BYTES``
(agent/symbols/elf.py). Larger ones — distribution debug files such as libc6-dbg's, 1.3 MB of
line program, 291,211 rows, 12.8 s and 377 MB decoded whole — are read per compilation unit
(CU): ``.debug_aranges`` says which CU covers an address, and only that CU's rows are decoded,
when an address inside it is first asked for. Decoded CUs are kept in an LRU bounded by rows.
No library offers this lookup for Python (pyelftools decodes whole line programs per CU, which
is the unit used here).
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from array import array
from collections import OrderedDict
from typing import Any

from agent.symbols.inflate_index import InflateIndex
from agent.symbols.packed_names import PackedNames

log = logging.getLogger(__name__)

# A CU's own line program is decoded only up to this size: ~40 ms with collect_rows_fast
# (libc's largest CU, malloc.c, is far below it).
MAX_CU_LINE_PROGRAM_BYTES = 256 * 1024
# Rows kept from CU-by-CU decoding, per file: ~16 B each, so ~3 MB (libc's malloc.c, its
# largest CU, has 5,699 rows; a profile touches a handful of CUs of a system library).
CU_CACHE_ROWS = 200_000
# The DWARFInfo of the file decoded from last is let go after this long without a decode.
RECENT_DWARF_IDLE_S = 60.0
# ... and opened again after this many decodes. pyelftools keeps every CU, abbreviation table
# and line program it parses for as long as its DWARFInfo lives (~75 KB a CU of libc's debug
# file, mostly small objects: 31 MB after 400 CUs), and a steady trickle of new addresses
# never leaves it idle. Opening libc's debug file again costs ~14 ms, a CU's decode ~6.5 ms:
# 32 decodes an opening hold ~2.5 MB and add ~7 % to decoding.
DECODES_PER_OPENING = 32


def release_dwarf(dwarf: Any) -> None:
    """Empty what a pyelftools DWARFInfo has parsed, so that it is freed when let go.

    Its parsed objects form reference cycles (a CU points at its DWARFInfo, which lists its
    CUs; a DIE and its CU point at each other), so dropping the last reference frees nothing
    until a whole-heap collection, which the agent makes rare (agent/gc_policy.py): 400
    decodes held ~31 MB with the DWARFInfo opened again every 32 of them, ~4 MB once the
    caches were emptied first. These are pyelftools' private caches (0.31 - 0.33); each is
    emptied only where it exists as expected, and if a release misses one, the cycles still
    go at the next whole-heap collection."""
    for cu in getattr(dwarf, "_cu_cache", ()):
        for name in ("_dielist", "_diemap"):
            parsed = getattr(cu, name, None)
            if isinstance(parsed, list):
                parsed.clear()
    for name in ("_cu_cache", "_cu_offsets_map", "_abbrevtable_cache", "_linetable_cache"):
        cache = getattr(dwarf, name, None)
        if isinstance(cache, (list, dict)):
            cache.clear()


class LineTable:
    """(address, file, line) rows sorted by address, as three parallel arrays (~16 B a row).

    The file names are packed into one blob (``PackedNames``) rather than kept as strings: a
    table outlives the many small objects its decoding made, and its names, made one at a
    time among them, would each keep one of Python's 1 MiB allocator arenas resident."""

    def __init__(self, rows: list[tuple[int, str, int]]) -> None:
        rows.sort(key=lambda r: r[0])
        self.addrs = array("Q", (r[0] for r in rows))
        # End-of-sequence rows carry line 0: lookups past a sequence's end return ("", 0).
        file_ids: dict[str, int] = {}
        self.file_ids = array("I", (file_ids.setdefault(r[1], len(file_ids)) for r in rows))
        self.numbers = array("I", (min(max(r[2], 0), 0xFFFFFFFF) for r in rows))
        self.files = PackedNames(f.encode("utf-8", "replace") for f in file_ids)

    def __len__(self) -> int:
        return len(self.addrs)

    def lookup(self, vaddr: int) -> tuple[str, int]:
        i = bisect.bisect_right(self.addrs, vaddr) - 1
        if i < 0:
            return "", 0
        return self.files[self.file_ids[i]], self.numbers[i]

    def nbytes(self) -> int:
        return 16 * len(self.numbers) + self.files.nbytes()


def whole_line_table(dwarf: Any) -> LineTable:
    """Every CU's rows in one table, decoded by ``collect_rows_fast``: pyelftools' own decoder
    (``collect_rows``) makes two objects per row, ~900 bytes of peak memory a row, and on a
    ~400 KB line program (88k rows) its transient small objects left 70 MB of Python's
    allocator arenas resident after the table was built (a few survivors pin each arena)."""
    rows: list[tuple[int, str, int]] = []
    for cu in dwarf.iter_CUs():
        program = dwarf.line_program_for_CU(cu)
        if program is not None:
            collect_rows_fast(program, cu, rows)
    return LineTable(rows)


class CuLineIndex:
    """Lines of a file whose line program is too large to decode whole, one CU at a time.

    ``open_dwarf`` gives the file's pyelftools DWARFInfo. It is opened to build the index and
    again to decode CUs, and only the last file's is kept (``_dwarf``): a host maps many such
    files. Where the debug sections are zlib-compressed (Debian's debug files), the opener
    reads them through ``inflate_indexes`` (agent/symbols/inflate_index.py), built at the
    first opening and kept with this index: opening again then costs ~14 ms and a CU's decode
    inflates only the blocks it reads, where inflating libc's sections whole took ~50 ms and
    held ~8 MB while the DWARFInfo was kept. A CU whose own line program is over ``MAX_CU_LINE_PROGRAM_BYTES``
    (one-CU "unity" builds such as Cython modules) keeps names only, like a whole file over the
    budget: each decode stays within ~40 ms. Raises ValueError without ``.debug_aranges``.
    """

    # The one DWARFInfo kept, of the file decoded from last (process-wide: one at a time),
    # and when it was last used: ``forget_idle_dwarf`` lets it go after a quiet while.
    _recent: tuple[CuLineIndex, Any] | None = None
    _recent_used = 0.0
    _recent_decodes = 0

    def __init__(self, open_dwarf: Any, path: str, cache_rows: int = CU_CACHE_ROWS,
                 inflate_indexes: dict[str, InflateIndex] | None = None) -> None:
        self._open_dwarf = open_dwarf
        self._inflate_indexes = inflate_indexes if inflate_indexes is not None else {}
        self.path = path
        self.cache_rows = cache_rows
        dwarf = open_dwarf()
        aranges = dwarf.get_aranges()
        if aranges is None:
            raise ValueError("no .debug_aranges")
        ranges = sorted((e.begin_addr, e.begin_addr + e.length, e.info_offset) for e in aranges.entries if e.length)
        self._starts = array("Q", (r[0] for r in ranges))
        self._ends = array("Q", (r[1] for r in ranges))
        self._cus = array("Q", (r[2] for r in ranges))
        self._tables: OrderedDict[int, LineTable] = OrderedDict()
        self._rows = 0
        self.cus_decoded = 0
        self.cus_too_large = 0

    def lookup(self, vaddr: int) -> tuple[str, int]:
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0 or vaddr >= self._ends[i]:
            return "", 0
        return self._table(self._cus[i]).lookup(vaddr)

    def _table(self, cu_offset: int) -> LineTable:
        table = self._tables.get(cu_offset)
        if table is not None:
            self._tables.move_to_end(cu_offset)
            return table
        rows: list[tuple[int, str, int]] = []
        try:
            dwarf = self._dwarf()
            cu = dwarf.get_CU_at(cu_offset)
            program = dwarf.line_program_for_CU(cu)
            if program is not None:
                size = program.program_end_offset - program.program_start_offset
                if size <= MAX_CU_LINE_PROGRAM_BYTES:
                    collect_rows_fast(program, cu, rows)
                else:
                    self.cus_too_large += 1
                    log.info("%s: the line program of CU 0x%x is %d bytes, over the %d-byte budget: "
                             "names only there", self.path, cu_offset, size, MAX_CU_LINE_PROGRAM_BYTES)
        except Exception as exc:  # pyelftools (and a truncated program) raise many types
            log.warning("%s: cannot read the line program of CU 0x%x: %s", self.path, cu_offset, exc)
            rows = []
        table = LineTable(rows)
        self.cus_decoded += 1
        self._tables[cu_offset] = table
        self._rows += len(table)
        while self._rows > self.cache_rows and len(self._tables) > 1:
            _, old = self._tables.popitem(last=False)
            self._rows -= len(old)
        return table

    def _dwarf(self) -> Any:
        """The DWARFInfo for one CU's decode, re-used while this file is the last one decoded
        from (the CUs of one file tend to be asked for in bursts: a new process's libc frames),
        for at most ``DECODES_PER_OPENING`` decodes (what it keeps grows with each)."""
        CuLineIndex._recent_used = time.monotonic()
        recent = CuLineIndex._recent
        if recent is not None and recent[0] is self and CuLineIndex._recent_decodes < DECODES_PER_OPENING:
            CuLineIndex._recent_decodes += 1
            return recent[1]
        CuLineIndex._recent = None  # the previous sections go before the new ones are read
        if recent is not None:
            release_dwarf(recent[1])
        dwarf = self._open_dwarf()
        CuLineIndex._recent, CuLineIndex._recent_decodes = (self, dwarf), 1
        return dwarf

    @staticmethod
    def forget_idle_dwarf(idle_s: float = RECENT_DWARF_IDLE_S) -> bool:
        """Let the kept DWARFInfo go when no CU was decoded for ``idle_s``; whether it did.

        Between bursts it only holds memory (the decompressed sections: 9 MB measured for
        libc's debug file in the agent); the next burst opens the file again (~14 ms)."""
        recent = CuLineIndex._recent
        if recent is None or time.monotonic() - CuLineIndex._recent_used < idle_s:
            return False
        CuLineIndex._recent = None
        release_dwarf(recent[1])
        return True

    def nbytes(self) -> int:
        return (24 * len(self._starts) + sum(t.nbytes() for t in self._tables.values())
                + sum(index.nbytes for index in self._inflate_indexes.values()))


def collect_rows(program: Any, cu: Any, rows: list[tuple[int, str, int]]) -> None:
    """Append the (address, file, line) rows of one CU's line program, decoded by pyelftools."""
    file_name = _file_namer(program, cu)
    for entry in program.get_entries():
        state = entry.state
        if state is None:
            continue
        if state.end_sequence:
            rows.append((state.address, "", 0))
        else:
            rows.append((state.address, file_name(state.file), state.line))


def _file_namer(program: Any, cu: Any) -> Any:
    """file index -> source path, for one CU's line program (memoized)."""
    header = program.header
    version = header["version"]
    comp_dir = _decode(cu.get_top_DIE().attributes.get("DW_AT_comp_dir").value) \
        if "DW_AT_comp_dir" in cu.get_top_DIE().attributes else ""
    dirs = [_decode(d) for d in header["include_directory"]]
    files = header["file_entry"]
    names: dict[int, str] = {}

    def file_name(index: int) -> str:
        name = names.get(index)
        if name is not None:
            return name
        # DWARF 5 numbers files from 0 and directories from 0 (0 = comp dir);
        # DWARF 2-4 number both from 1, directory 0 meaning the comp dir.
        pos = index if version >= 5 else index - 1
        if not 0 <= pos < len(files):
            names[index] = ""
            return ""
        entry = files[pos]
        base = _decode(entry.name)
        dir_index = entry.dir_index
        if version >= 5:
            directory = dirs[dir_index] if dir_index < len(dirs) else ""
        else:
            directory = dirs[dir_index - 1] if 0 < dir_index <= len(dirs) else comp_dir
        # DWARF 5's directory 0 *is* the compilation directory: joining it to itself would
        # double a relative one (glibc's "./nptl" became "nptl/nptl").
        is_comp_dir = version >= 5 and dir_index == 0
        if directory and not os.path.isabs(directory) and comp_dir and not is_comp_dir:
            directory = os.path.join(comp_dir, directory)
        full = base if os.path.isabs(base) else os.path.normpath(os.path.join(directory, base)) if directory else base
        names[index] = full
        return full

    return file_name


# Standard and extended opcodes of the DWARF line-number program (DWARF 5, section 6.2.5).
_LNS_COPY, _LNS_ADVANCE_PC, _LNS_ADVANCE_LINE, _LNS_SET_FILE = 1, 2, 3, 4
_LNS_CONST_ADD_PC, _LNS_FIXED_ADVANCE_PC = 8, 9
_LNE_END_SEQUENCE, _LNE_SET_ADDRESS = 1, 2


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _sleb(data: bytes, pos: int) -> tuple[int, int]:
    value, end = _uleb(data, pos)
    bits = 7 * (end - pos)
    if data[end - 1] & 0x40:
        value -= 1 << bits
    return value, end


def collect_rows_fast(program: Any, cu: Any, rows: list[tuple[int, str, int]]) -> None:
    """The rows ``collect_rows`` gives, decoded here from the program's bytes.

    pyelftools builds and copies a state object per row (~60 us a row measured on libc's
    malloc.c CU, 0.33 s for 5,699 rows); this loop keeps only address, file and line, about
    ten times faster. pyelftools still parses the header (file and directory tables).
    Only what x86-64 code uses: one operation per instruction (no VLIW op_index)."""
    header = program.header
    file_name = _file_namer(program, cu)
    stream = program.stream
    stream.seek(program.program_start_offset)
    data = stream.read(program.program_end_offset - program.program_start_offset)
    min_inst = header["minimum_instruction_length"]
    line_base, line_range = header["line_base"], header["line_range"]
    opcode_base = header["opcode_base"]
    operand_counts = list(header["standard_opcode_lengths"])
    const_add = ((255 - opcode_base) // line_range) * min_inst
    address, file, line = 0, 1, 1
    pos, end = 0, len(data)
    while pos < end:
        op = data[pos]
        pos += 1
        if op >= opcode_base:
            adjusted = op - opcode_base
            address += (adjusted // line_range) * min_inst
            line += line_base + adjusted % line_range
            rows.append((address, file_name(file), line))
        elif op == 0:
            length, pos = _uleb(data, pos)
            if length == 0:
                continue
            sub, operands = data[pos], data[pos + 1 : pos + length]
            pos += length
            if sub == _LNE_END_SEQUENCE:
                rows.append((address, "", 0))
                address, file, line = 0, 1, 1
            elif sub == _LNE_SET_ADDRESS:
                address = int.from_bytes(operands, "little")
        elif op == _LNS_COPY:
            rows.append((address, file_name(file), line))
        elif op == _LNS_ADVANCE_PC:
            advance, pos = _uleb(data, pos)
            address += advance * min_inst
        elif op == _LNS_ADVANCE_LINE:
            delta, pos = _sleb(data, pos)
            line += delta
        elif op == _LNS_SET_FILE:
            file, pos = _uleb(data, pos)
        elif op == _LNS_CONST_ADD_PC:
            address += const_add
        elif op == _LNS_FIXED_ADVANCE_PC:
            address += int.from_bytes(data[pos : pos + 2], "little")
            pos += 2
        else:  # column, is_stmt, basic block, prologue/epilogue, isa, unknown: skip operands
            for _ in range(operand_counts[op - 1] if op - 1 < len(operand_counts) else 0):
                _, pos = _uleb(data, pos)


def _decode(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
