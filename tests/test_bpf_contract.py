"""The C<->Python contract (agent/bpf/layouts.py, agent/bpf/contract.py) on the real compiler.

Every real program compiles with the contract's static assertions appended, with the defines
its actor really uses (CPython frames on; bpf/unwind.h's structs are checked in the unwind maps
module, the one program defining them: the unwinding variants of cpu, wall and lock cost
seconds more each to compile and are compiled by the integration tests), and bcc's own reading of
the compiled C structs (the ctypes classes it builds for map keys and values) agrees field
by field with ours. A deliberately wrong Python description fails the load with a message
naming the struct and the field, or the enum constant.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint32, c_uint64
from enum import IntEnum
from types import SimpleNamespace
from typing import Any

import pytest

from agent.bpf import contract, layouts
from agent.bpf.layouts import (
    AggKey,
    AggValue,
    ExitKey,
    GoProc,
    KnownStack,
    Layout,
    PyFrame,
    PyProc,
    StackEvent,
    UnwindCpu,
    UnwindMapping,
    UnwindProc,
    UnwindRow,
    struct_format,
)

# -- without BPF: the derived formats and sizes, against the C structs counted by hand ---------


def test_struct_sizes_are_the_c_ones() -> None:
    # stack_event: 3 u64 + 6 u32 + comm[16] = 64; two stacks of 127 u64; user_sp, copy_len,
    # _pad = 16; the 512-byte copy; py_count, py_status = 8; 64 py_frames of 24 bytes.
    assert ctypes.sizeof(StackEvent) == 64 + 2 * 127 * 8 + 16 + 512 + 8 + 64 * 24 == 4168
    # agg_value: 4 u64, u32 cpu + u32 on_cpu_count, weighted_ns, weighted_count, 3 u64 on_cpu_*
    assert ctypes.sizeof(AggValue) == 80 and AggValue.weighted_ns.offset == 40
    assert AggValue.weighted_count.offset == 48 and AggValue.on_cpu_ns.offset == 56
    assert ctypes.sizeof(UnwindRow) == 12
    assert ctypes.sizeof(UnwindProc) == 8 + 256 * 40
    assert ctypes.sizeof(UnwindCpu) == (9 + 3) * 8
    assert ctypes.sizeof(PyProc) == 8 + 4 + 12 * 2 + 3 * 2 + 6  # 6 bytes of tail padding to 8-byte alignment


def test_derived_formats_decode_as_the_hand_written_ones_did() -> None:
    assert struct_format(StackEvent, "ts_ns", "comm").format == "<QQQIIIiiI16s"
    assert struct_format(StackEvent, "user_sp", "_pad").format == "<QI4x"
    assert struct_format(PyFrame).format == "<QQI4x"
    assert struct_format(AggKey).format == "<IIQQ"
    assert struct_format(AggValue).format == "<QQQQIIQQQQQ"
    assert struct_format(UnwindRow).format == "<IihB1x"
    assert struct_format(UnwindMapping).format == "<QQQIIII"
    assert struct_format(UnwindCpu, "counters", "counters").format == "<9Q"
    with pytest.raises(TypeError, match="py"):
        struct_format(StackEvent, "py_count", "py")  # an array of structs has no single code


def test_assertions_cover_what_the_program_includes_under_its_guards() -> None:
    text = contract.assertions(["goroutine.bpf.c", "stack_event.h", "counters.h"])
    assert "struct go_proc" in text and "struct exit_key" in text and "struct stack_event" in text
    assert "#ifdef STACKFLEET_STACK_EVENT_H" in text and "#ifdef STACKFLEET_COUNTERS_H" in text
    assert "COUNTER_SLOTS == 4" in text  # goroutine's counters
    assert "struct agg_value" not in text and "struct unwind_row" not in text  # headers not included
    assert contract.assertions(["ring_wakeup.h"]).count("_Static_assert") == 0


# -- the real programs ----------------------------------------------------------------------

# (program, map, "Key"/"Leaf", our description): bcc's view of each shared map type.
MAP_TYPES: dict[str, list[tuple[str, str, type[Layout]]]] = {
    "goroutine.bpf.c": [("go_procs", "Leaf", GoProc), ("exits", "Key", ExitKey)],
    "wall.bpf.c": [("agg0", "Key", AggKey), ("agg1", "Leaf", AggValue), ("stacks", "Leaf", StackEvent),
                   ("py_procs", "Leaf", PyProc)],
    "lock.bpf.c": [("agg1", "Key", AggKey), ("agg0", "Leaf", AggValue), ("stacks", "Leaf", StackEvent),
                   ("py_procs", "Leaf", PyProc)],
    "heap.bpf.c": [("py_procs", "Leaf", PyProc)],
    "cpu.bpf.c": [("py_procs", "Leaf", PyProc), ("known_stacks", "Leaf", KnownStack)],
    "cpu_records.bpf.c": [("py_procs", "Leaf", PyProc)],
    "unwind_maps.bpf.c": [("unwind_rows", "Leaf", UnwindRow), ("unwind_procs", "Leaf", UnwindProc),
                          ("unwind_cpus", "Leaf", UnwindCpu)],
}


def _actor_defines(program: str) -> dict[str, int | str]:
    """The defines the program's actor compiles it with (native unwinding off)."""
    from agent.actors.cpu import CpuActor
    from agent.actors.goroutine import GoroutineActor
    from agent.actors.heap import HeapActor
    from agent.actors.lock import LockActor
    from agent.actors.wall import WallActor
    from agent.memory_budget import MemoryBudget
    from agent.settings import AgentSettings
    from shared.counters import Counters

    actors = {a.bpf_source: a for a in (CpuActor, WallActor, LockActor, HeapActor, GoroutineActor)}
    actors["cpu_records.bpf.c"] = CpuActor
    ctx = SimpleNamespace(settings=AgentSettings(), counters=Counters(), symbolizer=None, python=None,
                          unwinding=None, processes=None, budget=MemoryBudget())
    return actors[program](ctx).bpf_defines()  # type: ignore[arg-type]


