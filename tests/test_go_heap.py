"""The Go runtime profile reader on synthetic memory images (agent/runtimes/go/heap.py).

Each image lays out runtime variables and buckets as runtime/mprof.go does on amd64; the
expected values are what runtime.MemProfile computes from the same records (active plus
the unflushed cycle, or every cycle before the first GC) and what runtime/pprof prints.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent.process.selectors import ProcessSelector
from agent.runtimes.go.heap import (
    BUCKET_TYPES,
    MPROF_LAYOUTS,
    SYMBOLS,
    GoProfileReader,
    GoProfileSymbols,
    UnsupportedBinary,
    profile_symbols,
    scale_heap_sample,
)
from agent.runtimes.go.heap_profiles import GoHeapProfiles
from integration.go_toolchains import available
from integration.harness import WORKLOADS
from shared.counters import Counters
from shared.model import Frame, FrameType

VARS = {name: 0x1000 + 0x40 * i for i, name in enumerate(SYMBOLS)}
Cycle = tuple[int, ...]


class Image:
    """A sparse file standing in for /proc/PID/mem."""

    def __init__(self, path: Path, minor: int) -> None:
        self.path, self.layout = path, MPROF_LAYOUTS[minor]
        self.data = bytearray(0x10000)
        self.next_bucket = 0x4000

    def put(self, address: int, fmt: str, *values: float) -> None:
        struct.pack_into(fmt, self.data, address, *values)

    def bucket(self, head: str, size: int, pcs: tuple[int, ...], record: bytes) -> int:
        address = self.next_bucket
        (old_head,) = struct.unpack_from("<Q", self.data, VARS[head])
        self.put(address, "<QQqQQQ", 0, old_head, BUCKET_TYPES[head], 0, size, len(pcs))
        self.put(address + 48, f"<{len(pcs)}Q", *pcs)
        self.data[address + 48 + 8 * len(pcs):address + 48 + 8 * len(pcs) + len(record)] = record
        self.put(VARS[head], "<Q", address)
        self.next_bucket = address + 48 + 8 * len(pcs) + len(record) + 8
        return address

    def mem_bucket(self, size: int, pcs: tuple[int, ...], active: Cycle, future: tuple[Cycle, Cycle, Cycle]) -> int:
        words = self.layout.cycle_words
        record = b"".join(struct.pack(f"<{words}Q", *c[:words]) for c in (active, *future))
        return self.bucket("runtime.mbuckets", size, pcs, record)

    def reader(self, minor: int) -> GoProfileReader:
        self.path.write_bytes(bytes(self.data))
        symbols = GoProfileSymbols(f"go1.{minor}", self.layout, dict(VARS), False)
        return GoProfileReader(0, symbols, mem_path=str(self.path))


def image(tmp_path: Path, minor: int, cycle: int, flushed: bool, rate: int = 512 * 1024) -> Image:
    img = Image(tmp_path / "mem", minor)
    img.put(VARS["runtime.mProfCycle"], "<I", cycle << 1 | int(flushed))
    img.put(VARS["runtime.MemProfileRate"], "<q", rate)
    return img


def test_unflushed_cycle_is_published_like_memprofile(tmp_path: Path) -> None:
    # cycle 4: future[4 % 3 = 1] holds the completed cycle, not yet flushed into active.
    img = image(tmp_path, 23, cycle=4, flushed=False)
    img.mem_bucket(1024, (0x401000, 0x402000), (10, 4, 10240, 4096),
                   ((100, 100, 1, 1), (3, 1, 3072, 1024), (50, 50, 5, 5)))
    (bucket,) = img.reader(23).read_heap().buckets
    assert (bucket.allocs, bucket.frees, bucket.alloc_bytes, bucket.free_bytes) == (13, 5, 13312, 5120)
    assert bucket.pcs == (0x401000, 0x402000) and bucket.size == 1024


def test_flushed_cycle_is_not_counted_twice(tmp_path: Path) -> None:
    img = image(tmp_path, 23, cycle=4, flushed=True)
    img.mem_bucket(1024, (0x401000,), (10, 4, 10240, 4096), ((100, 100, 1, 1), (3, 1, 3072, 1024), (7, 7, 7, 7)))
    (bucket,) = img.reader(23).read_heap().buckets
    assert (bucket.allocs, bucket.frees) == (10, 4)


def test_before_the_first_gc_every_cycle_is_published(tmp_path: Path) -> None:
    img = image(tmp_path, 23, cycle=0, flushed=False)
    img.mem_bucket(64, (0x401000,), (0, 0, 0, 0), ((0, 0, 0, 0), (0, 0, 0, 0), (5, 0, 320, 0)))
    img.mem_bucket(128, (0x402000,), (0, 0, 0, 0), ((0, 0, 0, 0), (2, 0, 256, 0), (1, 0, 128, 0)))
    buckets = img.reader(23).read_heap().buckets
    assert sorted((b.size, b.allocs, b.alloc_bytes) for b in buckets) == [(64, 5, 320), (128, 3, 384)]


def test_go_127_records_have_no_byte_counts(tmp_path: Path) -> None:
    img = image(tmp_path, 27, cycle=2, flushed=False)
    # future[2 % 3 = 2] unflushed; bytes are count x object size
    img.mem_bucket(4096, (0x401000,), (6, 2), ((9, 9), (9, 9), (4, 1)))
    (bucket,) = img.reader(27).read_heap().buckets
    assert (bucket.allocs, bucket.frees, bucket.alloc_bytes, bucket.free_bytes) == (10, 3, 40960, 12288)


def test_corrupt_lists_raise_oserror(tmp_path: Path) -> None:
    img = image(tmp_path, 23, cycle=1, flushed=True)
    first = img.mem_bucket(64, (0x401000,), (1, 0, 64, 0), ((0,) * 4,) * 3)
    img.put(first + 8, "<Q", first)  # allnext points back at itself
    with pytest.raises(OSError, match="corrupt"):
        img.reader(23).read_heap()
    img.put(first + 8, "<Q", 0)
    img.put(first + 40, "<Q", 5000)  # nstk beyond runtime.maxProfStackDepth
    with pytest.raises(OSError, match="frames"):
        img.reader(23).read_heap()
    img.put(first + 40, "<Q", 1)
    img.put(first + 16, "<q", 2)  # a block profile bucket on the heap list: a wrong head address
    with pytest.raises(OSError, match="type 2"):
        img.reader(23).read_heap()


def test_mutex_and_block_records(tmp_path: Path) -> None:
    img = image(tmp_path, 23, cycle=1, flushed=True)
    img.bucket("runtime.xbuckets", 0, (0x401000,), struct.pack("<dq", 1998.0, 5_935_086_510))
    img.put(VARS["runtime.ticks"] + MPROF_LAYOUTS[23].ticks_val, "<q", 2_596_093_542)  # type: ignore[operator]
    reader = img.reader(23)
    (mutex,) = reader.read_contention("mutex")
    assert (mutex.count, mutex.cycles) == (1998.0, 5_935_086_510)
    assert reader.read_contention("block") == []
    assert reader.ticks_per_second() == 2_596_093_542


def test_scaling_is_pprofs() -> None:
    # A Go 1.19 program's own heap profile (MemProfileRate 64 KiB): 359 sampled 16 KiB
    # objects printed as 1622 objects, 26590763 bytes.
    assert scale_heap_sample(359, 359 * 16384, 65536) == (1622, 26590763)
    assert scale_heap_sample(0, 0, 65536) == (0, 0)
    assert scale_heap_sample(5, 500, 1) == (5, 500)  # rate 1: everything was recorded


@pytest.fixture(scope="module")
def go_binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The go_heap workload built with the oldest installed toolchain."""
    toolchain = available()[0]
    out = tmp_path_factory.mktemp("go_heap_bin")
    cache = Path("/tmp") / f"gocache-{toolchain.version}"
    return {"plain": toolchain.build(WORKLOADS / "go_heap", out / "plain", "plain", cache=cache)}


