"""Reading BPF hash maps in bulk: one ``BPF_MAP_LOOKUP_AND_DELETE_BATCH`` call per drain.

bcc's ``items_lookup_and_delete_batch`` allocates arrays of ``max_entries`` ctypes structs on
every call and hands back one ctypes object per entry; at a flush per second that churn is
most of the drain's cost. This keeps one pair of flat buffers per map and decodes them with
``struct.iter_unpack`` (plain tuples). Written here because bcc has no buffer-reusing
variant and no other maintained library on Debian's python3-bpfcc offers one.

The buffers hold ``CHUNK_ENTRIES`` entries, not the map's ``max_entries``: a drain reads the
map a chunk per call (the kernel's batch token carries on where the last call stopped), so
a flush of a few hundred entries costs one call as before, while the buffers stay ~70 KiB
a map instead of ~1 MiB (``ctypes.create_string_buffer`` zero-fills, so the whole buffer is
resident: 5 MB for the wall, lock and goroutine maps, docs/design/overhead.md).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any

# Entries read per BPF_MAP_LOOKUP_AND_DELETE_BATCH call. The kernel fails a call only when a
# single hash bucket holds more entries than the room left (ENOSPC with nothing read), which
# needs over a thousand colliding keys in one bucket.
CHUNK_ENTRIES = 1024


class HashMapDrainer:
    """Reads and deletes every entry of one BPF hash map, decoding keys and values."""

    def __init__(self, table: Any, key_format: struct.Struct, value_format: struct.Struct,
                 chunk_entries: int = CHUNK_ENTRIES) -> None:
        key_size, value_size = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
        if key_size != key_format.size or value_size != value_format.size:
            raise ValueError(f"map layout {key_size}/{value_size} bytes, expected "
                             f"{key_format.size}/{value_format.size}: BPF and agent structs differ")
        self.fd: int = table.map_fd
        self.capacity: int = table.max_entries
        self.key_format, self.value_format = key_format, value_format
        self.chunk = max(1, min(chunk_entries, self.capacity))
        self._keys = ctypes.create_string_buffer(key_size * self.chunk)
        self._values = ctypes.create_string_buffer(value_size * self.chunk)

    def drain(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Every (key, value) in the map, removed from it. Call on a map BPF is not writing."""
        from bcc.libbcc import lib

        rows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        token_in, token_out = ctypes.c_uint32(0), ctypes.c_uint32(0)
        key_size, value_size = self.key_format.size, self.value_format.size
        first = True
        # At most max_entries in all: a map BPF went on filling is not read forever.
        while len(rows) < self.capacity:
            count = ctypes.c_uint32(min(self.chunk, self.capacity - len(rows)))
            res = lib.bpf_lookup_and_delete_batch(
                self.fd, None if first else ctypes.byref(token_in), ctypes.byref(token_out),
                self._keys, self._values, ctypes.byref(count))
            err = ctypes.get_errno()
            first = False
            if count.value:
                keys = self.key_format.iter_unpack(ctypes.string_at(self._keys, key_size * count.value))
                values = self.value_format.iter_unpack(ctypes.string_at(self._values, value_size * count.value))
                rows.extend(zip(keys, values, strict=True))
            if res != 0:
                if err == errno.ENOENT:
                    break  # the whole map has been read
                raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {os.strerror(err)}")
            token_in.value = token_out.value
        return rows
