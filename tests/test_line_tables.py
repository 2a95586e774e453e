"""Whole DWARF line tables: decoded by the agent's own decoder, they equal pyelftools' rows.

pyelftools' line-program state machine is the reference decoder here; the agent decodes
whole tables with ``collect_rows_fast`` (no objects per row, which kept Python's allocator
arenas resident: docs/design/overhead.md) and must give exactly the same table.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.symbols.dwarf_lines import LineTable, collect_rows, whole_line_table

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
