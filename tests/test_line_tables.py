"""Whole DWARF line tables: decoded by the agent's own decoder, they equal pyelftools' rows.

pyelftools' line-program state machine is the reference decoder here; the agent decodes
whole tables with ``collect_rows_fast`` (no objects per row, which kept Python's allocator
arenas resident: docs/design/overhead.md) and must give exactly the same table.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from elftools.elf.elffile import ELFFile

from agent.symbols.dwarf_lines import CuLineIndex, LineTable, collect_rows, whole_line_table

FIXTURE = Path(__file__).parent / "fixtures" / "symbols_target.c"


@pytest.mark.parametrize("flags", [("-O0",), ("-O2", "-ffunction-sections")])
def test_whole_table_equals_pyelftools_rows(tmp_path: Path, flags: tuple[str, ...]) -> None:
    exe = tmp_path / "target"
    subprocess.run(["gcc", "-g", *flags, "-o", str(exe), str(FIXTURE)], check=True)
    with open(exe, "rb") as f:
        elf = ELFFile(f)
        ours = whole_line_table(elf.get_dwarf_info())
        dwarf = elf.get_dwarf_info()
        reference: list[tuple[int, str, int]] = []
        for cu in dwarf.iter_CUs():
            program = dwarf.line_program_for_CU(cu)
            if program is not None:
                collect_rows(program, cu, reference)
    expected = LineTable(reference)
    assert len(ours) == len(expected) > 10
    assert list(ours.addrs) == list(expected.addrs)
    rows = [ours.lookup(a) for a in ours.addrs]
    assert rows == [expected.lookup(a) for a in expected.addrs]
    assert any(name.endswith("symbols_target.c") and line > 0 for name, line in rows)
    assert ours.lookup(0) == ("", 0)


class _Aranges:
    def __init__(self, entries: list[SimpleNamespace]) -> None:
        self.entries = entries


class _Dwarf:
    """Two CUs covering [0x1000, 0x2000) and [0x2000, 0x3000), without line programs."""

    def get_aranges(self) -> _Aranges:
        return _Aranges([SimpleNamespace(begin_addr=0x1000, length=0x1000, info_offset=0),
                         SimpleNamespace(begin_addr=0x2000, length=0x1000, info_offset=100)])

    def get_CU_at(self, offset: int) -> int:
        return offset

    def line_program_for_CU(self, cu: int) -> None:
        return None


def test_kept_debug_sections_are_let_go_after_an_idle_while() -> None:
    opened: list[_Dwarf] = []

    def open_dwarf() -> _Dwarf:
        opened.append(_Dwarf())
        return opened[-1]

    index = CuLineIndex(open_dwarf, "lib.debug")
    assert len(opened) == 1  # the index itself
    assert index.lookup(0x1800) == ("", 0)
    assert len(opened) == 2 and CuLineIndex._recent is not None and CuLineIndex._recent[1] is opened[1]
    assert not CuLineIndex.forget_idle_dwarf(idle_s=3600)  # just used: kept
    assert index.lookup(0x1804) == ("", 0) and len(opened) == 2  # a decoded CU needs no sections
    assert CuLineIndex.forget_idle_dwarf(idle_s=0)
    assert CuLineIndex._recent is None and not CuLineIndex.forget_idle_dwarf(idle_s=0)
    assert index.lookup(0x2800) == ("", 0) and len(opened) == 3  # a new CU opens the file again
