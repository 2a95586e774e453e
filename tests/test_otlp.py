"""OTLP encoder invariants, fleet-wide dedup, and decoding by the real protoc."""

from __future__ import annotations

from pathlib import Path

from aggregator.otlp import encode_request, validate_request
from aggregator.profile import FleetProfiles, HostProfile
from shared.model import Frame, FrameType, Mapping
from shared.profile_types import ProfileType
from tests.otlp_server import protoc_decode

LIBC = Mapping(0x7F00, 0x8F00, 0, "/usr/lib/libc.so.6", "ab" * 20)


def frame(name: str, line: int, addr: int, ftype: FrameType = FrameType.NATIVE) -> Frame:
    return Frame(name, "/src/app.c", line, addr, ftype, LIBC if ftype == FrameType.NATIVE else None)


def fleet() -> FleetProfiles:
    f = FleetProfiles(start_ns=1_000, end_ns=10_000_000_000)
    for host in ("web-1", "web-2"):
        cpu = HostProfile(host, ProfileType.CPU, 1_000, 9_000, 10_101_010)
        cpu.add((frame("leaf", 3, 0x7F10), frame("main", 9, 0x7F20)), 10, 11, "w", "app", 0, (), (10_101_010,), 5_000)
        cpu.add((frame("leaf", 3, 0x7F10), frame("main", 9, 0x7F20)), 10, 11, "w", "app", 0, (), (10_101_010,), 6_000)
        cpu.add((frame("schedule", 0, 0xFFFF0000, FrameType.KERNEL),), 10, 12, "w2", "app", 1, (("k", "v"),),
                (10_101_010,), 7_000)
        f.hosts[(host, ProfileType.CPU)] = cpu
    lock = HostProfile("web-1", ProfileType.LOCK, 1_000, 9_000, 1)
    lock.add((frame("wait", 5, 0x7F30),), 10, 11, "w", "app", 0, (), (3, 1_500), 8_000)
    f.hosts[("web-1", ProfileType.LOCK)] = lock
    return f


def test_request_is_valid_and_tables_start_empty() -> None:
    req = encode_request(fleet(), "svc", "1.2.3", {"deployment.environment": "test"})
    assert validate_request(req) == []
    d = req.dictionary
    assert d.string_table[0] == ""
    assert len(d.function_table[0].SerializeToString()) == 0
    assert len(d.stack_table[0].SerializeToString()) == 0


def test_layout_per_host_and_per_sample_type() -> None:
    req = encode_request(fleet(), "svc", "1.2.3")
    s = req.dictionary.string_table
    hosts = {}
    for rp in req.resource_profiles:
        attrs = {a.key: a.value.string_value for a in rp.resource.attributes}
        assert attrs["service.name"] == "svc" and attrs["service.version"] == "1.2.3"
        types = [(s[p.sample_type.type_strindex], s[p.sample_type.unit_strindex])
                 for sp in rp.scope_profiles for p in sp.profiles]
        hosts[attrs["host.name"]] = types
    assert hosts["web-1"] == [("cpu", "nanoseconds"), ("contentions", "count"), ("delay", "nanoseconds")]
    assert hosts["web-2"] == [("cpu", "nanoseconds")]
    cpu = req.resource_profiles[0].scope_profiles[0].profiles[0]
    assert cpu.period == 10_101_010 and s[cpu.period_type.type_strindex] == "cpu"
    merged = [smp for smp in cpu.samples if len(smp.timestamps_unix_nano) == 2]
    assert merged and list(merged[0].values) == [10_101_010, 10_101_010]
    assert list(merged[0].timestamps_unix_nano) == [5_000, 6_000]


def test_symbols_are_deduplicated_fleet_wide() -> None:
    req = encode_request(fleet(), "svc", "1")
    s = req.dictionary.string_table
    names = [s[f.name_strindex] for f in req.dictionary.function_table[1:]]
    assert sorted(names) == sorted(set(names))
    assert names.count("leaf") == 1
    assert len(req.dictionary.mapping_table) == 2  # empty + libc, shared by both hosts


def test_frame_types_and_sample_attributes() -> None:
    req = encode_request(fleet(), "svc", "1")
    d = req.dictionary
    s = d.string_table

    def attrs(indices: list[int]) -> dict[str, object]:
        out: dict[str, object] = {}
        for i in indices:
            kv = d.attribute_table[i]
            out[s[kv.key_strindex]] = kv.value.string_value or kv.value.int_value
        return out

    kinds = {attrs(list(loc.attribute_indices))["profile.frame.type"] for loc in d.location_table[1:]}
    assert kinds == {"native", "kernel"}
    sample = req.resource_profiles[0].scope_profiles[0].profiles[0].samples[0]
    a = attrs(list(sample.attribute_indices))
    assert a["process.pid"] == 10 and a["thread.name"] in ("w", "w2")


def test_validator_catches_broken_indices() -> None:
    req = encode_request(fleet(), "svc", "1")
    req.dictionary.stack_table[1].location_indices.append(10_000)
    req.resource_profiles[0].scope_profiles[0].profiles[0].samples[0].stack_index = -1
    req.dictionary.string_table[0] = "oops"
    errors = validate_request(req)
    assert any("location index 10000" in e for e in errors)
    assert any("stack index -1" in e for e in errors)
    assert any("string_table[0]" in e for e in errors)


def test_protoc_decodes_the_request(tmp_path: Path) -> None:
    path = tmp_path / "req.otlp.pb"
    path.write_bytes(encode_request(fleet(), "svc", "1").SerializeToString())
    text = protoc_decode(path)
    assert 'string_table: "leaf"' in text and "resource_profiles" in text
