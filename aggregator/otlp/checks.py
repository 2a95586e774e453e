"""Conformance of an OTLP profiles request (v1.10) to the published rules consumers apply.

Our own code, written from the rules as published (docs/design/otlp.md cites them):

- ``profcheck`` (open-telemetry/sig-profiling) with every option on: index 0 of every
  dictionary table is the zero value; every index in range; no negative line, column or
  start line; mapping ranges either both zero or start < limit; link ids of 16 and 8 bytes;
  no duplicate strings or mappings; no unreferenced entry in any table; every sample
  timestamp inside ``[time, time + duration)``; one sample shape per profile (values only
  with exactly one value, timestamps only, or both with equal lengths); no duplicate
  attribute key in one attribute list; no empty resource or scope.
- The proto's MUSTs beyond that: a Function has a name, system name or file name; a Line
  points at a real Function (an unknown frame carries no Line at all).
- Grafana Pyroscope's OTLP ingest (``pkg/ingester/otlp``): the dictionary and every
  sample type are present; a sample of a profile with a period carries one value after
  timestamps-only samples are counted (anything else rejects the *whole request*, except
  for ``events``/``nanoseconds`` off-CPU profiles, whose values are summed); the resource
  names its service (``service.name``), which Pyroscope uses as the application name.
- Elastic's ``serializeprofiles`` (the Elasticsearch exporter), for the profiles it ingests
  (sample type ``samples``/``count``): period type ``cpu``/``nanoseconds``; every location
  of their samples has a ``profile.frame.type`` and a mapping with a
  ``process.executable.build_id.htlhash`` of 32 hex digits.

``check_request`` returns every violation; each names its rule, so tests can assert that a
crafted bad request breaks exactly the rule it was made to break.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.profiles.v1development.profiles_pb2 import (
    Function,
    KeyValueAndUnit,
    Link,
    Location,
    Mapping,
    Profile,
    ProfilesDictionary,
    Stack,
)

_HEX128 = re.compile(r"^(0x)?[0-9a-fA-F]{32}$")
ATTR_FRAME_TYPE = "profile.frame.type"
ATTR_HTLHASH = "process.executable.build_id.htlhash"

# Rule ids (the first word of each violation).
EMPTY_REQUEST = "profcheck.empty_request"
EMPTY_RESOURCE = "profcheck.resource_without_scope"
EMPTY_SCOPE = "profcheck.scope_without_profiles"
ZERO_VALUE = "profcheck.zero_value"
INDEX = "profcheck.index_out_of_range"
NEGATIVE = "profcheck.negative"
MAPPING_RANGE = "profcheck.mapping_range"
LINK_IDS = "profcheck.link_ids"
DUPLICATE_STRING = "profcheck.duplicate_string"
DUPLICATE_MAPPING = "profcheck.duplicate_mapping"
ORPHAN = "profcheck.unreferenced"
TIMESTAMP = "profcheck.timestamp_outside_profile"
SHAPE = "profcheck.sample_shape"
MIXED_SHAPES = "profcheck.mixed_sample_shapes"
DUPLICATE_KEY = "profcheck.duplicate_attribute_key"
EMPTY_FUNCTION = "proto.function_without_name"
LINE_WITHOUT_FUNCTION = "proto.line_without_function"
NO_DICTIONARY = "pyroscope.no_dictionary"
NO_SAMPLE_TYPE = "pyroscope.no_sample_type"
VALUES_LENGTH = "pyroscope.sample_values_length"
NO_SERVICE_NAME = "pyroscope.no_service_name"
ELASTIC_PERIOD_TYPE = "elastic.period_type"
ELASTIC_FRAME_TYPE = "elastic.no_frame_type"
ELASTIC_HTLHASH = "elastic.no_htlhash"

RULES = (EMPTY_REQUEST, EMPTY_RESOURCE, EMPTY_SCOPE, ZERO_VALUE, INDEX, NEGATIVE, MAPPING_RANGE, LINK_IDS,
         DUPLICATE_STRING, DUPLICATE_MAPPING, ORPHAN, TIMESTAMP, SHAPE, MIXED_SHAPES, DUPLICATE_KEY, EMPTY_FUNCTION,
         LINE_WITHOUT_FUNCTION, NO_DICTIONARY, NO_SAMPLE_TYPE, VALUES_LENGTH, NO_SERVICE_NAME, ELASTIC_PERIOD_TYPE,
         ELASTIC_FRAME_TYPE, ELASTIC_HTLHASH)


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule: its id, where in the request, and what is wrong."""

    rule: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule} at {self.where}: {self.detail}"


