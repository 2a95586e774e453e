"""Separate debug files (by build id, by .gnu_debuglink) and module-relative frames.

Ground truth: the target program prints its own addresses and lines; binutils makes the
debug files (``objcopy --only-keep-debug``, ``--add-gnu-debuglink``) and says where libc's
local functions are (``nm`` on libc6-dbg's file, ``readelf -l`` on libc); the kernel's
/proc/PID/maps says which file offset an address is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.symbols import Symbolizer
from agent.symbols.debuginfo import DebugFileFinder
from agent.symbols.dwarf_lines import CuLineIndex
from agent.symbols.elf import MAX_LINE_PROGRAM_BYTES
from aggregator.exporters.pprof import unknown_frame_label
from tests.test_symbols import Target, build, file_offset

DEBUG_DIR = "/usr/lib/debug"


def _split_debug(exe: Path, debug_file: Path, link: bool = False) -> None:
    """Move ``exe``'s symbols and DWARF into ``debug_file`` and strip ``exe`` (as packagers do)."""
    debug_file.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["objcopy", "--only-keep-debug", str(exe), str(debug_file)], check=True)
    subprocess.run(["strip", "--strip-all", str(exe)], check=True)
    if link:
        subprocess.run(["objcopy", f"--add-gnu-debuglink={debug_file}", str(exe)], check=True)