def _fields(cls: Any) -> list[tuple[str, int, int]]:
    """(name, offset, size) of a ctypes struct's fields, without bcc's added tail padding."""
    return [(name, getattr(cls, name).offset, getattr(cls, name).size)
            for name, *_ in cls._fields_ if not name.startswith("__pad")]


@pytest.mark.parametrize("program", list(MAP_TYPES))
def test_real_program_compiles_with_the_contract_and_bcc_agrees(program: str) -> None:
    pytest.importorskip("bcc")
    from agent.bpf.loader import BCC_LOCK, load_program, program_text

    text = program_text(program)
    assert "stackfleet contract: struct" in text  # the assertions went into what was compiled
    with BCC_LOCK:
        if program == "unwind_maps.bpf.c":
            # Compiled once per process (its maps are exported by name): the agent's own call.
            # Sized as the agents later in this process will ask for it (one size per process).
            from agent.settings import AgentSettings
            from agent.unwind.sharing import _maps_module

            bpf = _maps_module(AgentSettings.model_fields["unwind_table_rows"].default)
        else:
            defines = _actor_defines(program)
            assert defines.get("PYTHON_FRAMES") == 1 or program == "goroutine.bpf.c"
            bpf = load_program(program, defines)
    try:
        for map_name, side, ours in MAP_TYPES[program]:
            theirs = getattr(bpf[map_name], side)
            if issubclass(theirs, ctypes.Array):  # per-CPU maps: one value per CPU
                theirs = theirs._type_
            assert ctypes.sizeof(theirs) == ctypes.sizeof(ours), (map_name, side)
            assert _fields(theirs) == _fields(ours), (map_name, side)
        counters = layouts.PROGRAM_COUNTERS.get(program)
        if counters is not None:
            assert bpf["counters"].max_entries == max(counters) + 1
    finally:
        if program != "unwind_maps.bpf.c":
            with BCC_LOCK:
                bpf.cleanup()


def test_wall_program_taking_lock_waits_compiles_against_the_shared_lock_maps() -> None:
    """With wall and lock on, the wall program declares the lock maps extern: it compiles against
    the module that exports them, and they have the lock program's layouts and counter slots."""
    pytest.importorskip("bcc")
    from agent.actors.lock_maps import LockMapsView, shared_lock_maps
    from agent.actors.wall import WallActor
    from agent.bpf.loader import BCC_LOCK, load_program
    from agent.memory_budget import MemoryBudget
    from agent.settings import AgentSettings
    from shared.counters import Counters
    from shared.profile_types import ProfileType

    settings = AgentSettings(types=[ProfileType.WALL, ProfileType.LOCK])
    ctx = SimpleNamespace(settings=settings, counters=Counters(), symbolizer=None, python=None,
                          unwinding=None, processes=None, budget=MemoryBudget())
    defines = WallActor(ctx).bpf_defines()  # type: ignore[arg-type]
    assert defines["LOCK_FROM_SWITCH"] == 1
    with BCC_LOCK:
        view = LockMapsView(shared_lock_maps(settings))  # once per process, as the agent makes it
        bpf = load_program("wall.bpf.c", defines)
    try:
        for map_name, side, ours in MAP_TYPES["lock.bpf.c"][:3]:
            theirs = getattr(view[map_name], side)
            assert ctypes.sizeof(theirs) == ctypes.sizeof(ours), (map_name, side)
            assert _fields(theirs) == _fields(ours), (map_name, side)
        assert view["counters"].max_entries == max(layouts.LockCounter) + 1
    finally:
        with BCC_LOCK:
            bpf.cleanup()


