"""glibc malloc settings for the long-running services (agent and aggregator).

Both parse large inputs now and then (ELF sections and DWARF in the agent, export batches in
the aggregator) and keep small objects for long. With glibc's defaults that pattern leaves
most of the heap free but resident: the mmap threshold grows with every large block freed
(up to 32 MiB), so later large temporaries come from the heap, and the long-lived objects
allocated between them pin it; each thread that allocates also gets its own arena (up to 8
per core) holding its own free memory. The two settings below keep that memory returnable
(the soak figures are in docs/design/durability.md).

- ``M_MMAP_THRESHOLD`` fixed at 128 KiB (glibc's initial value): blocks that large always get
  their own mapping and go back to the kernel when freed. Setting it also stops the dynamic
  adjustment.
- ``M_ARENA_MAX`` 2: threads share arenas, so one thread's free memory serves another.

No library exposes mallopt; it is two ctypes calls, made before the service starts threads.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENA_MAX = 2


def configure_allocator() -> bool:
    """Apply the settings above; False (logged) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        log.info("malloc settings not applied (no glibc mallopt): %s", exc)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    if not ok:
        log.info("malloc settings not applied: mallopt refused them")
    return ok