def test_runtime_symbols_match_go_tool_nm(go_binaries: dict[str, Path]) -> None:
    symbols = profile_symbols(str(go_binaries["plain"]))
    assert symbols is not None and not symbols.pie
    nm = available()[0].tool("nm", str(go_binaries["plain"]))
    expected = {parts[2]: int(parts[0], 16) for parts in (line.split() for line in nm.splitlines())
                if len(parts) == 3 and parts[2] in SYMBOLS}
    assert symbols.addresses == expected and len(expected) == len(SYMBOLS)
    assert symbols.layout == MPROF_LAYOUTS[available()[0].minor]


def test_unknown_and_non_go_binaries(go_binaries: dict[str, Path], tmp_path: Path) -> None:
    # Stripped binaries: tests/test_go_heap_code.py. The same binary claiming a Go release
    # with no known layout (same length: go1.<NN>).
    data = go_binaries["plain"].read_bytes()
    version = profile_symbols(str(go_binaries["plain"])).version  # type: ignore[union-attr]
    future = version.replace(version.split(".")[1], "99", 1)
    assert len(future) == len(version)
    patched = tmp_path / "future"
    patched.write_bytes(data.replace(version.encode(), future.encode()))
    with pytest.raises(UnsupportedBinary) as exc:
        profile_symbols(str(patched))
    assert exc.value.reason == "version"
    assert profile_symbols("/bin/true") is None


