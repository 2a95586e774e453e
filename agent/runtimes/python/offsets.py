"""Struct offsets of the CPython internals we read, per interpreter version (x86-64).

CPython's internal structs change layout between minor versions, and the interpreters
on a fleet are mostly stripped (Debian's has no DWARF), so the offsets cannot be derived
from the binary at hand. This is a documented table instead, the approach py-spy takes.
Every value was read from the DWARF of CPython release builds with gdb
(``ptype /o`` / ``print &((T *)0)->field``) of 3.8.18, 3.9.18, 3.10.13, 3.11.7, 3.12.1 and 3.13.0;
``tests/test_python_frames.py`` re-derives them the same way whenever such builds are on
the machine, so a wrong entry fails a test rather than producing wrong stacks. The layouts
are stable within a minor version for release (non-debug, GIL) builds; debug builds
(``Py_DEBUG``, ``python3.11d``) and free-threaded builds (3.13t) differ and are not in the
table: such processes keep their native stacks and are counted as unsupported.

3.13 embeds its own offsets (``_Py_DebugOffsets`` at the start of ``_PyRuntime``); the
table is still used so that one mechanism covers every version.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agent.bpf.layouts import PY_NONE, PY_PROC_OFFSET_FIELDS

NONE = PY_NONE  # the field does not exist in this version


@dataclass(frozen=True, slots=True)
class PythonOffsets:
    """Offsets BPF needs to walk frames (``struct py_proc``) plus what the agent needs to
    read code objects and strings. Names follow bpf/python.h."""

    rt_interp_head: int
    rt_tstate_current: int
    is_next: int
    is_threads_head: int
    ts_next: int
    ts_native_tid: int
    ts_frame: int
    cf_current_frame: int
    fr_code: int
    fr_previous: int
    fr_instr: int
    fr_marker: int  # byte marking call boundaries: 3.11 is_entry, 3.12+ owner (3.10: none)
    co_code_adaptive: int
    # Agent side: PyCodeObject fields and string object layout.
    co_filename: int
    co_name: int
    co_qualname: int
    co_firstlineno: int
    co_linetable: int
    ascii_data: int  # sizeof(PyASCIIObject): where a compact ASCII string's characters start
    compact_data: int  # sizeof(PyCompactUnicodeObject): the same for other compact strings

    def bpf_fields(self) -> dict[str, int]:
        """The ``struct py_proc`` offset fields, by name."""
        return {name: getattr(self, name) for name in BPF_OFFSET_FIELDS}


BPF_OFFSET_FIELDS = PY_PROC_OFFSET_FIELDS  # struct py_proc's offset fields (agent/bpf/layouts.py)

# 3.10: frames are PyFrameObjects (f_back, f_code, int f_lasti in code units); one
# evaluation-loop call per frame; no native thread id (GIL holder used instead).
_PY310 = PythonOffsets(
    rt_interp_head=32, rt_tstate_current=568, is_next=0, is_threads_head=8, ts_next=8,
    ts_native_tid=NONE, ts_frame=24, cf_current_frame=NONE, fr_code=32, fr_previous=24,
    fr_instr=96, fr_marker=96, co_code_adaptive=0,
    co_filename=104, co_name=112, co_qualname=NONE, co_firstlineno=40, co_linetable=120,
    ascii_data=48, compact_data=72)
# 3.9: PyFrameObjects as in 3.10, but f_lasti sits 8 bytes further (it counts bytes, not code
# units) and lines come from co_lnotab (in co_linetable's place).
_PY39 = replace(_PY310, fr_instr=104, fr_marker=104)
# 3.8: as 3.9, but its gilstate sits further into _PyRuntime (more runtime state before it).
_PY38 = replace(_PY39, rt_tstate_current=1368)

OFFSETS: dict[tuple[int, int], PythonOffsets] = {
    (3, 8): _PY38,
    (3, 9): _PY39,
    (3, 10): _PY310,
    # 3.11: _PyInterpreterFrame chain reached through tstate->cframe; is_entry marks the
    # first frame of each evaluation-loop call.
    (3, 11): PythonOffsets(
        rt_interp_head=40, rt_tstate_current=NONE, is_next=0, is_threads_head=16, ts_next=8,
        ts_native_tid=160, ts_frame=56, cf_current_frame=8, fr_code=32, fr_previous=48,
        fr_instr=56, fr_marker=68, co_code_adaptive=184,
        co_filename=112, co_name=120, co_qualname=128, co_firstlineno=72, co_linetable=136,
        ascii_data=48, compact_data=72),
    # 3.12: each evaluation-loop call pushes a shim frame owned by the C stack (owner 3).
    (3, 12): PythonOffsets(
        rt_interp_head=40, rt_tstate_current=NONE, is_next=0, is_threads_head=72, ts_next=8,
        ts_native_tid=144, ts_frame=56, cf_current_frame=0, fr_code=0, fr_previous=8,
        fr_instr=56, fr_marker=70, co_code_adaptive=192,
        co_filename=112, co_name=120, co_qualname=128, co_firstlineno=68, co_linetable=136,
        ascii_data=40, compact_data=56),
    # 3.13: no _PyCFrame (tstate->current_frame); f_executable, instr_ptr.
    (3, 13): PythonOffsets(
        rt_interp_head=632, rt_tstate_current=NONE, is_next=7264, is_threads_head=7344, ts_next=8,
        ts_native_tid=160, ts_frame=72, cf_current_frame=NONE, fr_code=0, fr_previous=8,
        fr_instr=56, fr_marker=70, co_code_adaptive=200,
        co_filename=112, co_name=120, co_qualname=128, co_firstlineno=68, co_linetable=136,
        ascii_data=40, compact_data=56),
}
