"""Unwind tables per file identity: built once, shared by every process that maps the file.

A table is keyed by the file's GNU build id when it has one (the same libc in ten
containers is parsed once) and otherwise by its identity on disk (device, inode, size,
mtime), the same identity the symbolizer caches ELF symbols by. Building reads only
``.eh_frame`` (or ``.debug_frame``) and program headers, never symbols or DWARF lines.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from agent.process.procmaps import FileKey, MapEntry, file_key, map_files_path, root_view_path
from agent.unwind.elfread import ElfHeaders
from agent.unwind.table import TableTooLarge, UnwindTable, build_table

log = logging.getLogger(__name__)

# Measured: libc (150 KB of .eh_frame) 40 ms, python3.11 (410 KB) 100 ms, git (390 KB) 100 ms.
_BUILD_S_PER_CFI_BYTE = 2.6e-7

VDSO = "[vdso]"


@dataclass(frozen=True, slots=True)
class FileRef:
    """Where to open a mapped file: ``open_path`` works across mount namespaces."""

    key: FileKey | str
    open_path: str
    display: str


def file_ref(pid: int, entry: MapEntry) -> FileRef | None:
    """Identity of the file behind a mapping, or None when it cannot be opened (gone, no rights).

    ``/proc/PID/map_files/`` reaches files inside containers and deleted-but-mapped files,
    the same way the symbolizer opens them.
    """
    path = entry.path
    if path == VDSO:
        return FileRef(VDSO, "", VDSO)
    if not path.startswith("/"):
        return None
    for candidate in (map_files_path(pid, entry), root_view_path(pid, path)):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        return FileRef(file_key(st), candidate, path)
    return None


class TableCache:
    """Bounded LRU of built tables; failures are remembered so a bad file is read once."""

    def __init__(self, max_tables: int = 256, max_rows_per_file: int | None = None) -> None:
        self.max_tables = max_tables
        self.max_rows_per_file = max_rows_per_file
        self._by_file: OrderedDict[FileKey | str, UnwindTable | None] = OrderedDict()
        self.built = 0
        self.failed = 0
        self.too_large = 0
        self.build_cpu_s = 0.0  # thread CPU spent building tables: the unwinder's one-time cost

    def peek(self, ref: FileRef) -> tuple[bool, UnwindTable | None]:
        """(whether the file was looked at already, its table or None) without building."""
        if ref.key in self._by_file:
            return True, self._by_file[ref.key]
        return False, None

    def estimate_cpu_s(self, ref: FileRef) -> float:
        """What building ``ref``'s table would cost, from its CFI size (headers only: ~50 µs)."""
        if ref.key == VDSO:
            return 0.001
        try:
            with open(ref.open_path, "rb") as stream:
                sections = ElfHeaders(stream).sections
        except (OSError, ValueError):
            return 0.001  # the build will fail fast
        size = max((sections[n].size for n in (".eh_frame", ".debug_frame") if n in sections), default=0)
        return 0.001 + size * _BUILD_S_PER_CFI_BYTE

    def get(self, ref: FileRef, with_rows: bool = False) -> UnwindTable | None:
        """The table for ``ref``, building it on first use (blocking: tens to hundreds of ms).

        ``with_rows``: rebuild a table whose rows were dropped after its upload to BPF."""
        if ref.key in self._by_file:
            cached = self._by_file[ref.key]
            if not (with_rows and cached is not None and cached.rows_dropped):
                self._by_file.move_to_end(ref.key)
                return cached
            del self._by_file[ref.key]
        table = self._build(ref)
        if table is not None:
            table.key = ("build_id", table.build_id) if table.build_id else ref.key
            # Another identity of the same build (e.g. a container's copy) shares the rows.
            for other in self._by_file.values():
                if other is not None and table.build_id and other.build_id == table.build_id \
                        and not (with_rows and other.rows_dropped):
                    table = other
                    break
        self._by_file[ref.key] = table
        while len(self._by_file) > self.max_tables:
            self._by_file.popitem(last=False)
        return table

    def _build(self, ref: FileRef) -> UnwindTable | None:
        started = time.thread_time()
        try:
            return self._parse(ref)
        finally:
            self.build_cpu_s += time.thread_time() - started

    def _parse(self, ref: FileRef) -> UnwindTable | None:
        try:
            if ref.key == VDSO:
                return build_vdso_table()
            with open(ref.open_path, "rb") as stream:
                table = build_table(stream, ref.display, self.max_rows_per_file)
        except TableTooLarge as exc:
            self.too_large += 1
            log.info("no unwind table (frame pointers only): %s", exc)
            return None
        except Exception as exc:  # pyelftools raises many types on unusual files
            self.failed += 1
            log.info("no unwind table for %s: %s", ref.display, exc)
            return None
        self.built += 1
        return table


def build_vdso_table() -> UnwindTable | None:
    """The vDSO's table, read from this process's own vDSO: the kernel maps one image into
    every (64-bit) process, so ours has the same code and CFI as theirs."""
    import io

    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(VDSO):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                break
        else:
            return None
    with open("/proc/self/mem", "rb") as mem:
        mem.seek(lo)
        image = mem.read(hi - lo)
    return build_table(io.BytesIO(image), VDSO)
