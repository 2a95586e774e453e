"""The conformance checker: our exports pass it, and each rule rejects a request crafted to break it.

Each bad request starts from a conforming export and breaks one rule; the test asserts the
checker names that rule (and at most the unreferenced entries the change leaves behind).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.profiles.v1development.profiles_pb2 import Link, ResourceProfiles, ScopeProfiles

from aggregator.otlp import checks as c
from aggregator.otlp.encode import encode_request
from aggregator.profile import FleetProfiles, HostProfile
from shared.model import Frame, FrameType, Mapping
from shared.profile_types import ProfileType
from tests.test_otlp import fleet

GO = Mapping(0x400000, 0x500000, 0, "/bin/server", "", "go/build/id/x", "ab" * 16)
KERNEL = Mapping(0, 0x1000000, 0, "[kernel.kallsyms]", "cd" * 20, "", "ef" * 16)


def every_type_fleet() -> FleetProfiles:
    """Every profile type, with inlined Go frames, Python frames, kernel and unknown frames."""
    f = fleet()
    stack = (Frame("do_syscall_64", "", 0, 0x1234, FrameType.KERNEL, KERNEL),
             Frame("main.inner", "/src/a.go", 5, 0x401000, FrameType.GO, GO, True),
             Frame("main.outer", "/src/a.go", 9, 0x401000, FrameType.GO, GO),
             Frame("", "", 0, 0x402000, FrameType.NATIVE, GO),
             Frame("<module>", "/app/main.py", 1, 0, FrameType.CPYTHON))
    values = {ProfileType.CPU: (10,), ProfileType.WALL: (5_000,), ProfileType.LOCK: (2, 900),
              ProfileType.HEAP: (3, 4096, 1, 1024), ProfileType.GOROUTINE: (7,)}
    for ptype, vals in values.items():
        hp = HostProfile("go-1", ptype, 1_000, 9_000, 10)
        hp.add(stack, 30, 31, "t", "server", 2, (("service.name", "api"),), vals, 4_000)
        hp.add(stack, 30, 31, "t", "server", 2, (("service.name", "api"),), vals, 9_000)  # at the interval's end
        f.hosts[("go-1", ptype)] = hp
    # A sample no profile emits (zero value): nothing of it may be left in the dictionary.
    f.hosts[("go-1", ProfileType.CPU)].add((Frame("never_emitted", "/src/z.c", 1, 0x7F77, FrameType.NATIVE, GO),),
                                           32, 32, "z", "zero", 0, (("zero.only", "x"),), (0,), 5_000)
    return f


def good() -> ExportProfilesServiceRequest:
    return encode_request(every_type_fleet(), "svc", "1")


def rules(req: ExportProfilesServiceRequest) -> set[str]:
    return {v.rule for v in c.check_request(req)}


def test_exports_of_every_type_conform() -> None:
    assert c.check_request(good()) == []


def _profile(req: ExportProfilesServiceRequest, sample_type: str, min_samples: int = 1) -> object:
    s = req.dictionary.string_table
    return next(p for rp in req.resource_profiles for sp in rp.scope_profiles for p in sp.profiles
                if s[p.sample_type.type_strindex] == sample_type and len(p.samples) >= min_samples)


def _cpu_location(req: ExportProfilesServiceRequest) -> int:
    cpu = _profile(req, "samples")
    return req.dictionary.stack_table[cpu.samples[0].stack_index].location_indices[0]  # type: ignore[attr-defined]


def _empty_request(req: ExportProfilesServiceRequest) -> None:
    req.ClearField("resource_profiles")
    d = req.dictionary
    for table in ("mapping_table", "location_table", "function_table", "link_table", "attribute_table",
                  "stack_table", "string_table"):
        del getattr(d, table)[1:]


def _duplicate_mapping(req: ExportProfilesServiceRequest) -> None:
    d = req.dictionary
    copy = d.mapping_table.add()
    copy.CopyFrom(d.mapping_table[d.location_table[1].mapping_index])
    d.location_table[1].mapping_index = len(d.mapping_table) - 1


def _link(req: ExportProfilesServiceRequest) -> None:
    req.dictionary.link_table.append(Link(trace_id=b"\x01" * 16, span_id=b"\x02" * 4))
    _profile(req, "samples").samples[0].link_index = 1  # type: ignore[attr-defined]


def _mixed_shapes(req: ExportProfilesServiceRequest) -> None:
    cpu = _profile(req, "samples", min_samples=2)
    sample = cpu.samples[1]  # type: ignore[attr-defined]
    sample.ClearField("timestamps_unix_nano")
    sample.values.append(1)


def _counted_values(req: ExportProfilesServiceRequest) -> None:
    for sample in _profile(req, "samples").samples:  # type: ignore[attr-defined]
        sample.values.extend([1] * len(sample.timestamps_unix_nano))


def _no_service(req: ExportProfilesServiceRequest) -> None:
    attrs = req.resource_profiles[0].resource.attributes
    del attrs[[a.key for a in attrs].index("service.name")]


def _timestamp(req: ExportProfilesServiceRequest) -> None:
    cpu = _profile(req, "samples")
    cpu.samples[0].timestamps_unix_nano[0] = cpu.time_unix_nano + cpu.duration_nano  # type: ignore[attr-defined]


def _elastic_period(req: ExportProfilesServiceRequest) -> None:
    cpu = _profile(req, "samples")
    cpu.period_type.type_strindex = list(req.dictionary.string_table).index("contentions")  # type: ignore[attr-defined]


def _last_function_nameless(req: ExportProfilesServiceRequest) -> None:
    fn = req.dictionary.function_table[-1]
    fn.name_strindex = fn.system_name_strindex = fn.filename_strindex = 0


BREAKS: dict[str, Callable[[ExportProfilesServiceRequest], object]] = {
    c.EMPTY_REQUEST: _empty_request,
    c.EMPTY_RESOURCE: lambda r: r.resource_profiles.append(ResourceProfiles()),
    c.EMPTY_SCOPE: lambda r: r.resource_profiles[0].scope_profiles.append(ScopeProfiles()),
    c.ZERO_VALUE: lambda r: setattr(r.dictionary.function_table[0], "name_strindex", 1),
    c.INDEX: lambda r: r.dictionary.stack_table[1].location_indices.append(10_000),
    c.NEGATIVE: lambda r: setattr(r.dictionary.location_table[1].lines[0], "line", -3),
    c.MAPPING_RANGE: lambda r: setattr(next(m for m in r.dictionary.mapping_table if m.memory_start),
                                       "memory_limit", 1),
    c.LINK_IDS: _link,
    c.DUPLICATE_STRING: lambda r: r.dictionary.string_table.append(r.dictionary.string_table[1]),
    c.DUPLICATE_MAPPING: _duplicate_mapping,
    c.ORPHAN: lambda r: r.dictionary.string_table.append("nobody uses me"),
    c.TIMESTAMP: _timestamp,
    c.SHAPE: lambda r: _profile(r, "contentions").samples[0].ClearField("values"),  # type: ignore[attr-defined]
    c.MIXED_SHAPES: _mixed_shapes,
    c.DUPLICATE_KEY: lambda r: r.resource_profiles[0].scope_profiles[0].profiles[0].samples[0].attribute_indices
    .append(r.resource_profiles[0].scope_profiles[0].profiles[0].samples[0].attribute_indices[0]),
    c.EMPTY_FUNCTION: _last_function_nameless,
    c.LINE_WITHOUT_FUNCTION: lambda r: setattr(r.dictionary.location_table[1].lines[0], "function_index", 0),
    c.NO_DICTIONARY: lambda r: r.ClearField("dictionary"),
    c.NO_SAMPLE_TYPE: lambda r: _profile(r, "contentions").ClearField("sample_type"),  # type: ignore[attr-defined]
    c.VALUES_LENGTH: _counted_values,
    c.NO_SERVICE_NAME: _no_service,
    c.ELASTIC_PERIOD_TYPE: _elastic_period,
    c.ELASTIC_FRAME_TYPE: lambda r: r.dictionary.location_table[_cpu_location(r)].ClearField("attribute_indices"),
    c.ELASTIC_HTLHASH: lambda r: setattr(r.dictionary.location_table[_cpu_location(r)], "mapping_index", 0),
}
# What breaking a rule may also leave behind (an entry nothing refers to any more, ...).
ALSO = {rule: {c.ORPHAN} for rule in (c.DUPLICATE_STRING, c.DUPLICATE_MAPPING, c.EMPTY_FUNCTION,
                                      c.LINE_WITHOUT_FUNCTION, c.NO_SAMPLE_TYPE, c.ELASTIC_FRAME_TYPE,
                                      c.ELASTIC_HTLHASH, c.ELASTIC_PERIOD_TYPE)}
ALSO[c.NO_DICTIONARY] = {c.ZERO_VALUE, c.INDEX}


def test_every_rule_has_a_crafted_bad_request() -> None:
    assert set(BREAKS) == set(c.RULES)


@pytest.mark.parametrize("rule", sorted(BREAKS))
def test_a_request_breaking_one_rule_is_rejected_for_it(rule: str) -> None:
    req = good()
    BREAKS[rule](req)
    found = rules(req)
    assert rule in found
    assert found - {rule} <= ALSO.get(rule, set()), found
