"""Wire format: round trip, delta behaviour, resync and validation of hostile input."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.model import Frame, FrameType, Mapping, Sample
from shared.profile_types import ProfileType
from shared.wire import (
    ATTRIBUTE_SETS_VERSION,
    PROTOCOL_VERSION,
    StreamDictionary,
    StreamEncoder,
    WireError,
    decode_samples,
    header,
    parse_resync,
    resync_request,
    unpack,
)

LIBC = Mapping(0x7F0000000000, 0x7F0000200000, 0, "/usr/lib/libc.so.6", "abcd")
EXE = Mapping(0x400000, 0x500000, 0, "/usr/bin/app", "")


def frames(*names: str) -> tuple[Frame, ...]:
    return (
        *tuple(Frame(n, "app.c", 10 + i, 4198400 + 16 * i, FrameType.NATIVE, EXE) for i, n in enumerate(names)),
        Frame("__libc_start_main", "", 0, 139637976732212, FrameType.NATIVE, LIBC),
    )


def sample(ts: int, stack: tuple[Frame, ...], tid: int = 11, attrs: dict[str, str] | None = None) -> Sample:
    return Sample(ts, 1, 10, tid, "worker", "app", stack, (10_101_010,), attrs or {})


def receive(
    dictionary: StreamDictionary | None, dict_msg: bytes | None, samples_msg: bytes
) -> tuple[StreamDictionary, list[Sample]]:
    if dict_msg is not None:
        d = unpack(dict_msg)
        _, epoch, _ = header(d, "dict")
        dictionary = dictionary or StreamDictionary(epoch)
        dictionary.apply(d)
    assert dictionary is not None
    s = unpack(samples_msg)
    key, _, _ = header(s, "samples")
    return dictionary, decode_samples(s, key, dictionary).samples


def test_round_trip_preserves_every_field() -> None:
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    batch = [
        sample(1_000, frames("leaf", "mid", "main")),
        sample(2_000, frames("other", "main"), tid=12, attrs={"k": "v"}),
    ]
    dict_msg, samples_msg = enc.encode(batch, period=10_101_010)
    assert samples_msg is not None
    _, got = receive(None, dict_msg, samples_msg)
    assert got == batch


def test_attributes_travel_as_sets_with_one_index_per_sample() -> None:
    """Samples of a process share its attributes dict: each distinct list is sent once
    (equal lists of different dicts too) and every sample carries its list's index."""
    web, db = {"service.name": "web", "container.id": "c1"}, {"service.name": "db"}
    web_again = dict(web)  # another object with the same content
    batch = [sample(1_000 + i, frames("leaf", "main"), attrs=a) for i, a in enumerate([web, db, web, web_again, db])]
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    dict_msg, samples_msg = enc.encode(batch, period=10_101_010)
    assert samples_msg is not None
    msg = unpack(samples_msg)
    assert msg["v"] == ATTRIBUTE_SETS_VERSION and "attrs" not in msg
    assert len(msg["attr_sets"]) == 2 and msg["attr"] == [0, 1, 0, 0, 1]
    _, got = receive(None, dict_msg, samples_msg)
    assert got == batch


def test_samples_without_attributes_stay_version_1() -> None:
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    _, samples_msg = enc.encode([sample(1_000, frames("leaf", "main"))], period=10_101_010)
    assert samples_msg is not None
    msg = unpack(samples_msg)
    assert msg["v"] == PROTOCOL_VERSION == 1 and not {"attrs", "attr_sets", "attr"} & set(msg)


def _as_older_agent(samples_msg: bytes) -> dict:
    """The message as an older agent sent it: version 1, one attribute list per sample."""
    msg = unpack(samples_msg)
    sets, index = msg.pop("attr_sets"), msg.pop("attr")
    return {**msg, "v": 1, "attrs": [sets[i] for i in index]}


def test_older_agents_per_sample_attributes_are_read() -> None:
    batch = [sample(1_000, frames("leaf", "main"), attrs={"k": "v"}), sample(2_000, frames("leaf", "main")),
             sample(3_000, frames("other", "main"), attrs={"k": "w", "k2": "v"})]
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    dict_msg, samples_msg = enc.encode(batch, period=10_101_010)
    assert dict_msg is not None and samples_msg is not None
    d = unpack(dict_msg)
    dictionary = StreamDictionary(header(d, "dict")[1])
    dictionary.apply(d)
    old = unpack(msgpack.packb(_as_older_agent(samples_msg)))
    assert decode_samples(old, header(old, "samples")[0], dictionary).samples == batch


