"""CPython frame reading: offsets, line tables, code objects, placement — against real interpreters.

Ground truth comes from the interpreters themselves: each CPython found on the machine
reports its own line numbers (``co_lines``) and the address of a code object (``id``),
and gdb reads struct offsets from the DWARF of builds that carry it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from agent.process.memory import ProcessMemory
from agent.process.procmaps import ProcessKey
from agent.runtimes.python.code import BadObject, CodeReader
from agent.runtimes.python.frames import PythonProcesses, PythonStacks
from agent.runtimes.python.linetable import line_for_offset
from agent.runtimes.python.offsets import OFFSETS
from agent.runtimes.python.process import EVAL_FUNCTION, FileCache, find_python, read_interpreter_file
from shared.counters import Counters
from shared.model import Frame, FrameType, Mapping

PYENV = Path("/root/.pyenv/versions")


def _interpreters() -> dict[tuple[int, int], str]:
    found: dict[tuple[int, int], str] = {(sys.version_info[0], sys.version_info[1]): sys.executable}
    if PYENV.is_dir():
        for root in sorted(PYENV.iterdir()):
            exe = root / "bin" / "python3"
            parts = root.name.split(".")
            if exe.exists() and len(parts) >= 2 and (int(parts[0]), int(parts[1])) in OFFSETS:
                found.setdefault((int(parts[0]), int(parts[1])), str(exe))
    return {v: exe for v, exe in found.items() if v in OFFSETS}


INTERPRETERS = _interpreters()
IDS = [f"{v[0]}.{v[1]}" for v in INTERPRETERS]

# Prints, for a function with loops, branches and calls: its line table, first line and the
# interpreter's own (byte offset -> line) for every instruction.
_LINES_PROBE = textwrap.dedent('''
    import json, sys
    def sample(n):
        total = 0
        for i in range(n):
            if i % 3:
                total += i
            else:
                total -= (
                    i * 2
                )
        try:
            total //= n
        except ZeroDivisionError:
            total = -1
        return [total for _ in range(2)]
    code = sample.__code__
    if hasattr(code, "co_lines"):
        lines = [(start, end, line) for start, end, line in code.co_lines()]
        table = code.co_linetable
    else:  # before 3.10: the line starts dis reads from co_lnotab, as (start, end, line) spans
        import dis
        starts = list(dis.findlinestarts(code))
        ends = [start for start, _ in starts[1:]] + [len(code.co_code)]
        lines = [(start, end, line) for (start, line), end in zip(starts, ends)]
        table = code.co_lnotab
    print(json.dumps({"table": table.hex(), "first": code.co_firstlineno, "lines": lines}))
''')


@pytest.mark.parametrize("version", list(INTERPRETERS), ids=IDS)
def test_line_table_matches_the_interpreter(version: tuple[int, int]) -> None:
    out = subprocess.run([INTERPRETERS[version], "-c", _LINES_PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout)
    table = bytes.fromhex(probe["table"])
    checked = 0
    for start, end, line in probe["lines"]:
        for offset in range(start, end, 2):
            assert line_for_offset(version, table, probe["first"], offset) == (line or 0), (offset, line)
            checked += 1
    assert checked > 20


def test_line_table_of_garbage_is_zero_not_an_error() -> None:
    assert line_for_offset((3, 11), b"\x00\x01\x02", 10, 4) == 0
    assert line_for_offset((3, 10), b"\xff", 10, 4) == 0
    assert line_for_offset((3, 9), b"\xff", 10, 4) == 10  # no complete pair: the first line


# A child that keeps running Python and prints the address of a code object with a
# non-ASCII qualified name, and its own view of it.
_CODE_PROBE = textwrap.dedent('''
    import sys, time
    class Überklasse:
        def méthode(self):
            return 1
    code = Überklasse.méthode.__code__
    print(id(code), code.co_qualname if hasattr(code, "co_qualname") else code.co_name,
          code.co_filename, code.co_firstlineno, flush=True)
    sys.stdin.readline()
''')


@pytest.mark.parametrize("version", list(INTERPRETERS), ids=IDS)
def test_code_objects_read_from_a_live_process(version: tuple[int, int], tmp_path: Path) -> None:
    script = tmp_path / "probe_ünï.py"
    script.write_text(_CODE_PROBE, encoding="utf-8")
    child = subprocess.Popen([INTERPRETERS[version], str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, encoding="utf-8")
    try:
        assert child.stdout is not None
        address, name, filename, first = child.stdout.readline().split()
        process = find_python(child.pid, FileCache())
        assert process is not None and process.version == version
        reader = CodeReader(ProcessMemory(child.pid), process.offsets)
        info = reader.code(int(address))
        assert (info.name, info.filename, info.first_line) == (name, filename, int(first))
        assert info.linetable
        with pytest.raises(BadObject):
            reader.code(int(address) + 8)  # not an object start: its "type" is not code
        reader.memory.close()
    finally:
        child.kill()
        child.wait()


def test_runtime_and_evaluation_loop_found_in_debians_stripped_interpreter() -> None:
    exe = "/usr/bin/python3.11"
    if not os.path.exists(exe):
        pytest.skip("no Debian python3.11")
    info = read_interpreter_file(exe, exe)
    assert info is not None and info.version == (3, 11)
    (start, end), = info.eval_ranges
    assert 20_000 < end - start < 200_000


def test_an_interpreter_unreadable_for_a_moment_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError opening the interpreter (a descriptor limit, say) is not remembered as "no
    runtime in this file": find_python raises it (counted unreadable, looked at again after
    NEGATIVE_TTL_S) and the next look finds the runtime. It used to be kept as None for the
    file, which made the process's interpreter "unsupported" for an hour."""
    import builtins

    import agent.runtimes.python.process as process_module

    real_open = builtins.open
    failing = [True]

    def flaky_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if failing[0] and args[:1] == ("rb",):
            raise OSError(24, "Too many open files")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(process_module, "open", flaky_open, raising=False)
    files = FileCache()
    with pytest.raises(OSError):
        find_python(os.getpid(), files)
    failing[0] = False
    found = find_python(os.getpid(), files)
    assert found is not None and found.version == sys.version_info[:2]


