"""Where a process's resident memory is, from ``/proc/PID/smaps``: one figure per kind of mapping.

- ``compiler``: the pages of libLLVM, libclang-cpp and libbcc mapped into the process (bcc
  compiles BPF programs in the agent; agent/bpf/compiler_memory.py drops them after a compile);
- ``files``: every other file mapping (the interpreter, shared libraries, extension modules);
- ``heap``: glibc's main arena (``[heap]``);
- ``anonymous``: anonymous mappings: Python's allocator arenas (objects up to 512 bytes),
  glibc's other arena, blocks over the mmap threshold (large bytes, arrays, dicts), thread
  stacks;
- ``bpf``: BPF maps mapped into the process (ring buffers);
- ``other``: the rest (``[stack]``, ``[vdso]``, ...).
"""

from __future__ import annotations

COMPILER_LIBRARIES = ("libLLVM", "libclang", "libbcc")
KINDS = ("compiler", "files", "heap", "anonymous", "bpf", "other")


def mapping_kind(name: str) -> str:
    """The kind of a mapping from the path column of its smaps header ('' for anonymous)."""
    if not name:
        return "anonymous"
    if name == "[heap]":
        return "heap"
    if name.startswith("anon_inode:bpf"):
        return "bpf"
    if name.startswith("["):
        return "other"
    if any(lib in name for lib in COMPILER_LIBRARIES):
        return "compiler"
    return "files"


def parse_smaps_rss(text: str) -> dict[str, int]:
    """Resident bytes per kind (``KINDS``) of the mappings listed in an smaps text."""
    totals = dict.fromkeys(KINDS, 0)
    kind = "other"
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            kind = mapping_kind(" ".join(fields[5:]) if len(fields) >= 6 else "")
        elif fields[0] == "Rss:":
            totals[kind] += int(fields[1]) * 1024
    return totals


def rss_breakdown(pid: int) -> dict[str, int]:
    """Resident bytes per kind of mapping of ``pid``; all zero when it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            return parse_smaps_rss(f.read())
    except OSError:
        return dict.fromkeys(KINDS, 0)
