"""The profile-type table: one place that says what each profile type measures.

Everything that needs sample types, units or period (agent actors, wire format,
OTLP encoder, pprof writer) reads it from here. Names and units follow pprof's
conventions so that ``go tool pprof`` users find what they expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ProfileType(StrEnum):
    """The five profile types stackfleet collects; the value is used in NATS subjects."""

    CPU = "cpu"
    WALL = "wall"
    LOCK = "lock"
    HEAP = "heap"
    GOROUTINE = "goroutine"


@dataclass(frozen=True, slots=True)
class ValueType:
    """A (type, unit) pair, as pprof's and OTLP's ``ValueType``."""

    type: str
    unit: str


@dataclass(frozen=True, slots=True)
class ProfileTypeSpec:
    """What one profile type measures.

    ``sample_types`` are the value columns every sample of this type carries (OTLP
    v1.10 allows one sample type per ``Profile``, so a multi-value type becomes one
    OTLP profile per column). ``period_type`` is what the sampling period counts.
    """

    profile_type: ProfileType
    sample_types: tuple[ValueType, ...]
    period_type: ValueType
    description: str
    # Value columns that are gauges (live goroutines, in-use heap): each report replaces the
    # previous one for the same sample instead of adding to it. Other columns are deltas.
    snapshot_columns: tuple[int, ...] = ()


PROFILE_TYPES: dict[ProfileType, ProfileTypeSpec] = {
    ProfileType.CPU: ProfileTypeSpec(
        ProfileType.CPU,
        sample_types=(ValueType("cpu", "nanoseconds"),),
        period_type=ValueType("cpu", "nanoseconds"),
        description="on-CPU time, sampled with a perf cpu-clock event at a fixed frequency",
    ),
    ProfileType.WALL: ProfileTypeSpec(
        ProfileType.WALL,
        sample_types=(ValueType("wall", "nanoseconds"),),
        period_type=ValueType("wall", "nanoseconds"),
        description="elapsed time per thread: on-CPU samples plus off-CPU intervals from sched_switch",
    ),
    ProfileType.LOCK: ProfileTypeSpec(
        ProfileType.LOCK,
        sample_types=(ValueType("contentions", "count"), ValueType("delay", "nanoseconds")),
        period_type=ValueType("contentions", "count"),
        description="user-space lock contention: futex wait count and time per waiting stack",
    ),
    ProfileType.HEAP: ProfileTypeSpec(
        ProfileType.HEAP,
        sample_types=(
            ValueType("alloc_objects", "count"),
            ValueType("alloc_space", "bytes"),
            ValueType("inuse_objects", "count"),
            ValueType("inuse_space", "bytes"),
        ),
        period_type=ValueType("space", "bytes"),
        description="sampled allocations and live memory (estimates scaled from byte-based sampling)",
        snapshot_columns=(2, 3),
    ),
    ProfileType.GOROUTINE: ProfileTypeSpec(
        ProfileType.GOROUTINE,
        sample_types=(ValueType("goroutine", "count"),),
        period_type=ValueType("goroutine", "count"),
        description="live goroutines per stack in Go processes",
        snapshot_columns=(0,),
    ),
}


def spec(profile_type: ProfileType | str) -> ProfileTypeSpec:
    """Look up the spec of a profile type given as enum or string."""
    return PROFILE_TYPES[ProfileType(profile_type)]