_LIBS = [p for v in OFFSETS for p in sorted(PYENV.glob(f"{v[0]}.{v[1]}.*/lib/libpython{v[0]}.{v[1]}.so.1.0"))] \
    if PYENV.is_dir() else []


@pytest.mark.parametrize("lib", _LIBS, ids=lambda p: p.name)
def test_largest_function_fallback_is_the_evaluation_loop(lib: Path, tmp_path: Path) -> None:
    """Without symbols the loop is found as the largest FDE: check against the symbol."""
    with_symbol = read_interpreter_file(str(lib), lib.name)
    assert with_symbol is not None
    stripped = tmp_path / lib.name
    if not shutil.which("objcopy"):
        pytest.skip("binutils' objcopy not available")
    subprocess.run(["objcopy", f"--strip-symbol={EVAL_FUNCTION}", "--strip-debug", str(lib), str(stripped)],
                   check=True)
    without = read_interpreter_file(str(stripped), lib.name)
    assert without is not None and without.eval_ranges == with_symbol.eval_ranges


# -- offsets, re-derived from DWARF ------------------------------------------------------------
_FIELDS = {
    "rt_interp_head": "(long)&((struct pyruntimestate*)0)->interpreters.head",
    "is_next": "(long)&((PyInterpreterState*)0)->next",
    "ts_next": "(long)&((PyThreadState*)0)->next",
    "co_filename": "(long)&((PyCodeObject*)0)->co_filename",
    "co_name": "(long)&((PyCodeObject*)0)->co_name",
    "co_firstlineno": "(long)&((PyCodeObject*)0)->co_firstlineno",
    "co_linetable": "(long)&((PyCodeObject*)0)->co_linetable",
    "ascii_data": "(long)sizeof(PyASCIIObject)",
    "compact_data": "(long)sizeof(PyCompactUnicodeObject)",
}
_BEFORE_311 = {"rt_tstate_current": "(long)&((struct pyruntimestate*)0)->gilstate.tstate_current",
               "is_threads_head": "(long)&((PyInterpreterState*)0)->tstate_head",
               "ts_frame": "(long)&((PyThreadState*)0)->frame",
               "fr_code": "(long)&((PyFrameObject*)0)->f_code", "fr_previous": "(long)&((PyFrameObject*)0)->f_back",
               "fr_instr": "(long)&((PyFrameObject*)0)->f_lasti"}
