"""Facts about a Go binary that the Go actors need: is it Go, which Go release built it
(``go_version``), where its runtime functions start (``GoRuntimeInfo.entries``, from the
pclntab, so stripped binaries work), where is g.startpc, and how to find its goroutines
(``runtime.g`` layout, ``runtime.allgs``: agent.runtimes.go.layout).

A binary built by a Go release outside the checked range (agent.runtimes.go.layout.unsupported_reason)
gets ``unsupported`` set, logged once per binary: its runtime structures and probe
conventions may have moved, so the goroutine actor leaves it alone; its CPU frames still
come from the pclntab, whose own format is checked independently.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from functools import lru_cache

from elftools.elf.elffile import ELFFile

from agent.process.procmaps import FileKey
from agent.runtimes.go.layout import GLayout, allgs_candidates, layout_for, unsupported_reason
from agent.runtimes.go.pclntab import GoSymbolTable, load_go_table, pclntab_section, uvarint

log = logging.getLogger(__name__)


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
    # For the current-stack goroutine profile (agent.runtimes.go.goroutines): None/() when unsupported.
    g_layout: GLayout | None = None
    allgs: tuple[int, ...] = ()
    # Why this binary's runtime is not read ("": it is): agent.runtimes.go.layout.unsupported_reason.
    unsupported: str = ""

    def entry(self, function: str) -> int | None:
        return dict(self.entries).get(function)


PROBED_FUNCTIONS = ("runtime.newproc1", "runtime.goexit1")  # the goroutine profile's uprobes
_BUILDINFO_MAGIC = b"\xff Go buildinf:"


def is_go_binary(elf: ELFFile) -> bool:
    return pclntab_section(elf) is not None or elf.get_section_by_name(".go.buildinfo") is not None


@lru_cache(maxsize=1024)
def go_runtime_info(path: str, identity: FileKey) -> GoRuntimeInfo | None:
    """Go facts for the file at ``path`` (``identity`` = dev, ino, size, mtime keys the cache)."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if not is_go_binary(elf):
                return None
            has_symbols = elf.get_section_by_name(".symtab") is not None
            table: GoSymbolTable | None = load_go_table(elf)
            version = go_version(elf)
            unsupported = unsupported_reason(version) or ""
            if unsupported:  # logged once per binary: this function is cached per file identity
                log.warning("%s was built by %s: %s, its goroutines are not profiled (CPU frames are)",
                            path, version or "an unknown Go release", unsupported.replace("_", " "))
            layout = layout_for(elf, version)
            if layout is None and not unsupported:
                log.warning("%s (%s) has no DWARF and its release has no checked runtime.g layout: "
                            "current goroutine stacks and exit tracking are off for it", path, version)
            allgs: tuple[int, ...] = ()
            entries: list[tuple[str, int]] = []
            if table is not None:
                found = table.function_entries((*PROBED_FUNCTIONS, "runtime.allgadd"))
                entries = [(name, found[name]) for name in PROBED_FUNCTIONS if name in found]
                if layout is not None:  # else this Go version's goroutines cannot be read anyway
                    allgs = allgs_candidates(elf, table, found.get("runtime.allgadd"))
            startpc = layout.startpc if layout is not None else None
            return GoRuntimeInfo(path, startpc, has_symbols, version, _go_build_id(elf), tuple(entries), layout, allgs,
                                 unsupported)
    except Exception as exc:  # unreadable or unusual file: not profiled, logged once (cached)
        log.info("cannot inspect %s: %s", path, exc)
        return None


def go_version(elf: ELFFile) -> str:
    """The Go release that built ``elf`` ("go1.27.3"), from .go.buildinfo ("": not found).

    Go 1.18+ writes the version inline (flag bit 2 of byte 15), a varint length and the bytes."""
    section = elf.get_section_by_name(".go.buildinfo")
    if section is None:
        return ""
    data = section.data()
    if not data.startswith(_BUILDINFO_MAGIC) or len(data) < 33 or not data[15] & 0x2:
        return ""
    try:
        length, pos = uvarint(data, 32)
    except IndexError:  # the length runs past the section: no version to read
        return ""
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

