"""Building OTLP profiles (proto v1.10, ``v1development``) from the fleet's merged profiles.

One request per export, with one ``ProfilesDictionary`` shared by every host: strings,
functions, mappings, locations, stacks and attributes are deduplicated fleet-wide (the same
libc function on 1,000 hosts is one Function). Index 0 of every table is the empty element,
as the spec requires, so "unset" references are 0. Nothing unreferenced is added.

Layout, as the OpenTelemetry eBPF profiler emits it and backends read it (see
docs/design/otlp.md): one ``ResourceProfiles`` per profiled *process* (``host.name``,
``service.name``, ``process.pid``, ``process.executable.name``, container and pod
attributes; ``OTEL_RESOURCE_ATTRIBUTES`` given to the aggregator are applied last and never
overridden), one ``ScopeProfiles`` naming the profiler (``stackfleet`` and its version), and
one ``Profile`` per profile type *per sample type* (v1.10 gives a Profile a single
``sample_type``). Sample shapes: the CPU profile is ``samples``/``count`` with period type
``cpu``/``nanoseconds``, period 1e9/Hz and one timestamp per sample taken (no values);
every other profile has one value per sample (the interval's sum, or a gauge's latest
value) and no timestamps. Thread id, thread name and CPU stay sample attributes.

Frames marked ``inlined`` and the frame they were inlined into become one Location with
several Lines, innermost first; a frame with neither function nor file gets no Line at all
(address and mapping only). Every Location has a mapping carrying an htlhash, as Elastic
requires: frames without a file mapping get a pseudo-mapping (see ``_pseudo_mapping_key``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any, cast

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.profiles.v1development.profiles_pb2 import (
    Function,
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
from shared.model import INTERPRETED_FRAME_TYPES as _INTERPRETED
from shared.model import KERNEL_FILENAME, Frame, inline_runs
from shared.profile_types import PROFILE_TYPES, ProfileType
from shared.version import installed_version

SCOPE_NAME = "stackfleet"

# Semantic-convention attribute keys.
ATTR_FRAME_TYPE = "profile.frame.type"
ATTR_PID = "process.pid"
ATTR_TID = "thread.id"
ATTR_THREAD_NAME = "thread.name"
ATTR_EXECUTABLE_NAME = "process.executable.name"
ATTR_CPU = "cpu.logical_number"
ATTR_SERVICE_NAME = "service.name"
ATTR_SERVICE_VERSION = "service.version"
ATTR_HOST_NAME = "host.name"
ATTR_BUILD_ID_GNU = "process.executable.build_id.gnu"
ATTR_BUILD_ID_GO = "process.executable.build_id.go"
ATTR_BUILD_ID_HTLHASH = "process.executable.build_id.htlhash"
# Sample attributes the agent resolves per process that describe the process, not the sample:
# they go to the process's Resource.
RESOURCE_KEYS = frozenset({ATTR_SERVICE_NAME, ATTR_SERVICE_VERSION, "service.namespace", ATTR_EXECUTABLE_NAME,
                           "process.executable.path", "container.id", "container.name", "k8s.pod.uid",
                           "k8s.pod.name", "k8s.namespace.name", "k8s.container.name"})
# Samples of the CPU profile are counted, as the eBPF profiler (and Elastic, which accepts
# nothing else) has it; pprof files keep cpu/nanoseconds values.
CPU_SAMPLE_TYPE = ("samples", "count")
# The eBPF profiler's file ids for "symbolization failed" and "kernel without a build id":
# mappings we know nothing of carry them, so every mapping has an htlhash.
UNSYMBOLIZED_FILE_ID = "ffffffffffffffffffffffffffffffff"
UNKNOWN_KERNEL_FILE_ID = "fffffffffffffffdfffffffffffffffd"


def profiler_version() -> str:
    """The installed stackfleet distribution's version (what ``stackfleet --version`` says)."""
    return installed_version()


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
        self._functions: dict[tuple[str, str, str], int] = {}
        self._mappings: dict[Any, int] = {}
        self._locations: dict[tuple[Frame, ...], int] = {}
        self._stacks: dict[tuple[int, ...], int] = {}
        self._attributes: dict[tuple[str, Any], int] = {}
        # Identity caches in front of the value caches: merged samples share the very tuple
        # and Frame objects of their stream's dictionary, and hashing a 20-frame stack of
        # dataclasses per sample would dominate the export's cost. The objects are kept
        # referenced here so an id cannot be reused while the builder lives.
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

    def function(self, f: Frame) -> int:
        """The Function of a frame; interpreted code has no system name (pprof would try to
        demangle ``<module>`` when system name equals name)."""
        system_name = "" if f.frame_type in _INTERPRETED else f.function
        key = (f.function, system_name, f.filename)
        idx = self._functions.get(key)
        if idx is None:
            idx = len(self.dictionary.function_table)
            self.dictionary.function_table.append(
                Function(name_strindex=self.string(f.function), system_name_strindex=self.string(system_name),
                         filename_strindex=self.string(f.filename)))
            self._functions[key] = idx
        return idx

    def mapping(self, f: Frame) -> int:
        m = f.mapping
        key: Any = m if m is not None else _pseudo_mapping_key(f)
        idx = self._mappings.get(key)
        if idx is None:
            idx = len(self.dictionary.mapping_table)
            if m is None:
                attrs = [self.attribute(ATTR_BUILD_ID_HTLHASH, key[1])]
                self.dictionary.mapping_table.append(Mapping(attribute_indices=attrs))
            else:
                attrs = []
                if m.build_id:
                    attrs.append(self.attribute(ATTR_BUILD_ID_GNU, m.build_id))
                if m.go_build_id:
                    attrs.append(self.attribute(ATTR_BUILD_ID_GO, m.go_build_id))
                htlhash = m.htlhash or (UNKNOWN_KERNEL_FILE_ID if m.filename == KERNEL_FILENAME
                                        else UNSYMBOLIZED_FILE_ID)
                attrs.append(self.attribute(ATTR_BUILD_ID_HTLHASH, htlhash))
                self.dictionary.mapping_table.append(
                    Mapping(memory_start=m.start, memory_limit=m.limit, file_offset=m.offset,
                            filename_strindex=self.string(m.filename), attribute_indices=attrs))
            self._mappings[key] = idx
        return idx

    def location(self, f: Frame) -> int:
        """The Location of a frame not inlined into another."""
        idx = self._location_ids.get(id(f))
        if idx is None:
            idx = self._location_ids[id(f)] = self._location((f,))
            self._located.append(f)
        return idx

    def _location(self, run: tuple[Frame, ...]) -> int:
        """The Location of frames at one address: inlined callees innermost first, then their caller."""
        idx = self._locations.get(run)
        if idx is None:
            outer = run[-1]
            idx = len(self.dictionary.location_table)
            lines = [Line(function_index=self.function(f), line=f.line) for f in run if f.function or f.filename]
            self.dictionary.location_table.append(
                Location(mapping_index=self.mapping(outer), address=outer.address, lines=lines,
                         attribute_indices=[self.attribute(ATTR_FRAME_TYPE, outer.frame_type.value)]))
            self._locations[run] = idx
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
        if any(map(_is_inlined, frames)):
            locations = tuple(map(self._location, inline_runs(frames)))
        else:
            known = tuple(map(self._location_ids.get, map(id, frames)))
            locations = cast(tuple[int, ...], known) if None not in known else tuple([self.location(f) for f in frames])
        idx = self._stacks.get(locations)
        if idx is None:
            idx = len(self.dictionary.stack_table)
            self.dictionary.stack_table.append(Stack(location_indices=locations))
            self._stacks[locations] = idx
        return idx


