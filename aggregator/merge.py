"""Fleet-wide merge: decoded batches from every host accumulate into one interval's profiles.

Identical samples merge into one entry (values summed, timestamps kept) keyed by the
symbolized stack itself, so two hosts running the same binary share functions and
locations once the OTLP encoder deduplicates them.
"""

from __future__ import annotations

import time

from aggregator.profile import FleetProfiles, HostProfile
from shared.wire import DecodedSamples


class Merger:
    """Accumulates the current interval; ``rotate`` hands it over and starts the next."""

    def __init__(self) -> None:
        self._current = FleetProfiles(start_ns=time.time_ns(), end_ns=0)
        self.samples_in_interval = 0

    def add(self, batch: DecodedSamples) -> None:
        key = (batch.stream.host, batch.stream.profile_type)
        profile = self._current.hosts.get(key)
        if profile is None:
            start = self._current.start_ns
            profile = HostProfile(batch.stream.host, batch.stream.profile_type, start, start, batch.period,
                                  {"host.name": batch.stream.host})
            self._current.hosts[key] = profile
        profile.period = batch.period
        for s in batch.samples:
            profile.add(s.frames, s.pid, s.tid, s.thread_name, s.process_name, s.cpu,
                        tuple(sorted(s.attributes.items())), s.values, s.timestamp_ns)
        self.samples_in_interval += len(batch.samples)

    def rotate(self) -> FleetProfiles:
        """Close the current interval (end = now) and return it."""
        now = time.time_ns()
        done = self._current
        done.end_ns = now
        for profile in done.hosts.values():
            profile.start_ns = min(profile.start_ns, done.start_ns)
            profile.end_ns = max(profile.end_ns, now)
        self._current = FleetProfiles(start_ns=now, end_ns=0)
        self.samples_in_interval = 0
        return done
