"""The page's other views of one query: the top-functions table and the timeline.

Blocking (merging and reading retained exports): the server calls these from worker threads.
Both are computed from the same samples as the flame graph (:mod:`aggregator.web.query`),
so the table's and the timeline's numbers add up to the graph's total.
"""

from __future__ import annotations

from typing import Any

from aggregator.otlp.decode import merge_request
from aggregator.profile import FleetProfiles
from aggregator.web import query as q
from aggregator.web.store import RetainedExports
from shared.profile_types import PROFILE_TYPES

MAX_TOP_ROWS = 5000  # the table's rows, by total: enough for search, small enough for the browser
MAX_TIMELINE_POINTS = 300


def top_functions(fleet: FleetProfiles, query: q.ProfileQuery, limit: int = MAX_TOP_ROWS) -> list[dict[str, Any]]:
    """Every function with its ``self`` (samples where it is the leaf) and ``total`` (samples
    where it is anywhere on the stack, counted once even when recursive), largest total first.

    Exact, from the samples: unlike the flame graph, nothing small is folded away. Samples
    without frames count for no function (the graph shows them as the process's own).
    """
    self_value: dict[str, int] = {}
    total_value: dict[str, int] = {}
    for hp in fleet.hosts.values():
        if hp.profile_type != query.profile_type:
            continue
        for s in hp.samples.values():
            value = s.values[query.column] if query.column < len(s.values) else 0
            if value <= 0 or not s.frames:
                continue
            names = [q.frame_name(f) for f in s.frames]  # leaf first
            self_value[names[0]] = self_value.get(names[0], 0) + value
            for name in set(names):
                total_value[name] = total_value.get(name, 0) + value
    ranked = sorted(total_value.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return [{"name": name, "self": self_value.get(name, 0), "total": total} for name, total in ranked]


def timeline(store: RetainedExports, query: q.ProfileQuery,
             max_points: int = MAX_TIMELINE_POINTS) -> list[tuple[int, int, int]]:
    """The query's value over its range: ``(start_ns, end_ns, value)`` per bucket, oldest first.

    One bucket per export (an export covers one export interval and is named by its end), or
    evenly spaced buckets when there are more than ``max_points`` exports. Delta columns (CPU
    time, allocations, lock waits) add up within a bucket. Gauge columns (in-use heap, live
    goroutines) are replaced by newer reports, so their value at an export is the merge of all
    exports up to it (as the flame graph of the range up to there would show), and a bucket
    shows the last one.
    """
    exports = store.list(query.since_ns, query.until_ns)
    if not exports:
        return []
    span = max(query.until_ns - query.since_ns, 1)
    ends = sorted({e.end_ns for e in exports})  # replicas' exports may share an end
    if len(ends) <= max_points:
        # the first export's interval is taken to be as long as the next one's (its start is not stored)
        first = ends[0] - (ends[1] - ends[0]) if len(ends) > 1 else query.since_ns
        edges = [max(query.since_ns, first), *ends]
        index = {end: i for i, end in enumerate(ends)}
        bucket_of = [index[e.end_ns] for e in exports]
    else:
        width = -(-span // max_points)
        edges = [query.since_ns + i * width for i in range(max_points + 1)]
        bucket_of = [min((e.end_ns - query.since_ns) // width, max_points - 1) for e in exports]
    values = [0] * (len(edges) - 1)
    gauge = query.column in PROFILE_TYPES[query.profile_type].snapshot_columns
    running = FleetProfiles(query.since_ns, query.until_ns)
    for export, bucket in zip(exports, bucket_of, strict=True):
        if gauge:
            req = store.load(export)
            if req is None:
                continue
            merge_request(running, req, query.profile_type)
            values[bucket] = _total(q.filter_fleet(running, query), query)
        else:
            part = store.decoded(export, query.profile_type)
            if part is not None:
                values[bucket] += _total(q.filter_fleet(part, query), query)
    return [(edges[i], edges[i + 1], values[i]) for i in range(len(values))]


def _total(fleet: FleetProfiles, query: q.ProfileQuery) -> int:
    return sum(s.values[query.column] for hp in fleet.hosts.values() for s in hp.samples.values()
               if query.column < len(s.values) and s.values[query.column] > 0)
