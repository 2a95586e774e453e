"""One Go symbol table per Go binary for the whole agent (goroutine actor and symbolizer)."""

from __future__ import annotations

import gc
import io
import weakref
from pathlib import Path

from elftools.elf.elffile import ELFFile

from agent.runtimes.go.pclntab import GoSymbolTable, shared_go_table
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
