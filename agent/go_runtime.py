"""Facts about a Go binary that the goroutine actor needs: is it Go, where is g.startpc,
and how to find its goroutines (``runtime.g`` layout, ``runtime.allgs``: agent.go_layout).

Offsets inside ``runtime.g`` change between Go versions, so they are read from the
binary's own DWARF (Go emits it, compressed, unless built with ``-ldflags=-w``). Without
DWARF the actor still counts creations but cannot attribute exits; that is counted.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from functools import lru_cache

from elftools.elf.elffile import ELFFile

from agent.go_layout import GLayout, allgs_candidates, layout_for
from agent.symbols.gopclntab import GoSymbolTable, load_go_table

log = logging.getLogger("stackfleet.go")


@dataclass(frozen=True, slots=True)
class GoRuntimeInfo:
    path: str
    startpc_offset: int | None
    has_symbols: bool
    go_version: str = ""
    build_id: str = ""  # the Go build id (process.executable.build_id.go)
    # Entry addresses of the runtime functions the actors probe, from .gopclntab: usable
    # on stripped binaries, where there is no symbol table to probe by name.
    entries: tuple[tuple[str, int], ...] = ()
    # For the current-stack goroutine profile (agent.go_goroutines): None/() when unsupported.
    g_layout: GLayout | None = None
    allgs: tuple[int, ...] = ()

    def entry(self, function: str) -> int | None:
        return dict(self.entries).get(function)


PROBED_FUNCTIONS = ("runtime.newproc1", "runtime.goexit1", "runtime.mallocgc")
_BUILDINFO_MAGIC = b"\xff Go buildinf:"


def is_go_binary(elf: ELFFile) -> bool:
    return elf.get_section_by_name(".gopclntab") is not None or elf.get_section_by_name(".go.buildinfo") is not None


@lru_cache(maxsize=1024)
def go_runtime_info(path: str, identity: tuple[int, int, int, int]) -> GoRuntimeInfo | None:
    """Go facts for the file at ``path`` (``identity`` = dev, ino, size, mtime keys the cache)."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if not is_go_binary(elf):
                return None
            has_symbols = elf.get_section_by_name(".symtab") is not None
            table: GoSymbolTable | None = load_go_table(elf)
            version = go_version(elf)
            layout = layout_for(elf, version)
            allgs: tuple[int, ...] = ()
            if table is not None:
                found = table.function_entries((*PROBED_FUNCTIONS, "runtime.allgadd"))
                entries = [(name, found[name]) for name in PROBED_FUNCTIONS if name in found]
                if layout is not None:  # else this Go version's goroutines cannot be read anyway
                    allgs = allgs_candidates(elf, table, found.get("runtime.allgadd"))
            startpc = layout.startpc if layout is not None else None
            return GoRuntimeInfo(path, startpc, has_symbols, version, _go_build_id(elf), tuple(entries), layout, allgs)
    except Exception as exc:  # unreadable or unusual file: not profiled, logged once (cached)
        log.info("cannot inspect %s: %s", path, exc)
        return None


def go_version(elf: ELFFile) -> str:
    """Go version from .go.buildinfo (Go 1.18+ inline-string format: flag bit 2)."""
    section = elf.get_section_by_name(".go.buildinfo")
    if section is None:
        return ""
    data = section.data()
    if not data.startswith(_BUILDINFO_MAGIC) or len(data) < 33 or not data[15] & 0x2:
        return ""
    length, pos = _uvarint(data, 32)
    return data[pos : pos + length].decode("utf-8", "replace")


def _go_build_id(elf: ELFFile) -> str:
    """The Go build id from the .note.go.buildid note (name "Go", type 4)."""
    section = elf.get_section_by_name(".note.go.buildid")
    if section is None:
        return ""
    data = section.data()
    namesz, descsz, _type = struct.unpack_from("<III", data, 0)
    desc_start = 12 + (namesz + 3) // 4 * 4
    return data[desc_start : desc_start + descsz].decode("utf-8", "replace")


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(data):
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    return result, pos
