"""A few named symbols of an ELF file, read without pyelftools' per-symbol objects.

pyelftools' ``get_symbol_by_name`` builds a name map of the whole table, several Python
objects and two small file reads per symbol. Each read releases the GIL; in an agent whose
process has a busy Python thread, taking it back costs up to the switch interval (5 ms), so
the 2,200 symbols of CPython's ``.dynsym`` took 1.4 s (measured under the CPU actor's own
test). Here the table is one read and is decoded with ``struct.iter_unpack``; only the
names asked for are compared, by their offsets in the string table. Hand-written because no
ELF library offers a lookup of a few names that does not decode every symbol as an object.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

SYM64 = struct.Struct("<IBBHQQ")  # Elf64_Sym: st_name, st_info, st_other, st_shndx, st_value, st_size
SHN_UNDEF = 0


def find_symbols(elf: ELFFile, names: Iterable[str],
                 sections: tuple[str, ...] = (".symtab", ".dynsym")) -> dict[str, tuple[int, int]]:
    """{name: (st_value, st_size)} of the defined symbols called ``names``, from the first of
    ``sections`` that defines each; names not found are left out. 64-bit little-endian
    files only (the agent's platform): others answer {}."""
    wanted = list(dict.fromkeys(names))
    found: dict[str, tuple[int, int]] = {}
    if elf.elfclass != 64 or not elf.little_endian:
        return found
    for section_name in sections:
        missing = [name for name in wanted if name not in found]
        if not missing:
            break
        section = elf.get_section_by_name(section_name)
        if not isinstance(section, SymbolTableSection) or section["sh_entsize"] != SYM64.size:
            continue
        by_offset = _name_offsets(elf.get_section(section["sh_link"]).data(), missing)
        if not by_offset:
            continue
        data = section.data()
        for st_name, _info, _other, shndx, value, size in SYM64.iter_unpack(data[: len(data) - len(data) % SYM64.size]):
            name = by_offset.get(st_name)
            if name is not None and shndx != SHN_UNDEF and name not in found:
                found[name] = (value, size)
    return found


def _name_offsets(strtab: bytes, names: list[str]) -> dict[int, str]:
    """Every string-table offset at which one of ``names`` is a whole NUL-terminated string:
    a linker may store a name as the tail of a longer one, so each occurrence counts."""
    offsets: dict[int, str] = {}
    for name in names:
        encoded = name.encode() + b"\0"
        at = strtab.find(encoded)
        while at >= 0:
            offsets[at] = name
            at = strtab.find(encoded, at + 1)
    return offsets
