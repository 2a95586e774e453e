"""Per-process metadata attributes, resolved from /proc (and the kubelet) and cached.

Resolution reads small /proc files (cgroup, comm, exe link, environ), so it runs in a thread;
the cache makes it once per process per ``cache_ttl_s``. Unreadable processes (gone, or not
permitted) are counted and get no attributes rather than failing a batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from agent.metadata.cgroup import parse_cgroup_file
from agent.metadata.kubelet import KubeletPods, PodInfo
from agent.metadata.service_name import ProcessFacts, service_name
from agent.metadata.settings import MetadataSettings
from agent.process.procmaps import YOUNG_PROCESS_S, age_s, start_time
from agent.process.watcher import ProcessSubscription, ProcessWatcher, running_pids
from shared.counters import Counters

log = logging.getLogger(__name__)

# A process younger than YOUNG_PROCESS_S may still exec: its entry is re-checked after
# YOUNG_TTL_S instead of the configured TTL.
YOUNG_TTL_S = 1.0

# environ can be large (and is attacker-controlled in size); services are named in the first part.
MAX_ENVIRON_BYTES = 256 * 1024


def read_environ(pid: int, proc: str = "/proc") -> dict[str, str]:
    """The process's initial environment (what it was started with)."""
    with open(f"{proc}/{pid}/environ", "rb") as f:
        raw = f.read(MAX_ENVIRON_BYTES)
    env: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def process_age_s(pid: int, proc: str = "/proc") -> float:
    """Seconds since the process started; inf if unknown (gone, or no stat in ``proc``)."""
    try:
        return age_s(start_time(pid, proc))
    except (OSError, ValueError, IndexError):
        return float("inf")


def executable_name(exe_link: str) -> str:
    """Base name of a process's /proc/PID/exe target, without the " (deleted)" the kernel
    appends for a replaced or unlinked file (memfd executables, upgraded binaries)."""
    return os.path.basename(exe_link.removesuffix(" (deleted)"))


