"""Go symbolization from the pclntab, present even in stripped Go binaries.

Hand-written because no maintained Python library reads it (pyelftools does not). Layout
for Go 1.18+ (magic 0xfffffff0; 1.20+ is 0xfffffff1 and adds ``startLine`` to ``_func``),
all offsets relative to the start of the table:

    header: magic u32, pad u16, minLC u8, ptrSize u8, nfunc, nfiles, textStart (0 from
            Go 1.26: use moduledata.text), funcnameOffset, cuOffset, filetabOffset,
            pctabOffset, pclnOffset  (ptrSize each)
    functab (at pclnOffset): nfunc+1 pairs (entryOff u32, funcOff u32); entries are
            relative to runtime.text, funcOff relative to pclnOffset
    _func (at pclnOffset+funcOff): entryOff u32, nameOff i32, args i32, deferreturn u32,
            pcsp u32, pcfile u32, pcln u32, npcdata u32, cuOffset u32, [startLine i32 1.20+],
            funcID u8, flag u8, pad u8, nfuncdata u8
    pc-value tables (at pctabOffset+off): pairs of (zig-zag varint value delta,
            varint pc delta x minLC), ending with a zero value delta after the first pair.
    file of a pc: pcfile value -> cutab[cuOffset + value] (u32) -> NUL-terminated name at
            filetabOffset + that.

    after _func: pcdata u32[npcdata] (pc-value table offsets), funcdata u32[nfuncdata]
            (offsets from moduledata.gofunc, the ``go:func.*`` data; ~0 = none).

Inlining (``lookup_inline``), as the runtime's own traceback expands it: PCDATA 2
(InlTreeIndex) at a PC is the index of the innermost inlined call covering it (-1: none) in
the function's inline tree, FUNCDATA 3 (InlTree). Each tree entry names the inlined callee
and ``parentPc``, an offset from the function entry of an instruction whose source position
is the call site; the caller's frame is found by looking up file, line and tree index again
at that PC. Entry layouts:
    1.18/1.19 (magic ...f0, 20 bytes): parent i16, funcID u8, pad u8, file i32, line i32,
            nameOff i32, parentPc i32
    1.20+     (magic ...f1, 16 bytes): funcID u8, pad 3, nameOff i32, parentPc i32, startLine i32
``gofunc`` and ``text`` are not in the pclntab: they are read from ``runtime.firstmoduledata``,
found by the pointers to the pclntab it starts with (works on stripped and PIE binaries; see
``find_moduledata``). The format is the same from Go 1.18 to 1.27 (checked against each
release's runtime/symtab.go and, in tests, against `go tool objdump` of real builds).
"""

from __future__ import annotations

import bisect
import os
import struct
import weakref
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import Section

from agent.elf_symbols import find_symbols
from agent.file_region import BytesRegion, FileRegion, OpenedFile, Region

K = TypeVar("K")
V = TypeVar("V")

