"""Where a Go process keeps its goroutines: ``runtime.allgs`` and the ``runtime.g`` fields
the current-stack goroutine profile reads (see docs/design/goroutine.md).

Offsets come from ``G_LAYOUTS`` below, a per-release table for linux/amd64 from each
release's ``runtime/runtime2.go``, else from the binary's own DWARF (``-ldflags=-w`` drops
it; Go 1.25+ writes DWARF 5, which pyelftools reads: only struct members are needed, no
location or range lists):

    g:      stack{lo, hi} at 0, stackguard0/1, _panic, _defer, m, sched (gobuf) at 56,
            syscallsp, syscallpc, [syscallbp: Go 1.23+], stktopsp, param, atomicstatus u32,
            stackLock u32, goid, ...  startpc further down (moves with almost every release)
    gobuf:  sp 0, pc 8, g 16, ctxt 24, [ret 32: up to Go 1.24], lr, bp

Every row is checked in tests against the DWARF of a real build by that release
(tests/test_go_layout.py): only releases with a toolchain in the test matrix have a row.
Other releases from 1.18 to ``NEWEST_GO_MINOR`` work from DWARF only; releases outside that
range are not read at all (``unsupported_reason``): a future runtime may move anything this
module and the goroutine probes rely on, so it is reported, never guessed.

``runtime.allgs`` (a ``[]*g``) is found the same way with or without a symbol table (reading
a Go symbol table with pyelftools takes seconds): the RIP-relative data references in
``runtime.allgadd`` (the only function that appends to it), each candidate then validated
against the live process (a slice whose first element is the main goroutine, goid 1: see
``agent.runtimes.go.goroutines``). ``data_references`` does this for any function.
No Python library reads any of this; hand-written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from elftools.elf.elffile import ELFFile

from agent.runtimes.go.pclntab import GoSymbolTable


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
    startpc: int | None = None
    source: str = "table"

    @property
    def read_size(self) -> int:
        """Bytes of g to read so every known field is inside."""
        return max(self.atomicstatus + 4, self.goid + 8, self.sched_bp + 8, (self.startpc or 0) + 8)


_SCHED = 56
_GO119 = GLayout(0, 8, _SCHED + 0, _SCHED + 8, _SCHED + 48, 144, 152, startpc=312)
# Go 1.23 added g.syscallbp; Go 1.25 has no gobuf.ret (gobuf 48 bytes, bp at 40).
_GO125 = GLayout(0, 8, _SCHED + 0, _SCHED + 8, _SCHED + 40, 144, 152, startpc=296)
G_LAYOUTS: dict[int, GLayout] = {
    19: _GO119,
    21: replace(_GO119, startpc=296),
    23: replace(_GO119, atomicstatus=152, goid=160, startpc=304),
    25: _GO125,
    26: replace(_GO125, startpc=304),
    27: replace(_GO125, startpc=304),
}
OLDEST_GO_MINOR = 18  # the pclntab format of Go 1.18 (agent.runtimes.go.pclntab)
NEWEST_GO_MINOR = 27  # newest release whose runtime structures and probes were checked


def go_minor(version: str) -> int | None:
    """19 for "go1.19.8"; None when not a go1.N version string."""
    parts = version.removeprefix("go").split(".")
    if len(parts) < 2 or parts[0] != "1":
        return None
    digits = len(parts[1]) - len(parts[1].lstrip("0123456789"))
    return int(parts[1][:digits]) if digits else None


def unsupported_reason(version: str) -> str | None:
    """Why goroutines of a binary built by Go ``version`` are not read (None: they are)."""
    minor = go_minor(version)
    if minor is None:
        return "go_version_unknown"
    if minor < OLDEST_GO_MINOR:
        return "go_version_too_old"
    if minor > NEWEST_GO_MINOR:
        return "go_version_newer_than_supported"
    return None


def layout_for(elf: ELFFile, version: str) -> GLayout | None:
    """The g layout: the table's row for ``version``, else the binary's DWARF, else None.

    A row is used before DWARF because tests prove each row equal to its release's DWARF,
    while reading the runtime's DWARF types costs ~1 s of CPU per binary with pyelftools
    (the agent may meet many binaries at once); releases without a row need DWARF."""
    if unsupported_reason(version) is not None:
        return None
    minor = go_minor(version)
    row = G_LAYOUTS.get(minor) if minor is not None else None
    return row if row is not None else layout_from_dwarf(elf)


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
    return data_references(elf, table, allgadd) if allgadd is not None else ()


def data_references(elf: ELFFile, table: GoSymbolTable, entry: int) -> tuple[int, ...]:
    """Addresses in .data/.bss (and their no-pointer twins) that the function starting at
    ``entry`` loads or stores RIP-relative: how a runtime variable is found in a stripped
    binary (candidates, in code order; callers validate them against the process)."""
    index = table.function_index(entry)
    if index is None or index + 1 >= len(table.entries):
        return ()
    end = table.entries[index + 1]
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
