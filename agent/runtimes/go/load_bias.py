"""Where a Go executable was loaded in a process: its load bias.

Addresses the readers take from the binary (pclntab entries, ``runtime.allgs`` candidates,
the profile buckets' variables) are link-time addresses; a PIE executable runs moved by its
load bias. The bias is the start of the executable's mapping of file offset 0 in
/proc/PID/maps (matched by inode, so a replaced or deleted file is still found) minus the
link-time address of file offset 0 (Go links PIE at 0x400000 too, so it is never assumed 0).
"""

from __future__ import annotations

import os
import struct

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile


def first_load_address(elf: ELFFile) -> int:
    """The link-time address of file offset 0: the lowest PT_LOAD's vaddr minus its offset."""
    return min((seg["p_vaddr"] - seg["p_offset"] for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"),
               default=0)


def load_bias(pid: int, first_load: int | None = None) -> int:
    """Run-time minus link-time address of the process's executable (0 unless PIE).

    ``first_load`` is :func:`first_load_address` of the executable when the caller has it;
    otherwise the executable is read for it. Raises OSError when the executable cannot be
    read or is not in the process's maps."""
    exe = f"/proc/{pid}/exe"
    inode = os.stat(exe).st_ino
    if first_load is None:
        try:
            with open(exe, "rb") as f:
                first_load = first_load_address(ELFFile(f))
        except (ELFError, ValueError, struct.error) as exc:
            raise OSError(f"unreadable executable of pid {pid}: {exc}") from exc
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and int(fields[2], 16) == 0 and int(fields[4]) == inode:
                return int(fields[0].split("-")[0], 16) - first_load
    raise OSError(f"executable of pid {pid} not in its maps")
