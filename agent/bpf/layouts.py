"""Every record layout, enum and counter slot that BPF programs (bpf/) share with the agent.

This is the one Python description of what crosses the BPF/agent boundary:

- each ``ctypes.Structure`` mirrors one C struct field for field (same names, same types,
  same order; ctypes lays structs out by the same x86-64 ABI rules as clang);
- each ``IntEnum`` mirrors one C enum: member ``X`` is the C constant ``<prefix>X``
  (:data:`C_ENUMS` names the C enum, its prefix and its slot-count sentinel);
- :data:`C_CONSTANTS` lists the ``#define`` values the agent relies on.

None of it is trusted blindly: agent/bpf/contract.py appends a static assertion of every
size, field offset, field size, enum value and constant to each program it compiles, so a
C change the agent does not know about fails the load with a message naming the struct and
field (docs/design/bpf-contract.md). Decoding on hot paths uses ``struct.Struct`` formats
derived from these classes once, at import (:func:`struct_format`): no ctypes per record.
"""

from __future__ import annotations

import ctypes
import struct
from ctypes import c_char, c_int16, c_int32, c_uint8, c_uint16, c_uint32, c_uint64
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

# -- sizes the layouts depend on (bpf/stack_event.h, bpf/unwind.h) --------------------------
MAX_STACK_DEPTH = 127
STACK_COPY_BYTES = 512
PY_MAX_FRAMES = 64
COMM_BYTES = 16
UNWIND_MAX_MAPPINGS = 256
UNWIND_MAPPING_PENDING = 1  # unwind_mapping.flags: no table yet, ask for it when a pc lands here
UNWIND_REQUEST_REASON_SHIFT = 56  # unwind_requests values: reason << 56 | pc
PY_NONE = 0xFFFF  # a py_proc offset field that does not exist in the process's CPython version

# -- aggregate labels (agg_key.label) ---------------------------------------------------------
# bpf/wall.bpf.c: on-CPU samples, per-thread sums of short blocks, per-thread sums of exact
# on-CPU time, uncaptured blocks | task state; any other label is the task state of a captured block.
WALL_ON_CPU_LABEL = 1 << 63
WALL_SHORT_OFF_CPU_LABEL = (1 << 63) | 1
WALL_ON_CPU_TIME_LABEL = (1 << 63) | 2
WALL_UNCAPTURED_LABEL = (1 << 63) | (1 << 62)
# bpf/futex_wait.h: the futex address below LABEL_ADDRESS_BITS, WAIT_BITS in the top byte
# (bits 0-3 the futex command, then these flags).
LOCK_LABEL_ADDRESS_BITS = 56
# 1 / capture probability is kept in 1/2^WEIGHT_SHIFT ths (bpf/event_capture.h).
WEIGHT_SHIFT = 16
LOCK_WAIT_PRIVATE = 0x10
LOCK_WAIT_REALTIME = 0x20
LOCK_WAIT_MATCH_ANY = 0x40
LOCK_WAIT_THREAD_TID = 0x80
# bpf/heap.bpf.c: entries of neg_log_table, the exponential draws the agent fills in.
HEAP_NEG_LOG_ENTRIES = 1024


class Layout(ctypes.Structure):
    """A C struct shared with BPF; ``c_name`` is its C name, ``c_home`` the bpf/ file defining it."""

    c_name: str = ""
    c_home: str = ""


# -- bpf/stack_event.h ------------------------------------------------------------------------
class PyStatus(IntEnum):
    """``enum py_status``: what the CPython frame walk of one event found."""

    NOT_PYTHON = 0
    OK = 1
    NO_THREAD = 2
    TRUNCATED = 3


class PyFrame(Layout):
    """``struct py_frame``: one CPython frame as BPF read it."""

    c_name, c_home = "py_frame", "stack_event.h"
    _fields_ = [("code", c_uint64), ("instr", c_uint64), ("marker", c_uint32), ("_pad", c_uint32)]


class StackEvent(Layout):
    """``struct stack_event``: one event with its stacks (ring-buffer record, ``stacks`` map value)."""

    c_name, c_home = "stack_event", "stack_event.h"
    _fields_ = [
        ("ts_ns", c_uint64), ("value", c_uint64), ("aux", c_uint64),
        ("pid", c_uint32), ("tid", c_uint32), ("cpu", c_uint32),
        ("user_len", c_int32), ("kernel_len", c_int32), ("kind", c_uint32),
        ("comm", c_char * COMM_BYTES),
        ("user", c_uint64 * MAX_STACK_DEPTH), ("kernel", c_uint64 * MAX_STACK_DEPTH),
        ("user_sp", c_uint64), ("copy_len", c_uint32), ("_pad", c_uint32),
        ("stack_copy", c_uint8 * STACK_COPY_BYTES),
        ("py_count", c_uint32), ("py_status", c_int32), ("py", PyFrame * PY_MAX_FRAMES),
    ]


