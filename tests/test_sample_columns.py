"""The CPU profile's batch path without a Python object per sample: id records decoded
straight from their ring slots, samples held as columns (shared.model.SampleColumns), the
metadata sink and the wire encoder reading those columns.

Known answers: the per-record path (struct-unpacked headers, one ``Sample`` per sample, the
per-sample metadata loop, the encoder fed ``Sample`` objects) on the same input; the
columns must give the same samples and byte for byte the same wire messages.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.actors.base import ActorContext, SampleSink
from agent.bpf.layouts import DedupFlags
from agent.bpf.ring_reader import RingItem, RingReader, RingView, SlotRun, ring_records
from agent.bpf.sample_records import SAMPLE_RECORD, decode_batch, record_pids
from agent.clock import MonotonicToUnix
from agent.metadata.sink import MetadataSink
from agent.settings import AgentSettings
from agent.symbols import Symbolizer
from shared.counters import Counters
from shared.model import Coded, Frame, FrameType, Sample, SampleColumns, numbering
from shared.profile_types import ProfileType
from shared.wire import StreamDictionary, StreamEncoder, decode_samples, header, unpack
from tests.test_stack_dedup import FakeKernelCpuActor, stack_event
from tests.test_symbols import Target, build


def drained(records: list[bytes]) -> list[RingItem]:
    """``records`` written into a ring laid out as the kernel's and drained in runs."""
    view = RingView(memoryview(bytearray(8)), memoryview(bytearray(8)), memoryview(bytearray(2 * 65536)), 65536)
    pos = 0
    for r in records:
        slot = len(r).to_bytes(4, "little") + b"\x99\x88\x77\x66" + r
        view.data[pos : pos + len(slot)] = slot
        pos += (len(slot) + 7) & ~7
    view.producer[0] = pos
    return RingReader(view).drain_batch(SAMPLE_RECORD.size)


def random_headers(n: int, seed: int) -> list[tuple[int, int, int, int, int, int, int, bytes]]:
    rng = random.Random(seed)
    comms = [b"", b"t", b"spin", b"0123456789abcde", b"\xff" * 16, b"name\0junk"]
    return [(rng.getrandbits(64), rng.getrandbits(64), rng.getrandbits(64), rng.getrandbits(32),
             rng.getrandbits(32), rng.randrange(256), rng.choice([0, 1, 2]), rng.choice(comms).ljust(16, b"\0"))
            for _ in range(n)]


def test_id_records_decode_field_by_field_as_struct_unpacks_them() -> None:
    heads = random_headers(300, 1)
    records = [SAMPLE_RECORD.pack(*h) for h in heads]
    from_slots = drained(records[:250])
    assert [type(item) for item in from_slots] == [SlotRun] and ring_records(from_slots) == records[:250]
    assert list(decode_batch(from_slots).ids) == heads[:250]  # id records only: one block
    mixed = decode_batch([*records[250:], b"\0" * 40])  # and with a malformed one beside them
    assert list(mixed.ids) == heads[250:] and mixed.malformed == 1
    short = b"\0" * 20  # too short to hold a pid
    assert record_pids(records) == {h[3] for h in heads} == record_pids([*records, short])


def test_the_actor_gives_the_same_samples_from_ring_batches_as_from_records(tmp_path: Path) -> None:
    """Two processes' stacks, one thread renamed, one unknown stack: from a ring batch (id
    records in slots, the whole record beside them) the actor gives exactly the samples
    it gives for the same records one by one, and drops the unknown one, counted."""
    target = Target(build(tmp_path))
    try:
        pid = target.pid
        leaf, _ = target.truth["leaf_function"]
        caller, _ = target.truth["caller_function"]
        samples = {}
        clock = MonotonicToUnix()  # one clock: the same timestamps both ways
        for how in ("records", "batch"):
            ctx = ActorContext(AgentSettings(cpu_stack_dedup=True), Symbolizer(), ThreadPoolExecutor(1),
                               None,  # type: ignore[arg-type]
                               Counters(), clock)
            actor = FakeKernelCpuActor(ctx)
            new = SAMPLE_RECORD.pack(5, 61, 1, pid, pid, 0, DedupFlags.NEW, b"main") + stack_event(
                pid, pid, [leaf, caller + 1])
            ids = [SAMPLE_RECORD.pack(10 + i, 61 if i % 3 else 62, 1, pid, pid + i % 2, i % 2, DedupFlags.ID_ONLY,
                                      b"worker" if i % 2 else b"main") for i in range(12)]
            actor.known[62] = b""  # too short: never resolves, so id 62's records are dropped
            if how == "records":
                samples[how] = list(actor.to_samples([new, *ids]))
            else:
                samples[how] = list(actor.to_samples(drained([*ids[:5], new, *ids[5:]])))
            assert actor.ctx.counters.get("events_dropped", type="cpu", reason="stack_unknown") == 4
        assert samples["batch"] == samples["records"]
        got = samples["batch"]
        assert len(got) == 9
        assert [f.function for f in got[1].frames] == ["leaf_function", "caller_function"]
        assert {(s.tid - pid, s.thread_name, s.cpu) for s in got[1:]} == {(0, "main", 0), (1, "worker", 1)}
        assert {s.process_name for s in got} == {"target"}
        assert got[1].frames is got[2].frames  # one tuple per stack, shared by its samples
    finally:
        target.stop()


