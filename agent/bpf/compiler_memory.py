"""Giving memory back to the system: after each BPF compile, and periodically.

bcc compiles with clang/LLVM inside the agent: a compile leaves tens of MB of freed heap
that glibc keeps, and the LLVM/clang library pages resident. Neither is needed until the
next compile (an actor restart), so after each load the agent trims the heap
(``malloc_trim``) and asks the kernel to page out the compiler libraries' file-backed
pages (``MADV_PAGEOUT``, Linux >= 5.4). Those pages come back from disk on demand, so
this is safe; it only costs time on the next compile.

Periodically, both again (every ``TRIM_INTERVAL_S`` from the agent's cache sweep):
- the symbolizer's caches free what they drop in many small blocks, which glibc keeps
  resident inside its arenas; only ``malloc_trim`` hands whole free pages inside the arenas
  back (``MADV_DONTNEED``).
- the compiler libraries' pages come back into the agent's resident set when other
  processes on the host compile BPF programs; paged out again they stay out.

Figures: docs/design/overhead.md ("Where the agent's memory and CPU went").
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21
_COMPILER_LIBRARIES = ("libLLVM", "libclang", "libbcc")

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.malloc_trim.argtypes = [ctypes.c_size_t]


TRIM_INTERVAL_S = 60.0


def trim_heap() -> None:
    """Return the free pages inside glibc's arenas to the kernel (milliseconds)."""
    _libc.malloc_trim(0)


def release_compiler_memory() -> int:
    """Trim the heap and page out compiler libraries; returns how many mappings were advised."""
    trim_heap()
    advised = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or not any(lib in parts[5] for lib in _COMPILER_LIBRARIES):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if _libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += 1
    log.debug("paged out %d compiler library mappings", advised)
    return advised
