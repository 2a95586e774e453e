"""The mmap ring-buffer reader (agent/bpf/ring_reader.py) against a real BPF ring buffer map,
and against hand-built rings for headers the kernel only writes in passing (busy) or never
(malformed lengths).

The real ring is one page (4,096 bytes) so records wrap around its end quickly. A tracepoint
program writes one record per ``getpriority()`` call of this process whose ``which`` carries
a marker: the record is ``length`` bytes of a pattern the test wrote into an array map,
starting at ``who`` (or, with the discard flag, a reserved record that is discarded). The
expected records are therefore known byte for byte; ring-full failures are counted by the
program itself.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from agent.bpf.ring_reader import (
    BUSY_BIT,
    DISCARD_BIT,
    HEADER_BYTES,
    RingReader,
    RingView,
    SlotRun,
    record_count,
    ring_records,
)

RING_BYTES = 4096
MARKER = 0x5F000000
DISCARD_FLAG = 0x00800000

PROGRAM = """
struct pattern { u8 bytes[4096]; };
BPF_RINGBUF_OUTPUT(events, 1);
BPF_ARRAY(pattern, struct pattern, 1);
BPF_ARRAY(failures, u64, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getpriority)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TEST_TGID)
        return 0;
    u64 which = args->which;
    if ((which & 0xff000000) != MARKER)
        return 0;
    u32 zero = 0;
    u64 *failed = failures.lookup(&zero);
    if (!failed)
        return 0;
    if (which & DISCARD_FLAG) {
        u64 *rec = events.ringbuf_reserve(16);
        if (!rec) {
            __sync_fetch_and_add(failed, 1);
            return 0;
        }
        rec[0] = args->who;
        rec[1] = 0;
        events.ringbuf_discard(rec, 0);
        return 0;
    }
    struct pattern *p = pattern.lookup(&zero);
    if (!p)
        return 0;
    u32 len = which & 2047;
    u32 off = args->who & 2047;
    if (events.ringbuf_output(&p->bytes[off], len, 0) < 0)
        __sync_fetch_and_add(failed, 1);
    return 0;
}
"""


@pytest.fixture(scope="module")
def program() -> Iterator[tuple[Any, bytes]]:
    """The loaded program and the pattern its records are cut from."""
    bcc = pytest.importorskip("bcc")
    import ctypes

    bpf = bcc.BPF(text=PROGRAM, cflags=[f"-DTEST_TGID={os.getpid()}", f"-DMARKER={MARKER:#x}",
                                        f"-DDISCARD_FLAG={DISCARD_FLAG:#x}"])
    try:
        pattern = random.Random(20).randbytes(RING_BYTES)
        table = bpf["pattern"]
        table[ctypes.c_int(0)] = table.Leaf.from_buffer_copy(pattern)
        yield bpf, pattern
    finally:
        bpf.cleanup()


@pytest.fixture()
def reader(program: tuple[Any, bytes]) -> Iterator[RingReader]:
    bpf, _ = program
    r = RingReader.from_bcc(bpf["events"], name="test")
    r.drain()  # what an earlier test left
    r.stats.records = r.stats.discarded = 0
    try:
        yield r
    finally:
        r.close()


def emit(length: int, offset: int = 0, discard: bool = False) -> None:
    """Make the program write one record (or reserve and discard one)."""
    try:
        os.getpriority(MARKER | (DISCARD_FLAG if discard else 0) | length, offset)
    except OSError:
        pass  # EINVAL: the marker is no valid ``which``; the tracepoint has run already


def failures(program: tuple[Any, bytes]) -> int:
    import ctypes

    return int(program[0]["failures"][ctypes.c_int(0)].value)


def test_many_small_records_in_order_across_several_laps(program: tuple[Any, bytes], reader: RingReader) -> None:
    pattern = program[1]
    rng = random.Random(1)
    before = failures(program)
    expected: list[bytes] = []
    got: list[bytes] = []
    for _ in range(6):  # 6 x 150 records of 16-24 ring bytes: ~4 laps of the 4 KiB ring
        for _ in range(150):
            length, offset = rng.randrange(0, 14), rng.randrange(0, 2048)
            emit(length, offset)
            expected.append(pattern[offset : offset + length])
        got.extend(reader.drain())
    assert failures(program) == before  # the ring never filled
    assert got == expected
    assert reader.stats.records == 900
    assert reader.view.consumer[0] == reader.view.producer[0]
    assert reader.view.consumer[0] > 3 * RING_BYTES  # positions grow across laps


def test_records_wrapping_around_the_ring_end_come_back_whole(program: tuple[Any, bytes], reader: RingReader) -> None:
    pattern = program[1]
    wrapped = 0
    for lap in range(8):
        batch = []
        for i in range(3):  # 3 x 1,008 ring bytes: the start moves by 3,024 each round
            offset = (lap * 97 + i * 31) % 1000
            start = reader.view.producer[0] & (RING_BYTES - 1)
            wrapped += start + HEADER_BYTES + 1000 > RING_BYTES
            emit(1000, offset)
            batch.append(pattern[offset : offset + 1000])
        assert reader.drain() == batch
    assert wrapped >= 3  # records really crossed the end of the data area


def test_discarded_records_are_skipped_and_counted(program: tuple[Any, bytes], reader: RingReader) -> None:
    pattern = program[1]
    emit(40, 5)
    emit(0, 0, discard=True)
    emit(0, 0, discard=True)
    emit(7, 300)
    emit(0, 0, discard=True)
    assert reader.drain() == [pattern[5:45], pattern[300:307]]
    assert reader.stats.discarded == 3
    assert reader.view.consumer[0] == reader.view.producer[0]  # discarded space is given back
    assert reader.drain() == []


def test_a_full_ring_drains_in_one_batch_and_takes_records_again(program: tuple[Any, bytes],
                                                                  reader: RingReader) -> None:
    pattern = program[1]
    before = failures(program)
    written = []
    for i in range(60):  # 60 x 104 ring bytes = 6,240 > 4,096: the later ones find the ring full
        emit(96, i)
        written.append(pattern[i : i + 96])
    failed = failures(program) - before
    got = reader.drain()
    assert failed > 0 and len(got) + failed == 60
    assert got == written[: len(got)]  # the ones that fit, all of them, in order
    emit(96, 1)
    assert reader.drain() == [pattern[1:97]]
    assert failures(program) - before == failed


def test_wait_wakes_on_a_record_and_times_out_on_an_empty_ring(program: tuple[Any, bytes],
                                                               reader: RingReader) -> None:
    assert reader.wait(20) is False
    emit(3, 0)  # flags 0 and a caught-up consumer: the kernel wakes the ring's waiters
    assert reader.wait(10_000) is True
    assert reader.drain() == [program[1][0:3]]


# ----------------------------------------------------------------- hand-built rings


class FakeRing:
    """A ring in plain memory laid out like the kernel's, headers written by hand."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.ring = bytearray(size)
        self.consumer = bytearray(8)
        self.producer = bytearray(8)
        self.data = bytearray(2 * size)
        self.view = RingView(memoryview(self.consumer), memoryview(self.producer), memoryview(self.data), size)
        self.reader = RingReader(self.view, name="fake")

    @property
    def producer_pos(self) -> int:
        return int(self.view.producer[0])

    def put(self, payload: bytes, flags: int = 0, length: int | None = None) -> int:
        """Append a record at the producer position (wrapping); returns its position."""
        pos = self.producer_pos
        n = len(payload) if length is None else length
        header = ((n | flags) & 0xFFFFFFFF).to_bytes(4, "little") + bytes(4)
        for i, b in enumerate(header + payload):
            self.ring[(pos + i) % self.size] = b
        self.view.producer[0] = pos + ((len(payload) + HEADER_BYTES + 7) & ~7)
        self.data[:] = self.ring + self.ring  # the kernel maps the data pages twice
        return pos

    def set_header(self, pos: int, word: int) -> None:
        self.ring[pos % self.size : pos % self.size + 4] = word.to_bytes(4, "little")
        self.data[:] = self.ring + self.ring