@pytest.mark.parametrize("edit, reason", [
    (lambda m: m.update(attrs=[[] for _ in m["attr"]]), "bad_attrs"),       # both forms at once
    (lambda m: m.pop("attr_sets"), "bad_attrs"),                            # indexes without sets
    (lambda m: m.update(attr=m["attr"][:-1]), "bad_attrs"),                 # one index short
    (lambda m: m.update(attr=[*m["attr"][:-1], 2]), "bad_attrs"),           # no set 2
    (lambda m: m.update(attr=[*m["attr"][:-1], -1]), "bad_attrs"),
    (lambda m: m["attr_sets"].__setitem__(0, [1]), "bad_attrs"),            # a key without a value
    (lambda m: m["attr_sets"].__setitem__(0, [1, 10_000]), "unknown_id"),   # a string not sent
    (lambda m: m.update(attr_sets=[[1, 2]] * 5), "bad_attrs"),              # more sets than samples
])
def test_malformed_attribute_sets_are_rejected(edit: Any, reason: str) -> None:
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    batch = [sample(1_000, frames("leaf", "main"), attrs={"k": "v"}), sample(2_000, frames("leaf", "main"))]
    dict_msg, samples_msg = enc.encode(batch, period=10_101_010)
    assert dict_msg is not None and samples_msg is not None
    d = unpack(dict_msg)
    dictionary = StreamDictionary(header(d, "dict")[1])
    dictionary.apply(d)
    msg = unpack(samples_msg)
    edit(msg)
    msg = unpack(msgpack.packb(msg))
    with pytest.raises(WireError) as caught:
        decode_samples(msg, header(msg, "samples")[0], dictionary)
    assert caught.value.reason == reason


def test_inlined_frames_and_build_ids_round_trip() -> None:
    go = Mapping(0x400000, 0x500000, 0, "/bin/server", "", "aaa/bbb/ccc/ddd", "0f" * 16)
    stack = (Frame("main.inner", "a.go", 5, 0x401000, FrameType.GO, go, True),
             Frame("main.outer", "a.go", 9, 0x401000, FrameType.GO, go),
             Frame("main.outer", "a.go", 9, 0x401000, FrameType.GO, go))  # recursion: not inlined
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    dict_msg, samples_msg = enc.encode([sample(1_000, stack)], period=10_101_010)
    assert samples_msg is not None
    _, (got,) = receive(None, dict_msg, samples_msg)
    assert got.frames == stack and [f.inlined for f in got.frames] == [True, False, False]
    assert got.frames[0].mapping == go


def test_older_agents_rows_without_inlined_and_extra_build_ids_are_read() -> None:
    d = StreamDictionary(epoch=1)
    d.apply({"strings": [1, ["native", "app.c", "/bin/app", "beef"]], "mappings": [1, [[1, 2, 0, 3, 4]]],
             "functions": [1, [[2, 2]]], "locations": [1, [[1, 4198400, 1, 10, 1]]], "stacks": [1, [[1]]]})
    (frame,) = d.stacks[1]
    assert frame.mapping == Mapping(1, 2, 0, "/bin/app", "beef") and not frame.inlined
    assert (frame.function, frame.line, frame.frame_type) == ("app.c", 10, FrameType.NATIVE)


def test_known_entries_are_not_sent_again() -> None:
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    stack = frames("leaf", "mid", "main")
    first_dict, first = enc.encode([sample(1, stack)], 1)
    second_dict, second = enc.encode([sample(2, stack), sample(3, stack)], 1)
    assert first_dict is not None and second_dict is None
    assert first is not None and second is not None
    d, _got1 = receive(None, first_dict, first)
    _, got2 = receive(d, None, second)
    assert [s.frames for s in got2] == [stack, stack]
    # only new entries travel: a new stack sharing frames adds one stack and few locations
    third_dict, _ = enc.encode([sample(4, frames("leaf2", "mid", "main"))], 1)
    assert third_dict is not None
    delta = unpack(third_dict)
    assert len(delta["stacks"][1]) == 1
    assert len(delta["locations"][1]) == 1  # only "leaf2": "mid" and "main" are known
    assert delta["strings"][1] == ["leaf2"]


def test_missing_dictionary_is_detected_and_resync_repairs_it() -> None:
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    stack = frames("leaf", "main")
    enc.encode([sample(1, stack)], 1)  # receiver missed this dict message
    _, samples_msg = enc.encode([sample(2, stack)], 1)
    assert samples_msg is not None
    fresh = StreamDictionary(epoch=1)
    with pytest.raises(WireError) as err:
        decode_samples(unpack(samples_msg), header(unpack(samples_msg), "samples")[0], fresh)
    assert err.value.reason == "unknown_id"
    enc.request_full()
    full = enc.flush_dictionary()
    assert full is not None and unpack(full)["full"] is True
    fresh.apply(unpack(full))
    _, got = receive(fresh, None, samples_msg)
    assert got[0].frames == stack


