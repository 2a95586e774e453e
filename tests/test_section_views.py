"""DWARF read in place (agent/symbols/section_views.py) gives what pyelftools' copies give.

Known answer: pyelftools' own decoding (``collect_rows`` over an ``ELFFile`` whose sections are
copied into memory) of a program built here with gcc -g, plain and with zlib-compressed debug
sections (-gz: those take pyelftools' path); every row's address must give the same (file,
line) through a CU-by-CU index that reads the sections in place, and the plain build's
sections must be windows onto the file, not copies.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.symbols.dwarf_lines import CuLineIndex, collect_rows
from agent.symbols.section_views import FileWindow, ViewingELFFile

FIXTURE = Path(__file__).parent / "fixtures" / "symbols_target.c"


def _pyelftools_rows(path: Path) -> list[tuple[int, str, int]]:
    rows: list[tuple[int, str, int]] = []
    with open(path, "rb") as f:
        dwarf = ELFFile(f).get_dwarf_info()
        for cu in dwarf.iter_CUs():
            program = dwarf.line_program_for_CU(cu)
            if program is not None:
                collect_rows(program, cu, rows)
    return rows


@pytest.mark.parametrize("flags", [(), ("-gz",)])
def test_cu_index_over_file_windows_equals_pyelftools(tmp_path: Path, flags: tuple[str, ...]) -> None:
    exe = tmp_path / "target"
    subprocess.run(["gcc", "-g", "-O1", *flags, "-o", str(exe), str(FIXTURE)], check=True)
    rows = _pyelftools_rows(exe)
    assert len(rows) > 10
    with open(exe, "rb") as f:
        dwarf = ViewingELFFile(f).get_dwarf_info()
        windowed = isinstance(dwarf.debug_info_sec.stream, FileWindow)
        assert windowed == (not flags)  # compressed sections are decompressed into memory as before
        index = CuLineIndex(lambda: ViewingELFFile(f).get_dwarf_info(), str(exe))
        # The last row at an address wins in a sorted table (as LineTable keeps it).
        expected = {address: (file, line) for address, file, line in sorted(rows, key=lambda r: r[0])}
        for address, answer in expected.items():
            if answer != ("", 0):  # end-of-sequence addresses may start the next sequence
                assert index.lookup(address) == answer, hex(address)


def test_file_window_reads_only_its_part_of_the_file() -> None:
    base = io.BytesIO(bytes(range(100)))
    window = FileWindow(base, 10, 20)
    assert window.read(5) == bytes(range(10, 15)) and window.tell() == 5
    window.seek(-3, io.SEEK_END)
    assert window.read() == bytes(range(27, 30)) and window.read(4) == b""
    window.seek(2)
    base.seek(90)  # another user moved the shared file: the window does not care
    window.seek(1, io.SEEK_CUR)
    assert window.read(2) == bytes(range(13, 15))
