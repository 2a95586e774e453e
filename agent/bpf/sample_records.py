"""Decoding of the CPU profile's sample records (bpf/stack_dedup.h), a batch at a time.

Most records are 56-byte id records (time, cpu, pid, tid, thread name, stack id, serial);
a record for a stack BPF has not sent before carries the whole ``struct stack_event`` after
the same header. A batch's id records are decoded together with one ``struct.iter_unpack``
over their concatenation: no per-record Python objects besides the tuple it yields.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.bpf.layouts import FullSampleRecord, KnownStack, SampleRecord, struct_format
from agent.bpf.records import RawStackEvent, parse_stack_event

SAMPLE_RECORD: struct.Struct = struct_format(SampleRecord)
KNOWN_STACK_HEAD: struct.Struct = struct_format(KnownStack, "serial", "generation")
FULL_RECORD_SIZE = ctypes.sizeof(FullSampleRecord)
KNOWN_STACK_SIZE = ctypes.sizeof(KnownStack)
_EVENT_AT = FullSampleRecord.ev.offset
_KNOWN_EVENT_AT = KnownStack.ev.offset

# One decoded header: (ts_ns, stack_id, serial, pid, tid, cpu, flags, comm bytes).
Header = tuple[int, int, int, int, int, int, int, bytes]


@dataclass(slots=True)
class SampleBatch:
    """A batch of records, split: id records (headers only) and records with a whole stack."""

    ids: Iterable[Header] = ()
    full: list[tuple[Header, RawStackEvent]] = field(default_factory=list)
    malformed: int = 0


def decode_batch(records: list[bytes]) -> SampleBatch:
    """Split and decode ``records``; records of any other size are counted as malformed."""
    batch = SampleBatch()
    small: list[bytes] = []
    size = SAMPLE_RECORD.size
    for raw in records:
        n = len(raw)
        if n == size:
            small.append(raw)
        elif n >= FULL_RECORD_SIZE:
            head: Header = SAMPLE_RECORD.unpack_from(raw)
            batch.full.append((head, parse_stack_event(raw[_EVENT_AT:])))
        else:
            batch.malformed += 1
    if small:
        batch.ids = SAMPLE_RECORD.iter_unpack(b"".join(small))  # yields Header tuples
    return batch


def parse_known_stack(raw: bytes) -> tuple[int, RawStackEvent]:
    """(serial, stack) of a ``known_stacks`` map value; ValueError if it is too short."""
    if len(raw) < KNOWN_STACK_SIZE:
        raise ValueError(f"known stack of {len(raw)} bytes, expected {KNOWN_STACK_SIZE}")
    serial, _generation = KNOWN_STACK_HEAD.unpack_from(raw)
    return serial, parse_stack_event(raw[_KNOWN_EVENT_AT:])


def thread_name(comm: bytes) -> str:
    """A NUL-padded comm as text."""
    return comm.split(b"\0", 1)[0].decode("utf-8", "replace")
