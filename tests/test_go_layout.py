"""runtime.g offsets and runtime.allgs, and reading goroutines from a live Go process.

The per-version table's Go 1.19 row must equal what the binary's DWARF says; the address
picked for runtime.allgs must be the symbol's (per `go tool nm`) and must work on a stripped
build; the reader's bounds must hold (goroutines cut at the limit and counted, stacks cut at
the depth limit and counted as truncated).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.go_goroutines import GoroutineReader, ReadStats
from agent.go_layout import G_LAYOUTS, go_minor, layout_from_dwarf
from agent.go_runtime import GoRuntimeInfo, go_runtime_info
from agent.symbols.gopclntab import GoSymbolTable


def info(path: Path) -> GoRuntimeInfo:
    st = os.stat(path)
    found = go_runtime_info(str(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    assert found is not None
    return found


@pytest.fixture
def running(binaries: tuple[Path, Path], request: pytest.FixtureRequest) -> Iterator[tuple[Path, int]]:
    exe = binaries[0] if request.param == "plain" else binaries[1]
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout
    proc.stdout.readline()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().split() == ["count", "111"]
    yield exe, proc.pid
    proc.stdin.write("exit\n")
    proc.stdin.flush()
    proc.wait(timeout=30)


def test_go_minor() -> None:
    assert go_minor("go1.19.8") == 19 and go_minor("go1.23rc1") == 23 and go_minor("devel +abc") is None


def test_table_matches_dwarf_for_the_installed_go(binaries: tuple[Path, Path]) -> None:
    plain, stripped = binaries
    with open(plain, "rb") as f:
        dwarf = layout_from_dwarf(ELFFile(f))
    assert dwarf is not None and dwarf.startpc is not None
    minor = go_minor(info(plain).go_version)
    assert minor is not None
    assert dataclasses.replace(dwarf, startpc=None, source="table") == G_LAYOUTS[minor]
    assert info(plain).g_layout == dwarf and info(stripped).g_layout == G_LAYOUTS[minor]


@pytest.mark.parametrize("running", ["plain", "stripped"], indirect=True)
def test_allgs_found_and_goroutines_read(running: tuple[Path, int]) -> None:
    exe, pid = running
    details = info(exe)
    assert details.g_layout is not None
    table = GoSymbolTable.from_elf(str(exe))
    assert table is not None
    reader = GoroutineReader(pid, table, details.g_layout, details.allgs)
    try:
        address = reader.locate_allgs()
        if exe.name == "plain":
            nm = subprocess.run(["go", "tool", "nm", str(exe)], capture_output=True, text=True, check=True).stdout
            symbol = next(int(line.split()[0], 16) for line in nm.splitlines() if line.endswith(" runtime.allgs"))
            assert address == symbol
        stats = ReadStats()
        goroutines = reader.read(stats)
        workers = [g for g in goroutines if g.start == "main.startWorkers.func1"]
        assert len(workers) == 100 and all(g.state == "waiting" and not g.truncated for g in workers)
        leaf = table.lookup(workers[0].pcs[0] - 1)
        assert leaf is not None and leaf.function == "runtime.gopark"
        # Bounds: only the first 50 gs are read, the rest counted; depth 2 cuts every stack.
        small = GoroutineReader(pid, table, details.g_layout, details.allgs, max_goroutines=50, max_depth=2)
        try:
            cut = ReadStats()
            few = small.read(cut)
            assert len(few) <= 50 and cut.over_limit >= 111 - 50
            assert all(len(g.pcs) <= 2 for g in few) and cut.truncated == len([g for g in few if g.pcs])
        finally:
            small.close()
    finally:
        reader.close()
