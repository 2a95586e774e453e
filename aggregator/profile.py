"""The aggregator's merged, in-memory form of one host's profile for one interval.

Intake rebuilds samples from wire deltas and merges identical ones here; the OTLP
encoder (:mod:`aggregator.otlp.encode`) and the local exporters read this form. Identical
samples (same stack, thread, cpu and attributes) are merged into one
``AggregatedSample`` whose values are summed and whose timestamps are kept, so
memory grows with distinct stacks, not with sample count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.model import Frame
from shared.profile_types import ProfileType

# Any hashable identity of "the same sample": the merger uses wire ids (cheap to hash),
# ``HostProfile.add`` uses the resolved values.
SampleKey = tuple[Any, ...]


@dataclass(slots=True)
class AggregatedSample:
    """Samples of one stack on one thread/cpu with the same attributes, merged."""

    frames: tuple[Frame, ...]  # leaf first
    pid: int
    tid: int
    thread_name: str
    process_name: str
    cpu: int
    attributes: tuple[tuple[str, str], ...]
    values: list[int]  # sums, one per sample type
    timestamps_ns: list[int] = field(default_factory=list)
    # values of each individual observation, parallel to timestamps_ns (OTLP pairs them)
    series: list[tuple[int, ...]] = field(default_factory=list)


@dataclass(slots=True)
class HostProfile:
    """One host's samples of one profile type over one export interval."""

    host: str
    profile_type: ProfileType
    start_ns: int
    end_ns: int
    period: int
    resource_attributes: dict[str, str] = field(default_factory=dict)
    samples: dict[SampleKey, AggregatedSample] = field(default_factory=dict)

    def add(
        self,
        frames: tuple[Frame, ...],
        pid: int,
        tid: int,
        thread_name: str,
        process_name: str,
        cpu: int,
        attributes: tuple[tuple[str, str], ...],
        values: tuple[int, ...] | list[int],
        timestamp_ns: int,
    ) -> None:
        """Merge one sample into the profile (values summed per identical key)."""
        key: SampleKey = (frames, pid, tid, thread_name, process_name, cpu, attributes)
        agg = self.samples.get(key)
        if agg is None:
            agg = AggregatedSample(frames, pid, tid, thread_name, process_name, cpu, attributes,
                                   list(values), [], [])
            self.samples[key] = agg
        else:
            for i, v in enumerate(values):
                agg.values[i] += v
        agg.timestamps_ns.append(timestamp_ns)
        agg.series.append(tuple(values))
        if timestamp_ns < self.start_ns:
            self.start_ns = timestamp_ns
        if timestamp_ns > self.end_ns:
            self.end_ns = timestamp_ns


@dataclass(slots=True)
class FleetProfiles:
    """Everything one export produces: every host's profiles of every type."""

    start_ns: int
    end_ns: int
    hosts: dict[tuple[str, ProfileType], HostProfile] = field(default_factory=dict)
