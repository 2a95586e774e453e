"""Writing gzipped pprof (``profile.proto``) files that Google's pprof and ``go tool pprof`` read.

Hand-written protobuf encoding, on purpose: none of our dependencies ships pprof's
profile.proto classes, and the format needs only varints, packed integers and
length-delimited fields (about 60 lines) — less than a code-generation step in the build.
Field numbers are those of github.com/google/pprof/proto/profile.proto.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from typing import Any, cast

from aggregator.profile import FleetProfiles
from shared.lock_waits import is_contention
from shared.model import INTERPRETED_FRAME_TYPES as _INTERPRETED
from shared.model import Frame, FrameType, inline_runs
from shared.model import Mapping as ModelMapping
from shared.profile_types import PROFILE_TYPES, ProfileType


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 negatives as two's complement, as protobuf does
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value) if value else b""


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _packed(field: int, values: Iterable[int]) -> bytes:
    body = b"".join(_varint(v) for v in values)
    return _bytes(field, body) if body else b""


class PprofDictionary:
    """Interns strings, mappings, functions and locations into profile.proto's tables, each entry
    encoded once (the pprof counterpart of :class:`aggregator.otlp.encode.DictionaryBuilder`).

    Merged samples share their stream dictionary's stack tuples (and the wire decoder interns
    equal frames), so the encoded location list of a stack is cached by identity: each distinct
    stack is encoded once, not once per sample, and frames are not hashed by value per sample.
    The tuples and frames are kept referenced so an id cannot be reused while the builder lives.
    """

    def __init__(self) -> None:
        self.string_table: list[str] = [""]
        self._strings: dict[str, int] = {"": 0}
        self._functions: dict[tuple[str, str, str], int] = {}
        self._mappings: dict[ModelMapping, int] = {}
        self._mapping_order: list[ModelMapping] = []
        # per mapping id: [every location has a function, ... a file name, ... a line, has Go frames]
        self._mapping_flags: dict[int, list[bool]] = {}
        self._locations: dict[tuple[Frame, ...], int] = {}
        self._labels: dict[tuple[str, str, int | None], bytes] = {}
        self.function_messages: list[bytes] = []
        self.location_messages: list[bytes] = []
        self._stack_fields: dict[int, tuple[bytes, tuple[Frame, ...]]] = {}
        self._location_varints: dict[int, bytes] = {}
        self._located: list[Frame] = []  # keeps the frames behind _location_varints alive

    def string(self, s: str) -> int:
        idx = self._strings.get(s)
        if idx is None:
            idx = len(self.string_table)
            self.string_table.append(s)
            self._strings[s] = idx
        return idx

    def mapping(self, m: ModelMapping | None) -> int:
        """The mapping's id; 0 (none) for a frame without one."""
        if m is None:
            return 0
        mid = self._mappings.get(m)
        if mid is None:
            mid = len(self._mappings) + 1
            self._mappings[m] = mid
            self._mapping_order.append(m)
            self._mapping_flags[mid] = [True, True, True, False]
        return mid

    def function(self, f: Frame) -> int:
        name = f.function or unknown_frame_label(f)
        # pprof demangles a name whose system name equals it: interpreted code has none.
        system_name = "" if f.frame_type in _INTERPRETED else name
        key = (name, system_name, f.filename)
        fid = self._functions.get(key)
        if fid is None:
            fid = len(self._functions) + 1
            self._functions[key] = fid
            self.function_messages.append(_int(1, fid) + _int(2, self.string(name))
                                          + _int(3, self.string(system_name)) + _int(4, self.string(f.filename)))
        return fid

    def location(self, run: tuple[Frame, ...]) -> int:
        """The location of frames at one address: inlined callees innermost first, then their caller."""
        lid = self._locations.get(run)
        if lid is None:
            lid = len(self._locations) + 1
            self._locations[run] = lid
            outer = run[-1]
            mid = self.mapping(outer.mapping)
            lines = b"".join(_bytes(4, _int(1, self.function(f)) + _int(2, f.line)) for f in run)
            self.location_messages.append(_int(1, lid) + _int(2, mid) + _int(3, outer.address) + lines)
            if mid:
                flags = self._mapping_flags[mid]
                for f in run:
                    flags[0] &= bool(f.function)
                    flags[1] &= bool(f.filename)
                    flags[2] &= f.line > 0
                    flags[3] |= f.frame_type == FrameType.GO
        return lid

    def _location_varint(self, f: Frame) -> bytes:
        known = self._location_varints.get(id(f))
        if known is None:
            known = self._location_varints[id(f)] = _varint(self.location((f,)))
            self._located.append(f)
        return known

    def stack(self, frames: tuple[Frame, ...]) -> bytes:
        """A sample's encoded ``location_id`` field for ``frames`` (leaf first)."""
        known = self._stack_fields.get(id(frames))
        if known is None:
            if any(f.inlined for f in frames):
                body = b"".join(_varint(self.location(run)) for run in inline_runs(frames))
            else:
                # Lookups by identity in C (map over id and dict.get); new frames take the slow path.
                parts = list(map(self._location_varints.get, map(id, frames)))
                body = b"".join(cast(list[bytes], parts) if None not in parts else
                                [self._location_varint(f) for f in frames])
            known = (_bytes(1, body) if body else b"", frames)
            self._stack_fields[id(frames)] = known
        return known[0]

    def label(self, key: str, text: str = "", num: int | None = None) -> bytes:
        """An encoded sample ``label`` field: a string value, or a number."""
        cache_key = (key, text, num)
        encoded = self._labels.get(cache_key)
        if encoded is None:
            body = _int(1, self.string(key)) + (_int(2, self.string(text)) if text else b"") + \
                (_key(3, 0) + _varint(num) if num is not None else b"")
            encoded = self._labels[cache_key] = _bytes(3, body)
        return encoded

    def mapping_messages(self) -> list[bytes]:
        """Every mapping, in id order; has_functions/filenames/line_numbers only where every location
        of it has them, has_inline_frames for Go code (its inlined calls are expanded)."""
        out = []
        for mid, m in enumerate(self._mapping_order, 1):
            has_functions, has_filenames, has_lines, go = self._mapping_flags[mid]
            out.append(_int(1, mid) + _int(2, m.start) + _int(3, m.limit) + _int(4, m.offset)
                       + _int(5, self.string(m.filename)) + _int(6, self.string(m.build_id or m.go_build_id))
                       + _int(7, has_functions) + _int(8, has_filenames) + _int(9, has_lines) + _int(10, go))
        return out