class FakeSymbolizer:
    """Inline expansions per looked-up address, as agent.symbols.Symbolizer returns them."""

    def __init__(self, frames: dict[int, list[tuple[str, int]]]) -> None:
        self.frames = frames

    def symbolize_user(self, pid: int, addresses: list[int]) -> tuple[Frame, ...]:
        return tuple(Frame(fn, "f.go", line, addresses[0], FrameType.NATIVE, None) for fn, line in
                     self.frames[addresses[0]])


def names(frames: tuple[Frame, ...]) -> list[tuple[str, int]]:
    return [(f.function, f.line) for f in frames]


def test_stacks_with_one_pc_per_logical_frame_are_not_doubled() -> None:
    # Unlock inlined into holdLock at 0x100; 0x90 is holdLock's inline mark (parentPc).
    symbolizer = FakeSymbolizer({0x100: [("sync.Unlock", 5), ("main.holdLock", 61)], 0x90: [("main.holdLock", 61)],
                                 0x200: [("main.worker", 72)]})
    profiles = GoHeapProfiles(symbolizer, Counters(), ProcessSelector(), 1.0)  # type: ignore[arg-type]
    proc = type("P", (), {"exe_path": "/x"})()
    logical = profiles._symbolize(1, proc, (0x101, 0x91, 0x201), hide_runtime=False)
    assert names(logical) == [("sync.Unlock", 5), ("main.holdLock", 61), ("main.worker", 72)]
    # Frame-pointer stacks (mutex/block, Go 1.23+) carry physical PCs: expanded in full.
    physical = profiles._symbolize(1, proc, (0x101, 0x201), hide_runtime=False)
    assert names(physical) == [("sync.Unlock", 5), ("main.holdLock", 61), ("main.worker", 72)]


def test_leading_runtime_frames_are_hidden_like_pprof() -> None:
    symbolizer = FakeSymbolizer({0x10: [("runtime.mallocgc", 1)], 0x20: [("runtime.makeslice", 2)],
                                 0x30: [("main.fill", 3)], 0x40: [("runtime.main", 4)]})
    profiles = GoHeapProfiles(symbolizer, Counters(), ProcessSelector(), 1.0)  # type: ignore[arg-type]
    proc = type("P", (), {"exe_path": "/x"})()
    stack = profiles._symbolize(1, proc, (0x11, 0x21, 0x31, 0x41), hide_runtime=True)
    assert names(stack) == [("main.fill", 3), ("runtime.main", 4)]
    only_runtime = profiles._symbolize(1, proc, (0x11, 0x41), hide_runtime=True)
    assert names(only_runtime) == [("runtime.mallocgc", 1), ("runtime.main", 4)]  # pprof's second try: all
