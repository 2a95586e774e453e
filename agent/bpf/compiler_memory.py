"""Giving memory back to the system: after each BPF compile, and periodically.

bcc compiles with clang/LLVM inside the agent: a compile leaves tens of MB of freed heap
that glibc keeps, and the LLVM/clang library pages resident. Neither is needed until the
next compile (an actor restart), so after each load the agent trims the heap
(``malloc_trim``) and drops the compiler libraries' pages from its resident set.

How the library pages are dropped depends on what they hold (``/proc/self/smaps``, per
mapping):

- a mapping that cannot be written and holds no private (anonymous, copy-on-write) page is
  an unmodified view of the file: ``MADV_DONTNEED`` unmaps its pages from this process, and
  a later access maps them again from the page cache (or the disk). Nothing is lost, and it
  works whoever else maps the same pages: ``MADV_PAGEOUT`` skips a page that any other
  process maps, so on a host where another program uses the same LLVM (a second agent,
  bcc tools, a test run) those pages stayed resident in the agent (86 MB measured);
- any other mapping (relocated data, written data) gets ``MADV_PAGEOUT`` (Linux >= 5.4),
  which reclaims what it can and never loses data.

Periodically, both again (from the agent's cache sweep: 10, 20 and 40 s apart after
start-up, whose first scans and symbolizations leave tens of MB of freed heap, then every
``TRIM_INTERVAL_S``):
- the symbolizer's caches free what they drop in many small blocks, which glibc keeps
  resident inside its arenas; only ``malloc_trim`` hands whole free pages inside the arenas
  back (``MADV_DONTNEED``).
- the compiler libraries' pages have been seen back in the agent's resident set during a
  soak (while other processes on the host compiled BPF programs); dropped again, they
  stayed out.

Figures: docs/design/overhead.md ("Where the agent's memory and CPU went", "Resident memory
with all four types").
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
MADV_PAGEOUT = 21
_COMPILER_LIBRARIES = ("libLLVM", "libclang", "libbcc")

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.malloc_trim.argtypes = [ctypes.c_size_t]


TRIM_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class LibraryMapping:
    """One mapping of a compiler library, as ``/proc/self/smaps`` describes it."""

    start: int
    end: int
    permissions: str
    path: str
    anonymous_kib: int  # private copies of pages (relocations, written data): not in the file

    @property
    def file_view(self) -> bool:
        """Pages all as in the file: dropping them from the resident set loses nothing."""
        return "w" not in self.permissions and self.anonymous_kib == 0


def parse_smaps(text: str, libraries: tuple[str, ...] = _COMPILER_LIBRARIES) -> list[LibraryMapping]:
    """The mappings of files whose path contains one of ``libraries``."""
    found: list[LibraryMapping] = []
    header: tuple[int, int, str, str] | None = None
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            header = None
            if len(fields) >= 6 and any(lib in fields[5] for lib in libraries):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                header = (start, end, fields[1], fields[5])
        elif header is not None and fields[0] == "Anonymous:":
            found.append(LibraryMapping(*header, anonymous_kib=int(fields[1])))
            header = None
    return found


def trim_heap() -> None:
    """Return the free pages inside glibc's arenas to the kernel (milliseconds)."""
    _libc.malloc_trim(0)


def release_compiler_memory() -> int:
    """Drop compiler library pages and trim the heap; returns how many mappings were advised.

    The trim comes last: reading ``/proc/self/smaps`` (~100 KB of text per 100 mappings,
    and its parse) frees blocks that would otherwise stay resident until the next trim."""
    advised = 0
    try:
        with open("/proc/self/smaps") as f:
            mappings = parse_smaps(f.read())
    except OSError:
        mappings = []
    for m in mappings:
        advice = MADV_DONTNEED if m.file_view else MADV_PAGEOUT
        if _libc.madvise(m.start, m.end - m.start, advice) == 0:
            advised += 1
    trim_heap()
    log.debug("dropped the pages of %d compiler library mappings", advised)
    return advised