def encode_pprof(fleet: FleetProfiles, profile_type: ProfileType, contention_only: bool = False) -> bytes:
    """Uncompressed profile.proto bytes for one profile type, merged across hosts.

    Each sample keeps ``host``, ``pid``, ``tid``, ``thread`` and its own attributes as labels,
    so ``pprof -tagfocus=host=web-1`` narrows to one host. The first mapping is the main
    binary (pprof names the profile after it): the executable that carries the most weight.
    A run of inlined frames is one location with several lines, innermost first.
    ``contention_only``: a lock profile keeps mutex and rwlock waits only (shared/lock_waits.py).
    """
    spec = PROFILE_TYPES[profile_type]
    d = PprofDictionary()
    main = _main_binary(fleet, profile_type)
    if main is not None:
        d.mapping(main)  # id 1
    sample_messages: list[bytes] = []
    period = 0
    for (host, ptype), profile in sorted(fleet.hosts.items()):
        if ptype != profile_type:
            continue
        period = profile.period
        # A thread's labels are the same for every stack it ran: encoded once per export.
        sample_labels: dict[tuple[Any, ...], bytes] = {}
        for s in profile.samples.values():
            if contention_only and profile_type == ProfileType.LOCK and not is_contention(s.attributes):
                continue
            stack = d.stack(s.frames)  # first: it interns strings, whose order is the file's
            key = (s.pid, s.tid, s.thread_name, s.process_name, s.attributes)
            labels_field = sample_labels.get(key)
            if labels_field is None:
                labels_field = d.label("host", host) + d.label("pid", num=s.pid) + d.label("tid", num=s.tid)
                labels_field += d.label("thread", s.thread_name) + d.label("process", s.process_name)
                for k, v in s.attributes:
                    labels_field += d.label(k, v)
                sample_labels[key] = labels_field
            sample_messages.append(_bytes(2, stack + _packed(2, s.values) + labels_field))

    start = min((p.start_ns for p in fleet.hosts.values()), default=fleet.start_ns)
    end = max((p.end_ns for p in fleet.hosts.values()), default=fleet.end_ns)
    sample_types = b"".join(_bytes(1, _int(1, d.string(vt.type)) + _int(2, d.string(vt.unit)))
                            for vt in spec.sample_types)
    period_type = _bytes(11, _int(1, d.string(spec.period_type.type)) + _int(2, d.string(spec.period_type.unit)))
    out = bytearray(sample_types)
    out += b"".join(sample_messages)
    out += b"".join(_bytes(3, m) for m in d.mapping_messages())
    out += b"".join(_bytes(4, m) for m in d.location_messages)
    out += b"".join(_bytes(5, m) for m in d.function_messages)
    out += b"".join(_bytes(6, s.encode()) for s in d.string_table)  # string_table (index 0 = "")
    out += _int(9, start) + _int(10, max(0, end - start)) + period_type + _int(12, period)
    return bytes(out)


