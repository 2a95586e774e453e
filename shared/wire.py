"""The wire format: compact msgpack deltas between agent and aggregator.

A *stream* is one agent instance's output for one profile type. Each stream keeps a
dictionary of five tables — strings, mappings, functions, locations, stacks — whose
entries get consecutive integer ids starting at 1 (0 means "none"). An entry is sent
once, in a *dict message*; *samples messages* then refer to stacks and strings by id.

Dict message (map)::

    v: PROTOCOL_VERSION   kind: "dict"   host: str   type: str   agent: str (instance id)
    epoch: int      bumps when the agent starts a fresh dictionary (ids are reassigned)
    seq: int        dict message counter within the epoch
    full: bool      true when this message re-sends the whole dictionary (resync)
    strings:   [base_id, [str, ...]]
    mappings:  [base_id, [[start, limit, offset, filename_sid, build_id_sid, go_build_id_sid,
                           htlhash_sid], ...]]
    functions: [base_id, [[name_sid, filename_sid], ...]]
    locations: [base_id, [[mapping_id, address, function_id, line, frame_type_sid, inlined], ...]]

Receivers also accept the shorter rows of older agents: mappings without the last two
build ids and locations without ``inlined`` (0 or 1; absent means 0).
    stacks:    [base_id, [[location_id, ...] (leaf first), ...]]

Entries with ids ``base_id, base_id+1, ...``. A receiver applies a table delta only when
``base_id <= known + 1`` (re-sent entries overwrite identically); a larger base is a gap:
it asks for a resync on :data:`shared.subjects.RESYNC_SUBJECT`.

Samples message (map, columnar so msgpack packs small ints tightly)::

    v, kind: "samples", host, type, agent, epoch, seq
    t0: int         unix ns of the first sample; ``ts`` holds offsets from it
    period: int     sampling period in the type's period unit
    ts, cpu, pid, tid, thread, process, stack: [int, ...]  (thread/process are string ids)
    values: [[int, ...], ...]   one list per sample, in PROFILE_TYPES order
    attr_sets: [[key_sid, value_sid, ...], ...]  optional: the batch's distinct attribute lists
    attr:   [int, ...]  with attr_sets: per sample, the index of its list in attr_sets

Samples share their process's attributes, so a batch holds few distinct lists: each is sent
once and every sample carries one small index. Older agents sent ``attrs``, one list per
sample (``[[key_sid, value_sid, ...], ...]``): receivers accept either form.

``v`` is the lowest protocol version that reads the message: 2 for a samples message with
``attr_sets`` (a version-1 receiver rejects it as ``bad_version`` instead of dropping its
attributes unseen), 1 for everything else.

Everything received is validated (types, sizes, id bounds) before use: a bad message is
rejected with :class:`WireError`, never applied halfway.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, TypeVar, cast

import msgpack
import zstandard

from shared.model import Coded, Column, Frame, FrameType, Mapping, Sample, SampleColumns
from shared.profile_types import PROFILE_TYPES, ProfileType

T = TypeVar("T")

PROTOCOL_VERSION = 1
ATTRIBUTE_SETS_VERSION = 2  # samples messages with attr_sets/attr
ACCEPTED_VERSIONS = (PROTOCOL_VERSION, ATTRIBUTE_SETS_VERSION)

# Bounds applied to every received message: generous for real agents, small enough that
# a hostile publisher cannot make the aggregator allocate without limit.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_ENTRIES_PER_TABLE = 200_000
MAX_SAMPLES_PER_MESSAGE = 200_000
MAX_STRING_BYTES = 4096
MAX_STACK_DEPTH = 512
MAX_VALUES = 8
MAX_ATTRS = 16

# Messages larger than this are zstd-compressed (a zstd frame starts with its magic number,
# which no msgpack map does, so receivers tell them apart without a flag). Measured with the
# host simulator: CPU sample batches shrink ~2.4x at level 3.
COMPRESS_MIN_BYTES = 256
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_compressor = zstandard.ZstdCompressor(level=3)
_decompressor = zstandard.ZstdDecompressor()

_FRAME_TYPES = tuple(FrameType)
# A dict lookup instead of calling the enum (about 1 µs each) for every location received.
_FRAME_TYPE_BY_VALUE = {t.value: t for t in FrameType}
_TABLES = ("strings", "mappings", "functions", "locations", "stacks")
# Sample fields read column by column when encoding.
_TIMESTAMP, _CPU, _PID, _TID = (attrgetter(f) for f in ("timestamp_ns", "cpu", "pid", "tid"))
_THREAD_NAME, _PROCESS_NAME, _FRAMES = (attrgetter(f) for f in ("thread_name", "process_name", "frames"))
_VALUES, _ATTRIBUTES = attrgetter("values"), attrgetter("attributes")


class WireError(ValueError):
    """A message that does not follow the wire format; carries a short reason for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def new_agent_id() -> str:
    """A random instance id: a restarted agent is a new stream, never confused with the old one."""
    return os.urandom(8).hex()


