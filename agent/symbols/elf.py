"""Per-file symbol information from ELF: function symbols, build id, DWARF line tables.

One :class:`ElfSymbols` per *file identity* is built once and shared by every process that
maps the file. Symbol tables are read eagerly (cheap); the DWARF line table is built
lazily on the first lookup that needs it, as two sorted arrays, because pyelftools takes
seconds on large DWARF and must never run per sample.
"""

from __future__ import annotations

import bisect
import logging
import os
from array import array
from dataclasses import dataclass
from typing import IO, Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection

log = logging.getLogger("stackfleet.symbols")

# Files whose DWARF line program is larger than this are symbolized by name only: building
# the table would take too long and too much memory for an agent that runs everywhere.
MAX_LINE_PROGRAM_BYTES = 64 * 1024 * 1024


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
        self._elf = elf
        self.build_id = _build_id(elf)
        self.segments = [
            Segment(s["p_offset"], s["p_vaddr"], s["p_filesz"])
            for s in elf.iter_segments()
            if s["p_type"] == "PT_LOAD"
        ]
        self._starts, self._ends, self._names = _function_symbols(elf)
        self._has_dwarf = elf.get_section_by_name(".debug_line") is not None
        self._line_addrs: array[int] | None = None
        self._line_rows: list[tuple[str, int]] = []

    def file_offset_to_vaddr(self, file_offset: int) -> int | None:
        """Translate a file offset (from /proc maps) into the ELF vaddr symbols use."""
        for seg in self.segments:
            if seg.offset <= file_offset < seg.offset + max(seg.filesz, 1):
                return file_offset - seg.offset + seg.vaddr
        return None

    def function(self, vaddr: int) -> str:
        """Name of the function symbol containing ``vaddr``, or ""."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return ""
        end = self._ends[i]
        if vaddr < end or (end == self._starts[i] and (i + 1 == len(self._starts) or vaddr < self._starts[i + 1])):
            return self._names[i]
        return ""

    def line(self, vaddr: int) -> tuple[str, int]:
        """(source file, line) for ``vaddr`` from DWARF, or ("", 0)."""
        if not self._has_dwarf:
            return "", 0
        if self._line_addrs is None:
            self._build_line_table()
        assert self._line_addrs is not None
        i = bisect.bisect_right(self._line_addrs, vaddr) - 1
        if i < 0:
            return "", 0
        return self._line_rows[i]

    def _build_line_table(self) -> None:
        rows: list[tuple[int, str, int]] = []
        try:
            dwarf = self._elf.get_dwarf_info()
            section = self._elf.get_section_by_name(".debug_line")
            if section is not None and section.data_size > MAX_LINE_PROGRAM_BYTES:
                log.info("%s: DWARF line program too large (%d bytes); names only", self.path, section.data_size)
            else:
                for cu in dwarf.iter_CUs():
                    program = dwarf.line_program_for_CU(cu)
                    if program is not None:
                        _collect_rows(program, cu, rows)
        except (ELFError, KeyError, ValueError, AttributeError, AssertionError) as exc:
            log.warning("%s: cannot read DWARF line info: %s", self.path, exc)
        rows.sort(key=lambda r: r[0])
        self._line_addrs = array("Q", (r[0] for r in rows))
        # End-of-sequence rows carry line 0: lookups past a sequence's end return ("", 0).
        self._line_rows = [(r[1], r[2]) for r in rows]
        self._has_dwarf = bool(rows)

    def close(self) -> None:
        self._stream.close()


def _collect_rows(program: Any, cu: Any, rows: list[tuple[int, str, int]]) -> None:
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
        if directory and not os.path.isabs(directory) and comp_dir:
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


def _build_id(elf: ELFFile) -> str:
    for section in elf.iter_sections():
        if isinstance(section, NoteSection):
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
    return ""


def _function_symbols(elf: ELFFile) -> tuple[array[int], array[int], list[str]]:
    """Sorted (start, end, name) of function symbols from .symtab, else .dynsym."""
    found: dict[int, tuple[int, str]] = {}
    for name in (".symtab", ".dynsym"):
        section = elf.get_section_by_name(name)
        if not isinstance(section, SymbolTableSection):
            continue
        for sym in section.iter_symbols():
            if sym["st_info"]["type"] not in ("STT_FUNC", "STT_GNU_IFUNC") or sym["st_shndx"] == "SHN_UNDEF":
                continue
            start = sym["st_value"]
            if not start:
                continue
            size = sym["st_size"]
            previous = found.get(start)
            # Prefer sized, global-looking names when several symbols share an address.
            if previous is None or (size > previous[0] - start and not sym.name.startswith("_")):
                found[start] = (start + size, sym.name)
        if found and name == ".symtab":
            break
    starts = sorted(found)
    return array("Q", starts), array("Q", (found[s][0] for s in starts)), [found[s][1] for s in starts]