def _main_binary(fleet: FleetProfiles, profile_type: ProfileType) -> ModelMapping | None:
    """The mapping of the executable with the most weight in the profile: a frame's mapping
    whose file is the sample's process executable (``process.executable.name``, else the
    process name, as the OTLP resource names it), counted once per sample. A file deleted or
    never linked (``/memfd:NAME (deleted)``: runc and other tools run from memfd) keeps the
    kernel's " (deleted)" in its mapping, not in the executable's name.

    When no sample has a frame in its own executable (a process whose stacks hold only a
    library leaf and interpreted frames, or kernel threads), the heaviest process executable
    is still what the profile is of: it is named by a mapping without addresses, since pprof
    otherwise takes the first library it finds for the program's name.
    """
    weights: dict[ModelMapping, int] = {}
    by_executable: dict[str, int] = {}
    executables: dict[tuple[tuple[str, str], ...], str] = {}
    # Samples share stack tuples (see PprofDictionary): each (stack, executable) is searched once.
    found: dict[tuple[int, str], ModelMapping | None] = {}
    for (_, ptype), profile in fleet.hosts.items():
        if ptype != profile_type:
            continue
        for s in profile.samples.values():
            executable = executables.get(s.attributes)
            if executable is None:
                executable = executables[s.attributes] = dict(s.attributes).get("process.executable.name", "")
            executable = executable or s.process_name
            weight = (s.values[0] if s.values else 0) + 1
            key = (id(s.frames), executable)
            if key not in found:
                found[key] = next((f.mapping for f in reversed(s.frames)  # the executable is at the root end
                                   if f.mapping is not None and _file_name(f.mapping) == executable), None)
            m = found[key]
            if m is not None:
                weights[m] = weights.get(m, 0) + weight
            elif executable:
                by_executable[executable] = by_executable.get(executable, 0) + weight
    if weights:
        return max(weights, key=lambda m: weights[m])
    if by_executable:
        return ModelMapping(start=0, limit=0, offset=0, filename=max(by_executable, key=lambda e: by_executable[e]))
    return None


def _file_name(mapping: ModelMapping) -> str:
    """A mapping's file name as ``process.executable.name`` gives it (agent/metadata/resolver.py)."""
    return mapping.filename.removesuffix(" (deleted)").rsplit("/", 1)[-1]


def unknown_frame_label(f: Frame) -> str:
    """An unnamed frame's label: module + file offset for user code, so the same code has one
    label in every process (the agent's mappings are in file-offset space, start = offset, so
    the offset is the address; another producer's absolute address is translated through its
    mapping), else the address and its mapping."""
    where = f.mapping.filename.rsplit("/", 1)[-1] if f.mapping else "?"
    if f.mapping is not None and f.frame_type != FrameType.KERNEL and f.mapping.start <= f.address:
        return f"{where}+0x{f.address - f.mapping.start + f.mapping.offset:x}"
    return f"0x{f.address:x} ({where})"


def write_pprof(path: str, fleet: FleetProfiles, profile_type: ProfileType) -> None:
    """Write ``encode_pprof`` gzipped to ``path`` (pprof's own on-disk form); lock files
    hold lock contention only, like pprof's mutex profile."""
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(encode_pprof(fleet, profile_type, contention_only=True))
