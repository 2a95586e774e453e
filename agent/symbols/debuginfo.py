"""Finding the separate debug file of a stripped ELF object (distribution debug symbols).

Distributions strip their libraries of local symbols and DWARF and ship them apart
(Debian ``libc6-dbg``, ``*-dbgsym``; Fedora/RHEL ``*-debuginfo``), in the layout gdb and perf
look in:

- by GNU build id: ``<debug dir>/.build-id/<first 2 hex digits>/<the rest>.debug``;
- by ``.gnu_debuglink`` (a file name plus the CRC-32 of the debug file): next to the object,
  in a ``.debug/`` folder next to it, and under ``<debug dir>/<the object's folder>/``.

A candidate is used only if it is the right one: its build id equals the object's, or (for an
object without a build id) its CRC-32 equals the debug link's. Debug files of a process in a
container are looked for in its own file system (``/proc/PID/root``) first, then on the host:
a file found by build id is the same build wherever it lies.

Results are cached per build id (per object path and root for objects without one), bounded,
so each object's debug file is searched for once, not per process or per sample.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection

log = logging.getLogger(__name__)

DEFAULT_DEBUG_DIRECTORIES = ("/usr/lib/debug",)
MAX_REMEMBERED = 4096  # objects whose debug file (or its absence) is remembered


class DebugLink(NamedTuple):
    """The content of a ``.gnu_debuglink`` section."""

    name: str
    crc: int


def read_debuglink(elf: ELFFile) -> DebugLink | None:
    """The object's ``.gnu_debuglink`` (file name, CRC-32), or None."""
    section = elf.get_section_by_name(".gnu_debuglink")
    if section is None:
        return None
    data = section.data()
    end = data.find(b"\0")
    if end <= 0:
        return None
    crc_at = (end + 4) & ~3  # the name is padded to a 4-byte boundary, then the CRC
    if crc_at + 4 > len(data):
        return None
    crc = int.from_bytes(data[crc_at : crc_at + 4], "little" if elf.little_endian else "big")
    return DebugLink(os.fsdecode(data[:end]), crc)


def gnu_build_id(elf: ELFFile) -> str:
    """The hex GNU build id of an ELF file, or ""."""
    for section in elf.iter_sections():
        if isinstance(section, NoteSection):
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
    return ""


class DebugFileFinder:
    """Where the debug file of an object is, if anywhere (see the module docstring)."""

    def __init__(self, directories: Sequence[str] = DEFAULT_DEBUG_DIRECTORIES,
                 capacity: int = MAX_REMEMBERED) -> None:
        self.directories = tuple(directories)
        self.capacity = capacity
        self._found: OrderedDict[tuple[str, ...], str | None] = OrderedDict()
        self.stats = {"found": 0, "not_found": 0, "rejected": 0}

    def find(self, build_id: str, debuglink: DebugLink | None, path: str, root: str = "") -> str | None:
        """The debug file of the object at ``path`` (as its process sees it), or None.

        ``root`` is the process's root view (``/proc/PID/root``), "" for the host's.
        """
        key = (build_id,) if build_id else (root, path, debuglink.name if debuglink else "")
        if key in self._found:
            self._found.move_to_end(key)
            return self._found[key]
        found = self._search(build_id, debuglink, path, root)
        self.stats["found" if found else "not_found"] += 1
        self._found[key] = found
        while len(self._found) > self.capacity:
            self._found.popitem(last=False)
        return found

    def _search(self, build_id: str, debuglink: DebugLink | None, path: str, root: str) -> str | None:
        roots = (root, "") if root else ("",)
        seen = set()  # a host process's root view is the host: each file is checked once
        for candidate in self._candidates(build_id, debuglink, path, roots):
            try:
                st = os.stat(candidate)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if self._matches(candidate, build_id, debuglink):
                return candidate
        return None

    def _candidates(self, build_id: str, debuglink: DebugLink | None, path: str,
                    roots: tuple[str, ...]) -> list[str]:
        out = []
        if len(build_id) > 2:
            out += [f"{r}{d}/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
                    for r in roots for d in self.directories]
        if debuglink is not None and "/" not in debuglink.name:
            folder = os.path.dirname(path)
            for r in roots:
                out += [f"{r}{folder}/{debuglink.name}", f"{r}{folder}/.debug/{debuglink.name}"]
                out += [f"{r}{d}{folder}/{debuglink.name}" for d in self.directories]
        # The object itself is never its own debug file.
        return [c for c in out if os.path.normpath(c) != os.path.normpath(f"{roots[0]}{path}")]

    def _matches(self, candidate: str, build_id: str, debuglink: DebugLink | None) -> bool:
        try:
            with open(candidate, "rb") as stream:
                if build_id:
                    ok = gnu_build_id(ELFFile(stream)) == build_id
                elif debuglink is not None:
                    ok = _crc32(stream) == debuglink.crc
                else:
                    ok = False
        except (OSError, ELFError, ValueError) as exc:
            log.info("debug file candidate %s unreadable: %s", candidate, exc)
            ok = False
        if not ok:
            self.stats["rejected"] += 1
            log.info("debug file candidate %s is not the right build: ignored", candidate)
        return ok


def _crc32(stream: object) -> int:
    """CRC-32 of a whole file, as ``.gnu_debuglink`` records it (zlib's polynomial)."""
    crc = 0
    read = stream.read  # type: ignore[attr-defined]
    while chunk := read(1 << 20):
        crc = zlib.crc32(chunk, crc)
    return crc
