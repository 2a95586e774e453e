"""The pclntab parser against each toolchain's own tools, for every Go release installed.

For the goroutine workload built by every toolchain (integration/go_toolchains.py: Debian's
1.19 and 1.21 ... 1.27), plain, stripped (``-s -w``) and PIE:
(and -trimpath with the newest):
- every function our table lists is `go tool nm`'s symbol of that name at that address
  (plain and PIE: stripped builds have no symbol table);
- at the entry of every function and up to 15 more addresses spread over its code,
  function, file and line equal `go tool addr2line` of the same toolchain (which, like
  ``lookup``, names the physical function and the innermost file:line);
- at the same addresses, the inlined frames equal the runtime's own expansion
  (runtime.CallersFrames inside the binary: its "frames" command).
Go 1.26 stopped writing the text start into the pclntab header (0): these tests are what
catch a parser that uses it. `go tool objdump` gives the same per-instruction truth but takes
~30 s per binary here, so it is used for a few functions of the system toolchain's build.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.runtimes.go.pclntab import (
    FRAME_ENTRY_BYTES,
    INLINE_ENTRY_BYTES,
    SP_ENTRY_BYTES,
    GoSymbolTable,
    load_go_table,
)
from integration.go_toolchains import GoToolchain
from tests.conftest import GO_CACHE, TOOLCHAINS, VARIANTS, GoBuilds

MATRIX = [pytest.param(t, v, id=f"{t.version}-{v}") for t in TOOLCHAINS for v in VARIANTS]
# -trimpath changes only the file names the pclntab holds: checked with the newest release.
WITH_TRIMPATH = [*MATRIX, *(pytest.param(t, "trimpath", id=f"{t.version}-trimpath") for t in TOOLCHAINS[-1:])]
POINTS_PER_FUNCTION = 16
# Frames the runtime leaves out of CallersFrames (funcID wrapper: method wrappers, defer/go
# statement wrappers, method values); the symbolizer keeps them, as they are in the code.
WRAPPER = re.compile(r"\.(deferwrap|gowrap)\d+$|-fm$")


def sample_addresses(table: GoSymbolTable) -> list[int]:
    """Every function's entry and up to POINTS_PER_FUNCTION - 1 more addresses inside it."""
    out = []
    for i in range(len(table.func_offsets)):
        lo, hi = table.entries[i], table.entries[i + 1]
        out.extend(range(lo, hi, max(1, (hi - lo) // POINTS_PER_FUNCTION)))
    return out


def reading_toolchain(toolchain: GoToolchain, variant: str) -> GoToolchain:
    """The toolchain whose tools read this build: its own, except Go 1.19's tools, which
    look for the pclntab only in .gopclntab (its PIE builds have .data.rel.ro.gopclntab)."""
    if variant == "pie" and toolchain.minor < 20:
        return next(t for t in TOOLCHAINS if t.minor >= 20)
    return toolchain


def tool(toolchain: GoToolchain, *args: str, stdin: str = "") -> str:
    return subprocess.run([str(toolchain.go), "tool", *args], input=stdin, capture_output=True, text=True,
                          check=True, env=toolchain.env(GO_CACHE / toolchain.version)).stdout


def for_print(name: str) -> str:
    """A function name as the runtime prints it: generic shapes shown as [...]."""
    i, j = name.find("["), name.rfind("]")
    return name if i < 0 or j < i else name[:i] + "[...]" + name[j + 1:]


@pytest.mark.parametrize(("toolchain", "variant"), WITH_TRIMPATH)
def test_every_function_matches_nm_and_addr2line(go_builds: GoBuilds, toolchain: GoToolchain, variant: str) -> None:
    exe = go_builds.get("goroutines", toolchain, variant)
    table = GoSymbolTable.from_elf(str(exe))
    assert table is not None and len(table.func_offsets) > 1000
    if variant != "stripped":
        nm: dict[int, set[str]] = {}
        for line in tool(toolchain, "nm", str(exe)).splitlines():
            address, kind, name = line.split(maxsplit=2)
            if kind in "Tt":  # ABI0 wrappers and assembly carry their ABI in the symbol name only
                nm.setdefault(int(address, 16), set()).add(name.removesuffix(".abi0"))
        for i in range(len(table.func_offsets)):
            name = table.function_name(i)
            assert table.entries[i] in nm, name
            # Compiler-made equality functions have a shorter name in the pclntab than the
            # symbol (which spells out the type); the address is what matters for them.
            assert name in nm[table.entries[i]] or name.startswith(("type:.eq.", "type..eq.")), name
    addresses = sample_addresses(table)
    answer = tool(reading_toolchain(toolchain, variant), "addr2line", str(exe),
                  stdin="".join(f"{a:#x}\n" for a in addresses)).splitlines()
    assert len(answer) == 2 * len(addresses)
    for k, address in enumerate(addresses):
        function, position = answer[2 * k], answer[2 * k + 1]
        file, line = position.rsplit(":", 1)
        frame = table.lookup(address)
        assert frame is not None, hex(address)
        # addr2line prints file "" and line -1 for the padding after a function's code.
        assert (frame.function, frame.file, frame.line) == (function, file, max(int(line), 0)), hex(address)
    worker = {table.lookup(a).file for a in addresses if table.lookup(a).function == "main.worker"} - {""}  # type: ignore[union-attr]
    # -trimpath leaves no build directory in file names ("./main.go" for a GOPATH-less build).
    assert len(worker) == 1 and worker.pop().endswith("goroutines/main.go") != (variant == "trimpath")


@pytest.mark.parametrize(("toolchain", "variant"), MATRIX)
def test_inlined_frames_match_the_runtime(go_builds: GoBuilds, toolchain: GoToolchain, variant: str) -> None:
    exe = go_builds.get("goroutines", toolchain, variant)
    table = GoSymbolTable.from_elf(str(exe))
    assert table is not None and table.gofunc is not None  # found via moduledata: stripped and PIE too
    # CallersFrames is given pc+1 (a return address): skip a pc whose pc+1 is in the next function.
    addresses = [a for a in sample_addresses(table) if table.function_index(a + 1) == table.function_index(a)]
    worker = table.function_entry("main.worker")
    assert worker is not None
    request = f"frames\n{worker:x}\n" + "".join(f"{a:x}\n" for a in addresses) + "end\nexit\n"
    lines = subprocess.run([str(exe)], input=request, capture_output=True, text=True, check=True,
                           timeout=120).stdout.splitlines()[1:]  # after "ready PID"
    assert len(lines) == len(addresses)
    inlined = shorter = 0
    for address, line in zip(addresses, lines, strict=True):
        truth = []
        for part in line.split("|"):
            function, file, number = part.rsplit(" ", 2)
            truth.append((function, "" if file == "?" else file, int(number)))
        ours = [(for_print(f.function), f.file, f.line) for f in table.lookup_inline(address)]
        inlined += len(ours) > 1
        # The runtime names the module's first function "" (its name offset is 0).
        truth = [(o[0] if t[0] == "" and o[0] == for_print(table.function_name(0)) else t[0], t[1], t[2])
                 for t, o in zip(truth, ours, strict=False)]
        if toolchain.minor < 23:
            # Before Go 1.23 (1.21 checked), CallersFrames expands inlined callers only from
            # the extra PCs runtime.Callers inserts: given one PC it returns the innermost
            # frame (tests/test_go_inline.py checks whole chains from runtime.Callers).
            assert truth == ours[:1], (hex(address), truth, ours)
            continue
        unwrapped = [ours[0], *(o for o in ours[1:] if o[1] != "<autogenerated>" and not WRAPPER.search(o[0]))]
        if truth in (ours, unwrapped):
            continue
        # A handful of PCs (reflect.callMethod's inlined callees) where the runtime stops
        # one caller early: its frames must still be ours, in order.
        assert len(truth) < len(ours) and truth == ours[:len(truth)], (hex(address), truth, ours)
        shorter += 1
    assert inlined > len(addresses) // 20  # inlined code is common: the expansion is exercised
    assert shorter <= len(addresses) // 1000, shorter


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


def test_memory_held_counts_the_lookup_caches(binaries: tuple[Path, Path]) -> None:
    """What the symbolizer's file cache is told a table holds grows with its lookup caches,
    by each cache's measured bytes an entry, besides the pclntab blocks the lookups read."""
    _, stripped = binaries
    with open(stripped, "rb") as f:
        table = load_go_table(ELFFile(f))  # its own table, not the one shared with other tests
        assert table is not None
        before, blocks_before = table.nbytes(), table.block_bytes()
        pcs = [table.entries[i] + 1 for i in range(0, len(table.func_offsets), 7)]
        assert len(pcs) > 100
        for pc in pcs:
            table.sp_delta(pc)
            table.lookup_inline(pc)  # the frame cache too: the physical function's frame
            table.lookup_inline(pc)  # cached: no second entry
        grown = table.nbytes() - before - (table.block_bytes() - blocks_before)
    assert grown == (SP_ENTRY_BYTES + FRAME_ENTRY_BYTES + INLINE_ENTRY_BYTES) * len(pcs)
