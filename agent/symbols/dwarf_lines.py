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
from array import array
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

# Rows kept from CU-by-CU decoding, per file: ~16 B each, so ~3 MB (libc's malloc.c, its
# largest CU, has 5,699 rows; a profile touches a handful of CUs of a system library).
CU_CACHE_ROWS = 200_000


class LineTable:
    """(address, file, line) rows sorted by address, as three parallel arrays (~16 B a row)."""

    def __init__(self, rows: list[tuple[int, str, int]]) -> None:
        rows.sort(key=lambda r: r[0])
        self.addrs = array("Q", (r[0] for r in rows))
        # End-of-sequence rows carry line 0: lookups past a sequence's end return ("", 0).
        file_ids: dict[str, int] = {}
        self.file_ids = array("I", (file_ids.setdefault(r[1], len(file_ids)) for r in rows))
        self.numbers = array("I", (min(max(r[2], 0), 0xFFFFFFFF) for r in rows))
        self.files = list(file_ids)

    def __len__(self) -> int:
        return len(self.addrs)

    def lookup(self, vaddr: int) -> tuple[str, int]:
        i = bisect.bisect_right(self.addrs, vaddr) - 1
        if i < 0:
            return "", 0
        return self.files[self.file_ids[i]], self.numbers[i]

    def nbytes(self) -> int:
        return 16 * len(self.numbers) + sum(100 + len(f) for f in self.files)


def whole_line_table(dwarf: Any) -> LineTable:
    """Every CU's rows in one table."""
    rows: list[tuple[int, str, int]] = []
    for cu in dwarf.iter_CUs():
        program = dwarf.line_program_for_CU(cu)
        if program is not None:
            collect_rows(program, cu, rows)
    return LineTable(rows)


class CuLineIndex:
    """Lines of a file whose line program is too large to decode whole, one CU at a time.

    ``open_dwarf`` gives the file's pyelftools DWARFInfo; it is opened to build the index and
    again for each CU decoded, and not kept in between (it holds the decompressed debug
    sections: ~10 MB for libc's debug file). Raises ValueError without ``.debug_aranges``.
    """

    def __init__(self, open_dwarf: Any, path: str, cache_rows: int = CU_CACHE_ROWS) -> None:
        self._open_dwarf = open_dwarf
        self.path = path
        self.cache_rows = cache_rows
        aranges = open_dwarf().get_aranges()
        if aranges is None:
            raise ValueError("no .debug_aranges")
        ranges = sorted((e.begin_addr, e.begin_addr + e.length, e.info_offset) for e in aranges.entries if e.length)
        self._starts = array("Q", (r[0] for r in ranges))
        self._ends = array("Q", (r[1] for r in ranges))
        self._cus = array("Q", (r[2] for r in ranges))
        self._tables: OrderedDict[int, LineTable] = OrderedDict()
        self._rows = 0
        self.cus_decoded = 0

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
            dwarf = self._open_dwarf()
            cu = dwarf.get_CU_at(cu_offset)
            program = dwarf.line_program_for_CU(cu)
            if program is not None:
                collect_rows(program, cu, rows)
        except Exception as exc:  # pyelftools raises many types on malformed DWARF
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

    def nbytes(self) -> int:
        return 24 * len(self._starts) + sum(t.nbytes() for t in self._tables.values())


def collect_rows(program: Any, cu: Any, rows: list[tuple[int, str, int]]) -> None:
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

    for entry in program.get_entries():
        state = entry.state
        if state is None:
            continue
        if state.end_sequence:
            rows.append((state.address, "", 0))
        else:
            rows.append((state.address, file_name(state.file), state.line))


def _decode(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