class MetadataResolver:
    """pid -> sample attributes, with a bounded, time-limited cache."""

    def __init__(self, settings: MetadataSettings, counters: Counters, proc: str = "/proc",
                 processes: ProcessWatcher | None = None) -> None:
        """``processes``: the agent's shared process watcher, whose scans list the processes
        (without it ``proc`` is listed at each scan)."""
        self.settings = settings
        self.counters = counters
        self.proc = proc
        self.processes = processes
        self.kubelet = KubeletPods(settings) if settings.kubelet_url else None
        self._kubelet_generation = 0
        # The scan thread and the sink's resolutions both write the cache.
        self._lock = threading.Lock()
        # pid -> (expires at, kubelet generation used, process name seen, attributes, when the
        # resolution began reading /proc). The name is the sample's process name at resolution:
        # a different name later means the pid was reused or the process exec'd, and the entry is
        # resolved again. The start time orders concurrent resolutions (scan thread, sink): the
        # one that read /proc last wins, so a scan that read a process just before its exec cannot
        # overwrite what the sink read after it.
        self._cache: OrderedDict[int, tuple[float, int, str, dict[str, str], float]] = OrderedDict()
        # pid -> network namespace inode (for agents scoped to their own network namespace)
        self._netns: dict[int, int] = {}
        self._subscription: ProcessSubscription | None = None  # what the watcher saw start

    def network_namespace(self, pid: int) -> int | None:
        """Inode of the process's network namespace as last resolved; None if unknown."""
        return self._netns.get(pid)

    def cached(self, pid: int) -> dict[str, str] | None:
        """The attributes last resolved for ``pid``; None if it never was (or was evicted).

        An expired entry still answers: expiry only makes ``stale`` ask for a new resolution.
        A batch looks its processes up after resolving the stale ones in a thread, and an
        entry that was fresh when ``stale`` looked may expire meanwhile (a young process's
        lives one second); its samples must still carry what was read, not nothing."""
        entry = self._cache.get(pid)
        return entry[3] if entry is not None else None

    def stale(self, processes: Iterable[tuple[int, str]]) -> dict[int, str]:
        """Of (pid, process name) pairs, those needing resolution: unknown, expired or renamed."""
        now = time.monotonic()
        out: dict[int, str] = {}
        for pid, name in processes:
            e = self._cache.get(pid)
            if e is None or e[0] < now or (name and e[2] and e[2] != name):
                out[pid] = name
        return out

    def refresh_kubelet(self) -> None:
        """Blocking: re-read the kubelet's pods; entries waiting for a pod name get re-resolved."""
        if self.kubelet is not None and self.kubelet.refresh():
            self._kubelet_generation += 1
            self.counters.inc("kubelet_refreshes", result="ok")
            # Processes whose pod was not listed yet are looked up again with the new list: their
            # entries expire now (kept, so samples meanwhile still carry the pod uid).
            with self._lock:
                for pid, (_, gen, name, attrs, began) in list(self._cache.items()):
                    if "k8s.pod.uid" in attrs and "k8s.pod.name" not in attrs and gen < self._kubelet_generation:
                        self._cache[pid] = (0.0, gen, name, attrs, began)
        elif self.kubelet is not None:
            self.counters.inc("kubelet_refreshes", result="failed")

    def scan(self) -> int:
        """Blocking: resolve the processes that appeared in /proc since the last scan (and any
        alive but never resolved); returns how many.

        Resolving at first sight matters: samples reach the publisher after symbolization, by
        which time a short-lived process may be gone, and its cgroup and environment with it.
        A process resolved before is not read again here when its entry expires: a process
        that exec'd is a new one to the watcher (reported as started), and the samples of a
        long-lived one renew its entry when they find it expired (``stale``), so the scan's
        cost follows how many processes start, not how many run.
        """
        try:
            if self.processes is not None:
                if self._subscription is None:
                    self._subscription = self.processes.subscribe()
                # Right after the watcher's own scan (after_each_scan), or one at most half a
                # scan interval old.
                changes = self._subscription.take(self.settings.scan_interval_s / 2)
                pids = set(changes.snapshot.alive)
                started = set(changes.started) & pids if changes.complete else set()
            else:
                pids = running_pids(self.proc)
                started = set()
        except OSError as exc:
            self.counters.inc("metadata_scan_failed", reason=type(exc).__name__)
            return 0
        now = time.monotonic()
        if self.processes is not None:
            todo = list(started | (pids - self._cache.keys()))
        else:
            todo = [p for p in pids if (e := self._cache.get(p)) is None or e[0] < now]
        self.resolve_many(todo)
        with self._lock:
            # Exited processes are kept for one more TTL: their last samples may still be on
            # their way through symbolization.
            grace = self.settings.cache_ttl_s
            for pid in [p for p, e in self._cache.items() if e[0] + grace < now and p not in pids]:
                del self._cache[pid]
                self._netns.pop(pid, None)
        return len(todo)

    def close(self) -> None:
        """Stop following the process watcher."""
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def resolve_many(self, processes: dict[int, str] | Iterable[int]) -> None:
        """Blocking: resolve and cache each pid (under the process name samples showed, if any).

        A process that cannot be read any more keeps what was resolved while it lived.
        """
        named = processes if isinstance(processes, dict) else dict.fromkeys(processes, "")
        now = time.monotonic()
        for pid, name in named.items():
            began = time.monotonic()
            young = process_age_s(pid, self.proc) < YOUNG_PROCESS_S
            expires = now + (YOUNG_TTL_S if young else self.settings.cache_ttl_s)
            resolved, comm = self.resolve(pid)
            with self._lock:
                newer = self._cache.get(pid)
                if newer is not None and newer[4] > began:  # another thread read /proc after us
                    self.counters.inc("metadata_resolutions_superseded")
                    continue
                if resolved is None:
                    old = self._cache.get(pid)
                    resolved = old[3] if old is not None else {}
                    expires = now + self.settings.cache_ttl_s  # gone: nothing new to learn
                self._cache[pid] = (expires, self._kubelet_generation, name or comm, resolved, began)
                self._cache.move_to_end(pid)
                while len(self._cache) > self.settings.max_cached_processes:
                    evicted, _ = self._cache.popitem(last=False)
                    self._netns.pop(evicted, None)

    def resolve(self, pid: int) -> tuple[dict[str, str] | None, str]:
        """Blocking: (attributes or None when unreadable, the process's comm)."""
        try:
            with open(f"{self.proc}/{pid}/cgroup") as f:
                cgroup = parse_cgroup_file(f.read())
            with open(f"{self.proc}/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError as exc:
            self.counters.inc("metadata_unreadable", reason=type(exc).__name__)
            return None, ""
        try:
            netns = os.stat(f"{self.proc}/{pid}/ns/net").st_ino
            with self._lock:
                self._netns[pid] = netns
        except OSError:
            pass
        try:
            exe = executable_name(os.readlink(f"{self.proc}/{pid}/exe"))
        except OSError:
            exe = ""  # kernel threads and zombies have no exe
        try:
            environ = read_environ(pid, self.proc)
        except OSError as exc:
            self.counters.inc("metadata_environ_unreadable", reason=type(exc).__name__)
            environ = {}
        attrs: dict[str, str] = {}
        if exe:  # the semantic conventions' process.executable.name: not the 15-character comm
            attrs["process.executable.name"] = exe
        pod: PodInfo | None = None
        if cgroup.container_id:
            attrs["container.id"] = cgroup.container_id
        if cgroup.pod_uid:
            attrs["k8s.pod.uid"] = cgroup.pod_uid
            pod = self.kubelet.pods.get(cgroup.pod_uid) if self.kubelet else None
        container_name = ""
        if pod is not None:
            attrs["k8s.pod.name"] = pod.name
            attrs["k8s.namespace.name"] = pod.namespace
            container_name = pod.containers.get(cgroup.container_id, "")
            if container_name:
                attrs["k8s.container.name"] = container_name
        facts = ProcessFacts(comm, exe, cgroup.path, environ,
                             pod.name if pod else "", pod.namespace if pod else "", container_name,
                             tuple(sorted(pod.labels.items())) if pod else ())
        name, source = service_name(self.settings, facts)
        if name:
            attrs["service.name"] = name
            self.counters.inc("service_names", source=source.split(":")[0])
        return attrs, comm
