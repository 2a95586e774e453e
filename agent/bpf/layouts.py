"""C record layouts shared with BPF, as ctypes structures (field names are the C names).

Each structure mirrors one C struct; ``check_leaf`` compares it with bcc's view of a map's
value type at load time, so a C change that is not mirrored here fails loudly instead of
being decoded wrongly. Counter slots mirror C enums as ``IntEnum``s.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from typing import Any


class SampleRecord(ctypes.Structure):
    """``struct sample_record`` (bpf/stack_dedup.h): one CPU sample, 56 bytes."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("stack_id", ctypes.c_uint64),
        ("serial", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
    ]


class KnownStackHead(ctypes.Structure):
    """The fields of ``struct known_stack`` (bpf/stack_dedup.h) before its ``struct stack_event ev``."""

    _fields_ = [
        ("serial", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
    ]


class DedupFlags(IntEnum):
    """``enum dedup_flags``: what follows a ``struct sample_record``."""

    ID_ONLY = 0       # nothing: the stack is (stack_id, serial)
    NEW = 1           # a struct stack_event, stored under (stack_id, serial)
    UNSTORED = 2      # a struct stack_event, not stored: never cached


class CpuCounter(IntEnum):
    """``enum cpu_counter``: slots of the CPU program's ``counters`` array."""

    SAMPLES = 0
    RINGBUF_FULL = 1
    IDLE = 2
    TAIL_CALL_FAILED = 3
    STACKS_STORED = 4
    STACKS_KNOWN = 5
    STACK_COLLISIONS = 6
    STACK_STORE_FAILED = 7
    STACKS_WITH_COPY = 8
    STACKS_WITH_ERROR = 9
    SLOTS = 10


def check_leaf(table: Any, expected: list[tuple[str, int, int]], total: int) -> None:
    """Raise RuntimeError unless bcc's value type of ``table`` has ``total`` bytes and each
    (name, offset, size) of ``expected``."""
    leaf = table.Leaf
    if ctypes.sizeof(leaf) != total:
        raise RuntimeError(f"{leaf.__name__} is {ctypes.sizeof(leaf)} bytes, agent expects {total}")
    for name, offset, size in expected:
        field = getattr(leaf, name, None)
        if field is None or field.offset != offset or field.size != size:
            raise RuntimeError(f"{leaf.__name__}.{name} differs from the agent's layout")


def fields_of(structure: type[ctypes.Structure]) -> list[tuple[str, int, int]]:
    """(name, offset, size) of each field of a ctypes structure."""
    out = []
    for spec in structure._fields_:
        descriptor = getattr(structure, spec[0])
        out.append((spec[0], descriptor.offset, descriptor.size))
    return out
