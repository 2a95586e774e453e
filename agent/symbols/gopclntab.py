"""Go symbolization from ``.gopclntab``, present even in stripped Go binaries.

Hand-written because no maintained Python library reads it (pyelftools does not). Layout
for Go 1.18+ (magic 0xfffffff0; 1.20+ is 0xfffffff1 and adds ``startLine`` to ``_func``),
all offsets relative to the start of the table:

    header: magic u32, pad u16, minLC u8, ptrSize u8, nfunc, nfiles, textStart,
            funcnameOffset, cuOffset, filetabOffset, pctabOffset, pclnOffset  (ptrSize each)
    functab (at pclnOffset): nfunc+1 pairs (entryOff u32, funcOff u32); entries are
            relative to textStart, funcOff relative to pclnOffset
    _func (at pclnOffset+funcOff): entryOff u32, nameOff i32, args i32, deferreturn u32,
            pcsp u32, pcfile u32, pcln u32, npcdata u32, cuOffset u32, [startLine i32 1.20+],
            funcID u8, flag u8, pad u8, nfuncdata u8
    pc-value tables (at pctabOffset+off): pairs of (zig-zag varint value delta,
            varint pc delta x minLC), ending with a zero value delta after the first pair.
    file of a pc: pcfile value -> cutab[cuOffset + value] (u32) -> NUL-terminated name at
            filetabOffset + that.

Inlined frames (FUNCDATA_InlTree) are not expanded: a PC reports its outermost function's
name with the line of the innermost inlined code, as the line table gives it.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from functools import lru_cache

from elftools.elf.elffile import ELFFile

MAGIC_118 = 0xFFFFFFF0
MAGIC_120 = 0xFFFFFFF1


@dataclass(frozen=True, slots=True)
class GoFrame:
    function: str
    file: str
    line: int
    entry: int


class GoSymbolTable:
    """Function, file and line for any PC of a Go binary, from its pclntab."""

    def __init__(self, data: bytes) -> None:
        magic, _pad, self.min_lc, self.ptr_size = struct.unpack_from("<IHBB", data, 0)
        if magic not in (MAGIC_118, MAGIC_120) or self.ptr_size != 8:
            raise ValueError(f"unsupported pclntab (magic {magic:#x}, pointer size {self.ptr_size})")
        self.go120 = magic == MAGIC_120
        fields = struct.unpack_from("<8Q", data, 8)
        nfunc, _nfiles, self.text_start, funcname, cu, filetab, pctab, pcln = fields
        self.data = data
        self.funcname_off, self.cu_off, self.filetab_off = funcname, cu, filetab
        self.pctab_off, self.pcln_off = pctab, pcln
        table = struct.unpack_from(f"<{2 * (nfunc + 1)}I", data, pcln)
        self.entries = [self.text_start + table[2 * i] for i in range(nfunc + 1)]
        self.func_offsets = [table[2 * i + 1] for i in range(nfunc)]

    @classmethod
    def from_elf(cls, path: str) -> GoSymbolTable | None:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            section = elf.get_section_by_name(".gopclntab")
            if section is None:
                return None
            return cls(section.data())

    def _func(self, index: int) -> tuple[int, int, int, int]:
        """(name offset, pcfile, pcln, cuOffset) of function ``index``."""
        base = self.pcln_off + self.func_offsets[index]
        _entry, name_off, _args, _defer, _pcsp, pcfile, pcln, _npcdata, cu = struct.unpack_from(
            "<IiiIIIIII", self.data, base)
        return name_off, pcfile, pcln, cu

    def _cstring(self, offset: int) -> str:
        end = self.data.index(b"\0", offset)
        return self.data[offset:end].decode("utf-8", "replace")

    def _pc_value(self, table_off: int, entry: int, target: int) -> int:
        """Value of a pc-value table at ``target`` (-1 when not covered)."""
        data, pos = self.data, self.pctab_off + table_off
        pc, value, first = entry, -1, True
        while True:
            delta, pos = _uvarint(data, pos)
            if delta == 0 and not first:
                return -1
            value += -(delta >> 1) - 1 if delta & 1 else delta >> 1  # zig-zag
            pc_delta, pos = _uvarint(data, pos)
            pc += pc_delta * self.min_lc
            first = False
            if target < pc:
                return value

    def function_index(self, pc: int) -> int | None:
        i = bisect.bisect_right(self.entries, pc) - 1
        return i if 0 <= i < len(self.func_offsets) else None

    def lookup(self, pc: int) -> GoFrame | None:
        """The frame for ``pc`` (an ELF virtual address), or None outside Go text."""
        i = self.function_index(pc)
        if i is None:
            return None
        return self._lookup(i, pc)

    @lru_cache(maxsize=65536)  # noqa: B019 - one table per binary, bounded, lives as long as it
    def _lookup(self, i: int, pc: int) -> GoFrame:
        name_off, pcfile, pcln, cu = self._func(i)
        entry = self.entries[i]
        name = self._cstring(self.funcname_off + name_off)
        line = self._pc_value(pcln, entry, pc) if pcln else -1
        file = ""
        file_index = self._pc_value(pcfile, entry, pc) if pcfile else -1
        if file_index >= 0:
            (file_off,) = struct.unpack_from("<I", self.data, self.cu_off + 4 * (cu + file_index))
            if file_off != 0xFFFFFFFF:
                file = self._cstring(self.filetab_off + file_off)
        return GoFrame(name, file, max(line, 0), entry)

    def function_entry(self, name: str) -> int | None:
        """Entry address of the function called ``name`` (for probing stripped binaries)."""
        for i in range(len(self.func_offsets)):
            name_off, *_ = self._func(i)
            if self._cstring(self.funcname_off + name_off) == name:
                return self.entries[i]
        return None


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
