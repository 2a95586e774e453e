"""The sampled native heap profile's preload library and its contract with the agent.

``sampler.c`` (built by ``make`` in this folder, which ``scripts/setup.sh`` runs) is loaded into
a service with ``LD_PRELOAD``; it samples allocations in the process and calls
:data:`PROBE_ALLOC`/:data:`PROBE_FREE` only for sampled ones. The heap actor puts uprobes on
those two functions (``bpf/heap.bpf.c``, ``on_sampled_alloc``/``on_sampled_free``).

The library lives here, inside the agent, because the two sides share one contract (the
probe names, their arguments, the environment variables) and change together; the agent's
image carries the source and builds it (deploy/). ``docs/design/heap.md`` says how an
operator enables it for a service.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

LIBRARY_NAME = "libstackfleet_heap.so"
PROBE_ALLOC = "stackfleet_heap_sampled_alloc"  # (void *addr, size_t size, size_t mean_bytes)
PROBE_FREE = "stackfleet_heap_sampled_free"  # (void *addr)
ENV_SAMPLE_BYTES = "STACKFLEET_HEAP_SAMPLE_BYTES"  # mean sampling distance; 0 turns sampling off
ENV_SEED = "STACKFLEET_HEAP_SEED"  # fixed seed: reproducible sampling (tests)
DEFAULT_SAMPLE_BYTES = 512 * 1024

SOURCE_DIR = Path(__file__).resolve().parent


def library_path() -> Path:
    """Where ``make`` in this folder puts the library."""
    return SOURCE_DIR / "build" / LIBRARY_NAME


def build_library() -> Path:
    """Build (or bring up to date) the library with ``make``; raises CalledProcessError."""
    subprocess.run(["make", "-s", "-C", str(SOURCE_DIR)], check=True, capture_output=True)
    return library_path()


def is_sampler_library(path: str) -> bool:
    """True for a mapped file that is the sampler library (by file name, in any folder)."""
    return path.rsplit("/", 1)[-1] == LIBRARY_NAME
