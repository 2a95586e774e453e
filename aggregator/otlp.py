"""Building OTLP profiles (proto v1.10, ``v1development``) from the fleet's merged profiles.

One request per export, with one ``ProfilesDictionary`` shared by every host: strings,
functions, mappings, locations, stacks and attributes are deduplicated fleet-wide (the same
libc function on 1,000 hosts is one Function). Index 0 of every table is the empty element,
as the spec requires, so "unset" references are 0.

Layout: one ``ResourceProfiles`` per host (``host.name``, ``service.name``,
``service.version``), one ``ScopeProfiles`` (``stackfleet``), and one ``Profile`` per profile
type *per sample type* — v1.10 gives a Profile a single ``sample_type``, so the heap type's
four value columns become four Profiles over the same samples. Each Sample carries the
timestamps of the observations merged into it with one value per timestamp.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from operator import itemgetter
from typing import Any, cast

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.profiles.v1development.profiles_pb2 import (
    Function,
    KeyValueAndUnit,
    Line,
    Location,
    Mapping,
    Profile,
    ProfilesDictionary,
    ResourceProfiles,
    Sample,
    ScopeProfiles,
    Stack,
    ValueType,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from aggregator.profile import AggregatedSample, FleetProfiles, HostProfile
from shared.model import Frame
from shared.model import Mapping as ModelMapping
from shared.profile_types import PROFILE_TYPES

SCOPE_NAME = "stackfleet"

# Semantic-convention attribute keys.
ATTR_FRAME_TYPE = "profile.frame.type"
ATTR_PID = "process.pid"
ATTR_TID = "thread.id"
ATTR_THREAD_NAME = "thread.name"
ATTR_EXECUTABLE_NAME = "process.executable.name"
ATTR_CPU = "cpu.logical_number"
ATTR_BUILD_ID_GNU = "process.executable.build_id.gnu"
ATTR_BUILD_ID_GO = "process.executable.build_id.go"


class DictionaryBuilder:
    """Interns everything into one ProfilesDictionary; each table starts with its empty entry."""

    def __init__(self) -> None:
        self.dictionary = ProfilesDictionary()
        d = self.dictionary
        d.string_table.append("")
        d.mapping_table.add()
        d.location_table.add()
        d.function_table.add()
        d.link_table.add()
        d.attribute_table.add()
        d.stack_table.add()
        self._strings: dict[str, int] = {"": 0}
        self._functions: dict[tuple[str, str], int] = {}
        self._mappings: dict[ModelMapping, int] = {}
        self._locations: dict[Frame, int] = {}
        self._stacks: dict[tuple[int, ...], int] = {}
        self._attributes: dict[tuple[str, Any], int] = {}
        # Identity caches in front of the value caches: merged samples share the very tuple
        # and Frame objects of their stream's dictionary, and hashing a 20-frame stack of
        # dataclasses was most of the export's cost. The objects are kept referenced here so
        # an id cannot be reused while the builder lives.
        self._stack_ids: dict[int, tuple[int, tuple[Frame, ...]]] = {}
        self._location_ids: dict[int, int] = {}
        self._located: list[Frame] = []  # keeps the frames behind _location_ids alive
        self._sample_attribute_ids: dict[tuple[Any, ...], list[int]] = {}

    def string(self, s: str) -> int:
        idx = self._strings.get(s)
        if idx is None:
            idx = len(self.dictionary.string_table)
            self.dictionary.string_table.append(s)
            self._strings[s] = idx
        return idx

    def attribute(self, key: str, value: str | int) -> int:
        cache_key = (key, value)
        idx = self._attributes.get(cache_key)
        if idx is None:
            idx = len(self.dictionary.attribute_table)
            kv = self.dictionary.attribute_table.add(key_strindex=self.string(key))
            if isinstance(value, int):
                kv.value.int_value = value
            else:
                kv.value.string_value = value
            self._attributes[cache_key] = idx
        return idx

    def function(self, name: str, filename: str) -> int:
        key = (name, filename)
        idx = self._functions.get(key)
        if idx is None:
            idx = len(self.dictionary.function_table)
            self.dictionary.function_table.append(
                Function(name_strindex=self.string(name), system_name_strindex=self.string(name),
                         filename_strindex=self.string(filename)))
            self._functions[key] = idx
        return idx

    def mapping(self, m: ModelMapping | None) -> int:
        if m is None:
            return 0
        idx = self._mappings.get(m)
        if idx is None:
            idx = len(self.dictionary.mapping_table)
            attrs = []
            if m.build_id:
                attrs.append(self.attribute(ATTR_BUILD_ID_GNU, m.build_id))
            self.dictionary.mapping_table.append(
                Mapping(memory_start=m.start, memory_limit=m.limit, file_offset=m.offset,
                        filename_strindex=self.string(m.filename), attribute_indices=attrs))
            self._mappings[m] = idx
        return idx

    def location(self, f: Frame) -> int:
        idx = self._location_ids.get(id(f))
        if idx is None:
            idx = self._location_ids[id(f)] = self._location(f)
            self._located.append(f)
        return idx

    def _location(self, f: Frame) -> int:
        idx = self._locations.get(f)
        if idx is None:
            idx = len(self.dictionary.location_table)
            self.dictionary.location_table.append(
                Location(mapping_index=self.mapping(f.mapping), address=f.address,
                         lines=[Line(function_index=self.function(f.function, f.filename), line=f.line)],
                         attribute_indices=[self.attribute(ATTR_FRAME_TYPE, f.frame_type.value)]))
            self._locations[f] = idx
        return idx

    def stack(self, frames: tuple[Frame, ...]) -> int:
        known = self._stack_ids.get(id(frames))
        if known is not None:
            return known[0]
        idx = self._stack(frames)
        self._stack_ids[id(frames)] = (idx, frames)
        return idx

    def _stack(self, frames: tuple[Frame, ...]) -> int:
        # Keyed by location indices, not by the frames: equal stacks have equal indices, and
        # a tuple of ints hashes without calling each frame's (Python-level) __hash__.
        # Every export re-interns every stack of the interval: the identity lookups run in C
        # (map over id and dict.get); only a stack with a frame not seen yet takes the slow path.
        known = tuple(map(self._location_ids.get, map(id, frames)))
        locations = cast(tuple[int, ...], known) if None not in known else tuple([self.location(f) for f in frames])
        idx = self._stacks.get(locations)
        if idx is None:
            idx = len(self.dictionary.stack_table)
            self.dictionary.stack_table.append(Stack(location_indices=locations))
            self._stacks[locations] = idx
        return idx


def _sample_attributes(b: DictionaryBuilder, s: AggregatedSample) -> list[int]:
    # Many samples share pid, thread, process, cpu and attributes (one per stack they ran):
    # their attribute indices are looked up once per export. Callers must not modify the list.
    key = (s.pid, s.tid, s.thread_name, s.process_name, s.cpu, s.attributes)
    known = b._sample_attribute_ids.get(key)
    if known is None:
        known = b._sample_attribute_ids[key] = _new_sample_attributes(b, s)
    return known


def _new_sample_attributes(b: DictionaryBuilder, s: AggregatedSample) -> list[int]:
    out = [b.attribute(ATTR_PID, s.pid), b.attribute(ATTR_TID, s.tid),
           b.attribute(ATTR_THREAD_NAME, s.thread_name), b.attribute(ATTR_EXECUTABLE_NAME, s.process_name),
           b.attribute(ATTR_CPU, s.cpu)]
    out += [b.attribute(k, v) for k, v in s.attributes]
    return out


def _profiles_for_host(b: DictionaryBuilder, host: HostProfile) -> Iterable[Profile]:
    spec = PROFILE_TYPES[host.profile_type]
    # Stacks and attributes are interned once per sample, shared by the per-column Profiles.
    prepared = [(s, b.stack(s.frames), _sample_attributes(b, s)) for s in host.samples.values()]
    period_type = ValueType(type_strindex=b.string(spec.period_type.type),
                            unit_strindex=b.string(spec.period_type.unit))
    for column, sample_type in enumerate(spec.sample_types):
        profile = Profile(
            sample_type=ValueType(type_strindex=b.string(sample_type.type), unit_strindex=b.string(sample_type.unit)),
            time_unix_nano=host.start_ns,
            duration_nano=max(0, host.end_ns - host.start_ns),
            period_type=period_type,
            period=host.period,
            profile_id=os.urandom(16),
        )
        gauge = column in spec.snapshot_columns
        for s, stack_index, attrs in prepared:
            if gauge or not s.series:
                # A gauge is its latest value, not a sum over the interval's reports.
                values, stamps = [s.values[column]], [s.timestamps_ns[-1]] if s.timestamps_ns else []
            else:
                values, stamps = list(map(itemgetter(column), s.series)), s.timestamps_ns
            if not any(values):
                continue
            profile.samples.append(Sample(stack_index=stack_index, attribute_indices=attrs, values=values,
                                          timestamps_unix_nano=stamps))
        yield profile


def encode_request(
    fleet: FleetProfiles,
    service_name: str,
    service_version: str,
    extra_resource_attributes: dict[str, str] | None = None,
) -> ExportProfilesServiceRequest:
    """The OTLP export request for one interval of the whole fleet."""
    b = DictionaryBuilder()
    request = ExportProfilesServiceRequest()
    by_host: dict[str, list[HostProfile]] = {}
    for (host, _), profile in sorted(fleet.hosts.items()):
        by_host.setdefault(host, []).append(profile)
    for host, profiles in by_host.items():
        resource_attrs = {**(extra_resource_attributes or {}), "service.name": service_name,
                          "service.version": service_version, "host.name": host}
        for p in profiles:
            resource_attrs.update(p.resource_attributes)
        rp = ResourceProfiles(resource=Resource(attributes=[
            KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in sorted(resource_attrs.items())]))
        scope = ScopeProfiles(scope=InstrumentationScope(name=SCOPE_NAME, version=service_version))
        for p in profiles:
            scope.profiles.extend(_profiles_for_host(b, p))
        rp.scope_profiles.append(scope)
        request.resource_profiles.append(rp)
    request.dictionary.CopyFrom(b.dictionary)
    return request


def validate_request(req: ExportProfilesServiceRequest) -> list[str]:
    """Every violated invariant of the request (empty list when valid).

    Checks what a receiver relies on: index 0 of every table is the empty element, every
    index points inside its table, value/timestamp lengths agree, and sample types exist.
    """
    d = req.dictionary
    errors: list[str] = []
    sizes = {"string": len(d.string_table), "mapping": len(d.mapping_table), "location": len(d.location_table),
             "function": len(d.function_table), "link": len(d.link_table), "attribute": len(d.attribute_table),
             "stack": len(d.stack_table)}
    for table, size in sizes.items():
        if size == 0:
            errors.append(f"{table}_table is empty (index 0 must be the empty element)")
    if errors:
        return errors
    if d.string_table[0] != "":
        errors.append("string_table[0] is not empty")
    for name, zero, default in (
        ("mapping", d.mapping_table[0], Mapping()), ("location", d.location_table[0], Location()),
        ("function", d.function_table[0], Function()), ("attribute", d.attribute_table[0], KeyValueAndUnit()),
        ("stack", d.stack_table[0], Stack()),
    ):
        if zero != default:
            errors.append(f"{name}_table[0] is not the empty element")

    def check(kind: str, idx: int, where: str) -> None:
        if not 0 <= idx < sizes[kind]:
            errors.append(f"{where}: {kind} index {idx} out of range [0, {sizes[kind]})")

    for i, m in enumerate(d.mapping_table):
        check("string", m.filename_strindex, f"mapping[{i}]")
        for a in m.attribute_indices:
            check("attribute", a, f"mapping[{i}]")
    for i, f in enumerate(d.function_table):
        for idx in (f.name_strindex, f.system_name_strindex, f.filename_strindex):
            check("string", idx, f"function[{i}]")
    for i, loc in enumerate(d.location_table):
        check("mapping", loc.mapping_index, f"location[{i}]")
        for line in loc.lines:
            check("function", line.function_index, f"location[{i}]")
        for a in loc.attribute_indices:
            check("attribute", a, f"location[{i}]")
    for i, kv in enumerate(d.attribute_table):
        check("string", kv.key_strindex, f"attribute[{i}]")
        check("string", kv.unit_strindex, f"attribute[{i}]")
    for i, st in enumerate(d.stack_table):
        for loc_idx in st.location_indices:
            check("location", loc_idx, f"stack[{i}]")
    for r, rp in enumerate(req.resource_profiles):
        for sp in rp.scope_profiles:
            for p, prof in enumerate(sp.profiles):
                where = f"resource[{r}].profile[{p}]"
                check("string", prof.sample_type.type_strindex, where)
                check("string", prof.sample_type.unit_strindex, where)
                check("string", prof.period_type.type_strindex, where)
                for a in prof.attribute_indices:
                    check("attribute", a, where)
                for s, sample in enumerate(prof.samples):
                    check("stack", sample.stack_index, f"{where}.sample[{s}]")
                    check("link", sample.link_index, f"{where}.sample[{s}]")
                    for a in sample.attribute_indices:
                        check("attribute", a, f"{where}.sample[{s}]")
                    if sample.timestamps_unix_nano and len(sample.timestamps_unix_nano) != len(sample.values):
                        errors.append(f"{where}.sample[{s}]: {len(sample.values)} values for "
                                      f"{len(sample.timestamps_unix_nano)} timestamps")
    return errors