# -- bpf/stack_dedup.h: the CPU profile's per-sample records -----------------------------------
class DedupFlags(IntEnum):
    """``enum dedup_flags``: what follows a ``struct sample_record``."""

    ID_ONLY = 0  # nothing: the stack is (stack_id, serial)
    NEW = 1  # a struct stack_event, stored under (stack_id, serial)
    UNSTORED = 2  # a struct stack_event, not stored: never cache it


class SampleRecord(Layout):
    """``struct sample_record``: one CPU sample (56 bytes); its stack by id, or whole after it."""

    c_name, c_home = "sample_record", "stack_dedup.h"
    _fields_ = [("ts_ns", c_uint64), ("stack_id", c_uint64), ("serial", c_uint64),
                ("pid", c_uint32), ("tid", c_uint32), ("cpu", c_uint32), ("flags", c_uint32),
                ("comm", c_char * COMM_BYTES)]


class FullSampleRecord(Layout):
    """``struct full_sample_record``: a sample record followed by its whole stack."""

    c_name, c_home = "full_sample_record", "stack_dedup.h"
    _fields_ = [("head", SampleRecord), ("ev", StackEvent)]


class KnownStack(Layout):
    """``struct known_stack``: a stored stack (``known_stacks`` value), as first sampled."""

    c_name, c_home = "known_stack", "stack_dedup.h"
    _fields_ = [("serial", c_uint64), ("generation", c_uint64), ("ev", StackEvent)]


# -- bpf/stack_agg.h --------------------------------------------------------------------------
class AggKey(Layout):
    """``struct agg_key``: one in-kernel aggregate's key."""

    c_name, c_home = "agg_key", "stack_agg.h"
    _fields_ = [("pid", c_uint32), ("tid", c_uint32), ("stack_id", c_uint64), ("label", c_uint64)]


class AggValue(Layout):
    """``struct agg_value``: one in-kernel aggregate's sums. ``weighted_ns`` and ``weighted_count``
    sum a captured event's ns and 1, each divided by the probability it was captured (in
    1/2^WEIGHT_SHIFT ths, bpf/event_capture.h); both are 0 for events not captured (stack id 0).
    ``on_cpu_*`` (wall only): the thread's on-CPU time carried by the switch-outs that closed
    this entry's intervals (their count, ns, and first and last span's start)."""

    c_name, c_home = "agg_value", "stack_agg.h"
    _fields_ = [("count", c_uint64), ("total_ns", c_uint64), ("first_ts", c_uint64), ("last_ts", c_uint64),
                ("cpu", c_uint32), ("on_cpu_count", c_uint32), ("weighted_ns", c_uint64),
                ("weighted_count", c_uint64), ("on_cpu_ns", c_uint64), ("on_cpu_first_ts", c_uint64),
                ("on_cpu_last_ts", c_uint64)]


# -- bpf/python.h -----------------------------------------------------------------------------
class PyProc(Layout):
    """``struct py_proc``: where one CPython process keeps what BPF walks (``py_procs`` value)."""

    c_name, c_home = "py_proc", "python.h"
    _fields_ = [("runtime", c_uint64), ("version", c_uint32),
                *((name, c_uint16) for name in (
                    "rt_interp_head", "rt_tstate_current", "is_next", "is_threads_head", "ts_next",
                    "ts_native_tid", "ts_frame", "cf_current_frame", "fr_code", "fr_previous", "fr_instr",
                    "fr_marker")),
                ("_pad", c_uint16 * 3)]


# The interpreter offsets among py_proc's fields (agent/runtimes/python/offsets.py fills them by name).
PY_PROC_OFFSET_FIELDS: tuple[str, ...] = tuple(
    name for name, ctype in PyProc._fields_ if ctype is c_uint16)  # type: ignore[misc]


# -- bpf/unwind.h -----------------------------------------------------------------------------
class UnwindKind(IntEnum):
    """``enum unwind_kind``: how one unwind row finds the caller's frame (agent/unwind/cfi.py)."""

    NONE = 0
    CFA_RSP = 1
    CFA_RBP = 2
    PLT = 3
    CFA_DEREF_RBP = 4
    END = 5
    UNSUPPORTED = 6