# -- deliberately wrong descriptions fail the load, naming what differs -----------------------


class GoProcSwapped(Layout):
    """go_proc with its two fields the other way round."""

    c_name, c_home = "go_proc", "goroutine.bpf.c"
    _fields_ = [("sched_bp", c_uint32), ("startpc", c_uint32)]


class PyFrameWider(Layout):
    """py_frame with a u64 marker: the frame and the event grow."""

    c_name, c_home = "py_frame", "stack_event.h"
    _fields_ = [("code", c_uint64), ("instr", c_uint64), ("marker", c_uint64), ("_pad", c_uint32)]


class GoroutineCounterShort(IntEnum):
    """goroutine's counters without the last slot."""

    CREATIONS = 0
    RING_FULL = 1
    EXITS_WITHOUT_OFFSETS = 2


def _goroutine_load_error() -> str:
    from agent.bpf.loader import BCC_LOCK, load_program

    with BCC_LOCK, pytest.raises(contract.ContractMismatch) as failure:
        load_program("goroutine.bpf.c", _actor_defines("goroutine.bpf.c"))
    return str(failure.value)


def test_moved_field_fails_the_load_naming_struct_and_field(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bcc")
    monkeypatch.setattr(contract, "LAYOUTS", tuple(GoProcSwapped if layout is GoProc else layout
                                                   for layout in layouts.LAYOUTS))
    message = _goroutine_load_error()
    assert message.startswith("goroutine.bpf.c: the C program and agent/bpf/layouts.py disagree")
    assert "struct go_proc (agent: GoProcSwapped) field sched_bp: offset is 0 in the agent" in message
    assert "struct go_proc (agent: GoProcSwapped) field startpc: offset is 4 in the agent" in message
    assert "size is" not in message  # same size: only the offsets differ


def test_resized_struct_and_missing_counter_slot_fail_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bcc")
    monkeypatch.setattr(contract, "LAYOUTS", tuple(PyFrameWider if layout is PyFrame else layout
                                                   for layout in layouts.LAYOUTS))
    enums = tuple(layouts.CEnum(GoroutineCounterShort, e.name, e.prefix, e.home, e.slots)
                  if e.enum is layouts.GoroutineCounter else e for e in layouts.C_ENUMS)
    monkeypatch.setattr(contract, "C_ENUMS", enums)
    monkeypatch.setattr(contract, "PROGRAM_COUNTERS", {"goroutine.bpf.c": GoroutineCounterShort})
    message = _goroutine_load_error()
    assert "struct py_frame (agent: PyFrameWider): size is 32 bytes in the agent" in message
    assert "struct py_frame (agent: PyFrameWider) field marker: size is 8 bytes in the agent" in message
    assert "struct py_frame (agent: PyFrameWider) field _pad: offset is 24 in the agent" in message
    assert "enum goroutine_counter GOROUTINE_COUNTER_SLOTS: 3 in the agent" in message
    assert "bpf/goroutine.bpf.c counters: 3 slots in the agent (GoroutineCounterShort)" in message
    # stack_event itself is described correctly: its py array is where the wider frame shows.
    assert "struct stack_event" not in message


def test_a_name_the_c_lacks_fails_with_the_compilers_words(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bcc")
    monkeypatch.setattr(contract, "C_CONSTANTS", (("GOROUTINE_NO_SUCH_LIMIT", 7, "goroutine.bpf.c"),))
    message = _goroutine_load_error()
    assert message.endswith("use of undeclared identifier 'GOROUTINE_NO_SUCH_LIMIT' "
                            "(GOROUTINE_NO_SUCH_LIMIT is 7 in the agent)"), message