MAGIC_118 = 0xFFFFFFF0
MAGIC_120 = 0xFFFFFFF1
PCDATA_INL_TREE_INDEX = 2
# Decoded frames kept per table, per kind (plain and with inlined calls).
LOOKUP_CACHE_ENTRIES = 65_536
# Bytes an entry of each lookup cache holds (key, value and dict slot), measured with
# tracemalloc over 5,390 functions of Go 1.27's own ``go`` binary: 45, 394 and 275 B (a
# frame's strings are its own; an inline tuple shares the frames of the frame cache).
SP_ENTRY_BYTES, FRAME_ENTRY_BYTES, INLINE_ENTRY_BYTES = 48, 400, 280
FUNCDATA_INL_TREE = 3
NO_FUNCDATA = 0xFFFFFFFF
PCLNTAB_SECTIONS = (".gopclntab", ".data.rel.ro.gopclntab")
MODULEDATA_SECTIONS = (".go.module", ".noptrdata", ".data")
# Word indexes in runtime.moduledata (runtime/symtab.go): ``text`` has stayed at 22 since
# Go 1.18; ``gofunc`` moved: 38 in 1.18/1.19, 40 from 1.20 (covctrs, ecovctrs), 43 from 1.27
# (typedesclen, itaboffset, itabsize). An index is used only where the word before it is
# ``rodata`` and no other candidate fits (find_moduledata), so a future layout gives no
# inline expansion, never a wrong one.
MODULEDATA_MINPC_WORD = 20  # minpc = text + the first function's entry offset: checks ``text``
MODULEDATA_TEXT_WORD = 22
MODULEDATA_GOFUNC_WORDS = {MAGIC_118: (38,), MAGIC_120: (40, 43)}
# Bytes of a pc-value table read at a time: most functions' tables are shorter.
PC_VALUE_CHUNK = 256
_U32 = struct.Struct("<I")
# A _func's first nine fields: entryOff, nameOff, args, deferreturn, pcsp, pcfile, pcln,
# npcdata, cuOffset.
_FUNC_HEAD = struct.Struct("<IiiIIIIII")


@dataclass(frozen=True, slots=True)
class GoFrame:
    function: str
    file: str
    line: int
    entry: int