_BY_VERSION = {
    (3, 8): {**_BEFORE_311, "co_linetable": "(long)&((PyCodeObject*)0)->co_lnotab"},
    (3, 9): {**_BEFORE_311, "co_linetable": "(long)&((PyCodeObject*)0)->co_lnotab"},
    (3, 10): {"rt_tstate_current": "(long)&((struct pyruntimestate*)0)->gilstate.tstate_current",
              "is_threads_head": "(long)&((PyInterpreterState*)0)->tstate_head",
              "ts_frame": "(long)&((PyThreadState*)0)->frame",
              "fr_code": "(long)&((PyFrameObject*)0)->f_code", "fr_previous": "(long)&((PyFrameObject*)0)->f_back",
              "fr_instr": "(long)&((PyFrameObject*)0)->f_lasti"},
    (3, 11): {"ts_frame": "(long)&((PyThreadState*)0)->cframe",
              "cf_current_frame": "(long)&((_PyCFrame*)0)->current_frame",
              "fr_code": "(long)&((struct _PyInterpreterFrame*)0)->f_code",
              "fr_marker": "(long)&((struct _PyInterpreterFrame*)0)->is_entry",
              "fr_instr": "(long)&((struct _PyInterpreterFrame*)0)->prev_instr"},
    (3, 12): {"ts_frame": "(long)&((PyThreadState*)0)->cframe",
              "cf_current_frame": "(long)&((_PyCFrame*)0)->current_frame",
              "fr_code": "(long)&((struct _PyInterpreterFrame*)0)->f_code",
              "fr_marker": "(long)&((struct _PyInterpreterFrame*)0)->owner",
              "fr_instr": "(long)&((struct _PyInterpreterFrame*)0)->prev_instr"},
    (3, 13): {"ts_frame": "(long)&((PyThreadState*)0)->current_frame",
              "fr_code": "(long)&((struct _PyInterpreterFrame*)0)->f_executable",
              "fr_marker": "(long)&((struct _PyInterpreterFrame*)0)->owner",
              "fr_instr": "(long)&((struct _PyInterpreterFrame*)0)->instr_ptr"},
}
_FROM_311 = {
    "is_threads_head": "(long)&((PyInterpreterState*)0)->threads.head",
    "ts_native_tid": "(long)&((PyThreadState*)0)->native_thread_id",
    "fr_previous": "(long)&((struct _PyInterpreterFrame*)0)->previous",
    "co_qualname": "(long)&((PyCodeObject*)0)->co_qualname",
    "co_code_adaptive": "(long)&((PyCodeObject*)0)->co_code_adaptive",
}


@pytest.mark.parametrize("version", sorted(OFFSETS), ids=[f"{v[0]}.{v[1]}" for v in sorted(OFFSETS)])
def test_offset_table_matches_dwarf(version: tuple[int, int]) -> None:
    libs = sorted(PYENV.glob(f"{version[0]}.{version[1]}.*/lib/libpython{version[0]}.{version[1]}.so.1.0")) \
        if PYENV.is_dir() else []
    if not libs or not shutil.which("gdb"):
        pytest.skip(f"no CPython {version} build with DWARF (or no gdb) on this machine")
    fields = {**_FIELDS, **(_FROM_311 if version >= (3, 11) else {}), **_BY_VERSION[version]}
    args = []
    for expr in fields.values():
        args += ["-ex", f"output {expr}", "-ex", "echo \\n"]
    out = subprocess.run(["gdb", "-batch", "-nx", str(libs[-1]), *args], capture_output=True, text=True, timeout=120)
    values = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(values) == len(fields), out.stdout + out.stderr
    table = OFFSETS[version]
    assert {name: getattr(table, name) for name in fields} == dict(zip(fields, map(int, values), strict=True))


