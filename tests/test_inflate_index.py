"""Random access into zlib streams (agent/symbols/inflate_index.py): known bytes at every
offset, corrupt and truncated streams rejected, and libc6-dbg's compressed DWARF read
through indexes with the same answers as whole decompression and as addr2line."""

from __future__ import annotations

import io
import random
import zlib

import pytest

from agent.symbols import inflate_index
from agent.symbols.dwarf_lines import CuLineIndex
from agent.symbols.inflate_index import IndexedInflateStream, InflateError, InflateIndex
from agent.symbols.section_views import WHOLE_SECTION_MAX_BYTES, ViewingELFFile
from tests.test_debug_symbols import _addr2line, _nm, _same_source, libc_debug_file

PREFIX = b"elf header and other sections"


def _data(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    words = [b"abc", b"xyzzy", b"\0" * 40, bytes(rng.randrange(256) for _ in range(64))]
    return b"".join(rng.choice(words) + rng.randbytes(rng.randrange(8)) for _ in range(n))


def _file(data: bytes) -> tuple[io.BytesIO, int]:
    compressed = zlib.compress(data, 6)
    return io.BytesIO(PREFIX + compressed + b"trailing bytes"), len(compressed)


@pytest.fixture
def small_spacing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inflate_index, "SPACING", 16 * 1024)


def test_reads_at_any_offset_give_the_decompressed_bytes(small_spacing: None) -> None:
    data = _data(8_000)  # ~250 KB: a saved state every 16 KiB
    base, length = _file(data)
    index = InflateIndex.build(base, len(PREFIX), length, len(data))
    assert index.size == len(data) and len(index.states) == len(index.outputs) == -(-len(data) // (16 * 1024))
    assert index.outputs == list(range(0, len(data), 16 * 1024))
    stream = IndexedInflateStream(base, len(PREFIX), index)
    rng = random.Random(2)
    for _ in range(1500):
        offset = rng.randrange(len(data) + 10)
        size = rng.choice([1, 3, 100, 4096, 20_000, 70_000, -1])
        stream.seek(offset)
        expected = data[offset:] if size < 0 else data[offset : offset + size]
        assert stream.read(size) == expected, (offset, size)
        assert stream.tell() == (offset + len(expected) if offset <= len(data) else offset)
    stream.seek(-5, 2)
    assert stream.read() == data[-5:]
    stream.seek(0)
    assert stream.read() == data


def test_a_stream_that_does_not_match_its_header_is_rejected(small_spacing: None) -> None:
    data = _data(5_000)
    base, length = _file(data)
    with pytest.raises(InflateError, match="header says"):
        InflateIndex.build(base, len(PREFIX), length, len(data) + 1)
    garbage = io.BytesIO(PREFIX + b"\x78\x9c" + bytes(range(256)) * 4)
    with pytest.raises(InflateError):
        InflateIndex.build(garbage, len(PREFIX), 1026, 100_000)


def test_a_file_truncated_after_the_index_was_built_is_an_error_not_short_data(small_spacing: None) -> None:
    data = _data(20_000)
    base, length = _file(data)
    index = InflateIndex.build(base, len(PREFIX), length, len(data))
    truncated = io.BytesIO(base.getvalue()[: len(PREFIX) + length // 2])
    stream = IndexedInflateStream(truncated, len(PREFIX), index)
    stream.seek(len(data) - 100)
    with pytest.raises(InflateError):
        stream.read(100)


def test_libc_debug_lines_through_indexes_match_whole_decompression_and_addr2line() -> None:
    """libc6-dbg compresses its DWARF: .debug_info and .debug_line (over
    WHOLE_SECTION_MAX_BYTES) are read through indexes built at the first opening and kept
    across openings; every CU decoded gives the rows whole decompression gives."""
    debug_file = libc_debug_file()
    with open(debug_file, "rb") as indexed_file, open(debug_file, "rb") as whole_file:
        inflate: dict[str, InflateIndex] = {}
        indexed = CuLineIndex(lambda: ViewingELFFile(indexed_file, inflate).get_dwarf_info(), debug_file,
                              inflate_indexes=inflate)
        whole = CuLineIndex(lambda: ViewingELFFile(whole_file).get_dwarf_info(), debug_file)
        assert set(inflate) == {".debug_info", ".debug_line"}
        assert all(index.size > WHOLE_SECTION_MAX_BYTES for index in inflate.values())
        kept = dict(inflate)
        rng = random.Random(4)
        cus = rng.sample(range(len(indexed._starts)), 120)
        for n, i in enumerate(cus):
            if n % 40 == 0:
                CuLineIndex._recent = None  # opened again, as after a quiet while
            address = rng.randrange(indexed._starts[i], indexed._ends[i])
            assert indexed.lookup(address) == whole.lookup(address), hex(address)
        assert all(inflate[name] is kept[name] for name in kept)  # built once
        assert indexed.nbytes() >= sum(index.nbytes for index in inflate.values()) > 0
        for name in ("start_thread", "qsort_r"):
            vaddr, size = _nm(debug_file, name)
            path, line = _addr2line(debug_file, vaddr + size // 2)
            file, ours = indexed.lookup(vaddr + size // 2)
            assert ours == line and _same_source(file, path), (name, file, ours, path, line)