def _is_inlined(f: Frame) -> bool:
    return f.inlined


def _pseudo_mapping_key(f: Frame) -> tuple[str, str]:
    """(marker, htlhash) of the mapping of a frame without a file mapping.

    Interpreted frames (Python) are keyed by their source file, as the eBPF profiler keys
    interpreted code by a file id of its own: a stable id made from the frame type and the
    source file name, not a hash of a file's contents. Native frames outside every mapping
    get the eBPF profiler's "unsymbolized" id."""
    if f.frame_type in _INTERPRETED:
        digest = hashlib.sha256(f"stackfleet:{f.frame_type.value}:{f.filename}".encode()).digest()[:16].hex()
        return ("pseudo", digest)
    return ("pseudo", UNSYMBOLIZED_FILE_ID)


def _split_attributes(attributes: tuple[tuple[str, str], ...]) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """A sample's attributes as (the process's resource attributes, the sample's own)."""
    resource = {k: v for k, v in attributes if k in RESOURCE_KEYS}
    own = tuple((k, v) for k, v in attributes if k not in RESOURCE_KEYS)
    return resource, own


def _sample_attributes(b: DictionaryBuilder, s: AggregatedSample, own: tuple[tuple[str, str], ...]) -> list[int]:
    # Many samples share thread, cpu and attributes (one per stack they ran): their attribute
    # indices are looked up once per export. Callers must not modify the list.
    key = (s.tid, s.thread_name, s.cpu, own)
    known = b._sample_attribute_ids.get(key)
    if known is None:
        known = [b.attribute(ATTR_TID, s.tid), b.attribute(ATTR_THREAD_NAME, s.thread_name),
                 b.attribute(ATTR_CPU, s.cpu)]
        taken = {ATTR_TID, ATTR_THREAD_NAME, ATTR_CPU}
        for k, v in own:
            if k not in taken:  # one value per key: the list's keys must be unique
                taken.add(k)
                known.append(b.attribute(k, v))
        b._sample_attribute_ids[key] = known
    return known


