"""Reading OTLP profiles back into the aggregator's model (the inverse of aggregator.otlp).

Used by ``stackfleet export`` to merge the aggregator's stored ``*.otlp.pb`` files into one
pprof; it accepts any v1.10 request whose sample types match stackfleet's profile types.
Merge requests oldest first: delta columns add up, gauge columns keep the latest value.
A profile type with several value columns arrives as one Profile per column; columns are
put back together by (stack, attributes).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.profile import AggregatedSample, FleetProfiles, HostProfile
from shared.model import Frame, FrameType, Mapping
from shared.profile_types import PROFILE_TYPES, ProfileType

_COLUMNS = {(vt.type, vt.unit): (ptype, i) for ptype, spec in PROFILE_TYPES.items()
            for i, vt in enumerate(spec.sample_types)}
_KNOWN = {"process.pid", "thread.id", "thread.name", "process.executable.name", "cpu.logical_number"}


def merge_request(fleet: FleetProfiles, req: ExportProfilesServiceRequest, profile_type: ProfileType) -> int:
    """Add the samples of ``profile_type`` in ``req`` to ``fleet``; returns how many were added."""
    d = req.dictionary
    s = d.string_table

    def attr(i: int) -> tuple[str, Any]:
        kv = d.attribute_table[i]
        value = kv.value
        return s[kv.key_strindex], (value.int_value if value.HasField("int_value") else value.string_value)

    frames_cache: dict[int, tuple[Frame, ...]] = {}

    def frames_of(stack_index: int) -> tuple[Frame, ...]:
        cached = frames_cache.get(stack_index)
        if cached is not None:
            return cached
        out = []
        for li in d.stack_table[stack_index].location_indices:
            loc = d.location_table[li]
            line = loc.lines[0] if loc.lines else None
            fn = d.function_table[line.function_index] if line is not None else None
            m = d.mapping_table[loc.mapping_index] if loc.mapping_index else None
            mapping = Mapping(m.memory_start, m.memory_limit, m.file_offset, s[m.filename_strindex]) if m else None
            ftype = dict(attr(a) for a in loc.attribute_indices).get("profile.frame.type", "native")
            out.append(Frame(s[fn.name_strindex] if fn else "", s[fn.filename_strindex] if fn else "",
                             line.line if line is not None else 0, loc.address, FrameType(ftype), mapping))
        frames_cache[stack_index] = tuple(out)
        return frames_cache[stack_index]

    n_columns = len(PROFILE_TYPES[profile_type].sample_types)
    gauges = PROFILE_TYPES[profile_type].snapshot_columns
    added = 0
    for rp in req.resource_profiles:
        host = next((a.value.string_value for a in rp.resource.attributes if a.key == "host.name"), "")
        for sp in rp.scope_profiles:
            for prof in sp.profiles:
                key = (s[prof.sample_type.type_strindex], s[prof.sample_type.unit_strindex])
                ptype, column = _COLUMNS.get(key, (None, -1))
                if ptype != profile_type:
                    continue
                hp = fleet.hosts.get((host, profile_type))
                end = prof.time_unix_nano + prof.duration_nano
                if hp is None:
                    hp = HostProfile(host, profile_type, prof.time_unix_nano, end, prof.period, {"host.name": host})
                    fleet.hosts[(host, profile_type)] = hp
                hp.start_ns, hp.end_ns = min(hp.start_ns, prof.time_unix_nano), max(hp.end_ns, end)
                for sample in prof.samples:
                    attrs = dict(attr(a) for a in sample.attribute_indices)
                    extra = tuple(sorted((k, str(v)) for k, v in attrs.items() if k not in _KNOWN))
                    frames = frames_of(sample.stack_index)
                    sample_key = (frames, attrs.get("process.pid", 0), attrs.get("thread.id", 0),
                                  attrs.get("thread.name", ""), attrs.get("process.executable.name", ""),
                                  attrs.get("cpu.logical_number", 0), extra)
                    agg = hp.samples.get(sample_key)
                    if agg is None:
                        agg = AggregatedSample(frames, int(sample_key[1]), int(sample_key[2]), str(sample_key[3]),
                                               str(sample_key[4]), int(sample_key[5]), extra, [0] * n_columns)
                        hp.samples[sample_key] = agg
                    if column in gauges:  # requests merged oldest first: the latest gauge value wins
                        agg.values[column] = sum(sample.values)
                    else:
                        agg.values[column] += sum(sample.values)
                    if column == 0:
                        agg.timestamps_ns.extend(sample.timestamps_unix_nano)
                    added += 1
    return added
