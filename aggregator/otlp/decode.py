"""Reading OTLP profiles back into the aggregator's model (the inverse of aggregator.otlp.encode).

Used by ``stackfleet export`` and the web page to merge stored ``*.otlp.pb`` files, and
accepts any valid v1.10 request whose sample types are stackfleet's, whoever produced it:

- every sample shape: values (summed), timestamps only (each timestamp one observation of
  value 1, as the spec says), or both;
- the CPU profile as ``cpu``/``nanoseconds`` values or as the eBPF profiler's
  ``samples``/``count`` with period type ``cpu``/``nanoseconds`` (count x period);
- all lines of a location (inlined calls become frames marked ``inlined``, innermost first),
  locations without lines (unknown frames), every semantic-convention frame type;
- process attributes on the resource or on the samples; mapping build ids (GNU, Go, htlhash).

Merge requests oldest first: delta columns add up, gauge columns keep the latest value.
A profile type with several value columns arrives as one Profile per column; columns are
put back together by (stack, attributes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.profiles.v1development.profiles_pb2 import Profile

from aggregator.profile import AggregatedSample, FleetProfiles, HostProfile
from shared.model import Frame, FrameType, Mapping
from shared.profile_types import PROFILE_TYPES, ProfileType

log = logging.getLogger(__name__)

_COLUMNS = {(vt.type, vt.unit): (ptype, i) for ptype, spec in PROFILE_TYPES.items()
            for i, vt in enumerate(spec.sample_types)}
_COUNTED_CPU = (("samples", "count"), ("cpu", "nanoseconds"))  # (sample type, period type)
# Attributes that are fields of a sample in the model, wherever the request puts them.
_FIELDS = {"process.pid", "thread.id", "thread.name", "process.executable.name", "cpu.logical_number", "host.name"}
# Resource attributes that describe the process (kept as sample attributes); the rest of a
# resource (e.g. OTEL_RESOURCE_ATTRIBUTES) is the exporter's to add again.
_PROCESS_KEYS = {"service.name", "service.version", "service.namespace", "process.executable.path", "container.id",
                 "container.name", "k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "k8s.container.name"}
_FRAME_TYPES = {t.value: t for t in FrameType}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else ""


def _as_int(value: Any) -> int:
    """An integer attribute another producer may have sent as a string (or not at all): 0 if not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def profile_column(strings: Sequence[str], prof: Profile) -> tuple[ProfileType, int] | None:
    """(stackfleet profile type, value column) a Profile holds, None for a sample type of another kind."""
    sample_type = (strings[prof.sample_type.type_strindex], strings[prof.sample_type.unit_strindex])
    period_type = (strings[prof.period_type.type_strindex], strings[prof.period_type.unit_strindex])
    if (sample_type, period_type) == _COUNTED_CPU:
        return ProfileType.CPU, 0
    return _COLUMNS.get(sample_type)


