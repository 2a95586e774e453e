"""One Go symbol table per Go binary for the whole agent (goroutine actor and symbolizer)."""

from __future__ import annotations

import gc
import io
import os
import weakref
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.file_region import BLOCK_BYTES, CACHED_BLOCKS, FileRegion
from agent.runtimes.go import pclntab
from agent.runtimes.go.pclntab import GoSymbolTable, load_go_table, pclntab_section, shared_go_table, uvarint
from agent.symbols.elf import ElfSymbols


def test_the_actor_and_the_symbolizer_share_one_table_per_file(binaries: tuple[Path, Path]) -> None:
    plain, stripped = binaries
    actors = GoSymbolTable.from_elf(str(plain))
    assert actors is not None
    with open(plain, "rb") as f:
        symbolizers = ElfSymbols(f, str(plain)).go_table()
        assert symbolizers is actors  # the same object, not a second copy of .gopclntab
        entry = actors.function_entry("main.main")
        frame = symbolizers.lookup(entry) if entry is not None else None
        assert frame is not None and frame.function == "main.main"
    other = GoSymbolTable.from_elf(str(stripped))
    assert other is not None and other is not actors  # another file, its own table
    ref = weakref.ref(actors)
    del actors, symbolizers
    gc.collect()
    assert ref() is None  # held only by its users: freed with the last one


def test_in_memory_images_are_not_shared(binaries: tuple[Path, Path]) -> None:
    image = binaries[0].read_bytes()
    first = shared_go_table(ELFFile(io.BytesIO(image)))
    second = shared_go_table(ELFFile(io.BytesIO(image)))
    assert first is not None and second is not None and first is not second


