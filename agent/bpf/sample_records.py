"""Decoding of the CPU profile's sample records (bpf/stack_dedup.h), a batch at a time.

Most records are 56-byte id records (time, cpu, pid, tid, thread name, stack id, serial);
a record for a stack BPF has not sent before carries the whole ``struct stack_event`` after
the same header. A batch's id records are decoded together, field by field: each field of
every record is one strided ``memoryview`` over the records' concatenation, turned into a
list in C; no Python object is made per record.
"""

from __future__ import annotations

import ctypes
import operator
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, repeat

from agent.bpf.layouts import FullSampleRecord, KnownStack, SampleRecord, struct_format
from agent.bpf.records import RawStackEvent, parse_stack_event

SAMPLE_RECORD: struct.Struct = struct_format(SampleRecord)
KNOWN_STACK_HEAD: struct.Struct = struct_format(KnownStack, "serial", "generation")
FULL_RECORD_SIZE = ctypes.sizeof(FullSampleRecord)
KNOWN_STACK_SIZE = ctypes.sizeof(KnownStack)
_EVENT_AT = FullSampleRecord.ev.offset
_KNOWN_EVENT_AT = KnownStack.ev.offset
_COMM_BYTES = SampleRecord.comm.size
# Fields read as strided views: (name, item format, offset in the record). The layout puts each
# at a multiple of its size, and records (56 bytes) and slots (64) are multiples of 8 bytes.
_COLUMNS = (("ts", "Q", SampleRecord.ts_ns.offset), ("stack_id", "Q", SampleRecord.stack_id.offset),
            ("serial", "Q", SampleRecord.serial.offset), ("pid", "I", SampleRecord.pid.offset),
            ("tid", "I", SampleRecord.tid.offset), ("cpu", "I", SampleRecord.cpu.offset),
            ("flags", "I", SampleRecord.flags.offset))
if SAMPLE_RECORD.size % 8 or SampleRecord.comm.offset % 8 or _COMM_BYTES != 16 or any(
        at % struct.calcsize(code) for _, code, at in _COLUMNS):
    raise ImportError("sample_record's layout no longer fits the strided column views")
_COMM_AT = SampleRecord.comm.offset

# One decoded header: (ts_ns, stack_id, serial, pid, tid, cpu, flags, comm bytes).
Header = tuple[int, int, int, int, int, int, int, bytes]


@dataclass(slots=True)
class IdColumns:
    """Id records decoded field by field into lists (each read in C from one strided view of
    the records' bytes: no Python object per record but the values). ``comm`` is the thread
    name's 16 bytes as one little-endian int (:func:`comm_bytes` turns it back): ints, unlike
    tuples, are not tracked by the garbage collector, so thousands a flush do not trigger
    collections."""

    ts: list[int]
    stack_id: list[int]
    serial: list[int]
    pid: list[int]
    tid: list[int]
    cpu: list[int]
    flags: list[int]
    comm: list[int]

    @classmethod
    def of(cls, blob: bytes, at: int, stride: int) -> IdColumns:
        """The records in ``blob`` that start at ``at`` and every ``stride`` bytes after."""
        view = memoryview(blob)
        words = {"Q": view.cast("Q"), "I": view.cast("I")}

        def column(code: str, offset: int) -> list[int]:
            size = struct.calcsize(code)
            return words[code][(at + offset) // size :: stride // size].tolist()

        ts, stack_id, serial, pid, tid, cpu, flags = (column(code, offset) for _, code, offset in _COLUMNS)
        comm = list(map(operator.or_, column("Q", _COMM_AT), map(operator.lshift, column("Q", _COMM_AT + 8),
                                                                  repeat(64))))
        return cls(ts, stack_id, serial, pid, tid, cpu, flags, comm)

    def __len__(self) -> int:
        return len(self.ts)

    def headers(self) -> Iterator[Header]:
        """The records as header tuples, in order."""
        return zip(self.ts, self.stack_id, self.serial, self.pid, self.tid, self.cpu, self.flags,
                   map(comm_bytes, self.comm), strict=True)


def comm_bytes(comm: int) -> bytes:
    """The 16 comm bytes of a thread name held as one little-endian int."""
    return comm.to_bytes(_COMM_BYTES, "little")


@dataclass(slots=True)
class SampleBatch:
    """A batch of records, split: id records (headers only, in column blocks) and records
    with a whole stack."""

    id_blocks: list[IdColumns] = field(default_factory=list)
    full: list[tuple[Header, RawStackEvent]] = field(default_factory=list)
    malformed: int = 0

    @property
    def ids(self) -> Iterable[Header]:
        """The id records as header tuples (for callers that want one per record)."""
        return chain.from_iterable(block.headers() for block in self.id_blocks)


def decode_batch(records: list[bytes]) -> SampleBatch:
    """Split and decode ``records``; records of any other size are counted as malformed."""
    batch = SampleBatch()
    size = SAMPLE_RECORD.size
    if records and set(map(len, records)) == {size}:  # the common batch: id records only (in C)
        batch.id_blocks.append(IdColumns.of(b"".join(records), 0, size))
        return batch
    small: list[bytes] = []
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
        batch.id_blocks.append(IdColumns.of(b"".join(small), 0, size))
    return batch


def record_pids(records: list[bytes]) -> set[int]:
    """The distinct pids of ``records`` (id records and whole stacks keep ``pid`` at the same
    offset): for a batch of id records only, one strided view over their concatenation."""
    size = SAMPLE_RECORD.size
    if records and set(map(len, records)) == {size}:
        return set(memoryview(b"".join(records)).cast("I")[SampleRecord.pid.offset // 4 :: size // 4])
    end = SampleRecord.pid.offset + 4
    return {int.from_bytes(r[SampleRecord.pid.offset : end], "little") for r in records if len(r) >= end}


def parse_known_stack(raw: bytes) -> tuple[int, RawStackEvent]:
    """(serial, stack) of a ``known_stacks`` map value; ValueError if it is too short."""
    if len(raw) < KNOWN_STACK_SIZE:
        raise ValueError(f"known stack of {len(raw)} bytes, expected {KNOWN_STACK_SIZE}")
    serial, _generation = KNOWN_STACK_HEAD.unpack_from(raw)
    return serial, parse_stack_event(raw[_KNOWN_EVENT_AT:])


def thread_name(comm: bytes) -> str:
    """A NUL-padded comm as text."""
    return comm.split(b"\0", 1)[0].decode("utf-8", "replace")
