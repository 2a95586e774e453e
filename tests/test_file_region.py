"""Reads of a file region on demand (agent/file_region.py) against the file's own bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.file_region import BLOCK_BYTES, CACHED_BLOCKS, BytesRegion, FileRegion, OpenedFile, RegionChanged


def _file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = bytes((i * 7 + i // 251) % 256 for i in range(size))
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def test_reads_equal_the_files_bytes_across_blocks_and_at_the_end(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 10 * BLOCK_BYTES + 123)
    offset, size = 1000, len(data) - 1000 - 17
    region_bytes = data[offset:offset + size]
    with open(path, "rb") as f:
        region = FileRegion(OpenedFile(f.fileno()), offset, size)
    memory = BytesRegion(region_bytes)
    assert len(region) == len(memory) == size
    cases = [(0, 1), (0, BLOCK_BYTES), (BLOCK_BYTES - 3, 10), (5, 3 * BLOCK_BYTES + 9),
             (size - 5, 100), (size, 4), (size + 10, 4), (1234, 0)]
    for pos, n in cases:
        assert region.read(pos, n) == memory.read(pos, n) == region_bytes[pos:pos + n], (pos, n)
    for negative in (region, memory):  # a corrupt offset is an error, not bytes from the end
        with pytest.raises(ValueError):
            negative.read(-1, 4)
        with pytest.raises(ValueError):
            negative.cstring(-1)


def test_cstrings_found_across_blocks_and_missing_ones_refused(tmp_path: Path) -> None:
    name = b"runtime.(*mheap).allocSpan" * 20  # longer than a search step, across a block
    start = BLOCK_BYTES - 50
    blob = b"x" * start + name + b"\0" + b"tail-without-nul"
    path = tmp_path / "strings.bin"
    path.write_bytes(blob)
    with open(path, "rb") as f:
        region = FileRegion(OpenedFile(f.fileno()), 0, len(blob))
    assert region.cstring(start) == BytesRegion(blob).cstring(start) == name
    assert region.cstring(start + 300) == name[300:]  # from inside the name: its rest
    with pytest.raises(ValueError):
        region.cstring(len(blob) - 5)
    with pytest.raises(ValueError):
        BytesRegion(blob).cstring(len(blob) - 5)


def test_the_block_cache_is_bounded(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 3 * CACHED_BLOCKS * BLOCK_BYTES)
    with open(path, "rb") as f:
        region = FileRegion(OpenedFile(f.fileno()), 0, len(data))
    for pos in range(0, len(data), BLOCK_BYTES):
        assert region.read(pos, 8) == data[pos:pos + 8]
        assert 0 < region.resident_bytes() <= CACHED_BLOCKS * BLOCK_BYTES


def test_a_file_cut_short_under_the_region_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 4 * BLOCK_BYTES)
    with open(path, "rb") as f:
        region = FileRegion(OpenedFile(f.fileno()), 0, len(data))
    assert region.read(0, 4) == data[:4]  # cached before the cut
    os.truncate(path, BLOCK_BYTES + 10)  # rewritten in place (where a mapping would SIGBUS)
    with pytest.raises(RegionChanged):
        region.read(2 * BLOCK_BYTES, 4)
    assert region.read(0, 4) == data[:4]  # what was read at the opening's content stays that


def test_a_file_rewritten_in_place_at_the_same_size_is_refused_not_misread(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 4 * BLOCK_BYTES)
    with open(path, "rb") as f:
        opened = OpenedFile(f.fileno())
    first, second = FileRegion(opened, 0, 2 * BLOCK_BYTES), FileRegion(opened, 2 * BLOCK_BYTES, 2 * BLOCK_BYTES)
    assert first.read(0, 8) == data[:8]
    stat = path.stat()
    with open(path, "r+b") as f:  # same size, other bytes, in place
        f.write(bytes(255 - b for b in data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # as a write a moment later
    for region in (first, second):  # both regions of the file see it, at their next file read
        with pytest.raises(RegionChanged):
            region.read(BLOCK_BYTES + 8, 8)
    assert first.read(0, 8) == data[:8]  # a block read before the change: the old content, as loaded


def test_regions_of_one_file_share_one_descriptor(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 2 * BLOCK_BYTES)
    before = len(os.listdir("/proc/self/fd"))
    with open(path, "rb") as f:
        opened = OpenedFile(f.fileno())
    regions = [FileRegion(opened, i, 16) for i in range(8)]
    assert len(os.listdir("/proc/self/fd")) == before + 1
    assert [r.read(0, 16) for r in regions] == [data[i:i + 16] for i in range(8)]
    del opened, regions
    assert len(os.listdir("/proc/self/fd")) == before  # closed with its last region


def test_a_region_keeps_reading_a_file_deleted_after_it_was_opened(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 2 * BLOCK_BYTES)
    with open(path, "rb") as f:
        region = FileRegion(OpenedFile(f.fileno()), 16, 64)
    path.unlink()
    assert region.read(0, 64) == data[16:80]
