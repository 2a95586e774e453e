"""agent/elf_symbols.py: a few named symbols, read with struct, against pyelftools' answers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent.elf_symbols import _name_offsets, find_symbols


def _pyelftools(path: str, section_name: str, name: str) -> tuple[int, int] | None:
    """The first defined symbol called ``name`` in ``section_name``, by pyelftools."""
    with open(path, "rb") as stream:
        section = ELFFile(stream).get_section_by_name(section_name)
        assert isinstance(section, SymbolTableSection)
        for symbol in section.get_symbol_by_name(name) or []:
            if symbol["st_shndx"] != "SHN_UNDEF":
                return symbol["st_value"], symbol["st_size"]
    return None


def _libc() -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/libc.so" in path or "/libc-" in path:
            return path
    pytest.skip("no libc mapped")


@pytest.mark.parametrize("names", [("_PyRuntime", "Py_Version", "_PyEval_EvalFrameDefault", "PyList_New"),
                                   ("no_such_symbol_here", "Py_Version")])
def test_the_interpreters_symbols_as_pyelftools_reads_them(names: tuple[str, ...]) -> None:
    path = str(Path(sys.executable).resolve())
    with open(path, "rb") as stream:
        found = find_symbols(ELFFile(stream), names, (".dynsym",))
    expected = {name: value for name in names if (value := _pyelftools(path, ".dynsym", name)) is not None}
    assert found == expected
    assert "Py_Version" in found  # the interpreter exports it (3.11+): the test compares something


def test_undefined_imports_are_not_answered() -> None:
    """libc defines ``malloc`` and does not define ``_PyRuntime``; the interpreter imports
    ``malloc`` from libc (an undefined symbol, value 0), which is not an answer."""
    libc = _libc()
    with open(libc, "rb") as stream:
        found = find_symbols(ELFFile(stream), ("malloc", "_PyRuntime"), (".dynsym",))
    assert found == {"malloc": _pyelftools(libc, ".dynsym", "malloc")} and found["malloc"][0] > 0
    path = str(Path(sys.executable).resolve())
    with open(path, "rb") as stream:
        assert "malloc" not in find_symbols(ELFFile(stream), ("malloc",), (".dynsym",))


def test_a_name_stored_as_the_tail_of_another_is_found_at_both_offsets() -> None:
    """Linkers may share a string's tail ("X_PyRuntime" serves "_PyRuntime" one byte in)."""
    strtab = b"\0X_PyRuntime\0_PyRuntime\0_PyRuntimeState\0"
    assert _name_offsets(strtab, ["_PyRuntime"]) == {2: "_PyRuntime", 13: "_PyRuntime"}
    assert _name_offsets(strtab, ["PyRuntime", "absent"]) == {3: "PyRuntime", 14: "PyRuntime"}