# -- placement -----------------------------------------------------------------------------------
class _FakeEntry:
    def __init__(self, version: tuple[int, int]) -> None:
        from agent.runtimes.python.process import PythonProcess
        self.key = ProcessKey(1, 1, None)
        self.process = PythonProcess(1, version, 0, ((0x1000, 0x2000),), OFFSETS[version], "python")
        self.reader = object()  # only checked for presence: frames are faked


def _stacks(version: tuple[int, int]) -> tuple[PythonStacks, _FakeEntry]:
    stacks = PythonStacks(PythonProcesses(), None, Counters(), "cpu")
    entry = _FakeEntry(version)
    stacks._frame = lambda e, code, offset: Frame(f"py{code}", "x.py", 1, 0, FrameType.CPYTHON)  # type: ignore[method-assign, assignment]
    stacks.processes.lookup = lambda pid: entry  # type: ignore[method-assign, assignment, return-value]
    return stacks, entry


_INTERPRETER = Mapping(0, 0x10000, 0, "python")


def _native(name: str, address: int, mapping: Mapping = _INTERPRETER) -> Frame:
    return Frame(name, "", 0, address, FrameType.NATIVE, mapping)


def test_python_runs_replace_evaluation_loop_frames_in_order() -> None:
    stacks, _ = _stacks((3, 11))
    native = (_native("c_leaf", 0x9000), _native("eval", 0x1100), _native("c_call", 0x9100),
              _native("eval", 0x1200), _native("main", 0x9200))
    # 3.11: marker is is_entry. Run 1: py1 (entry); run 2: py2, py3 (entry).
    records = ((1, 0, 1), (2, 0, 0), (3, 0, 1))
    names = [f.function for f in stacks.splice(1, native, records, 1)]
    assert names == ["c_leaf", "py1", "c_call", "py2", "py3", "main"]


def test_312_shim_frames_split_runs_and_are_dropped() -> None:
    stacks, _ = _stacks((3, 12))
    native = (_native("eval", 0x1100), _native("c_call", 0x9100), _native("eval", 0x1200), _native("main", 0x9200))
    records = ((1, 0, 0), (0, 0, 3), (2, 0, 0), (3, 0, 0), (0, 0, 3))
    names = [f.function for f in stacks.splice(1, native, records, 1)]
    assert names == ["py1", "c_call", "py2", "py3", "main"]


def test_runs_without_a_native_evaluation_frame_go_outermost() -> None:
    stacks, _ = _stacks((3, 10))
    native = (_native("c_leaf", 0x9000), _native("eval", 0x1100))  # native stack cut short
    records = ((1, 0, 0), (2, 0, 0))  # 3.10: one call per frame
    names = [f.function for f in stacks.splice(1, native, records, 1)]
    assert names == ["c_leaf", "py1", "py2"]


def test_evaluation_loop_is_matched_by_file_and_offset() -> None:
    """Native frames are module-relative: the same offset in another file is not the loop."""
    stacks, _ = _stacks((3, 11))
    other = Mapping(0, 0x10000, 0, "libother.so")
    native = (_native("c_leaf", 0x1100, other), _native("eval", 0x1100), _native("main", 0x9200))
    names = [f.function for f in stacks.splice(1, native, ((1, 0, 1),), 1)]
    assert names == ["c_leaf", "py1", "main"]


def test_non_python_process_is_left_alone() -> None:
    processes = PythonProcesses()
    assert processes.lookup(os.getppid()) is not None  # looked at, found not (or yes) Python: no error
    assert processes.lookup(2**22 + 12345) is None  # no such process


def test_exited_python_processes_are_forgotten_and_their_memory_closed() -> None:
    processes = PythonProcesses()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        entry = None
        for _ in range(50):  # the interpreter needs a moment to map its libraries
            entry = processes.lookup(child.pid)
            if entry is not None and entry.reader is not None:
                break
            processes._entries.clear()
            time.sleep(0.1)
        assert entry is not None and entry.reader is not None, "the venv's interpreter is a supported CPython"
        assert processes.sweep_exited(grace_s=0.0) == 0  # alive
    finally:
        child.kill()
        child.wait()
    assert processes.sweep_exited(grace_s=60.0) == 0  # within the grace period
    assert processes.sweep_exited(grace_s=0.0) == 1
    assert entry.reader.memory.closed