class UnwindRequestReason(IntEnum):
    """``enum unwind_request_reason``: why BPF asks the agent for a process or table."""

    NEW = 1
    UNKNOWN_ADDRESS = 2
    TABLE = 3


class UnwindStat(IntEnum):
    """``enum unwind_stat``: the unwinder's counter slots in ``struct unwind_cpu``."""

    SAMPLES = 0
    CFI_FRAMES = 1
    FP_FRAMES = 2
    END = 3
    UNSUPPORTED = 4
    READ_FAILED = 5
    BAD_FRAME = 6
    TRUNCATED = 7
    UNKNOWN_ADDR = 8


class UnwindRow(Layout):
    """``struct unwind_row``: one row (or bucket entry) of a file's table in ``unwind_rows``."""

    c_name, c_home = "unwind_row", "unwind.h"
    _fields_ = [("pc", c_uint32), ("cfa_offset", c_int32), ("rbp_offset", c_int16), ("kind", c_uint8),
                ("pad", c_uint8)]


class UnwindMapping(Layout):
    """``struct unwind_mapping``: one executable mapping of a process and where its table is."""

    c_name, c_home = "unwind_mapping", "unwind.h"
    _fields_ = [("start", c_uint64), ("end", c_uint64), ("bias", c_uint64), ("table", c_uint32),
                ("buckets", c_uint32), ("shift", c_uint32), ("flags", c_uint32)]


class UnwindProc(Layout):
    """``struct unwind_proc``: one process's sorted mappings (``unwind_procs`` value)."""

    c_name, c_home = "unwind_proc", "unwind.h"
    _fields_ = [("count", c_uint32), ("flags", c_uint32), ("mappings", UnwindMapping * UNWIND_MAX_MAPPINGS)]


class UnwindCpu(Layout):
    """``struct unwind_cpu``: per-CPU unwinder counters and scratch registers."""

    c_name, c_home = "unwind_cpu", "unwind.h"
    _fields_ = [("counters", c_uint64 * len(UnwindStat)), ("ip", c_uint64), ("sp", c_uint64), ("bp", c_uint64)]


# -- bpf/goroutine.bpf.c ----------------------------------------------------------------------
class GoProc(Layout):
    """``struct go_proc``: offsets inside runtime.g for one Go process (``go_procs`` value)."""

    c_name, c_home = "go_proc", "goroutine.bpf.c"
    _fields_ = [("startpc", c_uint32), ("sched_bp", c_uint32)]


class ExitKey(Layout):
    """``struct exit_key``: goroutine exits counted per (process, start PC)."""

    c_name, c_home = "exit_key", "goroutine.bpf.c"
    _fields_ = [("tgid", c_uint32), ("_pad", c_uint32), ("start_pc", c_uint64)]


# -- counter slots (bpf/counters.h): one enum per program's ``counters`` array ----------------
class AggCounter(IntEnum):
    """Slots bpf/stack_agg.h counts in the ``counters`` of the programs that aggregate (first)."""

    MAP_FULL = 0  # events that found the aggregation map full
    MAP_FULL_NS = 1  # their ns
    STACK_STORE_FAILED = 2
    STACKS_STORED = 3  # new stack ids: how well stacks aggregate
    CAPTURED = 4  # bpf/event_capture.h: events whose stack was captured
    SAMPLED_OUT = 5  # not captured by the draw
    CAPPED = 6  # not drawn: the CPU's window hit its hard cap


class CpuCounter(IntEnum):
    """bpf/cpu.bpf.c ``counters``."""

    SAMPLES = 0
    RING_FULL = 1
    IDLE_SKIPPED = 2
    TAIL_CALL_FAILED = 3  # into a later stage: the sample is lost
    STACKS_STORED = 4  # bpf/stack_dedup.h: new stacks stored
    STACKS_KNOWN = 5  # samples sent as an id record
    STACK_COLLISIONS = 6  # a different stack under a stored id: sent whole
    STACK_STORE_FAILED = 7  # the map refused the insert: sent whole
    STACKS_WITH_COPY = 8  # stacks carrying a user-stack copy: sent whole
    STACKS_WITH_ERROR = 9  # stack capture failed: sent whole
    SELF_NOT_KEPT = 10  # the agent's own samples left out (cpu_self_sample_one_in)