def test_gap_in_dictionary_is_rejected_without_partial_apply() -> None:
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    enc.encode([sample(1, frames("a"))], 1)
    later, _ = enc.encode([sample(2, frames("b"))], 1)
    d = StreamDictionary(epoch=1)
    before = (list(d.strings), list(d.stacks))
    with pytest.raises(WireError) as err:
        d.apply(unpack(later))  # type: ignore[arg-type]
    assert err.value.reason == "dict_gap"
    assert (d.strings, d.stacks) == before


@pytest.mark.parametrize(("table", "row", "reason"), [
    ("locations", [1, 4198400, 1, True, 1], "bad_location"),  # a bool is not an id
    ("locations", [1, 4198400, 1, -1, 1], "bad_location"),
    ("locations", [1, 4198400, 1, 10, 2], "bad_frame_type"),  # string 2 is not a frame type
    ("mappings", [1, 2, 0, 1, 1.5], "bad_mapping"),
    ("functions", [1], "bad_function"),
    ("locations", [1, 4198400, 1, 10, 1, 2], "bad_location"),  # inlined is 0 or 1
    ("mappings", [1, 2, 0, 1, 0, 0], "bad_mapping"),  # 5 (older agents) or 7 fields
])
def test_malformed_dictionary_rows_are_rejected(table: str, row: list[object], reason: str) -> None:
    body = {"strings": [1, ["native", "app.c"]], "mappings": [1, [[1, 2, 0, 1, 0]]],
            "functions": [1, [[2, 2]]], "locations": [1, [[1, 4198400, 1, 10, 1]]]}
    body[table] = [1, [row]]
    with pytest.raises(WireError) as err:
        StreamDictionary(epoch=1).apply(body)
    assert err.value.reason == reason


def test_dictionary_is_bounded_by_epochs() -> None:
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1", max_entries=10)
    for i in range(30):
        enc.encode([sample(i, frames(f"fn{i}"))], 1)
    assert enc.epoch > 1
    assert all(len(t.rows) <= 10 + 8 for t in enc._tables())


def test_resync_request_round_trip() -> None:
    host, types = parse_resync(resync_request("*", [ProfileType.CPU]))
    assert host == "*" and types == {ProfileType.CPU}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 99, "kind": "samples"}),
        msgpack.packb({"v": 3, "kind": "samples"}),
        msgpack.packb({"v": True, "kind": "samples"}),
        msgpack.packb({"v": 1, "kind": "samples", "host": "h", "type": "nope", "agent": "a", "epoch": 1, "seq": 1}),
        msgpack.packb({"v": 1, "kind": "samples", "host": "h", "type": "cpu", "agent": "a", "epoch": -1, "seq": 1}),
    ],
)
def test_malformed_headers_raise_wire_error(payload: bytes) -> None:
    with pytest.raises(WireError):
        header(unpack(payload), "samples")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "v": st.just(1),
            "kind": st.just("dict"),
            "host": st.just("h"),
            "type": st.just("cpu"),
            "agent": st.just("a"),
            "epoch": st.just(1),
            "seq": st.just(1),
        },
        optional={k: _json for k in ("strings", "mappings", "functions", "locations", "stacks")},
    ),
    st.fixed_dictionaries(
        {
            "v": st.sampled_from([PROTOCOL_VERSION, ATTRIBUTE_SETS_VERSION]),
            "kind": st.just("samples"),
            "host": st.just("h"),
            "type": st.just("cpu"),
            "agent": st.just("a"),
            "epoch": st.just(1),
            "seq": st.just(1),
        },
        optional={
            k: _json
            for k in ("t0", "period", "ts", "cpu", "pid", "tid", "thread", "process", "stack", "values", "attrs",
                      "attr_sets", "attr")
        },
    ),
)
def test_fuzzed_messages_never_raise_anything_but_wire_error(dict_body: dict, samples_body: dict) -> None:
    d = StreamDictionary(epoch=1)
    with contextlib.suppress(WireError):
        d.apply(unpack(msgpack.packb(dict_body)))
    try:
        msg = unpack(msgpack.packb(samples_body))
        decode_samples(msg, header(msg, "samples")[0], d)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    try:
        msg = unpack(data)
        header(msg, "dict")
        StreamDictionary(1).apply(msg)
    except WireError:
        pass