def test_a_busy_record_ends_the_batch_until_it_is_committed() -> None:
    fake = FakeRing()
    fake.put(b"first")
    busy = fake.put(b"second", BUSY_BIT)
    fake.put(b"third")
    assert fake.reader.drain() == [b"first"]
    assert fake.view.consumer[0] == busy  # stopped at the busy record
    assert fake.reader.drain() == []
    fake.set_header(busy, len(b"second"))  # committed
    assert fake.reader.drain() == [b"second", b"third"]


def test_records_wrap_and_come_back_whole_in_a_hand_built_ring() -> None:
    fake = FakeRing(64)
    fake.put(b"a" * 30)  # 40 ring bytes
    assert fake.reader.drain() == [b"a" * 30]
    fake.put(bytes(range(20)))  # starts at 40, crosses the end at 64
    fake.put(b"")  # an empty record is a record
    assert fake.reader.drain() == [bytes(range(20)), b""]
    assert fake.reader.stats.records == 3


@pytest.mark.parametrize("bad_length", [1 << 29, 500, 200])
def test_a_malformed_length_is_a_counted_drop_not_a_crash(bad_length: int,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRing(256)
    fake.put(b"ok")
    bad = fake.put(b"x" * 16)
    fake.put(b"lost with the bad one")
    fake.set_header(bad, bad_length)  # longer than the ring, or past the producer position
    assert fake.reader.drain() == [b"ok"]
    assert fake.reader.stats.malformed == 1
    assert fake.reader.stats.malformed_bytes == fake.producer_pos - bad
    assert fake.view.consumer[0] == fake.producer_pos  # moved on: no loop on the bad header
    assert "claims" in caplog.text
    fake.put(b"after")
    assert fake.reader.drain() == [b"after"]


def test_positions_further_apart_than_the_ring_are_a_counted_drop() -> None:
    fake = FakeRing(64)
    fake.put(b"x")
    fake.view.producer[0] = 1000  # more than a ring's worth ahead of the consumer
    assert fake.reader.drain() == []
    assert fake.reader.stats.malformed == 1
    assert fake.view.consumer[0] == 1000
    fake.put(b"after")
    assert fake.reader.drain() == [b"after"]


def test_discard_and_busy_bits_are_not_part_of_the_length() -> None:
    fake = FakeRing()
    fake.put(b"gone", DISCARD_BIT)
    fake.put(b"kept")
    assert fake.reader.drain() == [b"kept"]
    assert fake.reader.stats.discarded == 1


def test_a_ring_size_that_is_not_a_power_of_two_is_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        RingView(memoryview(bytearray(8)), memoryview(bytearray(8)), memoryview(bytearray(200)), 100)


def test_the_source_counts_queue_overflow_malformed_and_discarded_records() -> None:
    """RingBufferSource on a hand-built ring: what does not fit the bounded deque, what the
    reader dropped as malformed and what BPF discarded are each counted."""
    from agent.actors.sources import RECORD_OVERHEAD_BYTES, RingBufferSource
    from shared.counters import Counters

    counters = Counters()
    source = RingBufferSource(ring_pages=1, max_pending_bytes=3 * (2 + RECORD_OVERHEAD_BYTES), counters=counters,
                              type_name="cpu")
    source._pending.append(b"old")
    source._pending_bytes = 3 + RECORD_OVERHEAD_BYTES
    fake = FakeRing(256)
    for payload in (b"r1", b"r2", b"r3"):
        fake.put(payload)
    fake.put(b"gone", DISCARD_BIT)
    source._take_records(fake.reader)
    assert source.drain() == [b"r1", b"r2", b"r3"]  # the oldest went
    assert counters.get("events_dropped", type="cpu", reason="agent_queue_full") == 1
    assert counters.get("ring_records_discarded", type="cpu") == 1
    bad = fake.put(b"x" * 16)
    fake.set_header(bad, 1 << 29)
    source._take_records(fake.reader)
    source._take_records(fake.reader)
    assert counters.get("events_dropped", type="cpu", reason="malformed_ring_record") == 1
    assert counters.get("ring_records_discarded", type="cpu") == 1


# ----------------------------------------------------------------- batches of fixed-size records


def test_drain_batch_gives_what_drain_gives_across_laps(program: tuple[Any, bytes], reader: RingReader) -> None:
    """Mostly 56-byte records (64 ring bytes each, taken in runs) with some of other sizes and
    some discarded, over several laps of the real ring: every record comes back exactly
    once, in ring order, as ``drain`` would give them."""
    pattern = program[1]
    rng = random.Random(7)
    before = failures(program)
    expected: list[bytes] = []
    got: list[bytes] = []
    in_runs = 0
    discarded = 0
    for _ in range(8):  # 8 x 40 records, ~2.3 KiB a round: ~5 laps of the 4 KiB ring
        for _ in range(40):
            offset = rng.randrange(0, 2048)
            kind = rng.random()
            if kind < 0.1:
                emit(0, 0, discard=True)
                discarded += 1
                continue
            length = 56 if kind < 0.8 else rng.choice([0, 8, 55, 57, 120])
            emit(length, offset)
            expected.append(pattern[offset : offset + length])
        items = reader.drain_batch(56)
        assert record_count(items) == len(ring_records(items))
        got.extend(ring_records(items))
        in_runs += sum(item.count for item in items if isinstance(item, SlotRun))
        # Only 56-byte records come in runs, and every record of a run is one.
        assert all(item.record_size == 56 and len(item.slots) == 64 * item.count
                   for item in items if isinstance(item, SlotRun))
    assert failures(program) == before
    assert got == expected
    assert in_runs == sum(len(r) == 56 for r in expected) > 200  # all 56-byte ones came in runs
    assert reader.stats.records == len(expected) and reader.stats.discarded == discarded
    assert reader.view.consumer[0] == reader.view.producer[0]


def test_drain_batch_stops_at_a_busy_record_and_drops_a_malformed_one() -> None:
    fake = FakeRing(1024)
    fake.put(b"a" * 56)
    fake.put(b"b" * 56)
    busy = fake.put(b"c" * 56, BUSY_BIT)
    fake.put(b"d" * 56)
    first = fake.reader.drain_batch(56)
    assert [type(item) for item in first] == [SlotRun] and ring_records(first) == [b"a" * 56, b"b" * 56]
    assert fake.view.consumer[0] == busy
    fake.set_header(busy, 56)  # committed
    fake.put(b"e" * 10)
    bad = fake.put(b"f" * 56)
    fake.put(b"g" * 56)
    fake.set_header(bad, 1 << 29)
    assert ring_records(fake.reader.drain_batch(56)) == [b"c" * 56, b"d" * 56, b"e" * 10]
    assert fake.reader.stats.malformed == 1
    assert fake.view.consumer[0] == fake.producer_pos


def test_a_slot_source_hands_on_runs_bounded_in_bytes_and_drops_counted_by_record() -> None:
    """The source of fixed-size records hands a run on as one item and other records as their
    bytes, charges the byte bound what it holds, and counts drops in records: the oldest item
    goes first, a run whole."""
    from agent.actors.sources import RECORD_OVERHEAD_BYTES, RUN_OVERHEAD_BYTES, SlotRingSource
    from shared.counters import Counters

    counters = Counters()
    seen: list[list[bytes | SlotRun]] = []
    run_charge = 6 * 64 + RUN_OVERHEAD_BYTES
    source = SlotRingSource(ring_pages=1, max_pending_bytes=run_charge, counters=counters, type_name="cpu",
                            fixed_size=56, on_records=seen.append)
    told: list[int] = []
    source.on_buffered = told.append
    fake = FakeRing(1024)
    fake.put(b"odd")
    for i in range(6):
        fake.put(bytes([i]) * 56)
    fake.put(b"gone", DISCARD_BIT)
    source._take_records(fake.reader)
    [(odd, run)] = seen
    assert odd == b"odd" and isinstance(run, SlotRun) and run.count == 6
    assert told == [run_charge]  # b"odd" (charged 3 + RECORD_OVERHEAD_BYTES) went to fit
    assert ring_records(source.drain()) == [bytes([i]) * 56 for i in range(6)]
    assert counters.get("events_dropped", type="cpu", reason="agent_queue_full") == 1
    assert counters.get("ring_records_discarded", type="cpu") == 1
    for i in range(7):  # a run over the bound on its own: dropped whole, each record counted
        fake.put(bytes([i]) * 56)
    source._take_records(fake.reader)
    assert source.drain() == []
    assert counters.get("events_dropped", type="cpu", reason="agent_queue_full") == 8
    assert RECORD_OVERHEAD_BYTES < RUN_OVERHEAD_BYTES < 2 * 64


def test_the_pending_bound_is_in_bytes_so_small_records_wait_where_large_ones_would_not() -> None:
    """One bound, two record sizes: the byte budget of two 4 KiB records holds ~60 id
    records; beyond it the oldest go, counted, and what the flush signal is told is bytes."""
    from agent.actors.sources import RECORD_OVERHEAD_BYTES, RingBufferSource
    from shared.counters import Counters

    counters, told = Counters(), []
    bound = 2 * (4096 + RECORD_OVERHEAD_BYTES)
    source = RingBufferSource(ring_pages=1, max_pending_bytes=bound, counters=counters, type_name="cpu")
    source.on_buffered = told.append
    fake = FakeRing(16384)
    small = [i.to_bytes(2, "little") * 28 for i in range(60)]  # 60 x 97 charged bytes fit in 8,274
    for record in small:
        fake.put(record)
    source._take_records(fake.reader)
    assert counters.get("events_dropped", type="cpu", reason="agent_queue_full") == 0
    assert told == [60 * (56 + RECORD_OVERHEAD_BYTES)]
    for record in (b"a" * 4096, b"b" * 4096):
        fake.put(record)
    source._take_records(fake.reader)
    # Both large records fit only once every small one has gone: those 60 are the drops.
    assert counters.get("events_dropped", type="cpu", reason="agent_queue_full") == 60
    assert told[-1] == bound
    assert source.drain() == [b"a" * 4096, b"b" * 4096]
    fake.put(b"c" * 4096)
    source._take_records(fake.reader)  # the drain emptied the account too
    assert told[-1] == 4096 + RECORD_OVERHEAD_BYTES
    assert counters.get("events_dropped", type="cpu", reason="agent_queue_full") == 60


def test_interrupt_ends_a_wait_at_once_and_only_that_one(program: tuple[Any, bytes], reader: RingReader) -> None:
    """``interrupt`` (from another thread: the source's stop) ends a long wait now; the next
    wait on an empty ring times out again."""
    import threading
    import time

    waited: list[float] = []

    def wait() -> None:
        start = time.monotonic()
        reader.wait(30_000)
        waited.append(time.monotonic() - start)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    reader.interrupt()
    thread.join(10)
    assert waited and waited[0] < 10
    assert reader.wait(20) is False


def test_a_drain_takes_what_the_ring_holds_without_waiting_for_the_poll() -> None:
    """Records submitted without a wakeup are in the flush's drain even when the poll thread
    has not looked since; the flush signal is not told of a backlog the drain takes itself."""
    from agent.actors.sources import RUN_OVERHEAD_BYTES, SlotRingSource
    from shared.counters import Counters

    told: list[int] = []
    source = SlotRingSource(ring_pages=1, max_pending_bytes=1 << 20, counters=Counters(), type_name="cpu",
                            fixed_size=56)
    fake = FakeRing(1024)
    source._ring = fake.reader
    source.on_buffered = told.append
    for i in range(3):
        fake.put(bytes([i]) * 56)
    assert ring_records(source.drain()) == [bytes([i]) * 56 for i in range(3)]
    assert told == [] and fake.view.consumer[0] == fake.producer_pos
    fake.put(b"\7" * 56)
    source._take_records(fake.reader)  # the poll thread's step tells the flush signal, in bytes
    assert told == [64 + RUN_OVERHEAD_BYTES] and ring_records(source.drain()) == [b"\7" * 56]
