"""The 3.8-3.10 offset rows derived from one base (agent/runtimes/python/offsets.py) are the
values read from those releases' DWARF: the table as it was written out in full, row by row."""

from __future__ import annotations

import dataclasses

from agent.runtimes.python.offsets import NONE, OFFSETS

# Read with gdb from the DWARF of CPython 3.8.18, 3.9.18 and 3.10.13 release builds.
_COMMON = dict(rt_interp_head=32, is_next=0, is_threads_head=8, ts_next=8, ts_native_tid=NONE, ts_frame=24,
               cf_current_frame=NONE, fr_code=32, fr_previous=24, co_code_adaptive=0, co_filename=104,
               co_name=112, co_qualname=NONE, co_firstlineno=40, co_linetable=120, ascii_data=48,
               compact_data=72)
WRITTEN_OUT = {
    (3, 8): dict(_COMMON, rt_tstate_current=1368, fr_instr=104, fr_marker=104),
    (3, 9): dict(_COMMON, rt_tstate_current=568, fr_instr=104, fr_marker=104),
    (3, 10): dict(_COMMON, rt_tstate_current=568, fr_instr=96, fr_marker=96),
}


def test_derived_rows_equal_the_written_out_values() -> None:
    for version, values in WRITTEN_OUT.items():
        assert dataclasses.asdict(OFFSETS[version]) == values, version
