"""DWARF sections read in place from the open file instead of copied into memory.

pyelftools' ``ELFFile.get_dwarf_info`` copies every debug section into its own ``BytesIO``
(``_read_dwarf_section``): for a file whose lines are decoded one compilation unit at a time
(agent/symbols/dwarf_lines.py ``CuLineIndex``) that is ~10 MB of copies for libc's debug file,
kept while CUs are being decoded, though a CU's decode reads only its header, its top DIE,
its abbreviations and its line program. ``ViewingELFFile`` hands pyelftools a window onto the
file for each section that is stored plainly (not compressed, no relocations to apply, no
phantom bytes), so those reads go to the file (its page cache) and nothing is copied;
other sections take pyelftools' own path. pyelftools has no option for this; it reads its
sections only through ``seek``/``tell``/``read``, which is all the window offers.
Sections compressed with zlib in the file (Debian's debug files) are read through an
:class:`~agent.symbols.inflate_index.InflateIndex` given by the caller and kept by it across
openings: the first opening inflates each such section once to build its index, later ones
inflate only the blocks that CU decoding reads. The sections line decoding never reads are
not read at all.
"""

from __future__ import annotations

from typing import IO, cast

from elftools.common.utils import struct_parse
from elftools.dwarf.dwarfinfo import DebugSectionDescriptor
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationHandler
from elftools.elf.sections import Section

from agent.symbols.inflate_index import IndexedInflateStream, InflateIndex
from agent.symbols.section_stream import SectionStream


class FileWindow(SectionStream):
    """A read-only stream over ``size`` bytes of ``base`` from ``start``; every read seeks
    ``base`` first, so other users of the same file object may move it in between."""

    def __init__(self, base: IO[bytes], start: int, size: int) -> None:
        super().__init__(size)
        self._base, self._start = base, start

    def read(self, size: int | None = -1) -> bytes:
        left = max(self._size - self._pos, 0)
        count = left if size is None or size < 0 else min(size, left)
        if count == 0:
            return b""
        self._base.seek(self._start + self._pos)
        data = self._base.read(count)
        self._pos += len(data)
        return data


# Sections line decoding never reads (location and range lists, call frames, name indexes):
# given to pyelftools as absent, so a compressed one is not decompressed into memory (libc's
# debug file: 1.4 MB of .debug_loclists alone).
NOT_FOR_LINES = frozenset((".debug_loc", ".debug_loclists", ".debug_ranges", ".debug_rnglists", ".debug_frame",
                           ".eh_frame", ".debug_pubnames", ".debug_pubtypes", ".debug_types"))


# Compressed sections up to this size are inflated whole, as pyelftools does (libc's
# abbreviations, strings and address ranges: ~1.3 MB together, ~5 ms): a CU's decode reads
# from each of them, and through an index that would be one block inflated per section.
WHOLE_SECTION_MAX_BYTES = 1024 * 1024


class ViewingELFFile(ELFFile):
    """An ``ELFFile`` for line decoding: its DWARF sections are windows onto the file where
    they can be (through ``inflate_indexes``, by section name, where zlib compresses them),
    and the sections lines never need are left out."""

    def __init__(self, stream: IO[bytes], inflate_indexes: dict[str, InflateIndex] | None = None) -> None:
        super().__init__(stream)
        self.inflate_indexes = inflate_indexes

    def _read_dwarf_section(self, section: Section, relocate_dwarf_sections: bool) -> DebugSectionDescriptor:
        if section.name in NOT_FOR_LINES:
            return None  # type: ignore[return-value]  # pyelftools' value for a missing section
        compressed = bool(section["sh_flags"] & SH_FLAGS.SHF_COMPRESSED)
        viewable = section["sh_type"] != "SHT_NOBITS" and not self.has_phantom_bytes()
        if viewable and relocate_dwarf_sections:
            viewable = RelocationHandler(self).find_relocations_for_section(section) is None
        stream: IO[bytes] | None = None
        if viewable and not compressed:
            stream = cast(IO[bytes], FileWindow(self.stream, section["sh_offset"], section["sh_size"]))
        elif viewable and self.inflate_indexes is not None:
            stream = self._indexed_stream(section)
        if stream is None:
            return super()._read_dwarf_section(section, relocate_dwarf_sections)
        return DebugSectionDescriptor(
            stream=stream,
            name=section.name,
            global_offset=section["sh_offset"],
            size=section.data_size,
            address=section["sh_addr"])

    def _indexed_stream(self, section: Section) -> IO[bytes] | None:
        """The decompressed view of a zlib-compressed section through its index (built
        now if the caller has none yet); None for another compression or a small section."""
        assert self.inflate_indexes is not None
        if section.data_size <= WHOLE_SECTION_MAX_BYTES:  # data_size: the size inflated
            return None
        header = struct_parse(self.structs.Elf_Chdr, self.stream, stream_pos=section["sh_offset"])
        if header["ch_type"] != "ELFCOMPRESS_ZLIB":
            return None
        header_size = self.structs.Elf_Chdr.sizeof()
        start = section["sh_offset"] + header_size
        index = self.inflate_indexes.get(section.name)
        if index is None:
            index = InflateIndex.build(self.stream, start, section["sh_size"] - header_size, section.data_size)
            self.inflate_indexes[section.name] = index
        return cast(IO[bytes], IndexedInflateStream(self.stream, start, index))
