"""Per-file symbol information from ELF: function symbols, build id, DWARF line tables.

One :class:`ElfSymbols` per *file identity* is built once and shared by every process that
maps the file. Symbol tables are read eagerly (cheap); the DWARF line table is built
lazily on the first lookup that needs it, as two sorted arrays, because pyelftools takes
seconds on large DWARF and must never run per sample.

A stripped file (no ``.symtab`` or no DWARF) may be given a *debug source*: a way to open its
separate debug file (:mod:`agent.symbols.debuginfo`). It is opened on the first lookup, once
per file: its full symbol table replaces the file's exported-only one (local functions such
as libc's ``start_thread`` are named), and its DWARF gives the lines. Debug files keep the
object's virtual addresses, so lookups are unchanged.

The pyelftools ``ELFFile`` is not kept after the tables are read: its section headers and
per-file structure definitions are ~80 KB of small Python objects a file, over a hundred
files on a busy host, and those few long-lived objects kept Python allocator arenas
resident. The later first-time reads (line table, Go table) parse the ELF header again
from the open file (milliseconds, once per file; docs/design/overhead.md).
"""

from __future__ import annotations

import bisect
import logging
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent.elf_symbols import SYM64
from agent.runtimes.go.pclntab import GoSymbolTable, pclntab_section, shared_go_table
from agent.symbols.debuginfo import DebugLink, gnu_build_id, read_debuglink
from agent.symbols.dwarf_lines import CuLineIndex, LineTable, release_dwarf, whole_line_table
from agent.symbols.inflate_index import InflateIndex
from agent.symbols.packed_names import PackedNames
from agent.symbols.section_views import ViewingELFFile

log = logging.getLogger(__name__)

DebugSource = Callable[["ElfSymbols"], "tuple[IO[bytes], str] | None"]

# Files whose DWARF line program is larger than this get their lines one compilation unit at
# a time (agent/symbols/dwarf_lines.py). Measured: pyelftools needs ~10 us and ~900 bytes of
# peak memory per line-table row, so a 2.5 MB .debug_line (CPython built with -g: 620k rows)
# took 6.3 s and 560 MB whole — not acceptable in an agent on every host. At 1 MiB the worst
# whole decode is ~2.5 s once per file.
MAX_LINE_PROGRAM_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Segment:
    """A PT_LOAD segment: maps file offsets [offset, offset+filesz) to vaddr."""

    offset: int
    vaddr: int
    filesz: int


