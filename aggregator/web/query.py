"""What the web page asks for: a profile type, a time range and filters -> a merged profile.

Blocking (reads and parses retained exports): the server calls these from worker threads.
The merged profile is the same ``FleetProfiles`` the exporters take, so the downloads reuse
the pprof and OTLP encoders unchanged and match the flame graph sample for sample.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aggregator.exporters.pprof import unknown_frame_label
from aggregator.otlp.decode import merge_request, profile_column
from aggregator.profile import AggregatedSample, FleetProfiles, HostProfile
from aggregator.web.store import RetainedExports
from shared.lock_waits import LOCK_WAIT_KIND, is_contention
from shared.model import Frame
from shared.profile_types import PROFILE_TYPES, ProfileType

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_SINCE = "15m"


class QueryError(ValueError):
    """A request parameter that cannot be understood; the message is shown to the user."""


@dataclass(frozen=True, slots=True)
class ProfileQuery:
    """One view: which profile type and value column, when, and which hosts/processes."""

    profile_type: ProfileType
    since_ns: int
    until_ns: int
    hosts: frozenset[str] = field(default_factory=frozenset)
    service: str | None = None  # see sample_service()
    pid: int | None = None
    column: int = 0
    # Sample label filters: (key, accepted values); "*" accepts any value. See keeps_labels.
    labels: tuple[tuple[str, frozenset[str]], ...] = ()

    def keeps(self, host: str, service: str, pid: int) -> bool:
        return ((not self.hosts or host in self.hosts)
                and (self.service is None or service == self.service)
                and (self.pid is None or pid == self.pid))

    def keeps_labels(self, attributes: tuple[tuple[str, str], ...]) -> bool:
        """Every label filter accepts the sample's value; with no filter on the wait kind, a
        lock view keeps lock contention only (shared/lock_waits.py)."""
        values = dict(attributes)
        for key, accepted in self.labels:
            if "*" not in accepted and values.get(key) not in accepted:
                return False
        if self.profile_type == ProfileType.LOCK and not any(key == LOCK_WAIT_KIND for key, _ in self.labels):
            return is_contention(attributes)
        return True


def sample_service(s: AggregatedSample) -> str:
    """The sample's ``service.name`` (set by the agent from the process's environment, pod
    label or rules), else the process's executable name."""
    for key, value in s.attributes:
        if key == "service.name":
            return value
    return s.process_name


def parse_time(text: str, now_ns: int) -> int:
    """``now``, a duration back from now (``90s``, ``15m``, ``2h``, ``1d``), unix seconds or ISO 8601."""
    text = text.strip()
    if text in ("", "now"):
        return now_ns
    m = _DURATION.match(text)
    if m:
        return now_ns - int(float(m.group(1)) * _UNITS_S[m.group(2)] * 1e9)
    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"not a time: {text!r} (use now, 15m, 2h, unix seconds or ISO 8601)") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # a browser's datetime-local is the user's local time
    return int(dt.timestamp() * 1e9)


