"""The profiling data model shared by agent and aggregator.

Agent and aggregator exchange these objects through the wire format in
:mod:`shared.wire`; the aggregator turns them into OTLP in :mod:`aggregator.otlp.encode`.
Frames are *symbolized on the host* (the process may be gone seconds later), so a
``Frame`` already carries function, file and line; an unknown frame keeps its
address and mapping rather than being dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import compress
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class FrameType(StrEnum):
    """Values of the OTel semantic convention ``profile.frame.type``."""

    NATIVE = "native"
    KERNEL = "kernel"
    CPYTHON = "cpython"
    GO = "go"
    # Frame types other producers send (semantic conventions' list): stackfleet's agent does
    # not produce them, but requests read back by ``stackfleet export`` may carry them.
    DOTNET = "dotnet"
    JVM = "jvm"
    PERL = "perl"
    PHP = "php"
    RUBY = "ruby"
    V8JS = "v8js"
    BEAM = "beam"
    RUST = "rust"


# Frames of interpreted code: their function names are the language's own, not symbols.
INTERPRETED_FRAME_TYPES = frozenset(t for t in FrameType if t not in (FrameType.NATIVE, FrameType.KERNEL, FrameType.GO))


@dataclass(frozen=True, slots=True)
class Mapping:
    """A file-backed (or anonymous) memory region of a process, as in /proc/PID/maps.

    Build ids, each "" when unknown: ``build_id`` is the hex GNU build id
    (``.note.gnu.build-id``), ``go_build_id`` the Go build id (what ``go tool buildid``
    prints), ``htlhash`` the file id the OpenTelemetry eBPF profiler computes (hex, see
    :mod:`agent.symbols.file_ids`). Kernel frames use a mapping named ``KERNEL_FILENAME``
    whose addresses are relative to the start of the kernel's text.
    """

    start: int
    limit: int
    offset: int
    filename: str
    build_id: str = ""
    go_build_id: str = ""
    htlhash: str = ""


KERNEL_FILENAME = "[kernel.kallsyms]"
# The kernel's mapping when its text range and build id are unknown.
KERNEL_MAPPING = Mapping(start=0, limit=0, offset=0, filename=KERNEL_FILENAME)


@dataclass(frozen=True, slots=True)
class Frame:
    """One symbolized stack frame.

    ``function`` is "" when no symbol covers ``address``; ``filename``/``line`` are
    ""/0 when no line information exists. ``address`` is module-relative for code in a
    file — the file offset, with ``mapping`` in file-offset space — so the same code is the
    same frame in every process and on every host; the absolute address only for code in
    no file (JIT, anonymous memory); for kernel frames, the offset into the kernel's text.
    See docs/design/debug-symbols.md.
    ``inlined`` marks a frame of code inlined into the *next* frame of the stack (its
    caller) at the same address: a Go address inside inlined code is the inlined callees,
    innermost first, each ``inlined``, then the function they were inlined into. Exporters
    make such a run one location with several lines. Equal consecutive addresses alone do
    not say it (recursion through one call site has them too).
    """

    function: str
    filename: str
    line: int
    address: int
    frame_type: FrameType
    mapping: Mapping | None = None
    inlined: bool = False
    # Stacks (tuples of frames) are dictionary keys on both sides (stack ids on the wire,
    # merged samples in the aggregator), and a tuple's hash is not cached: every lookup would
    # hash every frame with its mapping again (~2 us a frame, ~40 us a 20-frame stack). Cached
    # here on first use; not part of equality.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        h = self._hash
        if not h:
            h = hash((self.function, self.filename, self.line, self.address, self.frame_type, self.mapping,
                      self.inlined)) or 1
            object.__setattr__(self, "_hash", h)
        return h


@dataclass(slots=True)
class Sample:
    """One observation: a stack and its values at a moment, for one thread.

    ``frames`` is leaf first. ``values`` are in the units of the profile type's
    sample types (see :mod:`shared.profile_types`), in the same order.
    ``attributes`` carries type-specific labels (off-CPU reason, lock address, ...).
    """

    timestamp_ns: int
    cpu: int
    pid: int
    tid: int
    thread_name: str
    process_name: str
    frames: tuple[Frame, ...]
    values: tuple[int, ...]
    attributes: dict[str, str] = field(default_factory=dict)



@dataclass(slots=True)
class Coded(Generic[T]):
    """A column held dictionary-encoded: sample ``i``'s value is ``values[codes[i]]``.

    A batch's thousands of samples share a few stacks, names and attribute dicts; a reader
    that maps each value to something (the wire encoder to its ids) does it once per value,
    then maps the codes, instead of looking every sample's value up.

    Every value is some sample's, and values are in the order of their first samples (what
    :meth:`of`, :meth:`concat` and :meth:`select` keep): a reader that numbers values as it
    meets them gives the numbers a pass over the samples would. ``values`` may repeat a
    value (two batches' values, concatenated): only the mapping's cost depends on it."""

    values: list[T]
    codes: list[int]

    @classmethod
    def of(cls, column: list[T]) -> Coded[T]:
        """``column`` as it is, one value per sample."""
        return cls(column, list(range(len(column))))

    def __len__(self) -> int:
        return len(self.codes)

    def decoded(self) -> list[T]:
        """One value per sample (a new list)."""
        return list(map(self.values.__getitem__, self.codes))

    def concat(self, other: Coded[T]) -> Coded[T]:
        """This column's samples, then ``other``'s (a new column)."""
        shift = len(self.values)
        return Coded(self.values + other.values, self.codes + list(map(shift.__add__, other.codes)))

    def select(self, keep: list[bool]) -> Coded[T]:
        """The samples whose ``keep`` is true, with only the values they refer to."""
        codes = list(compress(self.codes, keep))
        used = dict.fromkeys(codes)  # in order of first use, as the values of a column made anew
        renumber = numbering(used)
        return Coded(list(map(self.values.__getitem__, used)), list(map(renumber.__getitem__, codes)))


def numbering(values: Iterable[T]) -> dict[T, int]:
    """Each distinct value of ``values`` numbered 0, 1, ... in order of first appearance."""
    numbers: dict[T, int] = {}
    for value in values:
        numbers.setdefault(value, len(numbers))
    return numbers


# A column of a SampleColumns batch: one value per sample, or dictionary-encoded.
Column = list[T] | Coded[T]


def decoded(column: Column[T]) -> list[T]:
    """One value per sample: ``column`` itself if it is a list."""
    return column.decoded() if isinstance(column, Coded) else column


def coded(column: Column[T]) -> Coded[T]:
    """``column`` dictionary-encoded (a list as it is, one value per sample)."""
    return column if isinstance(column, Coded) else Coded.of(column)


class SampleColumns(Sequence[Sample]):
    """A batch of samples held column by column: what the CPU profile's hot path builds.

    Thousands of samples a second share a few stacks, threads and processes, so the columns
    hold references to those shared objects (the same frames tuple, the same name, the same
    attributes dict) and no ``Sample`` object exists per sample; the wire encoder reads the
    columns as they are. The stack, thread name, process name and attributes columns may be
    held dictionary-encoded (:class:`Coded`, read as they are with :meth:`column`); their
    properties give one value per sample either way. Indexing or iterating yields
    :class:`Sample` objects, made on demand (copies: changing one does not change the batch).
    ``attributes`` is None when no sample has any, else one dict per sample (possibly shared;
    never mutated here).
    """

    __slots__ = (
        "_columns",
        "cpus",
        "pids",
        "tids",
        "timestamps",
        "values",
    )

    def __init__(self, timestamps: list[int], cpus: list[int], pids: list[int], tids: list[int],
                 thread_names: Column[str], process_names: Column[str], stacks: Column[tuple[Frame, ...]],
                 values: list[tuple[int, ...]], attributes: Column[dict[str, str]] | None = None) -> None:
        n = len(timestamps)
        if any(len(c) != n for c in (cpus, pids, tids, thread_names, process_names, stacks, values)) or (
                attributes is not None and len(attributes) != n):
            raise ValueError("sample columns of different lengths")
        self.timestamps = timestamps
        self.cpus = cpus
        self.pids = pids
        self.tids = tids
        self.values = values
        # The columns that may be dictionary-encoded, by name (_CODABLE).
        self._columns: dict[str, Any] = {"thread_names": thread_names, "process_names": process_names,
                                         "stacks": stacks, "attributes": attributes}

    def column(self, name: str) -> Any:
        """The ``thread_names``, ``process_names``, ``stacks`` or ``attributes`` column as it
        is held: a list, a :class:`Coded` column, or None (``attributes`` only)."""
        return self._columns[name]

    @property
    def thread_names(self) -> list[str]:
        return decoded(self._columns["thread_names"])

    @property
    def process_names(self) -> list[str]:
        return decoded(self._columns["process_names"])

    @property
    def stacks(self) -> list[tuple[Frame, ...]]:
        return decoded(self._columns["stacks"])

    @property
    def attributes(self) -> list[dict[str, str]] | None:
        attributes = self._columns["attributes"]
        return None if attributes is None else decoded(attributes)

    @attributes.setter
    def attributes(self, attributes: Column[dict[str, str]] | None) -> None:
        if attributes is not None and len(attributes) != len(self):
            raise ValueError("sample columns of different lengths")
        self._columns["attributes"] = attributes

    @classmethod
    def from_samples(cls, samples: Iterable[Sample]) -> SampleColumns:
        """Columns holding ``samples`` (their attributes dicts as they are)."""
        columns = cls([], [], [], [], [], [], [], [])
        columns.extend(samples)
        return columns

    def concat(self, other: SampleColumns) -> None:
        """Append ``other``'s samples (one list extend per column; a column encoded on either
        side stays encoded)."""
        n, m = len(self), len(other)
        mine, theirs = self._columns, other._columns
        if mine["attributes"] is not None or theirs["attributes"] is not None:
            mine["attributes"] = self._with_attributes(n)
            theirs = {**theirs, "attributes": other._with_attributes(m)}
        for name in _CODABLE:
            a, b = mine[name], theirs[name]
            if a is None:
                continue
            if isinstance(a, Coded) or isinstance(b, Coded):
                mine[name] = coded(a).concat(coded(b))
            else:
                a.extend(b)
        self.timestamps.extend(other.timestamps)
        self.cpus.extend(other.cpus)
        self.pids.extend(other.pids)
        self.tids.extend(other.tids)
        self.values.extend(other.values)

    def _with_attributes(self, n: int) -> Column[dict[str, str]]:
        """The attributes column, or one empty dict per sample when there is none."""
        attributes: Column[dict[str, str]] | None = self._columns["attributes"]
        return Coded([{}], [0] * n) if attributes is None else attributes

    def __len__(self) -> int:
        return len(self.timestamps)

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same samples (a list of ``Sample`` objects included)."""
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indexes, and IndexError, as a list gives them
        thread, process, stack, attributes = (_value_at(self._columns[name], index) for name in _CODABLE)
        return Sample(self.timestamps[index], self.cpus[index], self.pids[index], self.tids[index],
                      thread, process, stack, self.values[index], dict(attributes) if attributes else {})

    def extend(self, samples: Iterable[Sample]) -> None:
        """Append ``samples`` (the batch's few samples made one by one) to the columns."""
        columns = self._columns
        for name in _CODABLE:  # appended to one by one: held as lists
            if isinstance(columns[name], Coded):
                columns[name] = columns[name].decoded()
        thread_names, process_names, stacks = columns["thread_names"], columns["process_names"], columns["stacks"]
        for s in samples:
            self.timestamps.append(s.timestamp_ns)
            self.cpus.append(s.cpu)
            self.pids.append(s.pid)
            self.tids.append(s.tid)
            thread_names.append(s.thread_name)
            process_names.append(s.process_name)
            stacks.append(s.frames)
            self.values.append(s.values)
            if s.attributes:
                if columns["attributes"] is None:
                    columns["attributes"] = [{} for _ in range(len(self.timestamps) - 1)]
                columns["attributes"].append(s.attributes)
            elif columns["attributes"] is not None:
                columns["attributes"].append({})

    def select(self, keep: list[bool]) -> SampleColumns:
        """The samples whose ``keep`` is true, as new columns."""
        thread, process, stack, attributes = (_selected(self._columns[name], keep) for name in _CODABLE)
        return SampleColumns(list(compress(self.timestamps, keep)), list(compress(self.cpus, keep)),
                             list(compress(self.pids, keep)), list(compress(self.tids, keep)),
                             thread, process, stack, list(compress(self.values, keep)), attributes)


# SampleColumns' columns that may be dictionary-encoded, in Sample's order.
_CODABLE = ("thread_names", "process_names", "stacks", "attributes")


def _value_at(column: Column[Any] | None, index: int) -> Any:
    if column is None:
        return None
    return column.values[column.codes[index]] if isinstance(column, Coded) else column[index]


def _selected(column: Column[Any] | None, keep: list[bool]) -> Any:
    if column is None:
        return None
    return column.select(keep) if isinstance(column, Coded) else list(compress(column, keep))


def inline_runs(frames: tuple[Frame, ...]) -> list[tuple[Frame, ...]]:
    """Leaf-first frames grouped into locations: each run of ``inlined`` frames with the frame
    after it (same address), then every other frame on its own."""
    runs: list[tuple[Frame, ...]] = []
    run: list[Frame] = []
    for i, f in enumerate(frames):
        run.append(f)
        following = frames[i + 1] if i + 1 < len(frames) else None
        if not (f.inlined and following is not None and following.address == f.address):
            runs.append(tuple(run))
            run = []
    return runs
