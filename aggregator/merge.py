"""Fleet-wide merge: decoded batches from every host accumulate into one interval's profiles.

Identical samples merge into one entry (values summed, timestamps kept) keyed by the
symbolized stack itself, so two hosts running the same binary share functions and
locations once the OTLP encoder deduplicates them.
"""

from __future__ import annotations

import time

from aggregator.profile import AggregatedSample, FleetProfiles, HostProfile
from shared.profile_types import PROFILE_TYPES
from shared.wire import DecodedSamples


class Merger:
    """Accumulates the current interval; ``rotate`` hands it over and starts the next."""

    def __init__(self) -> None:
        self._current = FleetProfiles(start_ns=time.time_ns(), end_ns=0)
        self.samples_in_interval = 0

    def add(self, batch: DecodedSamples) -> None:
        host_key = (batch.stream.host, batch.stream.profile_type)
        profile = self._current.hosts.get(host_key)
        if profile is None:
            start = self._current.start_ns
            profile = HostProfile(batch.stream.host, batch.stream.profile_type, start, start, batch.period,
                                  {"host.name": batch.stream.host})
            self._current.hosts[host_key] = profile
        profile.period = batch.period
        # Hot path (every sample of the fleet): key on wire ids, resolve strings and stacks
        # only when a new key appears.
        stream = (batch.stream.agent, batch.dictionary.epoch)
        strings, stacks = batch.dictionary.strings, batch.dictionary.stacks
        samples = profile.samples
        lo, hi = profile.start_ns, profile.end_ns
        snapshot = PROFILE_TYPES[batch.stream.profile_type].snapshot_columns
        for row in batch.rows:
            t, c, p, th, tn, pn, st, vals, attrs = row
            sample_key = (stream, st, p, th, tn, pn, c, attrs)
            agg = samples.get(sample_key)
            if agg is None:
                samples[sample_key] = AggregatedSample(
                    stacks[st], p, th, strings[tn], strings[pn], c,
                    tuple(sorted((strings[k], strings[v]) for k, v in attrs)), list(vals), [t], [vals])
            elif snapshot:  # gauge columns: the latest report replaces; delta columns add up
                latest = t >= agg.timestamps_ns[-1]
                for i, v in enumerate(vals):
                    if i not in snapshot:
                        agg.values[i] += v
                    elif latest:
                        agg.values[i] = v
                agg.timestamps_ns.append(t)
                agg.series.append(vals)
            else:
                agg_values = agg.values
                if len(vals) == 1:  # most types (cpu, wall, goroutine) have one column
                    agg_values[0] += vals[0]
                else:
                    for i, v in enumerate(vals):
                        agg_values[i] += v
                agg.timestamps_ns.append(t)
                agg.series.append(vals)
            if t < lo:
                lo = t
            elif t > hi:
                hi = t
        profile.start_ns, profile.end_ns = lo, hi
        self.samples_in_interval += len(batch.rows)

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