ResourceKey = tuple[Any, ...]


Row = tuple[AggregatedSample, tuple[tuple[str, str], ...]]  # a sample and its own (non-resource) attributes


class _Process:
    """One profiled process of one host: its resource attributes and its samples per profile type."""

    __slots__ = ("attributes", "samples")

    def __init__(self, attributes: dict[str, str | int]) -> None:
        self.attributes = attributes
        self.samples: dict[ProfileType, list[Row]] = {}


def _processes(profiles: list[HostProfile], default_service_name: str,
               default_service_version: str) -> dict[ResourceKey, _Process]:
    """The host's samples grouped by process."""
    out: dict[ResourceKey, _Process] = {}
    split_cache: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], tuple[tuple[str, str], ...]]] = {}
    for hp in profiles:
        for s in hp.samples.values():
            split = split_cache.get(s.attributes)
            if split is None:
                split = split_cache[s.attributes] = _split_attributes(s.attributes)
            resource, own = split
            key = (s.pid, s.process_name, tuple(sorted(resource.items())))
            process = out.get(key)
            if process is None:
                process = out[key] = _Process(_resource_attributes(hp.host, s, resource, default_service_name,
                                                                   default_service_version))
            process.samples.setdefault(hp.profile_type, []).append((s, own))
    return out


def _resource_attributes(host: str, s: AggregatedSample, resource: dict[str, str], default_service_name: str,
                         default_service_version: str) -> dict[str, str | int]:
    attrs: dict[str, str | int] = {ATTR_HOST_NAME: host, ATTR_PID: s.pid}
    attrs.update(resource)
    executable = resource.get(ATTR_EXECUTABLE_NAME) or s.process_name
    if executable:
        attrs[ATTR_EXECUTABLE_NAME] = executable
    if ATTR_SERVICE_NAME not in resource:
        if default_service_name:
            attrs[ATTR_SERVICE_NAME] = default_service_name
            if default_service_version:
                attrs[ATTR_SERVICE_VERSION] = default_service_version
        else:  # the semantic conventions' default for a process that does not name its service
            attrs[ATTR_SERVICE_NAME] = f"unknown_service:{executable}" if executable else "unknown_service"
    return attrs


def _time_range(host: HostProfile, samples: list[Row]) -> tuple[int, int]:
    """(time, duration) covering the interval and every sample timestamp: timestamps must be
    in [time, time + duration)."""
    stamps = [t for s, _ in samples for t in (s.timestamps_ns[:1] + s.timestamps_ns[-1:])]
    start = min([host.start_ns, *stamps])
    end = max([host.end_ns, *(t + 1 for t in stamps)])
    return start, end - start


