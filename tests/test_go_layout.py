"""runtime.g offsets and runtime.allgs, and reading goroutines from a live Go process, for
every Go release installed (integration/go_toolchains.py).

Every row of the per-release table must equal what the DWARF of a real build by that release
says (plain and PIE builds: DWARF 5 from Go 1.25 on), and every row must have a toolchain
here to check it; every build gets the row (stripped ones have no DWARF); a release without
a row falls back to DWARF. The address picked for
runtime.allgs must be the symbol's (per that toolchain's `go tool nm`) and must work on
stripped and PIE builds; the reader must find the 100 parked workers in runtime.gopark; its
bounds must hold (goroutines cut at the limit and counted, stacks cut at the depth limit and
counted as truncated). A release newer than the checked range is refused with a reason.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.runtimes.go.buildinfo import GoRuntimeInfo, go_runtime_info
from agent.runtimes.go.goroutines import GoroutineReader, ReadStats
from agent.runtimes.go.layout import (
    G_LAYOUTS,
    NEWEST_GO_MINOR,
    go_minor,
    layout_for,
    layout_from_dwarf,
    unsupported_reason,
)
from agent.runtimes.go.pclntab import GoSymbolTable
from integration.go_toolchains import GoToolchain
from tests.conftest import GO_CACHE, TOOLCHAINS, VARIANTS, GoBuilds

BY_TOOLCHAIN = [pytest.param(t, id=t.version) for t in TOOLCHAINS]
MATRIX = [pytest.param(t, v, id=f"{t.version}-{v}") for t in TOOLCHAINS for v in VARIANTS]


def info(path: Path) -> GoRuntimeInfo:
    st = os.stat(path)
    found = go_runtime_info(str(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    assert found is not None
    return found


def test_go_minor_and_supported_range() -> None:
    assert go_minor("go1.19.8") == 19 and go_minor("go1.23rc1") == 23 and go_minor("devel +abc") is None
    assert unsupported_reason("go1.27.3") is None and unsupported_reason("go1.18") is None
    assert unsupported_reason(f"go1.{NEWEST_GO_MINOR + 1}.0") == "go_version_newer_than_supported"
    assert unsupported_reason("go1.17.13") == "go_version_too_old"
    assert unsupported_reason("devel go1.99-abc") == "go_version_unknown"


def test_every_table_row_has_a_toolchain_to_check_it() -> None:
    assert set(G_LAYOUTS) <= {t.minor for t in TOOLCHAINS}, "a row no test checks against DWARF"


@pytest.mark.parametrize("toolchain", BY_TOOLCHAIN)
def test_table_matches_dwarf(go_builds: GoBuilds, toolchain: GoToolchain) -> None:
    plain, pie, stripped = (go_builds.get("goroutines", toolchain, v) for v in ("plain", "pie", "stripped"))
    assert info(plain).go_version == f"go{toolchain.version}"
    for exe in (plain, pie):
        with open(exe, "rb") as f:
            dwarf = layout_from_dwarf(ELFFile(f))
        assert dwarf is not None and dwarf.startpc is not None, exe
        assert dataclasses.replace(dwarf, source="table") == G_LAYOUTS[toolchain.minor], exe
        assert info(exe).g_layout == G_LAYOUTS[toolchain.minor] and info(exe).startpc_offset == dwarf.startpc
    stripped_info = info(stripped)
    assert stripped_info.g_layout == G_LAYOUTS[toolchain.minor] and not stripped_info.unsupported
    assert stripped_info.startpc_offset == G_LAYOUTS[toolchain.minor].startpc  # exits tracked when stripped


def test_release_without_a_row_uses_dwarf_and_a_newer_one_is_refused(binaries: tuple[Path, Path]) -> None:
    """The same binaries, read as if a release without a row (1.20: none of its toolchain
    here), or one after the checked range, had built them."""
    plain, stripped = binaries
    with open(plain, "rb") as f:
        elf = ELFFile(f)
        from_dwarf = layout_for(elf, "go1.20.14")
        assert from_dwarf is not None and from_dwarf.source == "dwarf" and from_dwarf == layout_from_dwarf(elf)
        assert layout_for(elf, f"go1.{NEWEST_GO_MINOR + 1}.0") is None
    with open(stripped, "rb") as f:
        assert layout_for(ELFFile(f), "go1.20.14") is None  # no row, no DWARF: not guessed


@pytest.fixture
def running(go_builds: GoBuilds, request: pytest.FixtureRequest) -> Iterator[tuple[GoToolchain, str, Path, int]]:
    toolchain, variant = request.param
    exe = go_builds.get("goroutines", toolchain, variant)
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout
    proc.stdout.readline()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().split() == ["count", "111"]
    yield toolchain, variant, exe, proc.pid
    proc.stdin.write("exit\n")
    proc.stdin.flush()
    proc.wait(timeout=30)


def worker_start(toolchain: GoToolchain) -> str:
    """The closure the compiler makes for ``go worker(ch)``: Go 1.22 renamed it."""
    return "main.startWorkers.func1" if toolchain.minor < 22 else "main.startWorkers.gowrap1"


def nm_symbol(toolchain: GoToolchain, exe: Path, name: str) -> int:
    nm = subprocess.run([str(toolchain.go), "tool", "nm", str(exe)], capture_output=True, text=True, check=True,
                        env=toolchain.env(GO_CACHE / toolchain.version)).stdout
    return next(int(line.split()[0], 16) for line in nm.splitlines() if line.endswith(" " + name))


@pytest.mark.parametrize("running", [(t, v) for t in TOOLCHAINS for v in VARIANTS], indirect=True,
                         ids=[f"{t.version}-{v}" for t in TOOLCHAINS for v in VARIANTS])
def test_allgs_found_and_goroutines_read(running: tuple[GoToolchain, str, Path, int]) -> None:
    toolchain, variant, exe, pid = running
    details = info(exe)
    assert details.g_layout is not None
    table = GoSymbolTable.from_elf(str(exe))
    assert table is not None
    reader = GoroutineReader(pid, table, details.g_layout, details.allgs)
    try:
        address = reader.locate_allgs()
        assert address is not None
        if variant != "stripped":
            assert address - reader.bias == nm_symbol(toolchain, exe, "runtime.allgs")
        assert (reader.bias != 0) == (variant == "pie")
        stats = ReadStats()
        goroutines = reader.read(stats)
        start = worker_start(toolchain)
        workers = [g for g in goroutines if g.start == start]
        assert len(workers) == 100 and all(g.state == "waiting" and not g.truncated for g in workers)
        assert {g.start_pc for g in workers} == {table.function_entry(start) + reader.bias}  # type: ignore[operator]
        leaf = table.lookup(workers[0].pcs[0] - 1 - reader.bias)
        assert leaf is not None and leaf.function == "runtime.gopark"
        callers = [table.lookup(pc - 1 - reader.bias) for pc in workers[0].pcs[1:]]
        assert "main.worker" in [f.function for f in callers if f is not None]
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


def test_binary_of_a_newer_release_is_refused_once_and_keeps_its_frames(
        go_builds: GoBuilds, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The newest toolchain's stripped build with its recorded version rewritten to a release
    after the checked range (same length, in .go.buildinfo): no goroutine reading, one
    warning however often it is looked at, and the same frames as before."""
    toolchain = TOOLCHAINS[-1]
    original = go_builds.get("goroutines", toolchain, "stripped")
    future = f"go1.{NEWEST_GO_MINOR + 1}".ljust(len(f"go{toolchain.version}"), "0")
    data = original.read_bytes()
    assert data.count(f"go{toolchain.version}".encode()) >= 1
    patched = tmp_path / "future"
    patched.write_bytes(data.replace(f"go{toolchain.version}".encode(), future.encode()))
    with caplog.at_level("WARNING", logger="agent.runtimes.go.buildinfo"):
        found = [info(patched) for _ in range(3)]
    assert found[0].go_version == future and found[0].unsupported == "go_version_newer_than_supported"
    assert found[0].g_layout is None and found[0].allgs == () and found[0].startpc_offset is None
    assert len([r for r in caplog.records if "not profiled" in r.getMessage()]) == 1
    before, after = GoSymbolTable.from_elf(str(original)), GoSymbolTable.from_elf(str(patched))
    assert before is not None and after is not None
    for address in range(before.entries[0], before.entries[-1], 997):
        # (file names of the toolchain's sources carried its version too: compared by base name)
        assert [(f.function, os.path.basename(f.file), f.line) for f in after.lookup_inline(address)] == \
               [(f.function, os.path.basename(f.file), f.line) for f in before.lookup_inline(address)]