# --------------------------------------------------------------------------- encoding (agent)


# Estimated bytes each new dictionary entry keeps alive in the encoder, for the agent's cache
# budget (agent/memory_budget.py). Measured with tracemalloc, encoding batches of synthetic
# 5-, 20- and 40-frame stacks drawn from 20,000 distinct frames with distinct function names
# (~40 characters; growth divided by the new entries): a stack 275 B + 8.5 B a frame (its
# row, its dict slot, its identity-map entry) plus its frames tuple when only the encoder
# still holds it (40 B + 8 B a frame); a location with its function and its name string
# 438 B, plus the Frame object its key keeps alive (96 B). Checked against tracemalloc by
# tests/test_cache_budget.py.
STRING_ENTRY_BYTES = 75  # plus one byte a character
FUNCTION_ENTRY_BYTES = 120
LOCATION_ENTRY_BYTES = 300
MAPPING_ENTRY_BYTES = 400
STACK_ENTRY_BYTES = 320
STACK_FRAME_BYTES = 16
IDENTITY_ENTRY_BYTES = 120  # an equal tuple that is another object: its entry (+ 8 B a frame)


@dataclass
class _Table:
    """One id-assigning table of the encoder; ``sent`` is how many ids the receiver has."""

    entry_bytes: int = 0
    ids: dict[Any, int] = field(default_factory=dict)
    rows: list[Any] = field(default_factory=list)
    sent: int = 0

    def intern(self, key: Any, row: Any, extra_bytes: int = 0) -> tuple[int, int]:
        """(id, estimated bytes the table grew by: 0 when ``key`` was known)."""
        found = self.ids.get(key)
        if found is not None:
            return found, 0
        self.rows.append(row)
        new_id = len(self.rows)
        self.ids[key] = new_id
        return new_id, self.entry_bytes + extra_bytes

    def pending(self) -> list[Any]:
        return [self.sent + 1, self.rows[self.sent :]]


