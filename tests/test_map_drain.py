"""HashMapDrainer reads a BPF hash map in chunks: every entry once, the map left empty.

A real kernel hash map (created with the bpf(2) syscall, no compile) is filled from here
with known keys and values, more than several chunks' worth, and drained; the known answer
is what was written. The buffers are a chunk, not the map's max_entries.
"""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from agent.bpf.map_drain import HashMapDrainer

BPF_SYSCALL = 321  # x86_64
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_HASH = 1
KEY = struct.Struct("<IIQ")
VALUE = struct.Struct("<QQ")


class _Key(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32), ("stack", ctypes.c_uint64)]


class _Value(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint64), ("total", ctypes.c_uint64)]


class _Table:
    """What HashMapDrainer reads of a bcc table: fd, size and the key/value ctypes types."""

    Key, Leaf = _Key, _Value

    def __init__(self, fd: int, max_entries: int) -> None:
        self.map_fd, self.max_entries = fd, max_entries


def _create_hash_map(max_entries: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    attr = struct.pack("<IIIII", BPF_MAP_TYPE_HASH, KEY.size, VALUE.size, max_entries, 0).ljust(128, b"\0")
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(BPF_SYSCALL, BPF_MAP_CREATE, buf, len(attr))
    if fd < 0:
        pytest.skip(f"cannot create a BPF map: {os.strerror(ctypes.get_errno())}")
    return int(fd)


def _fill(fd: int, entries: dict[tuple[int, ...], tuple[int, ...]]) -> None:
    from bcc.libbcc import lib

    for key, value in entries.items():
        k, v = ctypes.create_string_buffer(KEY.pack(*key)), ctypes.create_string_buffer(VALUE.pack(*value))
        assert lib.bpf_update_elem(fd, k, v, 0) == 0


@pytest.mark.parametrize("chunk", [7, 1024])
def test_drain_reads_every_entry_once_in_chunks_and_empties_the_map(chunk: int) -> None:
    fd = _create_hash_map(4096)
    try:
        entries = {(pid, pid * 3 % 97, pid << 20): (pid * 11, pid * 1_000_003) for pid in range(1, 2501)}
        _fill(fd, entries)
        drainer = HashMapDrainer(_Table(fd, 4096), KEY, VALUE, chunk_entries=chunk)
        assert len(drainer._keys) == KEY.size * chunk  # a chunk, not max_entries
        rows = drainer.drain()
        assert len(rows) == len(entries)
        assert dict(rows) == entries
        assert drainer.drain() == []  # lookup-and-delete left nothing
        _fill(fd, {(1, 2, 3): (4, 5)})
        assert drainer.drain() == [((1, 2, 3), (4, 5))]  # and it is usable again
    finally:
        os.close(fd)
