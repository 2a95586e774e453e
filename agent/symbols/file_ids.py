"""Build ids beyond the GNU one: the Go build id, the OpenTelemetry "htlhash" file id, the kernel's.

Backends key executables on these (``process.executable.build_id.{gnu,go,htlhash}``):

- **Go build id**: the string ``go tool buildid`` prints, stored by the Go linker in the ELF
  note ``.note.go.buildid`` (owner ``Go``, type 4).
- **htlhash**: the file id of the OpenTelemetry eBPF profiler (``libpf.FileIDFromExecutableReader``):
  the first 16 bytes of SHA-256 over the file's first 4 KiB, its last 4 KiB (overlapping for
  small files) and its length as a big-endian uint64, as 32 lower-case hex digits. It exists
  for files without a usable GNU build id, and Elastic's profiling backend requires it.
- **Kernel**: the GNU build id note of the running kernel from ``/sys/kernel/notes``; its
  htlhash is FNV-128a of that id in hex (``libpf.FileIDFromKernelBuildID``), since there is
  no file to hash.

Hand-written: the note layouts are a few fixed-size fields, and no library computes the
htlhash or FNV-128a.
"""

from __future__ import annotations

import hashlib
import struct
from typing import IO

from elftools.elf.elffile import ELFFile

HTLHASH_CHUNK = 4096
_NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type (native endianness: x86-64 is little)
_NT_GNU_BUILD_ID = 3
_NT_GO_BUILD_ID = 4
_FNV128_OFFSET = 0x6C62272E07BB014262B821756295C58D
_FNV128_PRIME = 0x0000000001000000000000000000013B


def htlhash(stream: IO[bytes]) -> str:
    """The eBPF profiler's file id of the whole file behind ``stream`` (hex), see the module doc."""
    h = hashlib.sha256()
    stream.seek(0)
    h.update(stream.read(HTLHASH_CHUNK))
    size = stream.seek(0, 2)
    stream.seek(size - min(size, HTLHASH_CHUNK))
    h.update(stream.read(HTLHASH_CHUNK))
    h.update(size.to_bytes(8, "big"))
    return h.digest()[:16].hex()


def htlhash_of_path(path: str) -> str:
    """:func:`htlhash` of a file by path; "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return htlhash(f)
    except OSError:
        return ""


def go_build_id(elf: ELFFile) -> str:
    """The Go build id from the ``.note.go.buildid`` note, "" when the file has none."""
    section = elf.get_section_by_name(".note.go.buildid")
    if section is None:
        return ""
    for owner, note_type, desc in iter_notes(section.data()):
        if owner == b"Go" and note_type == _NT_GO_BUILD_ID:
            return desc.decode("utf-8", "replace")
    return ""


def iter_notes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """(owner, type, descriptor) of each ELF note in ``data``; stops at a truncated note."""
    out = []
    pos = 0
    while pos + _NOTE_HEADER.size <= len(data):
        namesz, descsz, note_type = _NOTE_HEADER.unpack_from(data, pos)
        pos += _NOTE_HEADER.size
        name_end = pos + namesz
        desc_start = pos + (namesz + 3) // 4 * 4
        desc_end = desc_start + descsz
        if desc_end > len(data):
            break
        out.append((data[pos:name_end].rstrip(b"\0"), note_type, data[desc_start:desc_end]))
        pos = desc_start + (descsz + 3) // 4 * 4
    return out


def gnu_build_id_from_notes(data: bytes) -> str:
    """The GNU build id (hex) in a block of ELF notes, "" when absent."""
    for owner, note_type, desc in iter_notes(data):
        if owner == b"GNU" and note_type == _NT_GNU_BUILD_ID:
            return desc.hex()
    return ""


def kernel_build_id(notes_path: str = "/sys/kernel/notes") -> str:
    """The running kernel's GNU build id (hex), "" when its notes cannot be read."""
    try:
        with open(notes_path, "rb") as f:
            return gnu_build_id_from_notes(f.read())
    except OSError:
        return ""


def fnv128a(data: bytes) -> bytes:
    """FNV-1a, 128-bit, big-endian digest."""
    h = _FNV128_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV128_PRIME) & ((1 << 128) - 1)
    return h.to_bytes(16, "big")


def kernel_htlhash(build_id: str) -> str:
    """The eBPF profiler's file id of a kernel with GNU build id ``build_id`` (hex); "" if none.

    It requires at least 16 bytes of build id (32 hex digits) for enough entropy."""
    return fnv128a(build_id.encode()).hex() if len(build_id) >= 32 else ""


def read_file_ids(stream: IO[bytes]) -> tuple[str, str]:
    """(Go build id, htlhash) of an open ELF file; a part that cannot be read is ""."""
    try:
        file_id = htlhash(stream)
    except OSError:
        return "", ""
    try:
        go_id = go_build_id(ELFFile(stream))
    except Exception:  # pyelftools raises many types on unusual files; the caller reports them
        go_id = ""
    stream.seek(0)
    return go_id, file_id