class StreamEncoder:
    """Turns symbolized samples of one stream into dict + samples messages.

    Not thread-safe; one per actor. The dictionary is bounded: when it holds more than
    ``max_entries`` entries in any table, the encoder starts a new epoch (fresh ids), so a
    long-running agent's memory stays flat however many distinct stacks it sees. The owner
    may also start a new epoch between batches (``start_new_epoch``: the agent's cache budget,
    which reads ``estimated_bytes``); the receiver then gets the next batch's dictionary
    from id 1 under the new epoch, as after a bound.
    """

    def __init__(
        self, host: str, profile_type: ProfileType, agent_id: str, max_entries: int = 100_000
    ) -> None:
        self.host = host
        self.profile_type = profile_type
        self.agent_id = agent_id
        self.max_entries = min(max_entries, MAX_ENTRIES_PER_TABLE)
        self.epoch = 0
        self.estimated_bytes = 0  # what the dictionary keeps alive, estimated (see STRING_ENTRY_BYTES)
        self._seq = itertools.count(1)
        self._dict_seq = 0
        self._reset_tables()

    def _reset_tables(self) -> None:
        self.epoch += 1
        self._dict_seq = 0
        self.estimated_bytes = 0
        self._strings = _Table(STRING_ENTRY_BYTES)
        self._mappings = _Table(MAPPING_ENTRY_BYTES)
        self._functions = _Table(FUNCTION_ENTRY_BYTES)
        self._locations = _Table(LOCATION_ENTRY_BYTES)
        self._stacks = _Table(STACK_ENTRY_BYTES)
        # Stack ids by the identity (id()) of the frames tuple: the actors hand the very same
        # tuple for a stack they symbolized before (their per-stack cache), and hashing a
        # tuple of frozen dataclasses runs Python code per frame (~70 % of the encoder's time
        # when keyed by value). ``_identity_keepalive`` holds every tuple whose id is a key,
        # so no id can be reused by another object while its entry lives; an equal tuple that
        # is a different object is looked up by value once, then by identity too.
        self._stack_by_identity: dict[int, int] = {}
        self._identity_keepalive: list[tuple[Frame, ...]] = []
        self._identity_bytes = 0  # estimated bytes of identity entries beyond the stacks' own
        self._full_pending = False

    def start_new_epoch(self) -> int:
        """Forget the dictionary (call between batches); returns how many entries it held.

        Ids cannot be taken back one by one (receivers hold them in order), so a dictionary
        over its memory share starts over: the next batch's dict message carries the new
        epoch and every entry that batch uses, from id 1."""
        entries = sum(len(t.rows) for t in self._tables()) + len(self._stack_by_identity)
        self._reset_tables()
        return entries

    def request_full(self) -> None:
        """Mark the whole dictionary for re-sending with the next batch (receiver asked)."""
        for table in self._tables():
            table.sent = 0
        self._full_pending = True

    def _tables(self) -> tuple[_Table, ...]:
        return (self._strings, self._mappings, self._functions, self._locations, self._stacks)

    def _string(self, s: str) -> int:
        sid, grew = self._strings.intern(s, s, len(s))
        self.estimated_bytes += grew
        return sid

    def _mapping(self, m: Mapping | None) -> int:
        if m is None:
            return 0
        found = self._mappings.ids.get(m)
        if found is not None:
            return found
        row = [m.start, m.limit, m.offset, self._string(m.filename), self._string(m.build_id),
               self._string(m.go_build_id), self._string(m.htlhash)]
        mid, grew = self._mappings.intern(m, row)
        self.estimated_bytes += grew
        return mid

    def _location(self, f: Frame) -> int:
        found = self._locations.ids.get(f)
        if found is not None:
            return found
        fn_key = (f.function, f.filename)
        fn_id = self._functions.ids.get(fn_key)
        if fn_id is None:
            fn_id, grew = self._functions.intern(fn_key, [self._string(f.function), self._string(f.filename)])
            self.estimated_bytes += grew
        row = [self._mapping(f.mapping), f.address, fn_id, f.line, self._string(f.frame_type.value), int(f.inlined)]
        lid, grew = self._locations.intern(f, row)
        self.estimated_bytes += grew
        return lid

    def _stack(self, frames: tuple[Frame, ...]) -> int:
        found = self._stacks.ids.get(frames)
        if found is not None:
            return found
        sid, grew = self._stacks.intern(frames, [self._location(f) for f in frames[:MAX_STACK_DEPTH]],
                                        STACK_FRAME_BYTES * len(frames))
        self.estimated_bytes += grew
        return sid

    def _stack_ids(self, stacks: list[tuple[Frame, ...]]) -> list[int]:
        """The stack id of each frames tuple, by identity first (see ``_reset_tables``)."""
        by_identity = self._stack_by_identity
        if len(by_identity) > 2 * self.max_entries:  # bounded: equal tuples made anew each time
            self.estimated_bytes -= self._identity_bytes
            self._identity_bytes = 0
            by_identity.clear()
            self._identity_keepalive.clear()
        found: list[int | None] = list(map(by_identity.get, map(id, stacks)))  # C-level loop
        if None not in found:
            return cast(list[int], found)
        out = []
        for frames, stack_id in zip(stacks, found, strict=True):
            if stack_id is None:
                before = self.estimated_bytes
                stack_id = self._stack(frames)
                if self.estimated_bytes == before:  # known by value: this tuple is an extra entry
                    extra = IDENTITY_ENTRY_BYTES + 8 * len(frames)
                    self._identity_bytes += extra
                    self.estimated_bytes += extra
                by_identity[id(frames)] = stack_id
                self._identity_keepalive.append(frames)
            out.append(stack_id)
        return out

    def _string_ids(self, strings: list[str]) -> list[int]:
        """The string id of each string: each distinct string interned once, in order of
        first appearance (the ids a per-sample loop would give), then mapped in C."""
        known, ids = self._strings.ids, {}
        for s in dict.fromkeys(strings):
            ids[s] = known.get(s) or self._string(s)  # ids start at 1
        return list(map(ids.__getitem__, strings))

    def _coded_ids(self, column: Column[T], ids_of: Callable[[list[T]], list[int]]) -> list[int]:
        """Each sample's id of its value in ``column``: an encoded column's values are looked up
        once each (in their order: that of their first samples), then its codes mapped."""
        if isinstance(column, Coded):
            ids = ids_of(column.values)
            return list(map(ids.__getitem__, column.codes))
        return ids_of(column)

    def _attribute_sets(self, attributes: Column[dict[str, str]]) -> tuple[list[list[int]], list[int]]:
        """(the batch's distinct ``[key_sid, value_sid, ...]`` lists, each sample's index into
        them): each distinct dict object is flattened once (the samples of a process share its
        dict), equal lists are sent once, in order of first appearance."""
        if isinstance(attributes, Coded):
            distinct, index = self._attribute_sets(attributes.values)
            return distinct, list(map(index.__getitem__, attributes.codes))
        ids = list(map(id, attributes))
        sets: dict[tuple[int, ...], int] = {}
        index_by_dict: dict[int, int] = {}
        for attrs in dict(zip(ids, attributes, strict=True)).values():  # distinct objects, in C
            flat: list[int] = []
            for k, v in list(attrs.items())[:MAX_ATTRS]:
                flat.append(self._string(k))
                flat.append(self._string(v))
            index_by_dict[id(attrs)] = sets.setdefault(tuple(flat), len(sets))
        return list(map(list, sets)), list(map(index_by_dict.__getitem__, ids))

    def encode(self, samples: Sequence[Sample], period: int) -> tuple[bytes | None, bytes | None]:
        """Encode a batch: returns (dict message or None if nothing new, samples message or None).

        Column by column with C-level iteration (``map``/``attrgetter``, comprehensions):
        this runs once per sample of every profile type, the agent's hottest Python path.
        :class:`SampleColumns` are read as they are, without a ``Sample`` per sample."""
        if any(len(t.rows) > self.max_entries for t in self._tables()):
            self._reset_tables()
        attributes: Column[dict[str, str]] | None
        thread_names: Column[str]
        process_names: Column[str]
        stacks: Column[tuple[Frame, ...]]
        if isinstance(samples, SampleColumns):  # stack, name and attribute columns possibly encoded
            stamps, cpu, pid, tid = samples.timestamps, samples.cpus, samples.pids, samples.tids
            thread_names, process_names = samples.column("thread_names"), samples.column("process_names")
            stacks, values, attributes = samples.column("stacks"), samples.values, samples.column("attributes")
            # Any attributes at all: an encoded column's values, a plain one's per sample, as held.
            if attributes is not None and not any(attributes.values if isinstance(attributes, Coded) else attributes):
                attributes = None
        else:
            stamps = list(map(_TIMESTAMP, samples))
            cpu = list(map(_CPU, samples))
            pid = list(map(_PID, samples))
            tid = list(map(_TID, samples))
            thread_names = list(map(_THREAD_NAME, samples))
            process_names = list(map(_PROCESS_NAME, samples))
            stacks = list(map(_FRAMES, samples))
            values = list(map(_VALUES, samples))  # tuples: msgpack packs them as arrays, as lists
            attributes = list(map(_ATTRIBUTES, samples)) if any(map(_ATTRIBUTES, samples)) else None
        t0 = min(stamps, default=0)
        ts = list(map((-t0).__add__, stamps))
        thread = self._coded_ids(thread_names, self._string_ids)
        process = self._coded_ids(process_names, self._string_ids)
        stack = self._coded_ids(stacks, self._stack_ids)
        attr_sets, attr = self._attribute_sets(attributes) if attributes is not None else ([], [])
        dict_msg = self._dict_message()
        if not samples:
            return dict_msg, None
        body: dict[str, Any] = {
            **self._header("samples"),
            "seq": next(self._seq),
            "t0": t0,
            "period": period,
            "ts": ts,
            "cpu": cpu,
            "pid": pid,
            "tid": tid,
            "thread": thread,
            "process": process,
            "stack": stack,
            "values": values,
        }
        if attributes is not None:
            body["v"] = ATTRIBUTE_SETS_VERSION
            body["attr_sets"] = attr_sets
            body["attr"] = attr
        return dict_msg, pack(body)

    def flush_dictionary(self) -> bytes | None:
        """The pending dict message on its own (e.g. answering a resync with no samples)."""
        return self._dict_message()

    def _header(self, kind: str) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "kind": kind,
            "host": self.host,
            "type": self.profile_type.value,
            "agent": self.agent_id,
            "epoch": self.epoch,
        }

    def _dict_message(self) -> bytes | None:
        if all(t.sent == len(t.rows) for t in self._tables()) and not self._full_pending:
            return None
        self._dict_seq += 1
        body: dict[str, Any] = {**self._header("dict"), "seq": self._dict_seq, "full": self._full_pending}
        for name, table in zip(_TABLES, self._tables(), strict=True):
            body[name] = table.pending()
            table.sent = len(table.rows)
        self._full_pending = False
        return pack(body)