class GoSymbolTable:
    """Function, file and line for any PC of a Go binary, from its pclntab.

    ``data`` is the pclntab and ``gofunc`` the funcdata area (from ``moduledata.gofunc`` to
    the end of its section), each read from the binary on demand or, for in-memory images,
    from bytes (agent/file_region.py); without ``gofunc`` inlined calls are not expanded
    (``lookup_inline`` then gives one frame, like ``lookup``).
    """

    def __init__(self, data: Region, gofunc: Region | None = None, text_start: int | None = None) -> None:
        header = data.read(0, 72)
        if len(header) < 72:
            raise ValueError(f"pclntab of {len(header)} bytes, shorter than its header")
        magic, _pad, self.min_lc, self.ptr_size = struct.unpack_from("<IHBB", header, 0)
        if magic not in (MAGIC_118, MAGIC_120) or self.ptr_size != 8:
            raise ValueError(f"unsupported pclntab (magic {magic:#x}, pointer size {self.ptr_size})")
        self.go120 = magic == MAGIC_120
        fields = struct.unpack_from("<8Q", header, 8)
        nfunc, _nfiles, header_text, funcname, cu, filetab, pctab, pcln = fields
        # The header's textStart is 0 from Go 1.26 on: callers pass runtime.text (load_go_table).
        self.text_start = header_text if text_start is None else text_start
        if not self.text_start:
            raise ValueError("pclntab text start unknown (header field 0 and none given)")
        self.data: Region = data
        self.funcname_off, self.cu_off, self.filetab_off = funcname, cu, filetab
        self.pctab_off, self.pcln_off = pctab, pcln
        table = struct.unpack(f"<{2 * (nfunc + 1)}I", data.read(pcln, 8 * (nfunc + 1)))
        # Arrays, not lists: a Go binary has tens of thousands of functions, and a list costs
        # ~36 B per int where an array costs 8 (entries) or 4 (offsets).
        self.entries = array("Q", (self.text_start + table[2 * i] for i in range(nfunc + 1)))
        self.func_offsets = array("I", (table[2 * i + 1] for i in range(nfunc)))
        self.gofunc = gofunc
        self._func_size = 44 if self.go120 else 40
        self._inl_entry = struct.Struct("<BxxxiiI" if self.go120 else "<hBxiiiI")
        # Frames per (function, pc), kept with the table (at most LOOKUP_CACHE_ENTRIES each,
        # then started over): a cache on the class (functools' lru_cache on a method) would
        # keep every table it saw alive, its descriptor included, after its binary's last
        # process had gone.
        self._frame_cache: dict[tuple[int, int], GoFrame] = {}
        self._inline_cache: dict[tuple[int, int], tuple[GoFrame, ...]] = {}
        # SP deltas per pc (-1: none): the goroutine reader asks for every frame of every
        # goroutine at each collection, and goroutine stacks repeat the same return addresses.
        self._sp_cache: dict[int, int] = {}

    def nbytes(self) -> int:
        """Memory held: the pclntab and funcdata bytes in memory (a file's: its cached blocks),
        the two arrays and the lookup caches (up to ~47 MB when all three are full: the
        symbolizer's file cache, which sums this at every insert, must see them)."""
        caches = (SP_ENTRY_BYTES * len(self._sp_cache) + FRAME_ENTRY_BYTES * len(self._frame_cache)
                  + INLINE_ENTRY_BYTES * len(self._inline_cache))
        return self.block_bytes() + 8 * len(self.entries) + 4 * len(self.func_offsets) + caches

    def block_bytes(self) -> int:
        """The pclntab and funcdata bytes in memory (a file's: the blocks read so far)."""
        return self.data.resident_bytes() + (self.gofunc.resident_bytes() if self.gofunc is not None else 0)

    def _u32(self, pos: int) -> int:
        """The little-endian u32 at ``pos`` of the pclntab."""
        return int(_U32.unpack(self.data.read(pos, 4))[0])

    @classmethod
    def from_elf(cls, path: str) -> GoSymbolTable | None:
        with open(path, "rb") as f:
            return shared_go_table(ELFFile(f))

    def _func(self, index: int) -> tuple[int, int, int, int]:
        """(name offset, pcfile, pcln, cuOffset) of function ``index``."""
        base = self.pcln_off + self.func_offsets[index]
        _entry, name_off, _args, _defer, _pcsp, pcfile, pcln, _npcdata, cu = _FUNC_HEAD.unpack(
            self.data.read(base, _FUNC_HEAD.size))
        return name_off, pcfile, pcln, cu

    def pcsp(self, index: int) -> int:
        """Offset of function ``index``'s SP-delta pc-value table (0: none)."""
        return self._u32(self.pcln_off + self.func_offsets[index] + 16)

    def _pcdata(self, index: int, table: int) -> int:
        """Offset of pc-value table PCDATA ``table`` of function ``index`` (0: none)."""
        base = self.pcln_off + self.func_offsets[index]
        if table >= self._u32(base + 28):  # npcdata
            return 0
        return self._u32(base + self._func_size + 4 * table)

    def _funcdata(self, index: int, slot: int) -> int | None:
        """Offset from gofunc of FUNCDATA ``slot`` of function ``index`` (None: absent)."""
        base = self.pcln_off + self.func_offsets[index]
        npcdata = self._u32(base + 28)
        nfuncdata = self.data.read(base + self._func_size - 1, 1)[0]
        if slot >= nfuncdata:
            return None
        off = self._u32(base + self._func_size + 4 * (npcdata + slot))
        return None if off == NO_FUNCDATA else off

    def sp_delta(self, pc: int) -> int | None:
        """Bytes the function containing ``pc`` has pushed below its return address at ``pc``."""
        delta = _cached(self._sp_cache, pc, lambda: self._sp_delta(pc))
        return delta if delta >= 0 else None

    def _sp_delta(self, pc: int) -> int:
        i = self.function_index(pc)
        if i is None:
            return -1
        table = self.pcsp(i)
        if not table:
            return -1
        return max(self._pc_value(table, self.entries[i], pc), -1)

    def _file_line(self, i: int, pc: int) -> tuple[str, int]:
        _name_off, pcfile, pcln, cu = self._func(i)
        entry = self.entries[i]
        line = self._pc_value(pcln, entry, pc) if pcln else -1
        file = ""
        file_index = self._pc_value(pcfile, entry, pc) if pcfile else -1
        if file_index >= 0:
            file_off = self._u32(self.cu_off + 4 * (cu + file_index))
            if file_off != 0xFFFFFFFF:
                file = self._cstring(self.filetab_off + file_off)
        return file, max(line, 0)

    def lookup_inline(self, pc: int) -> tuple[GoFrame, ...]:
        """Frames at ``pc``, innermost inlined callee first, the real function last; () outside Go text."""
        i = self.function_index(pc)
        if i is None:
            return ()
        return _cached(self._inline_cache, (i, pc), lambda: self._lookup_inline(i, pc))

    def _lookup_inline(self, i: int, pc: int) -> tuple[GoFrame, ...]:
        outer = self._lookup(i, pc)
        gofunc = self.gofunc
        tree = self._funcdata(i, FUNCDATA_INL_TREE) if gofunc is not None else None
        index_table = self._pcdata(i, PCDATA_INL_TREE_INDEX)
        if gofunc is None or tree is None or not index_table:
            return (outer,)
        entry, frames = self.entries[i], []
        file, line = outer.file, outer.line
        ix = self._pc_value(index_table, entry, pc)
        # Each step moves to a strictly enclosing call; the bound only guards corrupt data.
        for _ in range(64):
            if ix < 0:
                break
            fields = self._inl_entry.unpack(gofunc.read(tree + ix * self._inl_entry.size, self._inl_entry.size))
            name_off, parent_pc = (fields[1], fields[2]) if self.go120 else (fields[4], fields[5])
            frames.append(GoFrame(self._cstring(self.funcname_off + name_off), file, line, entry))
            caller_pc = entry + parent_pc
            file, line = self._file_line(i, caller_pc)
            ix = self._pc_value(index_table, entry, caller_pc)
        frames.append(GoFrame(outer.function, file, line, entry))
        return tuple(frames)

    def _cstring(self, offset: int) -> str:
        return self.data.cstring(offset).decode("utf-8", "replace")

    def _pc_value(self, table_off: int, entry: int, target: int) -> int:
        """Value of a pc-value table at ``target`` (-1 when not covered).

        The table is read in chunks (``PC_VALUE_CHUNK``): a step is two varints of at most
        10 bytes each, so a chunk with fewer than 20 bytes left is read again from there,
        unless it already ends where the pclntab ends (a varint cut there: IndexError)."""
        base = self.pctab_off + table_off
        chunk = self.data.read(base, PC_VALUE_CHUNK)
        pos, pc, value, first = 0, entry, -1, True
        while True:
            if pos + 20 > len(chunk) and len(chunk) == PC_VALUE_CHUNK:
                base += pos
                chunk, pos = self.data.read(base, PC_VALUE_CHUNK), 0
            delta, pos = uvarint(chunk, pos)
            if delta == 0 and not first:
                return -1
            value += -(delta >> 1) - 1 if delta & 1 else delta >> 1  # zig-zag
            pc_delta, pos = uvarint(chunk, pos)
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

    def _lookup(self, i: int, pc: int) -> GoFrame:
        return _cached(self._frame_cache, (i, pc), lambda: self._decode_frame(i, pc))

    def _decode_frame(self, i: int, pc: int) -> GoFrame:
        name_off, *_ = self._func(i)
        file, line = self._file_line(i, pc)
        return GoFrame(self._cstring(self.funcname_off + name_off), file, line, self.entries[i])

    def function_name(self, index: int) -> str:
        name_off, *_ = self._func(index)
        return self._cstring(self.funcname_off + name_off)

    def function_entry(self, name: str) -> int | None:
        """Entry address of the function called ``name`` (for probing stripped binaries)."""
        return self.function_entries((name,)).get(name)

    def function_entries(self, names: tuple[str, ...]) -> dict[str, int]:
        """Entry addresses of the named functions, in one pass over the table."""
        wanted = {name.encode(): name for name in names}
        found: dict[str, int] = {}
        for i in range(len(self.func_offsets)):
            name_off, *_ = self._func(i)
            start = self.funcname_off + name_off
            raw = self.data.cstring(start)
            if raw in wanted:
                found[wanted[raw]] = self.entries[i]
                if len(found) == len(wanted):
                    break
        return found