def _build_id(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", out)
    assert match, out
    return match.group(1)


def test_stripped_binary_named_from_its_build_id_debug_file(tmp_path: Path) -> None:
    exe = build(tmp_path, "-Wl,--build-id")
    build_id = _build_id(exe)
    debug_root = tmp_path / "debug"
    _split_debug(exe, debug_root / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug")
    empty = tmp_path / "empty"
    empty.mkdir()
    t = Target(exe)
    try:
        leaf_addr, leaf_line = t.truth["leaf_function"]
        with_debug = Symbolizer(debug_directories=[str(debug_root)])
        (leaf,) = with_debug.symbolize_user(t.pid, [leaf_addr])
        assert (leaf.function, leaf.line) == ("leaf_function", leaf_line)
        assert leaf.filename.endswith("symbols_target.c")
        assert with_debug.stats["debug_files_found"] == 1
        without = Symbolizer(debug_directories=[str(empty)])
        (bare,) = without.symbolize_user(t.pid, [leaf_addr])
        assert (bare.function, bare.line) == ("", 0)
        # Named or not, the frame is the same module-relative location.
        assert bare.address == leaf.address == file_offset(t.pid, leaf_addr)
        assert bare.mapping == leaf.mapping and without.stats["debug_files_missing"] == 1
        assert unknown_frame_label(bare) == f"target+{file_offset(t.pid, leaf_addr):#x}"
    finally:
        t.stop()


def test_debuglink_is_followed_and_a_wrong_file_rejected(tmp_path: Path) -> None:
    """Without a build id, .gnu_debuglink names the file and its CRC-32 proves it is the right one."""
    exe = build(tmp_path, "-Wl,--build-id=none")
    debug_root = tmp_path / "debug"
    debug_file = debug_root / str(tmp_path).lstrip("/") / "target.debug"
    _split_debug(exe, debug_file, link=True)
    t = Target(exe)
    try:
        leaf_addr, leaf_line = t.truth["leaf_function"]
        (leaf,) = Symbolizer(debug_directories=[str(debug_root)]).symbolize_user(t.pid, [leaf_addr])
        assert (leaf.function, leaf.line) == ("leaf_function", leaf_line)
        # Another build's debug file under the same name: CRC mismatch, not used.
        other = build(tmp_path, "-O1", "-Wl,--build-id=none", name="other")
        subprocess.run(["objcopy", "--only-keep-debug", str(other), str(debug_file)], check=True)
        sym = Symbolizer(debug_directories=[str(debug_root)])
        (bare,) = sym.symbolize_user(t.pid, [leaf_addr])
        assert bare.function == "" and sym.stats["debug_files_rejected"] == 1
    finally:
        t.stop()


def test_same_code_in_two_processes_is_one_frame(tmp_path: Path) -> None:
    """Address randomisation loads each process elsewhere: frames are still equal."""
    exe = build(tmp_path, "-fPIE", "-pie")
    targets = [Target(exe), Target(exe)]
    try:
        assert targets[0].truth["leaf_function"][0] != targets[1].truth["leaf_function"][0], "ASLR is off"
        sym = Symbolizer()
        frames = [sym.symbolize_user(t.pid, [t.truth["leaf_function"][0], t.truth["getpid"][0]]) for t in targets]
        assert frames[0] == frames[1] and frames[0][0].function == "leaf_function"
    finally:
        for t in targets:
            t.stop()


def _nm(debug_file: str, name: str) -> tuple[int, int]:
    """(vaddr, size) of a function, from nm on the debug file."""
    nm = subprocess.run(["nm", "-S", debug_file], capture_output=True, text=True, check=True).stdout
    return next((int(a, 16), int(s, 16)) for a, s, _, n in (line.split() for line in nm.splitlines()
                                                           if len(line.split()) == 4) if n == name)


def _addr2line(debug_file: str, vaddr: int) -> tuple[str, int]:
    out = subprocess.run(["addr2line", "-e", debug_file, f"{vaddr:#x}"], capture_output=True, text=True,
                         check=True).stdout.strip()
    path, _, line = out.rpartition(":")
    return path, int(line.split()[0])


def _same_source(ours: str, binutils: str) -> bool:
    """Our path is binutils' path as a suffix. addr2line joins a relative compilation directory
    to DWARF 5's directory 0, which is that same directory (glibc: "./nptl/./nptl/x.c" for
    nptl/x.c; see test_relative_compilation_directory_is_not_doubled)."""
    theirs = Path(os.path.normpath(binutils)).parts
    mine = Path(ours).parts
    return bool(mine) and theirs[-len(mine):] == mine


def _libc_truth(libc: str, debug_file: str, name: str) -> tuple[int, int]:
    """File offsets [start, end) of a libc function, from nm on its debug file and libc's segments."""
    vaddr, size = _nm(debug_file, name)
    segments = subprocess.run(["readelf", "-lW", libc], capture_output=True, text=True, check=True).stdout
    for line in segments.splitlines():
        fields = line.split()
        if fields[:1] == ["LOAD"] and "E" in fields[6:-1]:
            offset, seg_vaddr = int(fields[1], 16), int(fields[2], 16)
            return vaddr - seg_vaddr + offset, vaddr - seg_vaddr + offset + size
    raise AssertionError(segments)


def libc_debug_file(libc: str | None = None) -> str:
    """libc6-dbg's debug file for ``libc`` (default: the system's), which setup installs."""
    libc = libc or next(p for p in ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6")
                        if Path(p).exists())
    build_id = _build_id(Path(libc))
    debug_file = f"{DEBUG_DIR}/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    assert Path(debug_file).is_file(), f"libc6-dbg's file for this libc ({debug_file}) is missing: run setup"
    return debug_file


def _libc(pid: int) -> tuple[str, int, int]:
    """(path, start, file offset) of the executable libc mapping of ``pid``."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) == 6 and "x" in fields[1] and fields[5].endswith("/libc.so.6"):
                return fields[5], int(fields[0].split("-")[0], 16), int(fields[2], 16)
    raise AssertionError("no libc mapping")


@pytest.mark.parametrize("name", ["start_thread", "__futex_abstimed_wait_common"])
def test_libc_local_functions_named_from_distribution_debug_symbols(name: str, tmp_path: Path) -> None:
    t = Target(build(tmp_path))
    try:
        libc, start, map_offset = _libc(t.pid)
        debug_file = libc_debug_file(libc)
        lo, hi = _libc_truth(libc, debug_file, name)
        address = start + lo - map_offset + (hi - lo) // 2
        (named,) = Symbolizer().symbolize_user(t.pid, [address])
        assert named.function == name and named.address == lo + (hi - lo) // 2
        # Lines too: libc6-dbg's line program is over the whole-table budget, so they come
        # from the one compilation unit that covers the address.
        path, line = _addr2line(debug_file, _nm(debug_file, name)[0] + (hi - lo) // 2)
        assert named.line == line and _same_source(named.filename, path), (named, path, line)
        empty = tmp_path / "empty"
        empty.mkdir()
        (bare,) = Symbolizer(debug_directories=[str(empty)]).symbolize_user(t.pid, [address])
        assert bare.function == "" and unknown_frame_label(bare) == f"libc.so.6+{named.address:#x}"
    finally:
        t.stop()


def test_finder_remembers_per_build_id_and_is_bounded(tmp_path: Path) -> None:
    root = tmp_path / "debug"
    finder = DebugFileFinder([str(root)], capacity=2)
    for i in range(3):
        assert finder.find(f"{i:040x}", None, "/usr/lib/libx.so") is None
    assert finder.stats["not_found"] == 3 and len(finder._found) == 2
    # A debug file that appears later is found once the bounded memory has let go of the miss.
    exe = build(tmp_path, "-Wl,--build-id")
    build_id = _build_id(exe)
    assert finder.find(build_id, None, str(exe)) is None
    _split_debug(exe, root / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug")
    assert finder.find(build_id, None, str(exe)) is None  # remembered
    for i in range(2):
        finder.find(f"{i + 10:040x}", None, "/usr/lib/liby.so")
    assert finder.find(build_id, None, str(exe)) == str(root / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug")



def test_container_debug_files_are_looked_for_in_its_root_first(tmp_path: Path) -> None:
    """A process's root view (/proc/PID/root) is a directory prefix: its debug files win,
    the host's serve when the container has none."""
    exe = build(tmp_path, "-Wl,--build-id")
    build_id = _build_id(exe)
    relative = Path("usr/lib/debug/.build-id") / build_id[:2] / f"{build_id[2:]}.debug"
    container, host = tmp_path / "container-root", tmp_path / "host"
    _split_debug(exe, container / relative)
    (host / relative).parent.mkdir(parents=True)
    shutil.copy(container / relative, host / relative)
    in_container = DebugFileFinder(["/usr/lib/debug"]).find(build_id, None, "/app/target", root=str(container))
    assert in_container == f"{container}/{relative}"
    # Not in the container's file system: the host's copy of the same build.
    on_host = DebugFileFinder([f"{host}/usr/lib/debug"]).find(build_id, None, "/app/target", root=str(container))
    assert on_host == f"{host}/{relative}"


def test_relative_compilation_directory_is_not_doubled(tmp_path: Path) -> None:
    """Distribution builds record relative source paths (-fdebug-prefix-map): DWARF 5 lists the
    compilation directory as directory 0, which must not be joined to itself."""
    source = tmp_path / "src" / "symbols_target.c"
    source.parent.mkdir()
    shutil.copy(Path(__file__).parent / "fixtures" / "symbols_target.c", source)
    exe = tmp_path / "target"
    subprocess.run(["gcc", "-g", "-gdwarf-5", "-O0", "-fno-omit-frame-pointer",
                    f"-fdebug-prefix-map={source.parent}=./src", "-o", str(exe), "symbols_target.c"],
                   check=True, cwd=source.parent)
    t = Target(exe)
    try:
        leaf_addr, leaf_line = t.truth["leaf_function"]
        (leaf,) = Symbolizer().symbolize_user(t.pid, [leaf_addr])
        assert (leaf.function, leaf.filename, leaf.line) == ("leaf_function", "src/symbols_target.c", leaf_line)
    finally:
        t.stop()


def test_large_line_program_is_decoded_per_compilation_unit() -> None:
    """libc6-dbg's line program is over the whole-table budget: each lookup decodes only the CU
    covering the address (found through .debug_aranges), answers as addr2line does, and the
    decoded CUs stay within their row budget."""
    from elftools.elf.elffile import ELFFile

    debug_file = libc_debug_file()
    with open(debug_file, "rb") as stream:
        elf = ELFFile(stream)
        section = elf.get_section_by_name(".debug_line")
        assert section is not None and section.data_size > MAX_LINE_PROGRAM_BYTES
        index = CuLineIndex(elf.get_dwarf_info, debug_file, cache_rows=2000)
        names = ["start_thread", "__futex_abstimed_wait_common", "__GI___clone3", "qsort_r"]
        for i, name in enumerate(names):
            vaddr, size = _nm(debug_file, name)
            for address in (vaddr, vaddr + size // 2):
                path, line = _addr2line(debug_file, address)
                file, ours = index.lookup(address)
                assert ours == line and _same_source(file, path), (name, hex(address), file, ours, path, line)
            assert index.cus_decoded == i + 1  # one CU per function, each decoded once
        assert index._rows <= 2000 or len(index._tables) == 1
        assert index.lookup(0) == ("", 0)


def test_kept_dwarf_of_a_large_file_stays_bounded_over_many_decodes() -> None:
    """Decoding CU after CU of libc6-dbg's file (a long-running agent meeting new libc
    addresses), the DWARFInfo kept between decodes is opened again every
    DECODES_PER_OPENING decodes, and what the old one parsed is freed then, without a
    garbage collection (the agent makes whole-heap ones rare): pyelftools keeps each CU,
    abbreviation table and line program it parsed for the DWARFInfo's life, in reference
    cycles, ~75 KB a CU (6.6 MB after 100 CUs when it was kept for good)."""
    import gc
    import tracemalloc

    from agent.symbols.dwarf_lines import DECODES_PER_OPENING
    from agent.symbols.inflate_index import InflateIndex
    from agent.symbols.section_views import ViewingELFFile

    with open(libc_debug_file(), "rb") as stream:
        inflate: dict[str, InflateIndex] = {}
        openings = 0

        def open_dwarf() -> object:
            nonlocal openings
            openings += 1
            return ViewingELFFile(stream, inflate).get_dwarf_info()

        index = CuLineIndex(open_dwarf, "libc.debug", cache_rows=1, inflate_indexes=inflate)
        starts = sorted({cu: start for start, cu in zip(index._starts, index._cus, strict=True)}.values())
        step = (len(starts) - 1) // 100
        assert step >= 1, len(starts)
        index.lookup(starts[0])  # the inflate indexes, built at the first decode, are kept by design
        gc.collect()
        gc.disable()  # only what reference counting frees counts
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for start in starts[step:101 * step:step]:
                index.lookup(start)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
    assert grown < 3 * 2**20, f"{grown / 2**20:.1f} MB kept after 100 CU decodes"
    assert index.cus_decoded == 101
    assert openings == 1 + -(-101 // DECODES_PER_OPENING)  # the index's own, then one per DECODES_PER_OPENING
