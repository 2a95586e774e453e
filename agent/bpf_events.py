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
EVENT_SIZE = _HEADER.size + 2 * _STACK_BYTES + _TAIL.size + STACK_COPY_BYTES


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
    return RawStackEvent(
        ts, value, aux, pid, tid, cpu, kind,
        comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
        user, kernel,
        ulen if ulen < 0 else 0, klen if klen < 0 else 0,
        user_sp, raw[copy_start : copy_start + min(copy_len, STACK_COPY_BYTES)],
    )


def _addresses(raw: bytes, offset: int, length: int) -> list[int]:
    if length <= 0:
        return []
    length = min(length, _STACK_BYTES)
    stack = array("Q")
    stack.frombytes(raw[offset : offset + length - length % 8])
    return [a for a in stack if a]