def pclntab_section(elf: ELFFile) -> Section | None:
    """The section holding the pclntab: ``.gopclntab``, or ``.data.rel.ro.gopclntab`` in PIE
    builds of Go before 1.26 (the linker put it among relocated read-only data there)."""
    for name in PCLNTAB_SECTIONS:
        section = elf.get_section_by_name(name)
        if section is not None and section["sh_type"] == "SHT_PROGBITS":
            return section
    return None


@dataclass(frozen=True, slots=True)
class ModuleData:
    """The words of ``runtime.firstmoduledata`` this parser needs (runtime/symtab.go)."""

    address: int
    text: int  # runtime.text: the base of every function entry offset
    gofunc: int | None  # go:func.*, base of funcdata offsets; None when the layout is unknown


# One table per Go binary for the whole agent: the goroutine actor and the symbolizer both
# read a running Go binary's pclntab (each table with its own descriptor, arrays and frame
# caches). Weak values: a table lives while one of its users keeps it. Keyed by the opened
# file's identity (device, inode, size, mtime).
_SHARED_TABLES: weakref.WeakValueDictionary[tuple[int, int, int, int], GoSymbolTable] = (
    weakref.WeakValueDictionary())


def _file_identity(stream: object) -> tuple[int, int, int, int] | None:
    try:
        st = os.fstat(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # in-memory images (the vDSO), closed files
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def shared_go_table(elf: ELFFile) -> GoSymbolTable | None:
    """``load_go_table(elf)``, or the table already loaded from the same file by another user."""
    key = _file_identity(elf.stream)
    table = _SHARED_TABLES.get(key) if key is not None else None
    if table is None:
        table = load_go_table(elf)
        if table is not None and key is not None:
            _SHARED_TABLES[key] = table
    return table


def opened_file(elf: ELFFile) -> OpenedFile | None:
    """The file ``elf`` was read from, as opened now (None for an in-memory image: the vDSO,
    tests' BytesIO). OSError when the descriptor cannot be duplicated (the agent's limit)."""
    try:
        fd = elf.stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return OpenedFile(fd)


def section_region(elf: ELFFile, section: Section, opened: OpenedFile | None, start: int = 0) -> Region:
    """The bytes of ``section`` from ``start``: read from ``opened`` on demand when they are
    stored plainly in it (agent/file_region.py), else copied (no file, a compressed
    section)."""
    plain = section["sh_type"] == "SHT_PROGBITS" and not section["sh_flags"] & SH_FLAGS.SHF_COMPRESSED
    if opened is not None and plain:
        return FileRegion(opened, section["sh_offset"] + start, section["sh_size"] - start)
    return BytesRegion(section.data()[start:])


def load_go_table(elf: ELFFile) -> GoSymbolTable | None:
    """The pclntab of ``elf`` with its funcdata area (for inlining), or None for non-Go files.
    Both are read from the file as lookups need them, not copied (``section_region``).

    Function entries are offsets from ``runtime.text``. The header's textStart gives it up to
    Go 1.25; Go 1.26 stopped filling it (0), so it is read from the module data, else the
    header's non-zero value, else the ``runtime.text`` symbol. Not the start of ``.text``:
    with external linking (cgo) the C start-up code comes first, and every name would be
    shifted; without any of the three the pclntab is refused (ValueError), never guessed."""
    section = pclntab_section(elf)
    if section is None:
        return None
    opened = opened_file(elf)  # one descriptor for both regions
    data = section_region(elf, section, opened)
    module = find_moduledata(elf, section["sh_addr"], data)
    head = data.read(0, 32)
    (header_text,) = struct.unpack_from("<Q", head, 24) if len(head) >= 32 else (0,)
    if module is not None:
        text_start = module.text
    elif header_text:
        text_start = header_text
    else:
        text_start = _symbol_value(elf, "runtime.text")
        if not text_start:
            raise ValueError("pclntab text start unknown: no module data found, header field 0, no runtime.text")
    funcdata: Region | None = None
    if module is not None and module.gofunc is not None:
        for sec in elf.iter_sections():
            start, size = sec["sh_addr"], sec["sh_size"]
            if sec["sh_type"] == "SHT_PROGBITS" and start <= module.gofunc < start + size:
                funcdata = section_region(elf, sec, opened, module.gofunc - start)
                break
    return GoSymbolTable(data, funcdata, text_start)


def _symbol_value(elf: ELFFile, name: str) -> int:
    """Value of symbol ``name`` in .symtab (0: none)."""
    found = find_symbols(elf, (name,), (".symtab",)).get(name)
    return found[0] if found else 0


def find_moduledata(elf: ELFFile, pclntab_addr: int, pclntab: Region) -> ModuleData | None:
    """``runtime.firstmoduledata``, read from the file so stripped binaries work too.

    It starts with a pointer to the pclntab header followed by the ``funcnametab`` slice,
    whose data pointer is the header address plus the header's funcnameOffset: both are
    checked, and ``minpc`` must be ``text`` plus the first function's offset. It sits in
    ``.go.module`` (Go 1.26+) or ``.noptrdata``; PIE builds by Go's linker keep the link-time
    addresses in the file (plus R_X86_64_RELATIVE relocations), so the same check works on
    them. ``gofunc`` is at a word index that moved with the
    struct (see MODULEDATA_GOFUNC_WORDS); the word before it is always ``rodata``, which must
    equal the start of ``.rodata``. (``types`` may equal it too, so candidates are per pclntab
    magic, and an ambiguous fit is not used.)"""
    header = pclntab.read(0, 72)
    if len(header) < 72:
        return None
    (funcname_off,) = struct.unpack_from("<Q", header, 32)
    (pcln_off,) = struct.unpack_from("<Q", header, 64)
    if pcln_off + 4 > len(pclntab):
        return None
    (first_entry,) = struct.unpack_from("<I", pclntab.read(pcln_off, 4))  # functab[0].entryoff
    needle = struct.pack("<QQ", pclntab_addr, pclntab_addr + funcname_off)
    rodata = elf.get_section_by_name(".rodata")
    rodata_start = rodata["sh_addr"] if rodata is not None else None
    candidates = MODULEDATA_GOFUNC_WORDS.get(struct.unpack_from("<I", header, 0)[0], ())
    words_needed = max(candidates, default=MODULEDATA_TEXT_WORD) + 1
    for name in MODULEDATA_SECTIONS:
        sec = elf.get_section_by_name(name)
        if sec is None or sec["sh_type"] != "SHT_PROGBITS":
            continue
        data = sec.data()
        pos = data.find(needle)
        while pos >= 0:
            if pos % 8 == 0 and pos + 8 * (MODULEDATA_TEXT_WORD + 1) <= len(data):
                count = min(words_needed, (len(data) - pos) // 8)
                words = struct.unpack_from(f"<{count}Q", data, pos)
                if words[MODULEDATA_MINPC_WORD] != words[MODULEDATA_TEXT_WORD] + first_entry:
                    pos = data.find(needle, pos + 1)  # not the layout we know: text unproven
                    continue
                fits = [words[i] for i in candidates if i < count and words[i - 1] == rodata_start and words[i]]
                gofunc = fits[0] if len(fits) == 1 else None
                return ModuleData(sec["sh_addr"] + pos, words[MODULEDATA_TEXT_WORD], gofunc)
            pos = data.find(needle, pos + 1)
    return None


def uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """Go's unsigned LEB128 varint at ``pos``: (value, position after it); IndexError if cut short."""
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7



def _cached(cache: dict[K, V], key: K, make: Callable[[], V]) -> V:
    """``cache[key]``, made on a miss; the cache is emptied when it reaches LOOKUP_CACHE_ENTRIES."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= LOOKUP_CACHE_ENTRIES:
            cache.clear()
        value = cache[key] = make()
    return value