def pack(body: dict[str, Any]) -> bytes:
    """msgpack-encode a message, zstd-compressing it when that pays."""
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) >= COMPRESS_MIN_BYTES:
        return _compressor.compress(data)
    return data


# --------------------------------------------------------------------------- decoding (aggregator)


def unpack(data: bytes) -> dict[str, Any]:
    """Unpack one message with size limits; raises WireError on anything but a well-formed map."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError("too_large", f"{len(data)} bytes")
    if data[:4] == ZSTD_MAGIC:
        data = _decompress(data)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STRING_BYTES * 16,
            max_bin_len=MAX_STRING_BYTES,
            max_array_len=MAX_SAMPLES_PER_MESSAGE,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError("not_msgpack", type(exc).__name__) from None
    if not isinstance(obj, dict):
        raise WireError("not_a_map")
    version = obj.get("v")
    if type(version) is not int or version not in ACCEPTED_VERSIONS:
        raise WireError("bad_version", repr(version)[:32])
    return obj


def _decompress(data: bytes) -> bytes:
    """Decompress with a hard output bound, so a small hostile frame cannot expand unbounded."""
    try:
        with _decompressor.stream_reader(io.BytesIO(data)) as reader:
            out = reader.read(MAX_MESSAGE_BYTES + 1)  # reads no more than the bound
    except zstandard.ZstdError as exc:
        raise WireError("bad_compression", str(exc)[:80]) from None
    if len(out) > MAX_MESSAGE_BYTES:
        raise WireError("too_large", "decompressed")
    return out


@dataclass(frozen=True, slots=True)
class StreamKey:
    """Identity of a stream: one agent instance's output of one profile type."""

    host: str
    profile_type: ProfileType
    agent: str


