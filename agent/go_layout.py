"""Where a Go process keeps its goroutines: ``runtime.allgs`` and the ``runtime.g`` fields
the current-stack goroutine profile reads (see docs/design/goroutine.md).

Offsets come from the binary's own DWARF when it has some (``-ldflags=-w`` drops it), else
from ``G_LAYOUTS`` below, a per-version table for linux/amd64 written from each release's
``runtime/runtime2.go``:

    g:      stack{lo, hi} at 0, stackguard0/1, _panic, _defer, m, sched (gobuf) at 56,
            syscallsp, syscallpc, [syscallbp: Go 1.23+], stktopsp, param, atomicstatus u32,
            stackLock u32, goid
    gobuf:  sp 0, pc 8, g 16, ctxt 24, ret 32, lr 40, bp 48           (1.18 - 1.23 alike)

so atomicstatus/goid are at 144/152 for Go 1.18 - 1.22 and 152/160 for 1.23. Only Go 1.19
(installed here) is checked against DWARF by the tests; when DWARF is present it wins, and
a disagreement with the table is logged. ``startpc`` moves too often to tabulate: without
DWARF the start function is taken from the unwound stack instead (the frame below
``runtime.goexit``).

``runtime.allgs`` (a ``[]*g``) is found the same way with or without a symbol table (reading
a Go symbol table with pyelftools takes seconds): the RIP-relative data references in
``runtime.allgadd`` (the only function that appends to it), each candidate then validated
against the live process (a slice whose first element is the main goroutine, goid 1: see
``agent.go_goroutines``).
No Python library reads any of this; hand-written.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, replace

from elftools.elf.elffile import ELFFile

from agent.symbols.gopclntab import GoSymbolTable

log = logging.getLogger("stackfleet.go")


@dataclass(frozen=True, slots=True)
class GLayout:
    """Byte offsets inside ``runtime.g`` (amd64)."""

    stack_lo: int
    stack_hi: int
    sched_sp: int
    sched_pc: int
    sched_bp: int
    atomicstatus: int
    goid: int
    startpc: int | None = None  # DWARF only
    source: str = "table"

    @property
    def read_size(self) -> int:
        """Bytes of g to read so every known field is inside."""
        return max(self.atomicstatus + 4, self.goid + 8, self.sched_bp + 8, (self.startpc or 0) + 8)


_SCHED = 56
_BEFORE_123 = GLayout(0, 8, _SCHED + 0, _SCHED + 8, _SCHED + 48, 144, 152)
G_LAYOUTS: dict[int, GLayout] = {
    18: _BEFORE_123, 19: _BEFORE_123, 20: _BEFORE_123, 21: _BEFORE_123, 22: _BEFORE_123,
    23: replace(_BEFORE_123, atomicstatus=152, goid=160),  # g.syscallbp added before stktopsp
}


def go_minor(version: str) -> int | None:
    """19 for "go1.19.8"; None when not a go1.N version string."""
    parts = version.removeprefix("go").split(".")
    if len(parts) < 2 or parts[0] != "1":
        return None
    digits = len(parts[1]) - len(parts[1].lstrip("0123456789"))
    return int(parts[1][:digits]) if digits else None


def layout_for(elf: ELFFile, version: str) -> GLayout | None:
    """The g layout from DWARF, else from the table for ``version``, else None (unsupported)."""
    minor = go_minor(version)
    table = G_LAYOUTS.get(minor) if minor is not None else None
    dwarf = layout_from_dwarf(elf)
    if dwarf is not None:
        if table is not None and replace(dwarf, startpc=None, source="table") != table:
            log.warning("Go %s: runtime.g layout from DWARF %s differs from the table %s; using DWARF",
                        version, dwarf, table)
        return dwarf
    return table


def layout_from_dwarf(elf: ELFFile) -> GLayout | None:
    """runtime.g / runtime.gobuf / runtime.stack member offsets from the runtime package's CU."""
    if not elf.has_dwarf_info():
        return None
    wanted = {b"runtime.g", b"runtime.gobuf", b"runtime.stack"}
    members: dict[bytes, dict[bytes, int]] = {}
    for cu in elf.get_dwarf_info().iter_CUs():
        top = cu.get_top_DIE()
        name = top.attributes.get("DW_AT_name")
        if name is None or name.value != b"runtime":
            continue
        for die in top.iter_children():
            type_name = die.attributes.get("DW_AT_name")
            if die.tag != "DW_TAG_structure_type" or type_name is None or type_name.value not in wanted:
                continue
            fields = members.setdefault(type_name.value, {})
            for member in die.iter_children():
                mname, loc = member.attributes.get("DW_AT_name"), member.attributes.get("DW_AT_data_member_location")
                if mname is not None and loc is not None and isinstance(loc.value, int):
                    fields[mname.value] = loc.value
        if len(members) == len(wanted):  # the package has several CUs: stop once all are seen
            break
    g, gobuf, stack = (members.get(k, {}) for k in (b"runtime.g", b"runtime.gobuf", b"runtime.stack"))
    try:
        sched, base = g[b"sched"], g[b"stack"]
        return GLayout(base + stack[b"lo"], base + stack[b"hi"], sched + gobuf[b"sp"], sched + gobuf[b"pc"],
                       sched + gobuf[b"bp"], g[b"atomicstatus"], g[b"goid"], g.get(b"startpc"), "dwarf")
    except KeyError:
        return None


def allgs_candidates(elf: ELFFile, table: GoSymbolTable, allgadd: int | None) -> tuple[int, ...]:
    """Addresses that may be ``runtime.allgs``: data references from the code of
    ``runtime.allgadd`` (entry ``allgadd``), to be validated against the process."""
    index = table.function_index(allgadd) if allgadd is not None else None
    if allgadd is None or index is None or index + 1 >= len(table.entries):
        return ()
    entry, end = allgadd, table.entries[index + 1]
    code = _read_vaddr(elf, entry, end - entry)
    bss = [(s["sh_addr"], s["sh_addr"] + s["sh_size"]) for s in elf.iter_sections()
           if s.name in (".bss", ".noptrbss", ".data", ".noptrdata")]
    found: list[int] = []
    # mov/lea with a REX.W prefix and a [rip + disp32] operand (ModRM mod=00 r/m=101): the
    # scan is not instruction-aligned, so stray matches happen; validation drops them.
    for k in range(len(code) - 7):
        if code[k] in (0x48, 0x4C) and code[k + 1] in (0x8B, 0x89, 0x8D) and code[k + 2] & 0xC7 == 0x05:
            (disp,) = struct.unpack_from("<i", code, k + 3)
            target = entry + k + 7 + disp
            if any(lo <= target < hi for lo, hi in bss) and target not in found:
                found.append(target)
    return tuple(found)


def _read_vaddr(elf: ELFFile, vaddr: int, size: int) -> bytes:
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr and vaddr + size <= seg["p_vaddr"] + seg["p_filesz"]:
            stream = elf.stream
            stream.seek(seg["p_offset"] + vaddr - seg["p_vaddr"])
            return bytes(stream.read(size))
    return b""
