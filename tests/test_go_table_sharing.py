"""One Go symbol table per Go binary for the whole agent (goroutine actor and symbolizer)."""

from __future__ import annotations

import gc
import io
import os
import weakref
from pathlib import Path

from elftools.elf.elffile import ELFFile

from agent.file_region import BLOCK_BYTES, CACHED_BLOCKS, FileRegion
from agent.runtimes.go.pclntab import GoSymbolTable, load_go_table, shared_go_table
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


def test_a_go_binary_rewritten_in_place_falls_back_to_elf_symbols_counted(binaries: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """The table reads its file as lookups come: a binary cut short in place afterwards (an
    in-place reinstall once its processes have gone) is a counted, logged fallback for the
    addresses not decoded yet, never a crash (a mapped file would SIGBUS there)."""
    from agent.symbols import Symbolizer

    copy = tmp_path / "goroutines"
    copy.write_bytes(binaries[0].read_bytes())
    symbolizer = Symbolizer()
    with open(copy, "rb") as f:
        elf = ElfSymbols(f, str(copy))
        table = elf.go_table()
        assert table is not None
        main = table.function_entry("main.main")
        assert main is not None and symbolizer._go_frames(elf, main)[-1].function == "main.main"
        other = table.entries[len(table.func_offsets) // 2]  # in the runtime, far from main.main
        os.truncate(copy, 4096)
        assert symbolizer._go_frames(elf, other) == ()
        assert symbolizer.stats["go_table_errors"] == 1
        assert symbolizer._go_frames(elf, main)[-1].function == "main.main"  # decoded before: kept
