"""The profiling data model shared by agent and aggregator.

Agent and aggregator exchange these objects through the wire format in
:mod:`shared.wire`; the aggregator turns them into OTLP in :mod:`aggregator.otlp`.
Frames are *symbolized on the host* (the process may be gone seconds later), so a
``Frame`` already carries function, file and line; an unknown frame keeps its
address and mapping rather than being dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class FrameType(StrEnum):
    """Values of the OTel semantic convention ``profile.frame.type``."""

    NATIVE = "native"
    KERNEL = "kernel"
    CPYTHON = "cpython"
    GO = "go"


@dataclass(frozen=True, slots=True)
class Mapping:
    """A file-backed (or anonymous) memory region of a process, as in /proc/PID/maps.

    ``build_id`` is the hex GNU build id (or Go build id) when known, else "".
    Kernel frames use the pseudo-mapping ``KERNEL_MAPPING``.
    """

    start: int
    limit: int
    offset: int
    filename: str
    build_id: str = ""


KERNEL_MAPPING = Mapping(start=0, limit=0, offset=0, filename="[kernel.kallsyms]")


@dataclass(frozen=True, slots=True)
class Frame:
    """One symbolized stack frame.

    ``function`` is "" when no symbol covers ``address``; ``filename``/``line`` are
    ""/0 when no line information exists. ``address`` is module-relative for code in a
    file — the file offset, with ``mapping`` in file-offset space — so the same code is the
    same frame in every process and on every host; the absolute address only for code in
    no file (JIT, anonymous memory); the kernel address for kernel frames. See
    docs/design/debug-symbols.md.
    """

    function: str
    filename: str
    line: int
    address: int
    frame_type: FrameType
    mapping: Mapping | None = None
    # Stacks (tuples of frames) are dictionary keys on both sides (stack ids on the wire,
    # merged samples in the aggregator), and a tuple's hash is not cached: every lookup hashed
    # every frame with its mapping again (~2 us a frame, ~40 us a 20-frame stack). Cached here
    # on first use; not part of equality.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        h = self._hash
        if not h:
            h = hash((self.function, self.filename, self.line, self.address, self.frame_type, self.mapping)) or 1
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
