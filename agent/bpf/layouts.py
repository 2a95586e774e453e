"""C layouts the agent reads from BPF maps, as ctypes structures checked against the map.

One definition per layout: the drain decodes with a ``struct.Struct`` derived from the
structure (``unpacker``), and ``check_layout`` compares field names, offsets and sizes with
the types bcc built from the C declaration when the program was loaded, so a C change
that the Python side does not follow fails at load with the field that differs.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

_FORMATS: dict[Any, str] = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_uint64: "Q",
            ctypes.c_int32: "i", ctypes.c_int64: "q"}


class AggKey(ctypes.Structure):
    """struct agg_key (bpf/stack_agg.h): one aggregate of wall or lock events."""

    _fields_ = [("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32), ("stack_id", ctypes.c_uint64),
                ("label", ctypes.c_uint64)]


class AggValue(ctypes.Structure):
    """struct agg_value (bpf/stack_agg.h). ``weighted_ns`` and ``weighted_count`` are the sums
    of a captured event's ns and of 1 (in 1/2^16ths) divided by the probability it was
    captured (bpf/event_capture.h); both 0 in the sums of events not captured (stack id 0)."""

    _fields_ = [("count", ctypes.c_uint64), ("total_ns", ctypes.c_uint64), ("first_ts", ctypes.c_uint64),
                ("last_ts", ctypes.c_uint64), ("cpu", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("weighted_ns", ctypes.c_uint64), ("weighted_count", ctypes.c_uint64)]


# 1 / capture probability is kept in 1/2^WEIGHT_SHIFT ths (bpf/event_capture.h).
WEIGHT_SHIFT = 16


def unpacker(layout: type[ctypes.Structure]) -> struct.Struct:
    """A little-endian ``struct.Struct`` reading ``layout``'s fields in order (padding included)."""
    fmt, offset = "<", 0
    for name, ctype in layout._fields_:  # type: ignore[misc]
        field = getattr(layout, name)
        if field.offset > offset:
            fmt += f"{field.offset - offset}x"
        fmt += _FORMATS[ctype]
        offset = field.offset + field.size
    if ctypes.sizeof(layout) > offset:
        fmt += f"{ctypes.sizeof(layout) - offset}x"
    return struct.Struct(fmt)


def layout_differences(layout: type[ctypes.Structure], loaded: Any) -> list[str]:
    """How the ctypes type bcc built from the C declaration differs from ``layout`` (empty if not)."""
    ours = [(name, getattr(layout, name).offset, getattr(layout, name).size) for name, _ in layout._fields_]  # type: ignore[misc]
    theirs = [(f[0], getattr(loaded, f[0]).offset, getattr(loaded, f[0]).size)
              for f in getattr(loaded, "_fields_", [])]
    diffs = [f"{a} != {b}" for a, b in zip(ours, theirs, strict=False) if a != b]
    if len(ours) != len(theirs):
        diffs.append(f"{len(ours)} fields here, {len(theirs)} in the program")
    if ctypes.sizeof(layout) != ctypes.sizeof(loaded):
        diffs.append(f"{ctypes.sizeof(layout)} bytes here, {ctypes.sizeof(loaded)} in the program")
    return diffs


def check_layout(layout: type[ctypes.Structure], loaded: Any) -> None:
    """Raise if the map's type (``table.Key``/``table.Leaf``) is not ``layout``."""
    diffs = layout_differences(layout, loaded)
    if diffs:
        raise ValueError(f"BPF {layout.__name__} layout differs from agent/bpf/layouts.py: {'; '.join(diffs)}")
