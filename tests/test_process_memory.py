"""The one /proc/PID/mem reader (agent/process/memory.py), on this process's own memory."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from agent.process.memory import ProcessMemory, UnreadableMemory


def test_reads_what_this_process_holds() -> None:
    buffer = ctypes.create_string_buffer(b"\x2a\x00\x00\x00\x00\x00\x00\x01stackfleet", 18)
    memory = ProcessMemory(os.getpid())
    try:
        address = ctypes.addressof(buffer)
        assert memory.read(address + 8, 10) == b"stackfleet"
        assert memory.word(address) == 0x0100_0000_0000_002A
    finally:
        memory.close()
    assert memory.closed


@pytest.mark.parametrize("address", [0, 1 << 63, (1 << 64) + 5], ids=["unmapped", "past-2**63", "past-2**64"])
def test_unreadable_addresses_are_one_oserror(address: int) -> None:
    memory = ProcessMemory(os.getpid())
    try:
        with pytest.raises(UnreadableMemory):
            memory.read(address, 8)
    finally:
        memory.close()


def test_a_memory_image_file_stands_in_for_a_process(tmp_path: Path) -> None:
    image = tmp_path / "mem"
    with open(image, "wb") as f:
        f.write(bytes(range(16)))
    memory = ProcessMemory(1, mem_path=str(image))
    try:
        assert memory.read(4, 4) == bytes([4, 5, 6, 7])
        with pytest.raises(UnreadableMemory, match="short read"):
            memory.read(12, 8)  # runs past the end of the image
    finally:
        memory.close()