def _frames(n: int) -> tuple[Frame, ...]:
    return tuple(Frame(f"f{n}_{i}", "x.c", i, 0x1000 + i, FrameType.NATIVE) for i in range(3))


def _samples(n: int) -> list[Sample]:
    stacks = [_frames(k) for k in range(4)]
    shared_attrs = {"process.executable.name": "spin", "k8s.pod.name": "p"}
    other_attrs = {"process.executable.name": "other"}
    out = []
    for i in range(n):
        attrs = shared_attrs if i % 3 == 0 else other_attrs if i % 3 == 1 else {}
        out.append(Sample(1_000_000 + 1000 * i, i % 2, 10 + i % 3, 20 + i % 5, f"t{i % 2}", f"p{i % 3}",
                          stacks[i % 4], (10_000_000,), attrs))
    return out


def test_the_encoder_writes_columns_byte_for_byte_as_samples() -> None:
    samples = _samples(50)
    by_samples = StreamEncoder("h", ProfileType.CPU, "a")
    by_columns = StreamEncoder("h", ProfileType.CPU, "a")
    for batch in (samples[:30], samples[30:], samples[:0]):
        assert by_columns.encode(SampleColumns.from_samples(batch), 1) == by_samples.encode(batch, 1)
    no_attrs = [Sample(s.timestamp_ns, s.cpu, s.pid, s.tid, s.thread_name, s.process_name, s.frames, s.values)
                for s in samples]
    assert by_columns.encode(SampleColumns.from_samples(no_attrs), 1) == by_samples.encode(no_attrs, 1)


def test_columns_decoded_by_the_aggregator_are_the_samples() -> None:
    samples = _samples(20)
    dict_msg, samples_msg = StreamEncoder("h", ProfileType.CPU, "a").encode(SampleColumns.from_samples(samples), 1)
    assert dict_msg is not None and samples_msg is not None
    d = unpack(dict_msg)
    dictionary = StreamDictionary(d["epoch"])
    dictionary.apply(d)
    msg = unpack(samples_msg)
    stream, _, _ = header(msg, "samples")
    assert decode_samples(msg, stream, dictionary).samples == samples


def test_sample_columns_behave_as_a_sequence_of_samples() -> None:
    samples = _samples(7)
    columns = SampleColumns.from_samples(samples[:4])
    columns.concat(SampleColumns.from_samples(samples[4:]))
    assert len(columns) == 7 and columns == samples and list(columns) == samples and columns[2:4] == samples[2:4]
    kept = columns.select([i % 2 == 0 for i in range(7)])
    assert kept == samples[::2]
    columns[0].attributes["changed"] = "yes"  # a copy: the batch is unchanged
    assert columns == samples


class _Resolver:
    """The resolver's cache as the sink reads it: attributes and network namespace per pid."""

    def __init__(self) -> None:
        self.attrs = {10: {"process.executable.name": "spin"}, 11: {}, 12: {"process.executable.name": "x",
                                                                             "lock.address": "ns"}}
        self.netns = {10: 1, 11: 1, 12: 2}
        self.resolved: list[dict[int, str]] = []

    def stale(self, processes: object) -> dict[int, str]:
        return {pid: name for pid, name in processes if pid not in self.attrs}  # type: ignore[attr-defined]

    def resolve_many(self, stale: dict[int, str]) -> None:
        self.resolved.append(stale)

    def cached(self, pid: int) -> dict[str, str] | None:
        return self.attrs.get(pid)

    def network_namespace(self, pid: int) -> int | None:
        return self.netns.get(pid)


class _Encode(SampleSink):
    def __init__(self) -> None:
        self.encoder = StreamEncoder("h", ProfileType.CPU, "a")
        self.messages: list[tuple[bytes | None, bytes | None]] = []

    async def submit(self, profile_type: ProfileType, samples: Sequence[Sample], period: int) -> None:
        self.messages.append(self.encoder.encode(samples, period))