def parse_query(get: Callable[[str], str | None], get_all: Callable[[str], list[str]],
                now_ns: int | None = None) -> ProfileQuery:
    """Build a query from request parameters (``get``/``get_all`` read the query string)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    type_name = get("type") or ProfileType.CPU.value
    try:
        ptype = ProfileType(type_name)
    except ValueError:
        raise QueryError(f"unknown profile type {type_name!r}; one of {[t.value for t in ProfileType]}") from None
    since = parse_time(get("since") or DEFAULT_SINCE, now_ns)
    until = parse_time(get("until") or "now", now_ns)
    if since > until:
        raise QueryError("since is after until")
    pid_text = get("pid")
    try:
        pid = int(pid_text) if pid_text else None
    except ValueError:
        raise QueryError(f"pid must be a number, not {pid_text!r}") from None
    column = _column(ptype, get("value"))
    hosts = frozenset(h for value in get_all("host") for h in value.split(",") if h)
    return ProfileQuery(ptype, since, until, hosts, get("service") or None, pid, column,
                        parse_labels(get_all("label")))


def parse_labels(values: list[str]) -> tuple[tuple[str, frozenset[str]], ...]:
    """``label=key=value[,value...]`` parameters (repeatable; values of one key are
    alternatives, keys must all match); ``key=*`` accepts any value, e.g.
    ``label=lock.wait.kind=*`` for every lock wait instead of contention only."""
    accepted: dict[str, set[str]] = {}
    for text in values:
        key, sep, rest = text.partition("=")
        if not sep or not key or not rest:
            raise QueryError(f"label filter must be key=value, not {text!r}")
        accepted.setdefault(key, set()).update(v for v in rest.split(",") if v)
    return tuple((key, frozenset(v)) for key, v in sorted(accepted.items()))


def _column(ptype: ProfileType, value: str | None) -> int:
    names = [vt.type for vt in PROFILE_TYPES[ptype].sample_types]
    if not value:
        return 0
    if value in names:
        return names.index(value)
    raise QueryError(f"{ptype.value} has values {names}, not {value!r}")


def load_fleet(store: RetainedExports, query: ProfileQuery) -> tuple[FleetProfiles, int]:
    """Merge the retained exports in range (oldest first) and keep what the filters select.

    Returns the filtered profiles and how many exports were read.
    """
    fleet = FleetProfiles(start_ns=query.since_ns, end_ns=query.until_ns)
    exports = store.list(query.since_ns, query.until_ns)
    read = 0
    # Types with snapshot (gauge) columns merge from the requests: whether an export carried a
    # gauge column for a sample decides if it replaces the value, and the decoded form loses that.
    from_parts = not PROFILE_TYPES[query.profile_type].snapshot_columns
    for export in exports:
        if from_parts:
            part = store.decoded(export, query.profile_type)
            if part is not None:
                _add_part(fleet, part)
                read += 1
            continue
        req = store.load(export)
        if req is not None:
            merge_request(fleet, req, query.profile_type)
            read += 1
    return filter_fleet(fleet, query), read


def _add_part(fleet: FleetProfiles, part: FleetProfiles) -> None:
    """Sum one decoded export (cached, so copied, never shared) into ``fleet``."""
    for key, hp in part.hosts.items():
        into = fleet.hosts.get(key)
        if into is None:
            into = HostProfile(hp.host, hp.profile_type, hp.start_ns, hp.end_ns, hp.period,
                               dict(hp.resource_attributes))
            fleet.hosts[key] = into
        else:
            into.start_ns, into.end_ns = min(into.start_ns, hp.start_ns), max(into.end_ns, hp.end_ns)
        samples = into.samples
        for sample_key, s in hp.samples.items():
            agg = samples.get(sample_key)
            if agg is None:
                samples[sample_key] = AggregatedSample(s.frames, s.pid, s.tid, s.thread_name, s.process_name, s.cpu,
                                                       s.attributes, list(s.values), list(s.timestamps_ns))
            else:
                agg.values = [a + b for a, b in zip(agg.values, s.values, strict=True)]
                agg.timestamps_ns.extend(s.timestamps_ns)


def filter_fleet(fleet: FleetProfiles, query: ProfileQuery) -> FleetProfiles:
    """Only the hosts and processes the query selects (profiles left empty are dropped)."""
    out = FleetProfiles(fleet.start_ns, fleet.end_ns)
    for (host, ptype), hp in fleet.hosts.items():
        if ptype != query.profile_type or (query.hosts and host not in query.hosts):
            continue
        samples = {k: s for k, s in hp.samples.items()
                   if query.keeps(host, sample_service(s), s.pid) and query.keeps_labels(s.attributes)}
        if samples:
            out.hosts[(host, ptype)] = HostProfile(host, ptype, hp.start_ns, hp.end_ns, hp.period,
                                                   dict(hp.resource_attributes), samples)
    return out


def labels(fleet: FleetProfiles) -> dict[str, Any]:
    """Hosts, services and processes present, for the page's selectors."""
    hosts: set[str] = set()
    processes: dict[tuple[str, int, str], int] = {}
    services: set[str] = set()
    for (host, _), hp in fleet.hosts.items():
        hosts.add(host)
        for s in hp.samples.values():
            key = (host, s.pid, s.process_name)
            processes[key] = processes.get(key, 0) + 1
            services.add(sample_service(s))
    return {
        "hosts": sorted(hosts),
        "services": sorted(name for name in services if name),
        "processes": [{"host": h, "pid": p, "name": n} for h, p, n in sorted(processes)],
    }


