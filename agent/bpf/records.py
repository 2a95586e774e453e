"""Parsing of ``struct stack_event`` records (bpf/stack_event.h) coming off a ring buffer.

Parsing is done with ``struct``/``array`` on the raw bytes rather than bcc's generated
ctypes classes: it is several times cheaper per record and does not depend on bcc's
C-struct parser. The formats and offsets come from the one description of the record,
agent/bpf/layouts.py ``StackEvent`` (checked against the C struct at every compile).
"""

from __future__ import annotations

import ctypes
from array import array
from dataclasses import dataclass

from agent.bpf.layouts import MAX_STACK_DEPTH, PY_MAX_FRAMES, STACK_COPY_BYTES, PyFrame, StackEvent, struct_format

__all__ = ["EVENT_SIZE", "MAX_STACK_DEPTH", "PY_MAX_FRAMES", "STACK_COPY_BYTES", "RawStackEvent", "parse_stack_event"]

EVENT_SIZE = ctypes.sizeof(StackEvent)
_HEADER = struct_format(StackEvent, "ts_ns", "comm")
_USER = StackEvent.user.offset
_KERNEL = StackEvent.kernel.offset
_STACK_BYTES = StackEvent.user.size
_TAIL = struct_format(StackEvent, "user_sp", "_pad")
_TAIL_AT = StackEvent.user_sp.offset
_COPY_AT = StackEvent.stack_copy.offset
_PY_HEADER = struct_format(StackEvent, "py_count", "py_status")
_PY_HEADER_AT = StackEvent.py_count.offset
_PY_AT = StackEvent.py.offset
_PY_FRAME = struct_format(PyFrame)  # code, instr, marker


@dataclass(slots=True)
class RawStackEvent:
    """One stack event as BPF wrote it; addresses are not yet symbolized.

    ``user_error``/``kernel_error`` hold the negative errno bpf_get_stack returned, else 0.
    """

    ts_mono_ns: int
    value: int
    aux: int
    pid: int
    tid: int
    cpu: int
    kind: int
    thread_name: str
    user: list[int]
    kernel: list[int]
    user_error: int
    kernel_error: int
    user_sp: int = 0
    stack_copy: bytes = b""
    # CPython frames (bpf/python.h), innermost first, as read: (code address, instruction
    # field, boundary marker byte); agent/runtimes/python/frames.py interprets them per version.
    py_status: int = 0
    python: tuple[tuple[int, int, int], ...] = ()


def parse_stack_event(raw: bytes) -> RawStackEvent:
    """Decode one record; truncated or oversized records raise ValueError."""
    if len(raw) < EVENT_SIZE:
        raise ValueError(f"stack event of {len(raw)} bytes, expected {EVENT_SIZE}")
    ts, value, aux, pid, tid, cpu, ulen, klen, kind, comm = _HEADER.unpack_from(raw)
    user = _addresses(raw, _USER, ulen)
    kernel = _addresses(raw, _KERNEL, klen)
    user_sp, copy_len = _TAIL.unpack_from(raw, _TAIL_AT)
    py_count, py_status = _PY_HEADER.unpack_from(raw, _PY_HEADER_AT)
    python: tuple[tuple[int, int, int], ...] = ()
    if py_count:
        frames = min(py_count, PY_MAX_FRAMES)
        python = tuple(_PY_FRAME.iter_unpack(raw[_PY_AT : _PY_AT + frames * _PY_FRAME.size]))
    return RawStackEvent(
        ts, value, aux, pid, tid, cpu, kind,
        comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
        user, kernel,
        ulen if ulen < 0 else 0, klen if klen < 0 else 0,
        user_sp, raw[_COPY_AT : _COPY_AT + min(copy_len, STACK_COPY_BYTES)],
        py_status, python,
    )


def _addresses(raw: bytes, offset: int, length: int) -> list[int]:
    if length <= 0:
        return []
    length = min(length, _STACK_BYTES)
    stack = array("Q")
    stack.frombytes(raw[offset : offset + length - length % 8])
    return [a for a in stack if a]
