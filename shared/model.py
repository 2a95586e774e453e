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
from typing import overload


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



class SampleColumns(Sequence[Sample]):
    """A batch of samples held column by column: what the CPU profile's hot path builds.

    Thousands of samples a second share a few stacks, threads and processes, so the columns
    hold references to those shared objects (the same frames tuple, the same name, the same
    attributes dict) and no ``Sample`` object exists per sample; the wire encoder reads the
    columns as they are. Indexing or iterating still yields :class:`Sample` objects, made on
    demand (copies: changing one does not change the batch). ``attributes`` is None when no
    sample has any, else one dict per sample (possibly shared; never mutated here).
    """

    __slots__ = (
        "attributes",
        "cpus",
        "pids",
        "process_names",
        "stacks",
        "thread_names",
        "tids",
        "timestamps",
        "values",
    )

    def __init__(self, timestamps: list[int], cpus: list[int], pids: list[int], tids: list[int],
                 thread_names: list[str], process_names: list[str], stacks: list[tuple[Frame, ...]],
                 values: list[tuple[int, ...]], attributes: list[dict[str, str]] | None = None) -> None:
        n = len(timestamps)
        if any(len(c) != n for c in (cpus, pids, tids, thread_names, process_names, stacks, values)) or (
                attributes is not None and len(attributes) != n):
            raise ValueError("sample columns of different lengths")
        self.timestamps = timestamps
        self.cpus = cpus
        self.pids = pids
        self.tids = tids
        self.thread_names = thread_names
        self.process_names = process_names
        self.stacks = stacks
        self.values = values
        self.attributes = attributes

    @classmethod
    def from_samples(cls, samples: Iterable[Sample]) -> SampleColumns:
        """Columns holding ``samples`` (their attributes dicts as they are)."""
        columns = cls([], [], [], [], [], [], [], [])
        columns.extend(samples)
        return columns

    def concat(self, other: SampleColumns) -> None:
        """Append ``other``'s samples (one list extend per column)."""
        if other.attributes is not None and self.attributes is None:
            self.attributes = [{} for _ in range(len(self))]
        if self.attributes is not None:
            self.attributes.extend(other.attributes if other.attributes is not None else [{}] * len(other))
        self.timestamps.extend(other.timestamps)
        self.cpus.extend(other.cpus)
        self.pids.extend(other.pids)
        self.tids.extend(other.tids)
        self.thread_names.extend(other.thread_names)
        self.process_names.extend(other.process_names)
        self.stacks.extend(other.stacks)
        self.values.extend(other.values)

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
        attrs = self.attributes[index] if self.attributes is not None else None
        return Sample(self.timestamps[index], self.cpus[index], self.pids[index], self.tids[index],
                      self.thread_names[index], self.process_names[index], self.stacks[index], self.values[index],
                      dict(attrs) if attrs else {})

    def extend(self, samples: Iterable[Sample]) -> None:
        """Append ``samples`` (the batch's few samples made one by one) to the columns."""
        for s in samples:
            self.timestamps.append(s.timestamp_ns)
            self.cpus.append(s.cpu)
            self.pids.append(s.pid)
            self.tids.append(s.tid)
            self.thread_names.append(s.thread_name)
            self.process_names.append(s.process_name)
            self.stacks.append(s.frames)
            self.values.append(s.values)
            if s.attributes:
                if self.attributes is None:
                    self.attributes = [{} for _ in range(len(self.timestamps) - 1)]
                self.attributes.append(s.attributes)
            elif self.attributes is not None:
                self.attributes.append({})

    def select(self, keep: list[bool]) -> SampleColumns:
        """The samples whose ``keep`` is true, as new columns."""
        attrs = list(compress(self.attributes, keep)) if self.attributes is not None else None
        return SampleColumns(list(compress(self.timestamps, keep)), list(compress(self.cpus, keep)),
                             list(compress(self.pids, keep)), list(compress(self.tids, keep)),
                             list(compress(self.thread_names, keep)), list(compress(self.process_names, keep)),
                             list(compress(self.stacks, keep)), list(compress(self.values, keep)), attrs)


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
