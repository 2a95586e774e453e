"""The pclntab parser against `go tool objdump`'s file:line for every instruction."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from agent.symbols.gopclntab import GoSymbolTable


def objdump(binary: Path, symbol: str) -> list[tuple[int, str, int]]:
    """(pc, file basename, line) of every instruction of ``symbol``, per `go tool objdump`."""
    text = subprocess.run(["go", "tool", "objdump", "-s", f"^{re.escape(symbol)}$", str(binary)],
                          capture_output=True, text=True, check=True).stdout
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s+(\S+):(\d+)\s+0x([0-9a-f]+)\s", line)
        if m:
            rows.append((int(m.group(3), 16), m.group(1), int(m.group(2))))
    return rows


@pytest.mark.parametrize("symbol", ["main.worker", "main.ticker", "main.main", "main.startWorkers",
                                    "runtime.newproc1", "runtime.mallocgc"])
def test_every_instruction_matches_objdump(binaries: tuple[Path, Path], symbol: str) -> None:
    plain, stripped = binaries
    truth = objdump(plain, symbol)
    assert truth, f"objdump found no {symbol}"
    for binary in (plain, stripped):  # same layout: -s -w drops symtab and DWARF, not the pclntab
        table = GoSymbolTable.from_elf(str(binary))
        assert table is not None
        for pc, file, line in truth:
            frame = table.lookup(pc)
            assert frame is not None and frame.function == symbol, (hex(pc), frame)
            assert os.path.basename(frame.file) == file and frame.line == line, (hex(pc), frame, file, line)


def test_function_entry_and_non_go_file(binaries: tuple[Path, Path]) -> None:
    _, stripped = binaries
    table = GoSymbolTable.from_elf(str(stripped))
    assert table is not None
    entry = table.function_entry("main.worker")
    assert entry is not None and table.lookup(entry).function == "main.worker"  # type: ignore[union-attr]
    assert GoSymbolTable.from_elf("/bin/true") is None