def test_the_metadata_sink_treats_columns_as_it_treats_samples() -> None:
    """Process attributes added (a sample's own win), out-of-namespace samples left out and
    counted, unknown pids resolved: the same messages from columns as from samples."""
    def samples() -> list[Sample]:
        out = _samples(30)
        out[3].attributes = {"lock.address": "own"}  # pid 10: its own attribute stays beside the process's
        out.append(Sample(5, 0, 13, 13, "new", "newproc", _frames(9), (1,)))  # unknown pid: resolved
        return out

    results = {}
    for how in ("samples", "columns"):
        counters = Counters()
        resolver = _Resolver()
        sink = MetadataSink(_Encode(), resolver, counters)  # type: ignore[arg-type]
        sink.own_netns = 1
        batch = samples()
        asyncio.run(sink.submit(ProfileType.CPU, batch if how == "samples" else SampleColumns.from_samples(batch), 1))
        results[how] = (sink.inner.messages, counters.get("samples_out_of_scope", type="cpu"),  # type: ignore[attr-defined]
                        resolver.resolved)
    assert results["columns"] == results["samples"]
    assert results["columns"][1] == 11  # pid 12 (10 samples) and the unknown pid 13
    assert results["columns"][2] == [{13: "newproc"}]


def encoded(samples: list[Sample]) -> SampleColumns:
    """``samples`` with their stack, name and attribute columns dictionary-encoded, values in
    the order of first samples, as the CPU actor and the metadata sink build them."""
    plain = SampleColumns.from_samples(samples)

    def encode(column: list[Any]) -> Coded[Any]:
        first: dict[int, int] = {}  # by identity: equal stacks and dicts may be distinct objects
        values = []
        for value in column:
            if id(value) not in first:
                first[id(value)] = len(values)
                values.append(value)
        return Coded(values, [first[id(v)] for v in column])

    attributes = plain.attributes
    return SampleColumns(plain.timestamps, plain.cpus, plain.pids, plain.tids, encode(plain.thread_names),
                         encode(plain.process_names), encode(plain.stacks), plain.values,
                         encode(attributes) if attributes is not None else None)


def test_encoded_columns_are_read_and_written_as_plain_ones() -> None:
    """Known answers from the plain columns: the same samples, the same selections and
    concatenations, and byte for byte the same wire messages (values numbered in order of
    first samples, as a pass over the samples numbers them)."""
    samples = _samples(40)
    coded_batch = encoded(samples)
    assert isinstance(coded_batch.column("stacks"), Coded) and len(coded_batch.column("stacks").values) == 4
    assert coded_batch == samples and coded_batch[-1] == samples[-1] and coded_batch[5:9] == samples[5:9]
    keep = [i % 4 != 1 for i in range(40)]  # drops every sample of stack 1: its value goes too
    kept = coded_batch.select(keep)
    assert kept == [s for s, k in zip(samples, keep, strict=True) if k]
    assert [f[0].function for f in kept.column("stacks").values] == ["f0_0", "f2_0", "f3_0"]
    joined = encoded(samples[:25])
    joined.concat(SampleColumns.from_samples(samples[25:]))  # encoded, then plain: stays encoded
    assert isinstance(joined.column("stacks"), Coded) and joined == samples
    by_samples = StreamEncoder("h", ProfileType.CPU, "a")
    by_codes = StreamEncoder("h", ProfileType.CPU, "a")
    for batch in (samples[:30], samples[30:]):
        assert by_codes.encode(encoded(batch), 1) == by_samples.encode(batch, 1)


def test_coded_select_and_concat_keep_every_value_used_and_in_first_use_order() -> None:
    column = Coded(["a", "b", "c"], [0, 1, 0, 2, 1])
    picked = column.select([False, True, True, False, True])
    assert picked == Coded(["b", "a"], [0, 1, 0]) and picked.decoded() == ["b", "a", "b"]
    both = Coded(["x"], [0, 0]).concat(picked)
    assert both == Coded(["x", "b", "a"], [0, 0, 1, 2, 1]) and both.decoded() == ["x", "x", "b", "a", "b"]
    assert numbering(["q", "r", "q", "s"]) == {"q": 0, "r": 1, "s": 2}


def test_the_metadata_sink_encodes_process_attributes_once_per_process() -> None:
    """Columns without attributes of their own get one code per sample into one dict per
    process (first samples' order); the messages are those of the per-sample path."""
    results = {}
    for how in ("samples", "columns"):
        # Fresh samples each time: the per-sample path sets their attributes in place.
        samples = [Sample(s.timestamp_ns, s.cpu, s.pid, s.tid, s.thread_name, s.process_name, s.frames, s.values)
                   for s in _samples(30)]
        sink = MetadataSink(_Encode(), _Resolver(), Counters())  # type: ignore[arg-type]
        batch: Sequence[Sample] = samples if how == "samples" else encoded(samples)
        asyncio.run(sink.submit(ProfileType.CPU, batch, 1))
        results[how] = sink.inner.messages  # type: ignore[attr-defined]
        if how == "columns":
            assert isinstance(batch, SampleColumns)
            attributes = batch.column("attributes")
            assert isinstance(attributes, Coded) and len(attributes.values) == 3  # pids 10, 11, 12
            assert [a.get("process.executable.name") for a in attributes.values] == ["spin", None, "x"]
    assert results["columns"] == results["samples"]
