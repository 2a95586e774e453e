"""OTLP encoder invariants, fleet-wide dedup, and decoding by the real protoc."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.otlp.decode import merge_request
from aggregator.otlp.encode import encode_request, profiler_version, validate_request
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


def resources(req: ExportProfilesServiceRequest) -> dict[tuple[str, int], dict[str, str | int]]:
    """(host, pid) -> resource attributes."""
    out = {}
    for rp in req.resource_profiles:
        attrs: dict[str, str | int] = {a.key: a.value.string_value or a.value.int_value for a in rp.resource.attributes}
        out[(str(attrs["host.name"]), int(attrs["process.pid"]))] = attrs
    return out


def test_one_resource_per_process_and_a_profile_per_sample_type() -> None:
    req = encode_request(fleet(), "svc", "1.2.3", {"deployment.environment": "test"})
    s = req.dictionary.string_table
    layout = {}
    for rp in req.resource_profiles:
        attrs = {a.key: a.value.string_value or a.value.int_value for a in rp.resource.attributes}
        assert attrs["service.name"] == "svc" and attrs["service.version"] == "1.2.3"
        assert attrs["process.executable.name"] == "app" and attrs["deployment.environment"] == "test"
        (sp,) = rp.scope_profiles
        assert sp.scope.name == "stackfleet" and sp.scope.version == profiler_version() != ""
        layout[attrs["host.name"]] = [(s[p.sample_type.type_strindex], s[p.sample_type.unit_strindex])
                                      for p in sp.profiles]
    assert layout["web-1"] == [("samples", "count"), ("contentions", "count"), ("delay", "nanoseconds")]
    assert layout["web-2"] == [("samples", "count")]


def test_cpu_profile_has_the_ebpf_profilers_shape() -> None:
    req = encode_request(fleet(), "svc", "1")
    s = req.dictionary.string_table
    cpu = req.resource_profiles[0].scope_profiles[0].profiles[0]
    assert (s[cpu.period_type.type_strindex], s[cpu.period_type.unit_strindex]) == ("cpu", "nanoseconds")
    assert cpu.period == 10_101_010
    stamps = sorted(tuple(smp.timestamps_unix_nano) for smp in cpu.samples)
    assert stamps == [(5_000, 6_000), (7_000,)]  # one timestamp per sample taken
    assert all(not smp.values for smp in cpu.samples)
    lock = req.resource_profiles[0].scope_profiles[0].profiles[1]
    assert [list(smp.values) for smp in lock.samples] == [[3]] and not lock.samples[0].timestamps_unix_nano


def test_operator_attributes_are_not_overridden_and_unnamed_processes_follow_the_conventions() -> None:
    f = fleet()
    named = HostProfile("web-3", ProfileType.CPU, 1_000, 9_000, 10)
    named.add((frame("leaf", 3, 0x7F10),), 20, 20, "t", "python3", 0, (("service.name", "orders"),), (10,), 5_000)
    named.add((frame("leaf", 3, 0x7F10),), 21, 21, "t", "python3", 0,
              (("process.executable.name", "python3.11"),), (10,), 5_000)
    f.hosts[("web-3", ProfileType.CPU)] = named
    req = encode_request(f, "", "")
    by_pid = resources(req)
    assert by_pid[("web-3", 20)]["service.name"] == "orders"
    assert by_pid[("web-3", 21)]["service.name"] == "unknown_service:python3.11"
    assert by_pid[("web-3", 21)]["process.executable.name"] == "python3.11"
    assert "service.version" not in by_pid[("web-3", 20)]
    forced = resources(encode_request(f, "", "", {"service.name": "fleet", "host.name": "given"}))
    assert {a["service.name"] for a in forced.values()} == {"fleet"}
    assert {a["host.name"] for a in forced.values()} == {"given"}


def test_inlined_frames_are_one_location_with_lines_innermost_first() -> None:
    go = Mapping(0x400000, 0x500000, 0, "/bin/server", "", "goid/x", "ab" * 16)
    inlined = (Frame("main.inner", "/src/a.go", 5, 0x401000, FrameType.GO, go, True),
               Frame("main.middle", "/src/a.go", 9, 0x401000, FrameType.GO, go, True),
               Frame("main.outer", "/src/a.go", 20, 0x401000, FrameType.GO, go),
               # recursion through one call site: equal addresses, not inlined
               Frame("main.rec", "/src/a.go", 30, 0x402000, FrameType.GO, go),
               Frame("main.rec", "/src/a.go", 30, 0x402000, FrameType.GO, go))
    f = FleetProfiles(0, 10_000)
    hp = HostProfile("h", ProfileType.CPU, 1_000, 9_000, 10)
    hp.add(inlined, 1, 1, "t", "server", 0, (), (10,), 5_000)
    f.hosts[("h", ProfileType.CPU)] = hp
    req = encode_request(f)
    assert validate_request(req) == []
    d = req.dictionary
    s = d.string_table
    stack = d.stack_table[req.resource_profiles[0].scope_profiles[0].profiles[0].samples[0].stack_index]
    locations = [d.location_table[i] for i in stack.location_indices]
    names = [[s[d.function_table[line.function_index].name_strindex] for line in loc.lines] for loc in locations]
    assert names == [["main.inner", "main.middle", "main.outer"], ["main.rec"], ["main.rec"]]
    assert [line.line for line in locations[0].lines] == [5, 9, 20]
    mapping_attrs = {s[d.attribute_table[a].key_strindex]: d.attribute_table[a].value.string_value
                     for a in d.mapping_table[locations[0].mapping_index].attribute_indices}
    assert mapping_attrs == {"process.executable.build_id.go": "goid/x",
                             "process.executable.build_id.htlhash": "ab" * 16}
    back = FleetProfiles(0, 0)
    merge_request(back, req, ProfileType.CPU)
    (sample,) = back.hosts[("h", ProfileType.CPU)].samples.values()
    assert sample.frames == inlined


def test_unknown_frames_have_no_line_and_python_functions_no_system_name() -> None:
    f = FleetProfiles(0, 10_000)
    hp = HostProfile("h", ProfileType.WALL, 1_000, 9_000, 10)
    hp.add((Frame("", "", 0, 0x7F99, FrameType.NATIVE, LIBC), Frame("<module>", "/app/m.py", 3, 0, FrameType.CPYTHON),
            Frame("", "", 0, 0x1234, FrameType.NATIVE)), 1, 1, "t", "python3", 0, (), (10,), 5_000)
    f.hosts[("h", ProfileType.WALL)] = hp
    req = encode_request(f)
    assert validate_request(req) == []
    d = req.dictionary
    s = d.string_table
    unknown, module, outside = (d.location_table[i] for i in d.stack_table[1].location_indices)
    assert not unknown.lines and not outside.lines
    fn = d.function_table[module.lines[0].function_index]
    assert s[fn.name_strindex] == "<module>" and fn.system_name_strindex == 0
    # Every location has a mapping with an htlhash (Elastic keys frames on it)
    assert all(loc.mapping_index for loc in (unknown, module, outside))


def test_symbols_are_deduplicated_fleet_wide() -> None:
    req = encode_request(fleet(), "svc", "1")
    s = req.dictionary.string_table
    names = [s[f.name_strindex] for f in req.dictionary.function_table[1:]]
    assert sorted(names) == sorted(set(names))
    assert names.count("leaf") == 1
    # empty + libc (shared by both hosts) + the kernel frames' pseudo-mapping
    assert len(req.dictionary.mapping_table) == 3


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
    assert a["thread.id"] in (11, 12) and a["thread.name"] in ("w", "w2") and "process.pid" not in a


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


def test_an_interval_of_zero_values_is_an_empty_request() -> None:
    f = FleetProfiles(0, 10_000)
    hp = HostProfile("h", ProfileType.GOROUTINE, 1_000, 9_000, 1)
    hp.add((frame("main", 1, 0x7F10),), 1, 1, "t", "app", 0, (), (0,), 5_000)  # the goroutines ended
    f.hosts[("h", ProfileType.GOROUTINE)] = hp
    req = encode_request(f)
    assert not req.resource_profiles and len(req.dictionary.string_table) == 1  # nothing left behind