def _cpu_profile(b: DictionaryBuilder, host: HostProfile, samples: list[Row]) -> Profile | None:
    """The CPU profile in the eBPF profiler's shape: one timestamp per sample taken, no values;
    when some sample has no timestamps (read back from a values-only file), counts instead.
    Dictionary entries are made only for what is emitted (nothing unreferenced)."""
    period = host.period
    rows = []
    with_timestamps = True
    for s, own in samples:
        if s.values[0] <= 0:
            continue
        if period > 0 and s.timestamps_ns and s.values[0] == period * len(s.timestamps_ns):
            stamps = s.timestamps_ns  # every observation was one sample (the agent's case)
        elif period > 0 and s.series and len(s.series) == len(s.timestamps_ns):
            stamps = [t for t, v in zip(s.timestamps_ns, s.series, strict=True)
                      for _ in range(max(1, round(v[0] / period)))]
        else:
            stamps = []
            with_timestamps = False
        rows.append((s, own, stamps))
    if not rows:
        return None
    time_ns, duration = _time_range(host, samples)
    profile = Profile(sample_type=ValueType(type_strindex=b.string(CPU_SAMPLE_TYPE[0]),
                                            unit_strindex=b.string(CPU_SAMPLE_TYPE[1])),
                      period_type=ValueType(type_strindex=b.string("cpu"), unit_strindex=b.string("nanoseconds")),
                      period=period, time_unix_nano=time_ns, duration_nano=duration, profile_id=os.urandom(16))
    for s, own, stamps in rows:
        stack_index, attrs = b.stack(s.frames), _sample_attributes(b, s, own)
        if with_timestamps:
            profile.samples.append(Sample(stack_index=stack_index, attribute_indices=attrs,
                                          timestamps_unix_nano=stamps))
        else:
            count = max(1, round(s.values[0] / period)) if period > 0 else 1
            profile.samples.append(Sample(stack_index=stack_index, attribute_indices=attrs, values=[count]))
    return profile


def _value_profiles(b: DictionaryBuilder, host: HostProfile, samples: list[Row]) -> Iterable[Profile]:
    """One Profile per value column, one value per sample (interval sum or latest gauge), no timestamps."""
    spec = PROFILE_TYPES[host.profile_type]
    time_ns, duration = _time_range(host, samples)
    for column, sample_type in enumerate(spec.sample_types):
        rows = [(s, own) for s, own in samples if s.values[column]]
        if not rows:
            continue
        profile = Profile(
            sample_type=ValueType(type_strindex=b.string(sample_type.type), unit_strindex=b.string(sample_type.unit)),
            time_unix_nano=time_ns, duration_nano=duration,
            period_type=ValueType(type_strindex=b.string(spec.period_type.type),
                                  unit_strindex=b.string(spec.period_type.unit)),
            period=host.period, profile_id=os.urandom(16))
        profile.samples.extend(Sample(stack_index=b.stack(s.frames), attribute_indices=_sample_attributes(b, s, own),
                                      values=[s.values[column]]) for s, own in rows)
        yield profile


def encode_request(
    fleet: FleetProfiles,
    service_name: str = "",
    service_version: str = "",
    extra_resource_attributes: dict[str, str] | None = None,
) -> ExportProfilesServiceRequest:
    """The OTLP export request for one interval of the whole fleet.

    ``service_name``/``service_version`` name the processes that do not name their service
    themselves ("" = the semantic conventions' ``unknown_service:<executable>``);
    ``extra_resource_attributes`` (``OTEL_RESOURCE_ATTRIBUTES``) go on every resource as given.
    """
    b = DictionaryBuilder()
    request = ExportProfilesServiceRequest()
    scope = InstrumentationScope(name=SCOPE_NAME, version=profiler_version())
    by_host: dict[str, list[HostProfile]] = {}
    for (host, _), profile in sorted(fleet.hosts.items()):
        by_host.setdefault(host, []).append(profile)
    for profiles in by_host.values():
        by_type = {hp.profile_type: hp for hp in profiles}
        for _, process in sorted(_processes(profiles, service_name, service_version).items(),
                                 key=lambda item: (item[0][0], item[0][1])):
            sp = ScopeProfiles(scope=scope)
            for ptype, samples in process.samples.items():
                hp = by_type[ptype]
                if ptype == ProfileType.CPU:
                    cpu = _cpu_profile(b, hp, samples)
                    if cpu is not None:
                        sp.profiles.append(cpu)
                else:
                    sp.profiles.extend(_value_profiles(b, hp, samples))
            if not sp.profiles:
                continue
            attrs = {**process.attributes, **(extra_resource_attributes or {})}
            rp = ResourceProfiles(resource=Resource(attributes=[_key_value(k, v) for k, v in sorted(attrs.items())]))
            rp.scope_profiles.append(sp)
            request.resource_profiles.append(rp)
    request.dictionary.CopyFrom(b.dictionary)
    return request


def _key_value(key: str, value: str | int) -> KeyValue:
    any_value = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
    return KeyValue(key=key, value=any_value)


def validate_request(req: ExportProfilesServiceRequest) -> list[str]:
    """Every rule the request breaks (empty when it is valid): see :mod:`aggregator.otlp.checks`."""
    from aggregator.otlp.checks import check_request

    return [str(v) for v in check_request(req)]