class WallCounter(IntEnum):
    """bpf/wall.bpf.c ``counters`` (after :class:`AggCounter`'s slots)."""

    ON_CPU_SAMPLES = len(AggCounter)
    THREAD_STATE_UNAVAILABLE = len(AggCounter) + 1  # no task storage for the thread
    OFF_CPU_INTERVALS = len(AggCounter) + 2
    NOT_CAPTURED = len(AggCounter) + 3  # switch-outs whose stack was not captured
    UNCAPTURED_LONG = len(AggCounter) + 4  # of their intervals, those >= MIN_BLOCK_NS
    UNWIND_TAIL_CALL_FAILED = len(AggCounter) + 5  # recorded without unwinding
    RECORD_TAIL_CALL_FAILED = len(AggCounter) + 6  # an on-CPU sample lost
    INTERVAL_END_UNSEEN = len(AggCounter) + 7  # threads switched in before the program attached


class LockCounter(IntEnum):
    """bpf/lock.bpf.c ``counters`` (after :class:`AggCounter`'s slots)."""

    WAITS = len(AggCounter)
    SHORT_WAITS = len(AggCounter) + 1  # below MIN_WAIT_NS
    SHORT_WAIT_NS = len(AggCounter) + 2
    UNWIND_TAIL_CALL_FAILED = len(AggCounter) + 3  # recorded without unwinding
    RECORD_TAIL_CALL_FAILED = len(AggCounter) + 4  # lost
    NOT_CAPTURED = len(AggCounter) + 5  # long waits not captured (summed under stack id 0)
    THREAD_STATE_UNAVAILABLE = len(AggCounter) + 6  # no task storage for the thread


class HeapCounter(IntEnum):
    """bpf/heap.bpf.c ``counters``."""

    ALLOCATIONS = 0
    RING_FULL = 1
    LIVE_FULL = 2
    BYTES_ALLOCATED = 3
    TAIL_CALL_FAILED = 4  # records lost to a failed tail call into stage 2


class GoroutineCounter(IntEnum):
    """bpf/goroutine.bpf.c ``counters``."""

    CREATIONS = 0
    RING_FULL = 1
    EXITS_WITHOUT_OFFSETS = 2
    EXITS_MAP_FULL = 3


class HeapEventKind(IntEnum):
    """``enum heap_event_kind``: the ``kind`` of bpf/heap.bpf.c's records."""

    ALLOC = 0  # precise mode: value = size, aux = address
    FREE = 1  # precise mode: a sampled address freed
    SAMPLED_ALLOC = 3  # by the preload library: value = size, aux = address
    SAMPLED_FREE = 4


@dataclass(frozen=True)
class CEnum:
    """Where an IntEnum lives in C: ``enum <name>`` with constants ``<prefix><MEMBER>`` and,
    if ``slots`` is set, a last constant of that name one past the highest member."""

    enum: type[IntEnum]
    name: str
    prefix: str
    home: str
    slots: str = ""


C_ENUMS: tuple[CEnum, ...] = (
    CEnum(PyStatus, "py_status", "PY_STATUS_", "stack_event.h"),
    CEnum(DedupFlags, "dedup_flags", "DEDUP_", "stack_dedup.h"),
    CEnum(UnwindKind, "unwind_kind", "UNWIND_", "unwind.h"),
    CEnum(UnwindRequestReason, "unwind_request_reason", "UNWIND_REQUEST_", "unwind.h"),
    CEnum(UnwindStat, "unwind_stat", "UNWIND_STAT_", "unwind.h", "UNWIND_STAT_SLOTS"),
    CEnum(AggCounter, "agg_counter", "AGG_", "counters.h", "AGG_COUNTER_SLOTS"),
    CEnum(CpuCounter, "cpu_counter", "CPU_", "counters.h", "CPU_COUNTER_SLOTS"),
    CEnum(WallCounter, "wall_counter", "WALL_", "counters.h", "WALL_COUNTER_SLOTS"),
    CEnum(LockCounter, "lock_counter", "LOCK_", "counters.h", "LOCK_COUNTER_SLOTS"),
    CEnum(HeapCounter, "heap_counter", "HEAP_", "counters.h", "HEAP_COUNTER_SLOTS"),
    CEnum(GoroutineCounter, "goroutine_counter", "GOROUTINE_", "counters.h", "GOROUTINE_COUNTER_SLOTS"),
    CEnum(HeapEventKind, "heap_event_kind", "HEAP_EVENT_", "heap.bpf.c"),
)

