"""Inlined Go frames from the pclntab inline tree, against the Go runtime's own view.

The fixture program is built with inlining on; the compiler confirms (``-gcflags=-m``) that
``leaf`` is inlined into ``middle`` and both into ``outer``. The program prints the return
PC of its call to ``capture`` (inside the doubly inlined code) and the frames
``runtime.CallersFrames`` expands for its stack: our table must give the same functions,
files and lines for that PC, in plain and stripped builds.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from agent.runtimes.go.pclntab import GoSymbolTable
from integration.go_toolchains import GoToolchain, system
from tests.conftest import TOOLCHAINS, GoBuilds

SOURCE = Path(__file__).resolve().parent / "fixtures" / "go_inline"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    out = tmp_path_factory.mktemp("go_inline")
    go = system()
    plain = out / "plain"
    # The compiler's inlining decisions are its -gcflags=-m report on stderr.
    decisions = subprocess.run([str(go.go), "build", "-gcflags=-m", "-o", str(plain), "main.go"], cwd=SOURCE,
                               env=go.env(out / "cache"), check=True, capture_output=True, text=True).stderr
    return decisions, plain, go.build(SOURCE, out / "stripped", "stripped", cache=out / "cache")


def runtime_view(binary: Path) -> tuple[int, list[tuple[str, str, int]]]:
    """(return PC inside the inlined code, [(function, file, line)] per runtime.CallersFrames)."""
    text = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    pc = int(re.search(r"^pc (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    frames = [(m.group(1), m.group(2), int(m.group(3))) for m in re.finditer(r"^frame (\S+) (\S+) (\d+)$", text, re.M)]
    return pc, frames


def test_compiler_inlines_the_fixture(built: tuple[str, Path, Path]) -> None:
    decisions, _, _ = built
    assert "inlining call to leaf" in decisions and "inlining call to middle" in decisions
    assert "inlining call to outer" not in decisions  # outer is the real (physical) frame


@pytest.mark.parametrize(("toolchain", "variant"), [pytest.param(t, v, id=f"{t.version}-{v}")
                                                    for t in TOOLCHAINS for v in ("plain", "stripped")])
def test_inlined_frames_match_runtime_callers_frames(go_builds: GoBuilds, toolchain: GoToolchain,
                                                     variant: str) -> None:
    binary = go_builds.get(SOURCE, toolchain, variant)
    pc, truth = runtime_view(binary)
    physical = [f[0] for f in truth].index("main.outer") + 1
    assert [f[0] for f in truth[:physical]] == ["main.leaf", "main.middle", "main.outer"]
    table = GoSymbolTable.from_elf(str(binary))
    assert table is not None and table.gofunc is not None  # found via moduledata even when stripped
    ours = [(f.function, f.file, f.line) for f in table.lookup_inline(pc - 1)]  # call site of a return PC
    assert ours == truth[:physical]
    # Without inline expansion the same PC is one frame: outer's name, leaf's line.
    assert (table.lookup(pc - 1).function, table.lookup(pc - 1).line) == ("main.outer", truth[0][2])  # type: ignore[union-attr]


def test_every_instruction_of_outer_is_consistent_with_objdump(built: tuple[str, Path, Path]) -> None:
    """For each instruction, the innermost frame has objdump's file:line and the outermost is outer."""
    _, plain, _ = built
    text = system().tool("objdump", "-s", "^main.outer$", str(plain))
    rows = [(int(m.group(3), 16), m.group(1), int(m.group(2)))
            for m in re.finditer(r"^\s+(\S+):(\d+)\s+0x([0-9a-f]+)\s", text, re.M)]
    table = GoSymbolTable.from_elf(str(plain))
    assert rows and table is not None
    depths = set()
    for pc, file, line in rows:
        frames = table.lookup_inline(pc)
        assert (os.path.basename(frames[0].file), frames[0].line) == (file, line), hex(pc)
        assert frames[-1].function == "main.outer"
        depths.add(len(frames))
    assert depths >= {1, 3}  # outer's own code and code two inlining levels deep