def merge_request(fleet: FleetProfiles, req: ExportProfilesServiceRequest, profile_type: ProfileType) -> int:
    """Add the samples of ``profile_type`` in ``req`` to ``fleet``; returns how many were added."""
    d = req.dictionary
    s = d.string_table

    def attr(i: int) -> tuple[str, Any]:
        kv = d.attribute_table[i]
        return s[kv.key_strindex], _value(kv.value)

    mappings: dict[int, Mapping | None] = {0: None}

    def mapping_of(index: int) -> Mapping | None:
        if index not in mappings:
            m = d.mapping_table[index]
            ids = dict(attr(a) for a in m.attribute_indices)
            name = s[m.filename_strindex]
            # A mapping with neither file nor range only carries an id (an interpreted frame's):
            # the model has no mapping there.
            mappings[index] = None if not name and m.memory_start == m.memory_limit == 0 else Mapping(
                m.memory_start, m.memory_limit, m.file_offset, name,
                str(ids.get("process.executable.build_id.gnu", "")), str(ids.get("process.executable.build_id.go", "")),
                str(ids.get("process.executable.build_id.htlhash", "")))
        return mappings[index]

    unknown_types: set[str] = set()
    frames_cache: dict[int, tuple[Frame, ...]] = {}

    def frames_of(stack_index: int) -> tuple[Frame, ...]:
        cached = frames_cache.get(stack_index)
        if cached is not None:
            return cached
        out = []
        for li in d.stack_table[stack_index].location_indices:
            loc = d.location_table[li]
            mapping = mapping_of(loc.mapping_index)
            type_name = str(dict(attr(a) for a in loc.attribute_indices).get("profile.frame.type", "native"))
            ftype = _FRAME_TYPES.get(type_name)
            if ftype is None:
                unknown_types.add(type_name)
                ftype = FrameType.NATIVE
            if not loc.lines:
                out.append(Frame("", "", 0, loc.address, ftype, mapping))
            last = len(loc.lines) - 1
            for j, line in enumerate(loc.lines):
                fn = d.function_table[line.function_index]
                out.append(Frame(s[fn.name_strindex] or s[fn.system_name_strindex], s[fn.filename_strindex],
                                 line.line, loc.address, ftype, mapping, j < last))
        frames_cache[stack_index] = tuple(out)
        return frames_cache[stack_index]

    n_columns = len(PROFILE_TYPES[profile_type].sample_types)
    gauges = PROFILE_TYPES[profile_type].snapshot_columns
    added = 0
    for rp in req.resource_profiles:
        resource = {a.key: _value(a.value) for a in rp.resource.attributes}
        host = str(resource.get("host.name", ""))
        process_attrs = {k: str(v) for k, v in resource.items() if k in _PROCESS_KEYS}
        if str(process_attrs.get("service.name", "")).startswith("unknown_service"):
            del process_attrs["service.name"]  # the conventions' "not named": the exporter adds it again
        for sp in rp.scope_profiles:
            for prof in sp.profiles:
                ptype, column = profile_column(s, prof) or (None, -1)
                if ptype != profile_type:
                    continue
                counted = (s[prof.sample_type.type_strindex], s[prof.sample_type.unit_strindex]) == _COUNTED_CPU[0]
                scale = max(prof.period, 1) if counted else 1
                hp = fleet.hosts.get((host, profile_type))
                end = prof.time_unix_nano + prof.duration_nano
                if hp is None:
                    hp = HostProfile(host, profile_type, prof.time_unix_nano, end, prof.period, {"host.name": host})
                    fleet.hosts[(host, profile_type)] = hp
                hp.start_ns, hp.end_ns = min(hp.start_ns, prof.time_unix_nano), max(hp.end_ns, end)
                for sample in prof.samples:
                    attrs = {**resource, **dict(attr(a) for a in sample.attribute_indices)}
                    extra_attrs = {**process_attrs, **{k: str(v) for k, v in attrs.items()
                                                       if k not in _FIELDS and k not in resource}}
                    extra = tuple(sorted(extra_attrs.items()))
                    frames = frames_of(sample.stack_index)
                    sample_key = (frames, _as_int(attrs.get("process.pid")), _as_int(attrs.get("thread.id")),
                                  str(attrs.get("thread.name", "")), str(attrs.get("process.executable.name", "")),
                                  _as_int(attrs.get("cpu.logical_number")), extra)
                    agg = hp.samples.get(sample_key)
                    if agg is None:
                        agg = AggregatedSample(frames, sample_key[1], sample_key[2], sample_key[3], sample_key[4],
                                               sample_key[5], extra, [0] * n_columns)
                        hp.samples[sample_key] = agg
                    # Timestamps only: each is one observation of value 1 (the spec's rule).
                    value = (sum(sample.values) if sample.values else len(sample.timestamps_unix_nano)) * scale
                    if column in gauges:  # requests merged oldest first: the latest gauge value wins
                        agg.values[column] = value
                    else:
                        agg.values[column] += value
                    if column == 0:
                        agg.timestamps_ns.extend(sample.timestamps_unix_nano)
                    added += 1
    if unknown_types:
        log.warning("frame types %s are not known here: their frames are shown as native", sorted(unknown_types))
    return added