def header(msg: dict[str, Any], kind: str) -> tuple[StreamKey, int, int]:
    """Validate the common header; returns (stream key, epoch, seq)."""
    if msg.get("kind") != kind:
        raise WireError("bad_kind", repr(msg.get("kind"))[:32])
    host, ptype, agent = msg.get("host"), msg.get("type"), msg.get("agent")
    if not isinstance(host, str) or not 0 < len(host) <= 255:
        raise WireError("bad_host")
    if not isinstance(agent, str) or not 0 < len(agent) <= 64:
        raise WireError("bad_agent")
    try:
        profile_type = ProfileType(str(ptype))
    except ValueError:
        raise WireError("bad_type", repr(ptype)[:32]) from None
    epoch, seq = msg.get("epoch"), msg.get("seq")
    if not isinstance(epoch, int) or not isinstance(seq, int) or not (_is_uint(epoch) and _is_uint(seq)):
        raise WireError("bad_header")
    return StreamKey(host, profile_type, agent), epoch, seq


def _is_uint(x: object) -> bool:
    return type(x) is int and 0 <= x < 2**64


_INT_ONLY = {int}
_LIST_ONLY = {list}


def _uint_column(col: list[Any]) -> bool:
    """True when every element is a plain int in [0, 2**64) (bool excluded)."""
    if type(col) is not list:
        return False
    if not col:
        return True
    # map(type) and the set are built in C: this runs on every column of every samples
    # message, where a generator expression costs a large share of the intake's decode time.
    return set(map(type, col)) == _INT_ONLY and min(col) >= 0 and max(col) < 2**64


