"""Reading BPF hash maps in bulk: one ``BPF_MAP_LOOKUP_AND_DELETE_BATCH`` call per drain.

bcc's ``items_lookup_and_delete_batch`` allocates arrays of ``max_entries`` ctypes structs on
every call and hands back one ctypes object per entry; at a flush per second that churn is
most of the drain's cost. This keeps one pair of flat buffers per map and decodes them with
``struct.iter_unpack`` (plain tuples). Written here because bcc has no buffer-reusing
variant and no other maintained library on Debian's python3-bpfcc offers one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any


class HashMapDrainer:
    """Reads and deletes every entry of one BPF hash map, decoding keys and values."""

    def __init__(self, table: Any, key_format: struct.Struct, value_format: struct.Struct) -> None:
        key_size, value_size = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
        if key_size != key_format.size or value_size != value_format.size:
            raise ValueError(f"map layout {key_size}/{value_size} bytes, expected "
                             f"{key_format.size}/{value_format.size}: BPF and agent structs differ")
        self.fd: int = table.map_fd
        self.capacity: int = table.max_entries
        self.key_format, self.value_format = key_format, value_format
        self._keys = ctypes.create_string_buffer(key_size * self.capacity)
        self._values = ctypes.create_string_buffer(value_size * self.capacity)

    def drain(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Every (key, value) in the map, removed from it. Call on a map BPF is not writing."""
        from bcc.libbcc import lib

        total = 0
        token_in, token_out = ctypes.c_uint32(0), ctypes.c_uint32(0)
        key_size, value_size = self.key_format.size, self.value_format.size
        while total < self.capacity:
            count = ctypes.c_uint32(self.capacity - total)
            res = lib.bpf_lookup_and_delete_batch(
                self.fd, ctypes.byref(token_in) if total else None, ctypes.byref(token_out),
                ctypes.byref(self._keys, key_size * total), ctypes.byref(self._values, value_size * total),
                ctypes.byref(count))
            err = ctypes.get_errno()
            total += count.value
            if res != 0:
                if err == errno.ENOENT:
                    break  # the whole map has been read
                raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {os.strerror(err)}")
            token_in.value = token_out.value
        keys = self.key_format.iter_unpack(ctypes.string_at(self._keys, key_size * total))
        values = self.value_format.iter_unpack(ctypes.string_at(self._values, value_size * total))
        return list(zip(keys, values, strict=True))
