"""Decoding of the CPU profile's sample records (bpf/stack_dedup.h), a batch at a time.

Most records are 56-byte id records (time, cpu, pid, tid, thread name, stack id, serial);
a record for a stack BPF has not sent before carries the whole ``struct stack_event`` after
the same header. A batch's id records come in runs of ring slots (agent/bpf/ring_reader.py
``SlotRun``) and are decoded together, field by field: each numeric field of every record is
one strided ``memoryview`` over the runs' concatenation, turned into a list in C, and the
stack key and thread name are cut out as bytes by ``struct.iter_unpack``; no Python step is
made per record.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from operator import itemgetter

from agent.bpf.layouts import FullSampleRecord, KnownStack, SampleRecord, struct_format
from agent.bpf.records import RawStackEvent, parse_stack_event
from agent.bpf.ring_reader import HEADER_BYTES, RingItem, SlotRun

SAMPLE_RECORD: struct.Struct = struct_format(SampleRecord)
KNOWN_STACK_HEAD: struct.Struct = struct_format(KnownStack, "serial", "generation")
FULL_RECORD_SIZE = ctypes.sizeof(FullSampleRecord)
KNOWN_STACK_SIZE = ctypes.sizeof(KnownStack)
_EVENT_AT = FullSampleRecord.ev.offset
_KNOWN_EVENT_AT = KnownStack.ev.offset
_COMM_BYTES = SampleRecord.comm.size
# Fields read as strided views: (name, item format, offset in the record). The layout puts each
# at a multiple of its size, and records (56 bytes) and slots (64) are multiples of 8 bytes.
_COLUMNS = (("ts", "Q", SampleRecord.ts_ns.offset), ("pid", "I", SampleRecord.pid.offset),
            ("tid", "I", SampleRecord.tid.offset), ("cpu", "I", SampleRecord.cpu.offset))
_FLAGS_AT = SampleRecord.flags.offset
# A record's stack key: its stack id, serial and pid, adjacent in the layout, as one 20-byte
# string (exact: the three fields' bytes).
_KEY_AT = SampleRecord.stack_id.offset
STACK_KEY = struct.Struct("<QQI")
if SAMPLE_RECORD.size % 8 or _COMM_BYTES != 16 or any(at % struct.calcsize(code) for _, code, at in _COLUMNS) \
        or SampleRecord.serial.offset != _KEY_AT + 8 or SampleRecord.pid.offset != _KEY_AT + 16:
    raise ImportError("sample_record's layout no longer fits the strided column views and stack keys")
_COMM_AT = SampleRecord.comm.offset

# One decoded header: (ts_ns, stack_id, serial, pid, tid, cpu, flags, comm bytes).
Header = tuple[int, int, int, int, int, int, int, bytes]


@lru_cache(maxsize=8)
def _field_cut(at: int, width: int, stride: int) -> struct.Struct:
    """A struct that takes the ``width`` bytes at ``at`` of each ``stride``-byte item."""
    return struct.Struct(f"{at}x{width}s{stride - at - width}x")


def _byte_field(blob: bytes, at: int, width: int, stride: int) -> list[bytes]:
    """The ``width`` bytes at ``at`` of every ``stride``-byte item of ``blob``, each its own
    ``bytes`` (cut in C by ``struct.iter_unpack``)."""
    return list(map(itemgetter(0), _field_cut(at, width, stride).iter_unpack(blob)))


@dataclass(slots=True)
class IdColumns:
    """Id records decoded field by field into lists, each read in C from the records' bytes: no
    Python object per record but the values. ``stack`` is each record's stack key (stack id,
    serial and pid as their 20 raw bytes, :data:`STACK_KEY`), ``comm`` its thread name's 16
    bytes; bytes, like ints and unlike tuples, are not tracked by the garbage collector, so
    thousands a flush do not trigger collections."""

    ts: list[int]
    pid: list[int]
    tid: list[int]
    cpu: list[int]
    stack: list[bytes]
    comm: list[bytes]
    # Where the records are, for the fields read only on demand (:meth:`headers`).
    blob: bytes
    at: int
    stride: int

    @classmethod
    def of(cls, blob: bytes, at: int, stride: int) -> IdColumns:
        """The records in ``blob`` that start at ``at`` and every ``stride`` bytes after
        (``blob`` holds whole ``stride``-byte items)."""
        view = memoryview(blob)
        words = {"Q": view.cast("Q"), "I": view.cast("I")}

        def column(code: str, offset: int) -> list[int]:
            size = struct.calcsize(code)
            return words[code][(at + offset) // size :: stride // size].tolist()

        ts, pid, tid, cpu = (column(code, offset) for _, code, offset in _COLUMNS)
        return cls(ts, pid, tid, cpu, _byte_field(blob, at + _KEY_AT, STACK_KEY.size, stride),
                   _byte_field(blob, at + _COMM_AT, _COMM_BYTES, stride), blob, at, stride)

    def __len__(self) -> int:
        return len(self.ts)

    def headers(self) -> Iterator[Header]:
        """The records as header tuples, in order."""
        flags = memoryview(self.blob).cast("I")[(self.at + _FLAGS_AT) // 4 :: self.stride // 4].tolist()
        keys = map(STACK_KEY.unpack, self.stack)
        return ((ts, stack_id, serial, pid, tid, cpu, flag, comm) for ts, (stack_id, serial, pid), tid, cpu, flag, comm
                in zip(self.ts, keys, self.tid, self.cpu, flags, self.comm, strict=True))


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

    def pids(self) -> list[int]:
        """The batch's distinct pids, whole records' first (the id records' pid columns read in C)."""
        found = dict.fromkeys(head[3] for head, _ev in self.full)
        for block in self.id_blocks:
            found.update(dict.fromkeys(block.pid))
        return list(found)


def decode_batch(items: Sequence[RingItem]) -> SampleBatch:
    """Split and decode a batch: runs of id records (:class:`SlotRun`) and single records;
    records of any other size are counted as malformed."""
    batch = SampleBatch()
    size = SAMPLE_RECORD.size
    runs: list[SlotRun] = []
    small: list[bytes] = []
    for item in items:  # a step per run or whole record, not per id record
        if isinstance(item, SlotRun):
            if item.record_size == size:
                runs.append(item)
            else:
                batch.malformed += item.count
            continue
        n = len(item)
        if n == size:
            small.append(item)
        elif n >= FULL_RECORD_SIZE:
            head: Header = SAMPLE_RECORD.unpack_from(item)
            batch.full.append((head, parse_stack_event(item[_EVENT_AT:])))
        else:
            batch.malformed += 1
    for slot in sorted({run.slot for run in runs}):  # one slot size in practice: one block
        blob = b"".join(run.slots for run in runs if run.slot == slot)
        batch.id_blocks.append(IdColumns.of(blob, HEADER_BYTES, slot))
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