def frame_name(frame: Frame) -> str:
    """The label of a frame: its function, or address and file when it has no symbol."""
    return frame.function or unknown_frame_label(frame)


def flamegraph(fleet: FleetProfiles, query: ProfileQuery, min_fraction: float = 1e-4) -> dict[str, Any]:
    """d3-flame-graph's input: ``{name, value, self, children}``, root = all, then process, then frames.

    ``value`` is the node's total (itself and everything it called), ``self`` its own share.
    Frames smaller than ``min_fraction`` of the total are folded into their caller (their
    value counts there as self) so the JSON stays small for wide profiles.
    """
    root: dict[str, Any] = {"name": "all", "value": 0, "children": {}}
    for hp in fleet.hosts.values():
        if hp.profile_type != query.profile_type:
            continue
        for s in hp.samples.values():
            value = s.values[query.column] if query.column < len(s.values) else 0
            if value <= 0:
                continue
            node = root
            node["value"] += value
            for name in _path(s.process_name, s.pid, reversed(s.frames)):
                child = node["children"].get(name)
                if child is None:
                    child = node["children"][name] = {"name": name, "value": 0, "children": {}}
                child["value"] += value
                node = child
    return _finish(root, root["value"] * min_fraction)


def _path(process_name: str, pid: int, frames_root_first: Iterable[Frame]) -> Iterable[str]:
    yield process_name or f"pid {pid}"
    for f in frames_root_first:
        yield frame_name(f)


def _finish(node: dict[str, Any], threshold: float) -> dict[str, Any]:
    kept = [_finish(c, threshold) for c in node["children"].values() if c["value"] >= threshold]
    kept.sort(key=lambda c: -c["value"])
    node["children"] = kept
    node["self"] = node["value"] - sum(c["value"] for c in kept)
    return node


def comparison(get: Callable[[str], str | None], get_all: Callable[[str], list[str]], query: ProfileQuery,
               now_ns: int | None = None) -> ProfileQuery | None:
    """The baseline of a diff view: ``query`` with ``compare_since``/``compare_until`` and/or
    ``compare_host`` in place of its range/hosts; None when no ``compare_*`` parameter is given."""
    since, until = get("compare_since"), get("compare_until")
    hosts = frozenset(h for value in get_all("compare_host") for h in value.split(",") if h)
    if not (since or until or hosts):
        return None
    now_ns = time.time_ns() if now_ns is None else now_ns
    since_ns = parse_time(since, now_ns) if since else query.since_ns
    until_ns = parse_time(until, now_ns) if until else query.until_ns
    if since_ns > until_ns:
        raise QueryError("compare_since is after compare_until")
    return ProfileQuery(query.profile_type, since_ns, until_ns, hosts or query.hosts, query.service, query.pid,
                        query.column, query.labels)


def add_deltas(tree: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Mark every node of ``tree`` with ``delta``: its total minus the baseline's, the baseline
    scaled to the same grand total (so a longer range or a busier host is not "all red").

    Positive means the function takes a larger share in ``tree`` than in ``baseline``; frames
    only in the baseline are not drawn (the flame graph has the shape of ``tree``).
    """
    scale = tree["value"] / baseline["value"] if baseline["value"] else 0.0

    def walk(node: dict[str, Any], base: dict[str, Any] | None) -> None:
        node["delta"] = round(node["value"] - (base["value"] * scale if base else 0))
        children = {c["name"]: c for c in base["children"]} if base else {}
        for child in node["children"]:
            walk(child, children.get(child["name"]))

    walk(tree, baseline)


def present_types(store: RetainedExports, since_ns: int, until_ns: int) -> set[ProfileType]:
    """Profile types that have any data in range (read from the exports' sample types)."""
    found: set[ProfileType] = set()
    for export in store.list(since_ns, until_ns):
        req = store.load(export)
        if req is None:
            continue
        strings = req.dictionary.string_table
        for rp in req.resource_profiles:
            for sp in rp.scope_profiles:
                for prof in sp.profiles:
                    column = profile_column(strings, prof)
                    if column is not None and prof.samples:
                        found.add(column[0])
    return found