# (C macro, value, bpf/ file defining it): constants the agent computes with.
C_CONSTANTS: tuple[tuple[str, int, str], ...] = (
    ("MAX_STACK_DEPTH", MAX_STACK_DEPTH, "stack_event.h"),
    ("STACK_COPY_BYTES", STACK_COPY_BYTES, "stack_event.h"),
    ("PY_MAX_FRAMES", PY_MAX_FRAMES, "stack_event.h"),
    ("PY_NONE", PY_NONE, "python.h"),
    ("UNWIND_MAX_MAPPINGS", UNWIND_MAX_MAPPINGS, "unwind.h"),
    ("UNWIND_MAPPING_PENDING", UNWIND_MAPPING_PENDING, "unwind.h"),
    ("UNWIND_REQUEST(1, 0)", 1 << UNWIND_REQUEST_REASON_SHIFT, "unwind.h"),
    ("WEIGHT_SHIFT", WEIGHT_SHIFT, "event_capture.h"),
    ("ON_CPU_LABEL", WALL_ON_CPU_LABEL, "wall.bpf.c"),
    ("SHORT_OFF_CPU_LABEL", WALL_SHORT_OFF_CPU_LABEL, "wall.bpf.c"),
    ("ON_CPU_TIME_LABEL", WALL_ON_CPU_TIME_LABEL, "wall.bpf.c"),
    ("UNCAPTURED_LABEL", WALL_UNCAPTURED_LABEL, "wall.bpf.c"),
    ("LABEL_ADDRESS_BITS", LOCK_LABEL_ADDRESS_BITS, "futex_wait.h"),
    ("WAIT_PRIVATE", LOCK_WAIT_PRIVATE, "futex_wait.h"),
    ("WAIT_REALTIME", LOCK_WAIT_REALTIME, "futex_wait.h"),
    ("WAIT_MATCH_ANY", LOCK_WAIT_MATCH_ANY, "futex_wait.h"),
    ("WAIT_THREAD_TID", LOCK_WAIT_THREAD_TID, "futex_wait.h"),
    ("NEG_LOG_ENTRIES", HEAP_NEG_LOG_ENTRIES, "heap.bpf.c"),
)

# Each program's counters enum: its ``counters`` array has one slot per member (COUNTER_SLOTS).
PROGRAM_COUNTERS: dict[str, type[IntEnum]] = {
    "cpu.bpf.c": CpuCounter, "cpu_records.bpf.c": CpuCounter, "wall.bpf.c": WallCounter,
    "lock.bpf.c": LockCounter, "heap.bpf.c": HeapCounter,
    "goroutine.bpf.c": GoroutineCounter,
}

LAYOUTS: tuple[type[Layout], ...] = (
    PyFrame, StackEvent, SampleRecord, FullSampleRecord, KnownStack, AggKey, AggValue, PyProc, UnwindRow,
    UnwindMapping, UnwindProc, UnwindCpu,
    GoProc, ExitKey,
)

_SCALAR_CODES: dict[Any, str] = {
    c_uint8: "B", c_uint16: "H", c_uint32: "I", c_uint64: "Q",
    ctypes.c_int8: "b", c_int16: "h", c_int32: "i", ctypes.c_int64: "q",
}


def is_padding(name: str) -> bool:
    """Fields that only fill alignment gaps (``_pad``, ``pad``): skipped by derived formats."""
    return name.startswith("_") or name == "pad"


def struct_format(layout: type[Layout], first: str | None = None, last: str | None = None) -> struct.Struct:
    """A little-endian ``struct.Struct`` decoding ``layout``'s fields ``first``..``last``
    (default: all), starting at ``first``'s offset.

    Scalars give one value each, arrays of scalars one value per element, ``char[N]`` one
    bytes value; padding fields and alignment gaps are skipped (``x``). Nested structs have
    no single code: such a field must lie outside the range (decode it with its own format)."""
    names = [name for name, *_ in layout._fields_]
    lo = names.index(first) if first else 0
    hi = names.index(last) if last else len(names) - 1
    start = getattr(layout, names[lo]).offset
    codes, at = ["<"], start
    ctype: Any
    for name, ctype, *_ in layout._fields_[lo : hi + 1]:
        field = getattr(layout, name)
        if field.offset > at:
            codes.append(f"{field.offset - at}x")
        if is_padding(name):
            codes.append(f"{field.size}x")
        elif ctype in _SCALAR_CODES:
            codes.append(_SCALAR_CODES[ctype])
        elif getattr(ctype, "_type_", None) is c_char:
            codes.append(f"{field.size}s")
        elif getattr(ctype, "_type_", None) in _SCALAR_CODES:
            codes.append(f"{ctype._length_}{_SCALAR_CODES[ctype._type_]}")
        else:
            raise TypeError(f"{layout.c_name}.{name}: not a scalar or char array, decode it separately")
        at = field.offset + field.size
    if hi == len(names) - 1 and ctypes.sizeof(layout) > at:
        codes.append(f"{ctypes.sizeof(layout) - at}x")  # trailing padding: the whole struct
    return struct.Struct("".join(codes))