class _Checker:
    def __init__(self, req: ExportProfilesServiceRequest) -> None:
        self.req = req
        self.d: ProfilesDictionary = req.dictionary
        self.out: list[Violation] = []
        self.sizes = {"string": len(self.d.string_table), "mapping": len(self.d.mapping_table),
                      "location": len(self.d.location_table), "function": len(self.d.function_table),
                      "link": len(self.d.link_table), "attribute": len(self.d.attribute_table),
                      "stack": len(self.d.stack_table)}

    def add(self, rule: str, where: str, detail: str) -> None:
        self.out.append(Violation(rule, where, detail))

    def index(self, table: str, idx: int, where: str) -> bool:
        if 0 <= idx < self.sizes[table]:
            return True
        self.add(INDEX, where, f"{table} index {idx} not in [0, {self.sizes[table]})")
        return False

    def string(self, idx: int) -> str:
        return self.d.string_table[idx] if 0 <= idx < self.sizes["string"] else ""

    def attributes(self, indices: Sequence[int], where: str) -> dict[str, KeyValueAndUnit]:
        """Checks an attribute list (range, unique keys); returns the resolvable ones by key."""
        found: dict[str, KeyValueAndUnit] = {}
        for pos, a in enumerate(indices):
            if not self.index("attribute", a, f"{where}.attribute_indices[{pos}]"):
                continue
            kv = self.d.attribute_table[a]
            if not self.index("string", kv.key_strindex, f"attribute_table[{a}].key_strindex"):
                continue
            key = self.d.string_table[kv.key_strindex]
            if key in found:
                self.add(DUPLICATE_KEY, f"{where}.attribute_indices[{pos}]", f"key {key!r} appears twice")
            else:
                found[key] = kv
        return found

    # -- the dictionary ---------------------------------------------------------------------
    def dictionary(self) -> None:
        d = self.d
        if not self.req.HasField("dictionary"):
            self.add(NO_DICTIONARY, "dictionary", "the request has no dictionary")
        zeros: list[tuple[str, Sequence[object], object]] = [
            ("mapping_table", d.mapping_table, Mapping()), ("location_table", d.location_table, Location()),
            ("function_table", d.function_table, Function()), ("link_table", d.link_table, Link()),
            ("stack_table", d.stack_table, Stack()), ("attribute_table", d.attribute_table, KeyValueAndUnit())]
        for name, table, zero in zeros:
            if not table:
                self.add(ZERO_VALUE, name, "empty: index 0 must hold the zero value")
            elif table[0] != zero:
                self.add(ZERO_VALUE, f"{name}[0]", "is not the zero value")
        if not d.string_table or d.string_table[0] != "":
            self.add(ZERO_VALUE, "string_table[0]", "must be the empty string")
        seen_strings: dict[str, int] = {}
        for i, s in enumerate(d.string_table):
            if s in seen_strings:
                self.add(DUPLICATE_STRING, f"string_table[{i}]", f"{s!r} is also string_table[{seen_strings[s]}]")
            else:
                seen_strings[s] = i
        seen_mappings: dict[tuple[object, ...], int] = {}
        for i, m in enumerate(d.mapping_table):
            where = f"mapping_table[{i}]"
            self.index("string", m.filename_strindex, f"{where}.filename_strindex")
            self.attributes(m.attribute_indices, where)
            if not (m.memory_start == m.memory_limit == 0) and not m.memory_start < m.memory_limit:
                self.add(MAPPING_RANGE, where, f"[{m.memory_start:#x}, {m.memory_limit:#x}) is neither 0-0 nor "
                                               "start < limit")
            if i:
                identity = (m.filename_strindex, tuple(sorted(m.attribute_indices)), m.memory_start,
                            m.memory_limit, m.file_offset)
                if identity in seen_mappings:
                    self.add(DUPLICATE_MAPPING, where, f"equals mapping_table[{seen_mappings[identity]}]")
                else:
                    seen_mappings[identity] = i
        for i, loc in enumerate(d.location_table):
            where = f"location_table[{i}]"
            self.index("mapping", loc.mapping_index, f"{where}.mapping_index")
            self.attributes(loc.attribute_indices, where)
            for j, line in enumerate(loc.lines):
                self.index("function", line.function_index, f"{where}.lines[{j}].function_index")
                if line.function_index == 0:
                    self.add(LINE_WITHOUT_FUNCTION, f"{where}.lines[{j}]",
                             "points at function_table[0]: an unknown frame carries no line")
                for field in ("line", "column"):
                    if getattr(line, field) < 0:
                        self.add(NEGATIVE, f"{where}.lines[{j}].{field}", str(getattr(line, field)))
        for i, f in enumerate(d.function_table):
            where = f"function_table[{i}]"
            for field in ("name_strindex", "system_name_strindex", "filename_strindex"):
                self.index("string", getattr(f, field), f"{where}.{field}")
            if f.start_line < 0:
                self.add(NEGATIVE, f"{where}.start_line", str(f.start_line))
            if i and not (self.string(f.name_strindex) or self.string(f.system_name_strindex)
                          or self.string(f.filename_strindex)):
                self.add(EMPTY_FUNCTION, where, "has no name, system name or file name")
        for i, link in enumerate(d.link_table):
            if i and (len(link.trace_id) != 16 or len(link.span_id) != 8):
                self.add(LINK_IDS, f"link_table[{i}]", f"trace_id {len(link.trace_id)} bytes, span_id "
                                                       f"{len(link.span_id)} bytes (want 16 and 8)")
        for i, kv in enumerate(d.attribute_table):
            self.index("string", kv.key_strindex, f"attribute_table[{i}].key_strindex")
            self.index("string", kv.unit_strindex, f"attribute_table[{i}].unit_strindex")
        for i, st in enumerate(d.stack_table):
            for j, li in enumerate(st.location_indices):
                self.index("location", li, f"stack_table[{i}].location_indices[{j}]")

    # -- resources, scopes, profiles, samples -----------------------------------------------
    def resources(self) -> None:
        if not self.req.resource_profiles:
            self.add(EMPTY_REQUEST, "resource_profiles", "the request has no resource profiles")
        for r, rp in enumerate(self.req.resource_profiles):
            where = f"resource_profiles[{r}]"
            if not rp.scope_profiles:
                self.add(EMPTY_RESOURCE, where, "has no scope profiles")
            service = next((a.value.string_value for a in rp.resource.attributes if a.key == "service.name"), "")
            for s, sp in enumerate(rp.scope_profiles):
                if not sp.profiles:
                    self.add(EMPTY_SCOPE, f"{where}.scope_profiles[{s}]", "has no profiles")
                for p, prof in enumerate(sp.profiles):
                    pwhere = f"{where}.scope_profiles[{s}].profiles[{p}]"
                    self.profile(prof, pwhere)
                    if not service and not self._samples_name_service(prof):
                        self.add(NO_SERVICE_NAME, pwhere, "neither the resource nor the samples name the service")

    def _samples_name_service(self, prof: Profile) -> bool:
        return bool(prof.samples) and all(
            any(0 <= a < self.sizes["attribute"] and self.string(self.d.attribute_table[a].key_strindex)
                == "service.name" for a in s.attribute_indices) for s in prof.samples)

    def profile(self, prof: Profile, where: str) -> None:
        self.attributes(prof.attribute_indices, where)
        if not prof.HasField("sample_type"):
            self.add(NO_SAMPLE_TYPE, f"{where}.sample_type", "missing")
        for field in ("sample_type", "period_type"):
            vt = getattr(prof, field)
            self.index("string", vt.type_strindex, f"{where}.{field}.type_strindex")
            self.index("string", vt.unit_strindex, f"{where}.{field}.unit_strindex")
        sample_type = (self.string(prof.sample_type.type_strindex), self.string(prof.sample_type.unit_strindex))
        period_type = (self.string(prof.period_type.type_strindex), self.string(prof.period_type.unit_strindex))
        start, end = prof.time_unix_nano, prof.time_unix_nano + prof.duration_nano
        summed = sample_type == ("events", "nanoseconds")  # Pyroscope sums off-CPU values
        has_period = prof.period != 0 and prof.HasField("period_type")
        expected_shape = ""
        for i, s in enumerate(prof.samples):
            swhere = f"{where}.samples[{i}]"
            self.index("stack", s.stack_index, f"{swhere}.stack_index")
            self.index("link", s.link_index, f"{swhere}.link_index")
            self.attributes(s.attribute_indices, swhere)
            outside = [t for t in s.timestamps_unix_nano if not start <= t < end]
            if outside:
                self.add(TIMESTAMP, swhere, f"{len(outside)} timestamp(s) outside [{start}, {end}), e.g. {outside[0]}")
            n_values, n_stamps = len(s.values), len(s.timestamps_unix_nano)
            if n_values and n_stamps:
                shape = "both"
                if n_values != n_stamps:
                    self.add(SHAPE, swhere, f"{n_values} values for {n_stamps} timestamps")
            elif n_values:
                shape = "values"
                if n_values != 1:
                    self.add(SHAPE, swhere, f"{n_values} values without timestamps (must be one)")
            elif n_stamps:
                shape = "timestamps"
            else:
                shape = "none"
                self.add(SHAPE, swhere, "neither values nor timestamps")
            if not expected_shape:
                expected_shape = shape
            elif shape != expected_shape:
                self.add(MIXED_SHAPES, swhere, f"shape {shape}, the profile's first sample has {expected_shape}")
            effective = n_values or (1 if n_stamps else 0)
            if has_period and not summed and effective > 1:
                self.add(VALUES_LENGTH, swhere, f"{effective} values for one sample type")
        if sample_type == ("samples", "count"):
            self.elastic(prof, period_type, where)

    def elastic(self, prof: Profile, period_type: tuple[str, str], where: str) -> None:
        if period_type != ("cpu", "nanoseconds"):
            self.add(ELASTIC_PERIOD_TYPE, f"{where}.period_type", f"{period_type}, Elastic wants cpu/nanoseconds")
        locations = {li for s in prof.samples if 0 <= s.stack_index < self.sizes["stack"]
                     for li in self.d.stack_table[s.stack_index].location_indices if 0 <= li < self.sizes["location"]}
        for li in sorted(locations):
            loc = self.d.location_table[li]
            if ATTR_FRAME_TYPE not in self._keys(loc.attribute_indices):
                self.add(ELASTIC_FRAME_TYPE, f"location_table[{li}]", "has no profile.frame.type")
            mapping = self.d.mapping_table[loc.mapping_index] if 0 <= loc.mapping_index < self.sizes["mapping"] \
                else Mapping()
            values = self._keys(mapping.attribute_indices)
            htlhash = values.get(ATTR_HTLHASH)
            if htlhash is None or not _HEX128.match(htlhash):
                self.add(ELASTIC_HTLHASH, f"location_table[{li}]",
                         f"its mapping {loc.mapping_index} has no htlhash of 32 hex digits ({htlhash!r})")

    def _keys(self, indices: Iterable[int]) -> dict[str, str]:
        out = {}
        for a in indices:
            if 0 <= a < self.sizes["attribute"]:
                kv = self.d.attribute_table[a]
                out[self.string(kv.key_strindex)] = kv.value.string_value
        return out

    # -- unreferenced entries ---------------------------------------------------------------
    def orphans(self) -> None:
        d = self.d
        refs: dict[str, set[int]] = {name: {0} for name in self.sizes}
        for rp in self.req.resource_profiles:
            for sp in rp.scope_profiles:
                for prof in sp.profiles:
                    refs["string"].update((prof.sample_type.type_strindex, prof.sample_type.unit_strindex,
                                           prof.period_type.type_strindex, prof.period_type.unit_strindex))
                    refs["attribute"].update(prof.attribute_indices)
                    for s in prof.samples:
                        refs["stack"].add(s.stack_index)
                        refs["link"].add(s.link_index)
                        refs["attribute"].update(s.attribute_indices)
        for st in d.stack_table:
            refs["location"].update(st.location_indices)
        for loc in d.location_table:
            refs["mapping"].add(loc.mapping_index)
            refs["attribute"].update(loc.attribute_indices)
            refs["function"].update(line.function_index for line in loc.lines)
        for m in d.mapping_table:
            refs["string"].add(m.filename_strindex)
            refs["attribute"].update(m.attribute_indices)
        for f in d.function_table:
            refs["string"].update((f.name_strindex, f.system_name_strindex, f.filename_strindex))
        for kv in d.attribute_table:
            refs["string"].update((kv.key_strindex, kv.unit_strindex))
        for table, size in self.sizes.items():
            unreferenced = [i for i in range(size) if i not in refs[table]]
            if unreferenced:
                self.add(ORPHAN, f"{table}_table", f"{len(unreferenced)} unreferenced, e.g. index {unreferenced[0]}")


def check_request(req: ExportProfilesServiceRequest) -> list[Violation]:
    """Every rule of the module doc that ``req`` breaks (empty when it conforms)."""
    checker = _Checker(req)
    checker.dictionary()
    checker.resources()
    checker.orphans()
    return checker.out
