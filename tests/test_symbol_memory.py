"""What an ElfSymbols keeps: its arrays and open file, not pyelftools' parsed ELFFile.

Known answers from the toolchain: ``nm`` gives a function's address, ``addr2line`` the line
of that address; both must still come out after the parsed file has been let go, and no
``ELFFile`` (section headers, structure definitions: ~80 KB of small objects a file) may be
reachable from the object, before or after its line table is built.
"""

from __future__ import annotations

import gc
import subprocess
from pathlib import Path

from elftools.elf.elffile import ELFFile

from agent.symbols.elf import ElfSymbols
from tests.test_symbols import build


def _reachable(root: object, limit: int = 200_000) -> list[object]:
    """Objects reachable from ``root`` through references (modules and classes not followed)."""
    seen, todo, found = {id(root)}, [root], []
    while todo and len(seen) < limit:
        obj = todo.pop()
        found.append(obj)
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not isinstance(ref, type) and type(ref).__name__ != "module":
                seen.add(id(ref))
                todo.append(ref)
    return found


def _nm_address(exe: Path, name: str) -> int:
    for line in subprocess.run(["nm", str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == name:
            return int(fields[0], 16)
    raise AssertionError(f"{name} not in nm output")


def test_no_parsed_elf_file_is_kept_and_lookups_still_answer(tmp_path: Path) -> None:
    exe = build(tmp_path)
    address = _nm_address(exe, "leaf_function")
    where = subprocess.run(["addr2line", "-e", str(exe), hex(address)], capture_output=True, text=True,
                           check=True).stdout.strip()
    file, line = where.rsplit(":", 1)
    with open(exe, "rb") as f:
        symbols = ElfSymbols(f, str(exe))
        assert not any(isinstance(o, ELFFile) for o in _reachable(symbols))
        assert symbols.function(address) == "leaf_function"
        assert symbols.line(address) == (file, int(line))
        assert not any(isinstance(o, ELFFile) for o in _reachable(symbols))  # the line table's parse let go too


def _pyelftools_functions(path: str) -> list[tuple[int, int, str]]:
    """(start, end, name) by pyelftools' own symbol reading, with the agent's rules: .symtab
    else .dynsym, functions and ifuncs with an address in a section, the largest of several at
    one address (the first of equal sizes)."""
    from elftools.elf.sections import SymbolTableSection

    with open(path, "rb") as f:
        elf = ELFFile(f)
        for name in (".symtab", ".dynsym"):
            section = elf.get_section_by_name(name)
            if not isinstance(section, SymbolTableSection):
                continue
            best: dict[int, tuple[int, str]] = {}
            for sym in section.iter_symbols():
                function = sym["st_info"]["type"] in ("STT_FUNC", "STT_LOOS", "STT_GNU_IFUNC")
                if not function or sym["st_shndx"] == "SHN_UNDEF":
                    continue
                value, size = sym["st_value"], sym["st_size"]
                if value and (value not in best or size > best[value][0] - value):
                    best[value] = (value + size, sym.name)
            if best:
                return [(v, best[v][0], best[v][1]) for v in sorted(best)]
    return []


def test_function_symbols_equal_pyelftools(tmp_path: Path) -> None:
    from agent.symbols.elf import _function_symbols

    exe = build(tmp_path)
    for path in (str(exe), "/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"):
        with open(path, "rb") as f:
            starts, ends, names = _function_symbols(ELFFile(f))
        got = [(starts[i], ends[i], names[i]) for i in range(len(starts))]
        expected = _pyelftools_functions(path)
        assert len(expected) >= 5 and got == expected, path