def test_large_messages_are_compressed_and_decompression_is_bounded() -> None:
    import zstandard

    from shared.wire import MAX_MESSAGE_BYTES, ZSTD_MAGIC

    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    batch = [sample(i * 10_000_000, frames("leaf", "mid", "main"), tid=i % 7) for i in range(200)]
    dict_msg, samples_msg = enc.encode(batch, period=10_101_010)
    assert samples_msg is not None and samples_msg[:4] == ZSTD_MAGIC
    _, got = receive(None, dict_msg, samples_msg)
    assert got == batch
    bomb = zstandard.ZstdCompressor().compress(b"\x80" * (MAX_MESSAGE_BYTES + 10))
    with pytest.raises(WireError) as err:
        unpack(bomb)
    assert err.value.reason == "too_large"
    with pytest.raises(WireError) as err:
        unpack(ZSTD_MAGIC + b"\x00" * 20)
    assert err.value.reason in ("bad_compression", "not_msgpack")  # a truncated frame may decode to nothing


def test_equal_frames_from_different_streams_are_one_object() -> None:
    """The exporters deduplicate frames by identity; equal frames of two hosts must be shared."""
    stack = frames("leaf", "main")
    got = []
    for host in ("host-a", "host-b"):
        dict_msg, samples_msg = StreamEncoder(host, ProfileType.CPU, "agent-" + host).encode(
            [sample(1, stack)], period=1)
        assert samples_msg is not None
        _, decoded = receive(None, dict_msg, samples_msg)
        got.append(decoded[0].frames)
    assert got[0] == got[1] == stack
    assert all(a is b for a, b in zip(got[0], got[1], strict=True))


def test_frame_hash_is_cached_and_equality_ignores_it() -> None:
    """Stacks are dict keys everywhere: a frame's hash is computed once, and two equal frames
    (one hashed, one not) are the same key."""
    import dataclasses

    from shared.model import Frame, FrameType, Mapping

    libc = Mapping(0x7F00_0000_0000, 0x7F00_0010_0000, 0, "/usr/lib/libc.so.6", "ab12")
    hashed = Frame("memcpy", "", 0, 0x7F00_0000_1000, FrameType.NATIVE, libc)
    fresh = Frame("memcpy", "", 0, 0x7F00_0000_1000, FrameType.NATIVE, libc)
    key = hash(hashed)
    assert hashed._hash == key and fresh._hash == 0
    assert hashed == fresh and {(hashed,): 1}[(fresh,)] == 1
    other = dataclasses.replace(hashed, frame_type=FrameType.GO)
    assert other != hashed and other._hash == 0 and hash(other) != key


def test_a_stack_is_the_same_id_whether_its_tuple_is_reused_or_rebuilt() -> None:
    """The encoder finds stacks by tuple identity first: a rebuilt equal tuple, a reused
    one and a batch mixing both must give the very same messages."""
    stacks = [frames("a", "main"), frames("b", "mid", "main"), frames("c")]
    reused = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    rebuilt = StreamEncoder("host-a", ProfileType.CPU, "agent1")
    dictionary = None
    for round_ in range(3):
        picks = [stacks[(round_ + i) % 3] for i in range(7)]
        batch = [sample(1_000 + i, s) for i, s in enumerate(picks)]
        fresh = [sample(1_000 + i, tuple(list(s))) for i, s in enumerate(picks)]
        assert all(a.frames is not b.frames for a, b in zip(batch, fresh, strict=True))
        d_msg, s_msg = reused.encode(batch, 10)
        assert (d_msg, s_msg) == rebuilt.encode(fresh, 10)
        assert s_msg is not None
        dictionary, got = receive(dictionary, d_msg, s_msg)
        assert [s.frames for s in got] == picks


def test_stack_ids_by_identity_start_over_with_the_epoch() -> None:
    """Past ``max_entries`` the encoder starts a new epoch with fresh ids: a stack tuple seen
    in the old epoch must be sent again, not referred to by its old id."""
    enc = StreamEncoder("host-a", ProfileType.CPU, "agent1", max_entries=10)
    kept = frames("kept", "main")
    for i in range(7):  # the kept stack, then new stacks (and locations) until the tables overflow
        stack = kept if i == 0 else frames(f"f{i}", f"g{i}")
        assert enc.encode([sample(i, stack)], 10)[1] is not None
    d_msg, s_msg = enc.encode([sample(9, kept)], 10)
    assert enc.epoch > 1 and d_msg is not None and s_msg is not None and unpack(d_msg)["epoch"] == enc.epoch
    _, got = receive(StreamDictionary(enc.epoch), d_msg, s_msg)  # the new epoch's dictionary alone
    assert got[0].frames == kept