class ElfSymbols:
    """Symbols and lines of one ELF file, looked up by ELF virtual address."""

    def __init__(self, stream: IO[bytes], display_path: str) -> None:
        self.path = display_path
        elf = ELFFile(stream)
        self._stream = stream
        self.build_id = gnu_build_id(elf)
        self.debuglink: DebugLink | None = read_debuglink(elf)
        self.segments = [
            Segment(s["p_offset"], s["p_vaddr"], s["p_filesz"])
            for s in elf.iter_segments()
            if s["p_type"] == "PT_LOAD"
        ]
        self._starts, self._ends, self._names = _function_symbols(elf)
        self._has_symtab = elf.get_section_by_name(".symtab") is not None
        self._has_dwarf = elf.get_section_by_name(".debug_line") is not None
        self._debug_source: DebugSource | None = None
        # The separate debug file, kept open when its DWARF gives the lines (else None: this file's).
        self._debug_stream: IO[bytes] | None = None
        self.debug_file = ""  # path of the separate debug file in use, if any
        self._is_go = pclntab_section(elf) is not None
        self._go_table: GoSymbolTable | None = None
        # Built on the first line lookup: three parallel arrays (~16 B a row, where a (file,
        # line) tuple per row cost ~80 B), or per CU for line programs over the budget.
        self._lines: LineTable | CuLineIndex | None = None
        self.line_table_skipped = False
        self.shared = False  # used for several files of the same build (Symbolizer._share_by_build_id)

    def estimated_bytes(self) -> int:
        """Rough memory this file's tables hold, for the symbolizer's byte-bounded file cache.

        Function symbols: 16 B of start/end plus their packed names; a Go table what it holds
        (its arrays and cached blocks of the pclntab); line rows 16 B each plus their
        file names; the open file's buffer, segments and the object itself are the fixed part.
        """
        go_table = self._go_table.nbytes() if self._go_table is not None else 0
        rows = self._lines.nbytes() if self._lines is not None else 0
        return 16_384 + 16 * len(self._starts) + self._names.nbytes() + rows + go_table

    @property
    def wants_debug_file(self) -> bool:
        """Whether a separate debug file could add anything: no full symbol table or no DWARF
        (Go binaries carry their own table in .gopclntab and are left alone)."""
        return not self._is_go and not (self._has_symtab and self._has_dwarf)

    def set_debug_source(self, source: DebugSource) -> None:
        """How to open this file's debug file: called once, on the first symbol lookup, with
        this object; returns (stream, path) or None when there is none."""
        self._debug_source = source

    def _use_debug_file(self) -> None:
        source, self._debug_source = self._debug_source, None
        assert source is not None
        opened = source(self)
        if opened is None:
            return
        stream, path = opened
        keep = False
        try:
            debug = ELFFile(stream)
            starts, ends, names = _function_symbols(debug)
            if len(starts) > len(self._starts):
                self._starts, self._ends, self._names = starts, ends, names
                self.debug_file = path
            if not self._has_dwarf and debug.get_section_by_name(".debug_line") is not None:
                self._has_dwarf, keep = True, True
                self.debug_file = path
        except Exception as exc:  # pyelftools raises many types on unusual files
            log.warning("%s: debug file %s unusable: %s", self.path, path, exc)
        if keep:
            self._debug_stream = stream
        else:
            stream.close()

    def file_offset_to_vaddr(self, file_offset: int) -> int | None:
        """Translate a file offset (from /proc maps) into the ELF vaddr symbols use."""
        for seg in self.segments:
            if seg.offset <= file_offset < seg.offset + max(seg.filesz, 1):
                return file_offset - seg.offset + seg.vaddr
        return None

    def function(self, vaddr: int) -> str:
        """Name of the function symbol containing ``vaddr``, or ""."""
        if self._debug_source is not None:
            self._use_debug_file()
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return ""
        end = self._ends[i]
        if vaddr < end or (end == self._starts[i] and (i + 1 == len(self._starts) or vaddr < self._starts[i + 1])):
            return self._names[i]
        return ""

    def go_table(self) -> GoSymbolTable | None:
        """The Go pclntab of this file (built on first use), or None for non-Go files.

        Go frames are symbolized from it rather than from symtab/DWARF: it exists in stripped
        binaries too and carries file and line without parsing DWARF."""
        if not self._is_go:
            return None
        if self._go_table is None:
            try:
                self._go_table = shared_go_table(ELFFile(self._stream))
            except (ValueError, struct.error, IndexError, ELFError) as exc:
                log.warning("%s: unusable .gopclntab: %s", self.path, exc)
                self._is_go = False
                return None
            # OSError (no descriptor left for the table's reads) goes to the caller, which
            # counts it and calls drop_go_table.
        return self._go_table

    def drop_go_table(self) -> None:
        """Name this file's addresses from its ELF symbols from now on: its Go table could not
        be loaded or read (agent/symbols/symbolizer.py ``_go_frames``)."""
        self._go_table = None
        self._is_go = False

    def function_start(self, vaddr: int) -> int | None:
        """Start address of the function symbol containing ``vaddr``."""
        if self._debug_source is not None:
            self._use_debug_file()
        i = bisect.bisect_right(self._starts, vaddr) - 1
        return self._starts[i] if i >= 0 and self.function(vaddr) else None

    def vaddr_to_file_offset(self, vaddr: int) -> int | None:
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + max(seg.filesz, 1):
                return vaddr - seg.vaddr + seg.offset
        return None

    def line(self, vaddr: int) -> tuple[str, int]:
        """(source file, line) for ``vaddr`` from DWARF, or ("", 0)."""
        if self._debug_source is not None:
            self._use_debug_file()
        if not self._has_dwarf:
            return "", 0
        if self._lines is None:
            self._lines = self._build_line_table()
        return self._lines.lookup(vaddr)

    def _build_line_table(self) -> LineTable | CuLineIndex:
        """The whole table when the line program is within budget, else a per-CU index
        (agent/symbols/dwarf_lines.py); an empty table when the DWARF is unreadable."""
        try:
            elf = ELFFile(self._debug_stream or self._stream)
            section = elf.get_section_by_name(".debug_line")
            if section is not None and section.data_size > MAX_LINE_PROGRAM_BYTES:
                stream = self._debug_stream or self._stream
                try:
                    # Its debug sections are read in place when a CU is decoded, not copied.
                    # The compressed sections' indexes outlive each opening (section_views.py).
                    inflate: dict[str, InflateIndex] = {}
                    index = CuLineIndex(lambda: ViewingELFFile(stream, inflate).get_dwarf_info(), self.path,
                                        inflate_indexes=inflate)
                    log.info("%s: DWARF line program of %d bytes is over the %d-byte budget: lines are "
                             "decoded per compilation unit", self.path, section.data_size, MAX_LINE_PROGRAM_BYTES)
                    return index
                except ValueError as exc:
                    self.line_table_skipped = True
                    log.warning("%s: DWARF line program of %d bytes is over the %d-byte budget and cannot be "
                                "read per compilation unit (%s): functions only, no line numbers",
                                self.path, section.data_size, MAX_LINE_PROGRAM_BYTES, exc)
                    return LineTable([])
            dwarf = elf.get_dwarf_info()
            try:
                return whole_line_table(dwarf)
            finally:
                release_dwarf(dwarf)  # freed now, not at the next whole-heap collection
        except (ELFError, KeyError, ValueError, AttributeError, AssertionError) as exc:
            log.warning("%s: cannot read DWARF line info: %s", self.path, exc)
            return LineTable([])

    def read(self, file_offset: int, size: int) -> bytes:
        """Raw bytes of the file (e.g. the instruction bytes before a return address)."""
        self._stream.seek(file_offset)
        return self._stream.read(size)

    def close(self) -> None:
        self._stream.close()
        if self._debug_stream is not None:
            self._debug_stream.close()

    @property
    def closed(self) -> bool:
        return self._stream.closed


