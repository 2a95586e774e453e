"""Finding CPython in a process: version, ``_PyRuntime`` and the evaluation loop's address.

A process runs CPython when one of its executable file mappings named like the
interpreter (``python3.X``, ``libpython3.X.so``) defines ``_PyRuntime``: the statically
linked interpreter (Debian's ``/usr/bin/python3.11``) and ``libpython`` loaded by a small
launcher (pyenv builds, embedding applications) are both covered. What we learn per file
(symbols, version) is cached by file identity; per process only the load address differs.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from agent.elf_symbols import find_symbols
from agent.process.procmaps import FileKey, MapEntry, file_key, map_files_path, read_maps, root_view_path
from agent.runtimes.python.offsets import OFFSETS, PythonOffsets
from agent.unwind.cfi import parse_cfi
from agent.unwind.elfread import ElfHeaders
from shared.model import Frame

log = logging.getLogger(__name__)

_INTERPRETER_NAME = re.compile(r"(?:^|/)(?:lib)?python(3)\.(\d+)[^/]*$")
EVAL_FUNCTION = "_PyEval_EvalFrameDefault"


@dataclass(frozen=True, slots=True)
class InterpreterFile:
    """What one interpreter binary or libpython tells us, independent of where it is loaded."""

    version: tuple[int, int]
    runtime_vaddr: int
    eval_ranges: tuple[tuple[int, int], ...]  # ELF vaddrs [start, end) of the evaluation loop
    exec_vaddr: int  # vaddr and file offset of the executable PT_LOAD, to compute the bias
    exec_offset: int


@dataclass(frozen=True, slots=True)
class PythonProcess:
    """A live CPython process: where its runtime is and how to read it."""

    pid: int
    version: tuple[int, int]
    runtime: int
    eval_ranges: tuple[tuple[int, int], ...]  # file offsets in ``path``, as native frames give them
    offsets: PythonOffsets
    path: str  # the interpreter file as the process maps it

    def in_eval_loop(self, frame: Frame) -> bool:
        """Whether a native frame (module-relative, agent.symbols.symbolizer) is in the loop."""
        if frame.mapping is None or frame.mapping.filename != self.path:
            return False
        # Return addresses may sit one past a call that ends the function: inclusive end.
        return any(lo <= frame.address <= hi for lo, hi in self.eval_ranges)


class UnsupportedPython(Exception):
    """CPython found, but of a version or build we cannot read: counted, stacks stay native."""


def find_python(pid: int, files: FileCache) -> PythonProcess | None:
    """The CPython runtime of ``pid``, None if it runs none; raises UnsupportedPython, OSError."""
    entries = read_maps(pid)
    candidates = []
    for entry in entries:
        if not entry.file_backed or not _INTERPRETER_NAME.search(entry.path):
            continue
        candidates.append(entry.path)
        info = files.get(pid, entry)
        if info is None:
            continue
        offsets = OFFSETS.get(info.version)
        if offsets is None:
            raise UnsupportedPython(f"CPython {info.version[0]}.{info.version[1]} in {entry.path}")
        bias = entry.start - entry.offset + info.exec_offset - info.exec_vaddr
        to_file = info.exec_offset - info.exec_vaddr
        return PythonProcess(pid, info.version, info.runtime_vaddr + bias,
                             tuple((lo + to_file, hi + to_file) for lo, hi in info.eval_ranges), offsets, entry.path)
    if candidates and any("libpython" in c or re.search(r"python3\.\d+$", c) for c in candidates):
        raise UnsupportedPython(f"no _PyRuntime symbol in {sorted(set(candidates))}")
    return None


class FileCache:
    """Interpreter facts per file identity (device, inode, size, mtime), bounded LRU."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._files: OrderedDict[FileKey, InterpreterFile | None] = OrderedDict()

    def get(self, pid: int, entry: MapEntry) -> InterpreterFile | None:
        path = map_files_path(pid, entry)
        if not os.path.exists(path):
            path = root_view_path(pid, entry.path)
        st = os.stat(path)
        key = file_key(st)
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        info = read_interpreter_file(path, entry.path)
        self._files[key] = info
        if len(self._files) > self.capacity:
            self._files.popitem(last=False)
        return info


def read_interpreter_file(path: str, display: str) -> InterpreterFile | None:
    """Version, ``_PyRuntime`` and evaluation-loop range of an ELF file; None without a runtime.

    OSError (the file unreadable now: a descriptor limit, a mount going away) is raised, not
    answered None: FileCache keeps a None for the file's identity, and find_python then
    called the process's interpreter unsupported for an hour."""
    try:
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            symbols = find_symbols(elf, ("_PyRuntime", "Py_Version", EVAL_FUNCTION), (".dynsym", ".symtab"))
            runtime = symbols.get("_PyRuntime")
            if runtime is None:
                return None
            version = _version(elf, symbols.get("Py_Version"), display)
            exec_segment = next((s for s in elf.iter_segments()
                                 if s["p_type"] == "PT_LOAD" and s["p_flags"] & 1), None)
            if exec_segment is None:
                return None
            eval_symbol = symbols.get(EVAL_FUNCTION)
            if eval_symbol is not None and eval_symbol[1]:
                ranges: tuple[tuple[int, int], ...] = ((eval_symbol[0], eval_symbol[0] + eval_symbol[1]),)
            else:
                stream.seek(0)
                ranges = _largest_function(stream)
            return InterpreterFile(version, runtime[0], ranges, exec_segment["p_vaddr"], exec_segment["p_offset"])
    except (ELFError, ValueError, struct.error) as exc:  # a malformed file: no runtime to read
        log.info("cannot read interpreter %s: %s", display, exc)
        return None


def _version(elf: ELFFile, py_version: tuple[int, int] | None, display: str) -> tuple[int, int]:
    """From ``Py_Version`` (3.11+, PY_VERSION_HEX in .rodata), else from the file name."""
    if py_version is not None:
        for segment in elf.iter_segments():
            start, size = segment["p_vaddr"], segment["p_filesz"]
            if segment["p_type"] == "PT_LOAD" and start <= py_version[0] < start + size:
                segment.stream.seek(segment["p_offset"] + py_version[0] - start)
                (hex_version,) = struct.unpack("<I", segment.stream.read(4))
                return (hex_version >> 24) & 0xFF, (hex_version >> 16) & 0xFF
    match = _INTERPRETER_NAME.search(display)
    if match is None:
        raise ValueError(f"cannot tell the Python version of {display}")
    return int(match.group(1)), int(match.group(2))


def _largest_function(stream: object) -> tuple[tuple[int, int], ...]:
    """Without a symbol: the evaluation loop is the largest function of the interpreter
    (true of every CPython 3.10-3.13 build checked, by a margin; see tests), found from the
    unwind information every x86-64 binary keeps."""
    headers = ElfHeaders(stream)  # type: ignore[arg-type]
    section = headers.sections.get(".eh_frame")
    data = headers.data(".eh_frame")
    if section is None or data is None:
        return ()
    fdes = parse_cfi(data, section.addr)
    if not fdes:
        return ()
    start, end, _ = max(fdes, key=lambda fde: fde[1] - fde[0])
    return ((start, end),)
