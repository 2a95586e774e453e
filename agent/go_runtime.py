"""Facts about a Go binary that the goroutine actor needs: is it Go, and where is g.startpc.

Offsets inside ``runtime.g`` change between Go versions, so they are read from the
binary's own DWARF (Go emits it, compressed, unless built with ``-ldflags=-w``). Without
DWARF the actor still counts creations but cannot attribute exits; that is counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

from elftools.elf.elffile import ELFFile

log = logging.getLogger("stackfleet.go")


@dataclass(frozen=True, slots=True)
class GoRuntimeInfo:
    path: str
    startpc_offset: int | None
    has_symbols: bool


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
            return GoRuntimeInfo(path, _startpc_offset(elf), has_symbols)
    except Exception as exc:  # unreadable or unusual file: not profiled, logged once (cached)
        log.info("cannot inspect %s: %s", path, exc)
        return None


def _startpc_offset(elf: ELFFile) -> int | None:
    if not elf.has_dwarf_info():
        return None
    dwarf = elf.get_dwarf_info()
    for cu in dwarf.iter_CUs():
        for die in cu.iter_DIEs():
            if die.tag != "DW_TAG_structure_type":
                continue
            name = die.attributes.get("DW_AT_name")
            if name is None or name.value != b"runtime.g":
                continue
            for member in die.iter_children():
                member_name = member.attributes.get("DW_AT_name")
                if member_name is not None and member_name.value == b"startpc":
                    return int(member.attributes["DW_AT_data_member_location"].value)
            return None
    return None
