"""Just the ELF headers the unwinder needs, read with ``struct``.

pyelftools parses every section header through ``construct`` objects; on binaries with
many sections that costs seconds per file (docs/design/overhead.md). This reads the ELF
header, program headers and section headers directly: a few syscalls and microseconds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import IO

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_NOTE = struct.Struct("<III")
_EM_X86_64, _PT_LOAD, _PF_X = 62, 1, 1
_SHT_NOTE, _SHT_NOBITS, _SHF_COMPRESSED = 7, 8, 0x800
_SHN_XINDEX, _NT_GNU_BUILD_ID = 0xFFFF, 3


class NotUsableElf(ValueError):
    """Not a 64-bit little-endian x86-64 ELF file, or truncated."""


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class LoadSegment:
    """A PT_LOAD program header."""

    offset: int
    vaddr: int
    filesz: int
    executable: bool


class ElfHeaders:
    """Program and section headers of an x86-64 ELF file open in ``stream``."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        ehdr = self._read(0, _EHDR.size)
        (ident, _type, machine, _version, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
         shentsize, shnum, shstrndx) = _EHDR.unpack(ehdr)
        if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1 or machine != _EM_X86_64:
            raise NotUsableElf("not a 64-bit little-endian x86-64 ELF file")
        self.segments = []
        if phoff and phentsize >= _PHDR.size:
            table = self._read(phoff, phnum * phentsize)
            for i in range(phnum):
                p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = \
                    _PHDR.unpack_from(table, i * phentsize)
                if p_type == _PT_LOAD:
                    self.segments.append(LoadSegment(p_offset, p_vaddr, p_filesz, bool(p_flags & _PF_X)))
        self.sections: dict[str, Section] = {}
        if not shoff or shentsize < _SHDR.size:
            return
        first = _SHDR.unpack(self._read(shoff, _SHDR.size))
        if shnum == 0:
            shnum = first[5]  # more than 0xff00 sections: the count is in section 0's sh_size
        if shstrndx == _SHN_XINDEX:
            shstrndx = first[6]
        table = self._read(shoff, shnum * shentsize)
        headers = [_SHDR.unpack_from(table, i * shentsize) for i in range(shnum)]
        if not 0 <= shstrndx < shnum:
            return
        strtab = self._read(headers[shstrndx][4], headers[shstrndx][5])
        for sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, *_ in headers:
            end = strtab.find(b"\0", sh_name)
            name = strtab[sh_name : end if end >= 0 else None].decode("utf-8", "replace")
            self.sections.setdefault(name, Section(name, sh_type, sh_flags, sh_addr, sh_offset, sh_size))

    def _read(self, offset: int, size: int) -> bytes:
        self._stream.seek(offset)
        data = self._stream.read(size)
        if len(data) != size:
            raise NotUsableElf("truncated ELF file")
        return data

    def data(self, name: str) -> bytes | None:
        """Contents of section ``name``; None if absent, without contents, or compressed."""
        section = self.sections.get(name)
        if section is None or section.type == _SHT_NOBITS or section.flags & _SHF_COMPRESSED:
            return None
        return self._read(section.offset, section.size)

    def build_id(self) -> str:
        """The GNU build id in hex, or ""."""
        for section in self.sections.values():
            if section.type != _SHT_NOTE or section.size > 1 << 16:
                continue
            notes = self._read(section.offset, section.size)
            pos = 0
            while pos + _NOTE.size <= len(notes):
                namesz, descsz, note_type = _NOTE.unpack_from(notes, pos)
                name_at = pos + _NOTE.size
                desc_at = name_at + (namesz + 3) // 4 * 4
                if note_type == _NT_GNU_BUILD_ID and notes[name_at : name_at + namesz] == b"GNU\0":
                    return notes[desc_at : desc_at + descsz].hex()
                pos = desc_at + (descsz + 3) // 4 * 4
        return ""