def _uint_row(row: object, n: int, what: str, old_n: int | None = None) -> list[int]:
    """A row of ``n`` uints; an older sender's row of ``old_n`` uints is accepted as is."""
    if not isinstance(row, list) or len(row) not in (n, old_n) or not _uint_column(row):
        raise WireError(f"bad_{what}")
    return row


class StreamDictionary:
    """The receiver's copy of one stream's dictionary, rebuilt from dict messages.

    Decoded objects (Mapping, Frame, stacks as Frame tuples) are materialized once when
    their entry arrives, so decoding a sample is a list lookup.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.strings: list[str] = [""]
        self.mappings: list[Mapping | None] = [None]
        self.functions: list[tuple[str, str]] = [("", "")]
        self.locations: list[Frame] = [Frame("", "", 0, 0, FrameType.NATIVE)]
        self.stacks: list[tuple[Frame, ...]] = [()]

    def apply(self, msg: dict[str, Any]) -> None:
        """Apply a validated-header dict message; raises WireError (gap or bad entry) atomically.

        Every table is checked before anything is written, so a rejected message leaves the
        dictionary exactly as it was.
        """
        deltas: list[tuple[str, int, list[Any]]] = []
        for name in _TABLES:
            part = msg.get(name)
            if part is None:
                continue
            if not isinstance(part, list) or len(part) != 2 or not _is_uint(part[0]) or part[0] < 1:
                raise WireError("bad_table", name)
            base, rows = part
            if not isinstance(rows, list) or len(rows) > MAX_ENTRIES_PER_TABLE:
                raise WireError("bad_table", name)
            current = len(getattr(self, name))
            if base > current:
                raise WireError("dict_gap", f"{name} base {base} > known {current - 1}")
            if base - 1 + len(rows) > MAX_ENTRIES_PER_TABLE:
                raise WireError("dict_too_large", name)
            deltas.append((name, base, rows))
        # Validate and materialize into staged rows first, in dependency order; commit at the end.
        staged: dict[str, tuple[int, list[Any]]] = {}
        for name, base, rows in deltas:
            materialize = getattr(self, f"_make_{name[:-1]}")
            new_rows: list[Any] = []
            staged[name] = (base, new_rows)
            for row in rows:
                new_rows.append(materialize(row, staged))
        for name, (base, new_rows) in staged.items():
            table = getattr(self, name)
            del table[base:]
            table.extend(new_rows)

    def _ref(self, staged: dict[str, tuple[int, list[Any]]], name: str, idx: int,
             allow_zero: bool = False) -> Any:
        """Resolve an id against staged rows of this message, then the committed table."""
        if idx == 0 and not allow_zero:
            raise WireError("bad_ref", f"{name} 0")
        part = staged.get(name)
        if part is not None and idx >= part[0]:
            base, rows = part
            if idx - base < len(rows):
                return rows[idx - base]
            raise WireError("unknown_id", f"{name} {idx}")
        table = getattr(self, name)
        if idx >= len(table):
            raise WireError("unknown_id", f"{name} {idx}")
        return table[idx]

    def _make_string(self, row: object, staged: dict[str, tuple[int, list[Any]]]) -> str:
        if not isinstance(row, str) or len(row) > MAX_STRING_BYTES:
            raise WireError("bad_string")
        return row

    def _make_mapping(self, row: object, staged: dict[str, tuple[int, list[Any]]]) -> Mapping:
        fields = _uint_row(row, 7, "mapping", old_n=5)
        start, limit, offset = fields[:3]
        fname, build_id, go_build_id, htlhash = (self._ref(staged, "strings", sid, True) for sid in
                                                 (*fields[3:], 0, 0)[:4])
        return _interned(Mapping(start, limit, offset, fname, build_id, go_build_id, htlhash))

    def _make_function(self, row: object, staged: dict[str, tuple[int, list[Any]]]) -> tuple[str, str]:
        name, fname = _uint_row(row, 2, "function")
        return (self._ref(staged, "strings", name, True), self._ref(staged, "strings", fname, True))

    def _make_location(self, row: object, staged: dict[str, tuple[int, list[Any]]]) -> Frame:
        fields = _uint_row(row, 6, "location", old_n=5)
        mapping_id, address, function_id, line, ftype = fields[:5]
        inlined = fields[5] if len(fields) == 6 else 0
        if inlined > 1:
            raise WireError("bad_location", "inlined")
        mapping = self._ref(staged, "mappings", mapping_id, True)
        name, fname = self._ref(staged, "functions", function_id, True)
        frame_type = _FRAME_TYPE_BY_VALUE.get(self._ref(staged, "strings", ftype, True))
        if frame_type is None:
            raise WireError("bad_frame_type")
        return _interned(Frame(name, fname, line, address, frame_type, mapping, bool(inlined)))

    def _make_stack(self, row: object, staged: dict[str, tuple[int, list[Any]]]) -> tuple[Frame, ...]:
        if not isinstance(row, list) or len(row) > MAX_STACK_DEPTH:
            raise WireError("bad_stack")
        frames = []
        for loc in row:
            if not _is_uint(loc):
                raise WireError("bad_stack")
            frames.append(self._ref(staged, "locations", loc))
        return tuple(frames)


# Equal frames and mappings received from different streams (hosts running the same build,
# a restarted agent's new epoch) are made the very same object. The exporters then
# deduplicate them by identity, once per distinct object, instead of hashing each stream's
# copies of a 20-field-deep value again at every export (at fleet scale that hashing would
# dominate the OTLP and pprof encoding time), and the aggregator holds one copy.
# Bounded: past the limit the table starts over, which only costs some sharing. The table
# also keeps frames alive that no dictionary uses any more (processes that are gone), about
# 250 bytes an entry: 200,000 (~50 MiB) still holds a large fleet's shared frames (how the
# bound was chosen: docs/design/fleet.md, "Aggregator tuning").
MAX_INTERNED = 200_000
_INTERN: dict[Any, Any] = {}
_Interned = TypeVar("_Interned", Frame, Mapping)


def _interned(value: _Interned) -> _Interned:
    found: _Interned | None = _INTERN.get(value)
    if found is not None:
        return found
    if len(_INTERN) >= MAX_INTERNED:
        _INTERN.clear()
    _INTERN[value] = value
    return value


# One decoded sample as ids: (ts_ns, cpu, pid, tid, thread_sid, process_sid, stack_id, values, attrs),
# attrs being ((key_sid, value_sid), ...). Ids keep hashing cheap on the aggregator's hot path.
SampleRow = tuple[int, int, int, int, int, int, int, tuple[int, ...], tuple[tuple[int, int], ...]]


@dataclass(slots=True)
class DecodedSamples:
    """A validated samples message: rows of ids plus the dictionary that resolves them.

    ``samples`` materializes full :class:`Sample` objects for callers that want them; the
    aggregator's merge works on ``rows`` directly.
    """

    stream: StreamKey
    period: int
    rows: list[SampleRow]
    dictionary: StreamDictionary

    @property
    def samples(self) -> list[Sample]:
        strings, stacks = self.dictionary.strings, self.dictionary.stacks
        return [
            Sample(t, c, p, th, strings[tn], strings[pn], stacks[st], vals,
                   {strings[k]: strings[v] for k, v in attrs})
            for t, c, p, th, tn, pn, st, vals, attrs in self.rows
        ]


def decode_samples(msg: dict[str, Any], stream: StreamKey, dictionary: StreamDictionary) -> DecodedSamples:
    """Validate a samples message against ``dictionary``.

    Raises WireError("unknown_id") when the message refers to ids the dictionary does not
    have yet (the caller may park it until the dict message arrives) and other WireErrors
    for malformed content.
    """
    columns = ("ts", "cpu", "pid", "tid", "thread", "process", "stack", "values")
    raw_cols = [msg.get(c) for c in columns]
    if not all(isinstance(c, list) for c in raw_cols):
        raise WireError("bad_columns")
    cols = cast(list[list[Any]], raw_cols)
    n = len(cols[0])
    if n > MAX_SAMPLES_PER_MESSAGE or any(len(c) != n for c in cols):
        raise WireError("bad_columns", "length mismatch")
    attrs = msg.get("attrs")
    if attrs is not None and (not isinstance(attrs, list) or len(attrs) != n or "attr_sets" in msg):
        raise WireError("bad_attrs")
    t0, period = msg.get("t0"), msg.get("period")
    if not isinstance(t0, int) or not isinstance(period, int) or not (_is_uint(t0) and _is_uint(period)):
        raise WireError("bad_header", "t0/period")
    ts, cpu, pid, tid, thread, process, stack, values = cols
    n_values = len(PROFILE_TYPES[stream.profile_type].sample_types)
    n_strings, n_stacks = len(dictionary.strings), len(dictionary.stacks)
    # Validate whole columns at once (C-speed builtins), not field by field: this loop sees
    # every sample of the fleet.
    for col in (ts, cpu, pid, tid, thread, process, stack):
        if not _uint_column(col):
            raise WireError("bad_sample")
    if n and (max(thread) >= n_strings or max(process) >= n_strings):
        raise WireError("unknown_id", "sample string")
    if n and (min(stack) == 0 or max(stack) >= n_stacks):
        raise WireError("unknown_id", "sample stack")
    if n and (set(map(type, values)) != _LIST_ONLY or set(map(len, values)) != {n_values}):
        raise WireError("bad_values")
    if not _uint_column(list(itertools.chain.from_iterable(values))):
        raise WireError("bad_values")
    value_rows = list(map(tuple, values))
    no_attrs: tuple[tuple[int, int], ...] = ()
    attr_rows: list[tuple[tuple[int, int], ...]] = [no_attrs] * n
    if "attr_sets" in msg or "attr" in msg:
        attr_rows = _attribute_rows(msg.get("attr_sets"), msg.get("attr"), n, n_strings)
    elif isinstance(attrs, list):  # older agents: one list per sample
        for i, flat in enumerate(attrs):
            if flat:
                attr_rows[i] = _attribute_pairs(flat, n_strings)
    # zip builds the row tuples in C; all columns were checked to have length n above.
    rows: list[SampleRow] = list(zip(map(t0.__add__, ts), cpu, pid, tid, thread, process, stack,
                                     value_rows, attr_rows, strict=True))
    return DecodedSamples(stream, period, rows, dictionary)


def _attribute_pairs(flat: object, n_strings: int) -> tuple[tuple[int, int], ...]:
    """``((key_sid, value_sid), ...)`` of one validated ``[key_sid, value_sid, ...]`` list."""
    if type(flat) is not list or len(flat) % 2 or len(flat) > 2 * MAX_ATTRS or not _uint_column(flat):
        raise WireError("bad_attrs")
    if flat and max(flat) >= n_strings:
        raise WireError("unknown_id", "attribute")
    return tuple(zip(flat[::2], flat[1::2], strict=True))


def _attribute_rows(sets: object, index: object, n: int, n_strings: int) -> list[tuple[tuple[int, int], ...]]:
    """Each sample's attribute pairs from ``attr_sets`` and ``attr``: every set is validated
    once, and the samples share its tuple."""
    if type(sets) is not list or type(index) is not list or len(index) != n or len(sets) > max(n, 1):
        raise WireError("bad_attrs")
    rows = [_attribute_pairs(flat, n_strings) for flat in sets]
    if n and (not _uint_column(index) or max(index) >= len(rows)):
        raise WireError("bad_attrs", "set index")
    return list(map(rows.__getitem__, index))


def resync_request(host: str, profile_types: Iterable[ProfileType] | None = None, reason: str = "") -> bytes:
    """Payload asking agent(s) on ``host`` ("*" for all) to re-send full dictionaries."""
    types = [t.value for t in profile_types] if profile_types else []
    return msgpack.packb({"v": PROTOCOL_VERSION, "kind": "resync", "host": host, "types": types,
                          "reason": reason[:200]}, use_bin_type=True)


def parse_resync(data: bytes) -> tuple[str, set[ProfileType]]:
    """Validate a resync request: returns (host or "*", requested types; empty = all)."""
    msg = unpack(data)
    host, types = msg.get("host"), msg.get("types", [])
    if msg.get("kind") != "resync" or not isinstance(host, str) or not isinstance(types, list):
        raise WireError("bad_resync")
    try:
        return host, {ProfileType(t) for t in types}
    except ValueError:
        raise WireError("bad_resync", "type") from None