def test_a_table_read_from_its_file_answers_as_the_copied_section_does(binaries: tuple[Path, Path]) -> None:
    """A table loaded from a file reads its pclntab and funcdata from the file as lookups
    need them: every frame (inlined calls included), SP delta and entry it gives equals what
    the same table over a copy of the sections gives, and it holds at most its block cache,
    a fraction of the pclntab."""
    plain = binaries[0]
    copied = load_go_table(ELFFile(io.BytesIO(plain.read_bytes())))
    with open(plain, "rb") as f:
        from_file = load_go_table(ELFFile(f))
    assert copied is not None and from_file is not None  # the file is closed: its own descriptor reads
    assert isinstance(from_file.data, FileRegion) and isinstance(from_file.gofunc, FileRegion)
    pcs = [pc for start, end in zip(copied.entries, copied.entries[1:], strict=False)
           for pc in (start, start + (end - start) // 3, start + 2 * (end - start) // 3)]
    assert len(pcs) > 3000
    assert [from_file.lookup_inline(pc) for pc in pcs] == [copied.lookup_inline(pc) for pc in pcs]
    assert [from_file.sp_delta(pc) for pc in pcs] == [copied.sp_delta(pc) for pc in pcs]
    assert any(len(copied.lookup_inline(pc)) > 1 for pc in pcs)  # inlined calls were compared too
    names = ("main.main", "runtime.goexit", "runtime.allgadd")
    entries = copied.function_entries(names)
    assert from_file.function_entries(names) == entries and len(entries) == 3
    held = from_file.data.resident_bytes()
    assert 0 < held <= CACHED_BLOCKS * BLOCK_BYTES < len(copied.data) == copied.data.resident_bytes()


@pytest.mark.parametrize("rewrite", ["cut_short", "same_size"])
def test_a_go_binary_rewritten_in_place_falls_back_to_elf_symbols_counted(binaries: tuple[Path, Path],
                                                                          tmp_path: Path, rewrite: str) -> None:
    """The table reads its file as lookups come: a binary rewritten in place afterwards (an
    in-place reinstall once its processes have gone), cut short or at the same size, is a
    counted, logged fallback to the file's ELF symbols for the addresses not decoded yet,
    never a crash (a mapped file would SIGBUS) and never the new bytes read as the old
    table."""
    from agent.symbols import Symbolizer

    copy = tmp_path / "goroutines"
    image = binaries[0].read_bytes()
    copy.write_bytes(image)
    copied = load_go_table(ELFFile(io.BytesIO(image)))
    assert copied is not None
    symbolizer = Symbolizer()
    with open(copy, "rb") as f:
        elf = ElfSymbols(f, str(copy))
        table = elf.go_table()
        assert table is not None
        main = table.function_entry("main.main")
        assert main is not None and symbolizer._go_frames(elf, main)[-1].function == "main.main"
        other = table.entries[len(table.func_offsets) // 2] + 1  # in the runtime, far from main.main
        if rewrite == "cut_short":
            os.truncate(copy, 4096)
        else:
            stat = copy.stat()
            with open(copy, "r+b") as w:
                w.seek(table.data._offset + 4096)  # type: ignore[attr-defined]
                w.write(bytes(len(image) - table.data._offset - 4096))  # type: ignore[attr-defined]
            os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        assert symbolizer._go_frames(elf, other) == ()
        assert symbolizer.stats["go_table_errors"] == 1
        assert elf.go_table() is None  # dropped: named from the ELF symbols read at the opening
        expected = copied.lookup(other)
        assert expected is not None and elf.function(other) == expected.function
        assert symbolizer._go_frames(elf, main) == () and symbolizer.stats["go_table_errors"] == 1  # logged once


def test_one_descriptor_per_go_table(binaries: tuple[Path, Path], tmp_path: Path) -> None:
    copy = tmp_path / "goroutines"
    copy.write_bytes(binaries[0].read_bytes())
    before = len(os.listdir("/proc/self/fd"))
    table = GoSymbolTable.from_elf(str(copy))
    assert table is not None and table.gofunc is not None  # pclntab and funcdata both read from it
    assert len(os.listdir("/proc/self/fd")) == before + 1
    del table
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def _pc_value_whole(data: bytes, pctab: int, table_off: int, entry: int, target: int, min_lc: int) -> int:
    """A pc-value table's value at ``target`` decoded over the whole pclntab in one piece."""
    pos, pc, value, first = pctab + table_off, entry, -1, True
    while True:
        delta, pos = uvarint(data, pos)
        if delta == 0 and not first:
            return -1
        value += -(delta >> 1) - 1 if delta & 1 else delta >> 1
        pc_delta, pos = uvarint(data, pos)
        pc += pc_delta * min_lc
        first = False
        if target < pc:
            return value


@pytest.mark.parametrize("chunk", [21, 23, 37])
def test_pc_value_tables_read_in_small_chunks_equal_the_whole_decode(binaries: tuple[Path, Path],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     chunk: int) -> None:
    """Tables are read PC_VALUE_CHUNK bytes at a time and read again across a chunk's end:
    with chunks a little over the 20 bytes a step can take, nearly every table is refilled,
    and every value equals the decode over the whole pclntab."""
    image = binaries[0].read_bytes()
    with open(binaries[0], "rb") as f:
        table = load_go_table(ELFFile(f))
    assert table is not None
    section = pclntab_section(ELFFile(io.BytesIO(image)))
    assert section is not None
    whole = section.data()
    monkeypatch.setattr(pclntab, "PC_VALUE_CHUNK", chunk)
    checked = 0
    for i in range(0, len(table.func_offsets), 3):
        entry, end = table.entries[i], table.entries[i + 1]
        _name, pcfile, pcln, _cu = table._func(i)
        for off in (pcln, pcfile, table.pcsp(i)):
            if not off:
                continue
            for pc in (entry, (entry + end) // 2, end - 1):
                ours = table._pc_value(off, entry, pc)
                assert ours == _pc_value_whole(whole, table.pctab_off, off, entry, pc, table.min_lc), (i, off, pc)
                checked += 1
    assert checked > 3000
