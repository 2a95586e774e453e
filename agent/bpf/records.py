"""Parsing of ``struct stack_event`` records (bpf/stack_event.h) coming off a ring buffer.

Parsing is done with ``struct``/``array`` on the raw bytes rather than bcc's generated
ctypes classes: it is several times cheaper per record and does not depend on bcc's
C-struct parser.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

MAX_STACK_DEPTH = 127
STACK_COPY_BYTES = 512
_HEADER = struct.Struct("<QQQIIIiiI16s")
_STACK_BYTES = MAX_STACK_DEPTH * 8
_TAIL = struct.Struct("<QII")
PY_MAX_FRAMES = 64
_PY_HEADER = struct.Struct("<Ii")
_PY_FRAME = struct.Struct("<QQII")
EVENT_SIZE = (_HEADER.size + 2 * _STACK_BYTES + _TAIL.size + STACK_COPY_BYTES
              + _PY_HEADER.size + PY_MAX_FRAMES * _PY_FRAME.size)


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
    user = _addresses(raw, _HEADER.size, ulen)
    kernel = _addresses(raw, _HEADER.size + _STACK_BYTES, klen)
    tail = _HEADER.size + 2 * _STACK_BYTES
    user_sp, copy_len, _ = _TAIL.unpack_from(raw, tail)
    copy_start = tail + _TAIL.size
    py_start = copy_start + STACK_COPY_BYTES
    py_count, py_status = _PY_HEADER.unpack_from(raw, py_start)
    python: tuple[tuple[int, int, int], ...] = ()
    if py_count:
        frames = min(py_count, PY_MAX_FRAMES)
        python = tuple((code, instr, marker) for code, instr, marker, _ in _PY_FRAME.iter_unpack(
            raw[py_start + _PY_HEADER.size : py_start + _PY_HEADER.size + frames * _PY_FRAME.size]))
    return RawStackEvent(
        ts, value, aux, pid, tid, cpu, kind,
        comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
        user, kernel,
        ulen if ulen < 0 else 0, klen if klen < 0 else 0,
        user_sp, raw[copy_start : copy_start + min(copy_len, STACK_COPY_BYTES)],
        py_status, python,
    )


def _addresses(raw: bytes, offset: int, length: int) -> list[int]:
    if length <= 0:
        return []
    length = min(length, _STACK_BYTES)
    stack = array("Q")
    stack.frombytes(raw[offset : offset + length - length % 8])
    return [a for a in stack if a]