_STT_FUNC, _STT_GNU_IFUNC = 2, 10


def _function_symbols(elf: ELFFile) -> tuple[array[int], array[int], PackedNames]:
    """Sorted (start, end, name) of function symbols from .symtab, else .dynsym.

    The symbol array is decoded with ``struct.iter_unpack`` rather than pyelftools'
    ``iter_symbols``, which builds several Python objects per symbol: on libraries with
    tens of thousands of symbols that is seconds against milliseconds (measured with
    py-spy on the agent), and the agent pays it for every new binary on the host.

    The kept symbols go into arrays as they are decoded and are sorted through one list of
    row numbers, not a dict of a tuple per symbol: that burst (~200 B a symbol, libLLVM has
    35,000) left Python allocator arenas resident after it was freed (docs/design/overhead.md).
    Of several symbols at one address the one with the largest size is kept (the first of
    equal sizes), as before.
    """
    for name in (".symtab", ".dynsym"):
        section = elf.get_section_by_name(name)
        if not isinstance(section, SymbolTableSection) or elf.elfclass != 64 or not elf.little_endian:
            continue
        strtab = elf.get_section(section["sh_link"]).data()
        data = section.data()
        usable = len(data) - len(data) % SYM64.size
        values, sizes, name_offsets = array("Q"), array("Q"), array("I")
        for st_name, st_info, _other, shndx, value, size in SYM64.iter_unpack(data[:usable]):
            if (st_info & 0xF) not in (_STT_FUNC, _STT_GNU_IFUNC) or shndx == 0 or not value:
                continue
            values.append(value)
            sizes.append(size)
            name_offsets.append(st_name)
        if not values:
            continue
        order = sorted(range(len(values)), key=values.__getitem__)  # stable: file order at one address
        kept = array("I")
        for i in order:
            if kept and values[kept[-1]] == values[i]:
                if sizes[i] > sizes[kept[-1]]:
                    kept[-1] = i
            else:
                kept.append(i)
        del order
        names = PackedNames(_cstring(strtab, name_offsets[i]) for i in kept)
        return (array("Q", (values[i] for i in kept)), array("Q", (values[i] + sizes[i] for i in kept)), names)
    return array("Q"), array("Q"), PackedNames()


def _cstring(table: bytes, offset: int) -> bytes:
    end = table.find(b"\0", offset)
    return table[offset : end if end >= 0 else len(table)]
