"""The busy-mix benchmark's RSS breakdown: smaps mappings summed by kind."""

from __future__ import annotations

import os

from benchmarks.memory_breakdown import KINDS, parse_smaps_rss, rss_breakdown

SMAPS = """\
55d0a0000000-55d0a0400000 r-xp 00000000 fe:01 11 /usr/bin/python3.11
Rss:                2048 kB
Anonymous:             0 kB
55d0a1000000-55d0a3000000 rw-p 00000000 00:00 0 [heap]
Rss:               30000 kB
7f0000000000-7f0000200000 r-xp 00200000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                 100 kB
7f0000400000-7f0000500000 r--p 00400000 fe:01 1235 /usr/lib/llvm-14/lib/libclang-cpp.so.14
Rss:                  20 kB
7f0000600000-7f0000700000 rw-p 00000000 00:00 0
Rss:                 512 kB
7f0000800000-7f0000900000 rw-p 00000000 00:00 0
Rss:                 256 kB
7f0001000000-7f0001080000 rw-s 00000000 00:0f 77 anon_inode:bpf-map
Rss:                 64 kB
7f0002000000-7f0002100000 r--p 00000000 fe:01 99 /usr/lib/my lib with spaces.so
Rss:                  8 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
"""


def test_mappings_are_summed_by_kind() -> None:
    parts = parse_smaps_rss(SMAPS)
    assert parts == {"compiler": 120 * 1024, "files": (2048 + 8) * 1024, "heap": 30000 * 1024,
                     "anonymous": 768 * 1024, "bpf": 64 * 1024, "other": 12 * 1024}
    assert list(parts) == list(KINDS)


def test_own_process_breakdown_adds_up_to_its_rss() -> None:
    parts = rss_breakdown(os.getpid())
    with open("/proc/self/smaps_rollup") as f:
        rollup = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Rss:"))
    assert parts["files"] > 0 and parts["anonymous"] + parts["heap"] > 0
    # Both read the same mappings a moment apart: within what a few allocations can move.
    assert abs(sum(parts.values()) - rollup) < 4 * 2**20
    assert rss_breakdown(2**22 + 12345) == dict.fromkeys(KINDS, 0)  # above pid_max's default: no process
