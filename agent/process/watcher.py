"""Which processes run on the host: the one /proc scanner the agent's parts share.

:class:`ProcessWatcher` scans /proc once per interval (in a worker thread, never on the event
loop) and keeps, for every process, its :class:`~agent.process.procmaps.ProcessKey`. A scan
lists the directory only when /proc/loadavg says a process or thread was created or reaped
since the last listing; otherwise it re-reads only the keys of processes that may still exec. Parts
that need to know about processes subscribe (:meth:`ProcessWatcher.subscribe`) and take what
changed since they last looked (:meth:`ProcessSubscription.take`): the processes that started
(or exec'd), those that exited, and the whole set alive now. Consumers run on their own
threads at their own pace, so changes are held per subscriber, bounded: past the bound a
subscriber is told to rebuild from the alive set instead (``complete=False``).

While scans find nothing changed, the periodic scan backs off (``QUIET_INTERVAL_S``); the
processes of new CPU stacks wake it at once (:meth:`ProcessWatcher.nudge`).

With a process selector (agent/process/selectors.py) the scan also matches every live
process against it, once for all the actors that filter by it (wall, lock, heap).

"A running process" means the same everywhere: a numeric entry of /proc, which is a
thread-group id (threads are not listed at its top level). A process whose key cannot be read
(not permitted, malformed stat) is counted (``process_watch_unreadable``) and logged, and
kept with no key; one that is gone before it is read is simply not listed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

from agent.process.procmaps import CLOCK_TICKS, YOUNG_PROCESS_S, ProcessKey, read_proc_file
from agent.thread_names import name_os_thread
from shared.counters import Counters

if TYPE_CHECKING:  # selectors list processes with running_pids, below
    from agent.process.selectors import ProcessSelector

log = logging.getLogger(__name__)

SCAN_INTERVAL_S = 1.0
# While scans find nothing that came, went or may still exec, the periodic scan backs off,
# doubling its wait up to this: such a scan only confirms the last one, and waking a thread
# to do so costs ~0.25 ms on an idle VM (docs/design/overhead.md), a fifth of the agent's
# fixed work at 99 Hz. Any change brings the wait back to the scan interval, a process's
# first CPU samples wake the scan at once (:meth:`ProcessWatcher.nudge`), and consumers that
# need a fresher view scan on demand (:meth:`ProcessWatcher.current`).
QUIET_INTERVAL_S = 4.0
# Changes held for one subscriber between two takes; past this it rebuilds from the alive set.
MAX_PENDING_CHANGES = 65_536


def running_pids(proc: str = "/proc") -> set[int]:
    """Tgids of the processes in ``proc`` now; raises OSError when ``proc`` cannot be listed."""
    return {int(name) for name in os.listdir(proc) if name.isdigit()}


@dataclass(frozen=True)
class ProcessSnapshot:
    """The processes alive at one scan."""

    alive: frozenset[int]
    # pid -> key (None: unreadable); every pid of ``alive`` is here.
    keys: dict[int, ProcessKey | None]
    # The alive processes the watcher's selector matches; None without a selector.
    selected: frozenset[int] | None
    scanned_at: float  # time.monotonic() of the scan


@dataclass(frozen=True)
class ProcessChanges:
    """What changed since a subscriber last looked.

    A pid that exec'd is in both ``exited`` and ``started`` (under its new key); one that
    started and exited between two takes may be in both too. ``complete`` is False when more
    changed than the subscriber's bound holds: then ``started``/``exited`` are empty and the
    subscriber rebuilds its view from ``snapshot.alive``.
    """

    started: dict[int, ProcessKey | None]
    exited: frozenset[int]
    snapshot: ProcessSnapshot
    complete: bool = True


@dataclass(eq=False)  # compared by identity: two subscribers with the same changes are two
class ProcessSubscription:
    """One subscriber's pending changes; filled by the watcher's scans, emptied by ``take``."""

    watcher: ProcessWatcher
    max_pending: int = MAX_PENDING_CHANGES
    _started: dict[int, ProcessKey | None] = field(default_factory=dict)
    _exited: set[int] = field(default_factory=set)
    _overflowed: bool = False

    def _add(self, started: dict[int, ProcessKey | None], exited: set[int]) -> None:
        """Called by the watcher under its lock."""
        if self._overflowed:
            return
        self._started.update(started)
        self._exited |= exited
        if len(self._started) + len(self._exited) > self.max_pending:
            self._started.clear()
            self._exited.clear()
            self._overflowed = True
            self.watcher.counters.inc("process_watch_overflows")

    def take(self, max_age_s: float = SCAN_INTERVAL_S) -> ProcessChanges:
        """What changed since the last take (scanning first, in this thread, when the latest
        scan is older than ``max_age_s``: blocking, never call it on the event loop)."""
        snapshot = self.watcher.current(max_age_s)
        with self.watcher.lock:
            changes = ProcessChanges(self._started, frozenset(self._exited), self.watcher.latest or snapshot,
                                     not self._overflowed)
            self._started, self._exited, self._overflowed = {}, set(), False
        return changes

    def close(self) -> None:
        self.watcher.unsubscribe(self)


class ProcessWatcher:
    """Scans /proc at most once per ``interval_s`` for everyone; thread-safe."""

    def __init__(self, counters: Counters, selector: ProcessSelector | None = None,
                 interval_s: float = SCAN_INTERVAL_S, proc: str = "/proc",
                 quiet_interval_s: float = QUIET_INTERVAL_S) -> None:
        self.counters = counters
        self.selector = selector if selector is not None and selector.filters else None
        self.interval_s = interval_s
        self.quiet_interval_s = max(interval_s, quiet_interval_s)
        # Whether the last scan found nothing changed and nothing to read again (its fast path).
        self.last_scan_quiet = False
        self._wake = threading.Event()  # a nudge, or the periodic scan's stop
        self.proc = proc
        self.lock = threading.Lock()  # guards the snapshot and the subscriptions
        self._scan_lock = threading.Lock()  # one scan at a time
        self.latest: ProcessSnapshot | None = None
        self._subscriptions: list[ProcessSubscription] = []
        self._unreadable: set[int] = set()  # counted and logged once each, while they live
        # Processes whose key is read again at every scan: young ones (a child between fork and
        # exec, a shell about to exec its command) and unreadable ones.
        self._recheck: set[int] = set()
        self._fingerprint: tuple[int, int] | None = None
        self._fingerprint_usable = same_pid_namespace(proc)
        self.listings = 0  # scans that listed the directory (the others found nothing changed)
        self._after_scan: list[Callable[[], object]] = []

    def subscribe(self) -> ProcessSubscription:
        """A new subscriber; its first take reports every process alive as started."""
        subscription = ProcessSubscription(self)
        with self.lock:
            if self.latest is not None:
                subscription._add(dict(self.latest.keys), set())
            self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: ProcessSubscription) -> None:
        with self.lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

    def current(self, max_age_s: float | None = None) -> ProcessSnapshot:
        """The latest snapshot, scanning first (blocking, in this thread) when there is none or
        it is older than ``max_age_s`` (default: the scan interval)."""
        max_age = self.interval_s if max_age_s is None else max_age_s
        latest = self.latest
        if latest is not None and time.monotonic() - latest.scanned_at < max_age:
            return latest
        return self.scan()

    def scan(self) -> ProcessSnapshot:
        """List /proc now and tell the subscribers what changed (blocking).

        When /proc/loadavg says no process or thread was created or reaped since the last
        listing (:func:`proc_fingerprint`), the listing is skipped: only the processes that may
        still exec (young or unreadable ones) are read again."""
        with self._scan_lock:
            # Read before listing: a process created in between changes the next fingerprint.
            fingerprint = proc_fingerprint(self.proc) if self._fingerprint_usable else None
            previous = self.latest.keys if self.latest is not None else {}
            if fingerprint is not None and fingerprint == self._fingerprint and self.latest is not None:
                if not self._recheck and self.selector is None:
                    # Nothing came or went and nothing may still exec: the same processes
                    # (a selector is matched again every scan: a process can change its name).
                    snapshot = replace(self.latest, scanned_at=time.monotonic())
                    with self.lock:
                        self.latest = snapshot
                    self.last_scan_quiet = True
                    return snapshot
                alive, candidates = set(previous), self._recheck & set(previous)
            else:
                try:
                    alive = running_pids(self.proc)
                except OSError as exc:  # /proc unreadable: keep the last view, say so
                    self.counters.inc("process_watch_failed", reason=type(exc).__name__)
                    log.warning("cannot list %s: %s", self.proc, exc)
                    if self.latest is not None:
                        return self.latest
                    alive = set()
                candidates = {pid for pid in alive if pid not in previous} | (self._recheck & alive)
                self.listings += 1
            self._fingerprint = fingerprint
            self.last_scan_quiet = False
            keys = {pid: previous[pid] for pid in alive if pid in previous}
            started: dict[int, ProcessKey | None] = {}
            exited = set(previous) - alive
            young_after = young_since_ticks()
            for pid in candidates:
                known = pid in previous
                old = previous.get(pid)
                read = self._read_key(pid)
                if read is _GONE:  # exited between the listing and the read
                    keys.pop(pid, None)
                    if known:
                        exited.add(pid)
                    continue
                key = cast("ProcessKey | None", read)
                keys[pid] = key
                if known and key == old:
                    continue
                if known:
                    exited.add(pid)  # exec'd: the old instance is gone, a new one started
                started[pid] = key
            self._recheck = {pid for pid, key in keys.items() if key is None or key.start_ticks > young_after}
            selected = None
            if self.selector is not None:
                selected = frozenset(pid for pid in keys if self.selector.matches(pid))
            snapshot = ProcessSnapshot(frozenset(keys), keys, selected, time.monotonic())
            self._unreadable &= snapshot.alive
            with self.lock:
                self.latest = snapshot
                for subscription in self._subscriptions:
                    subscription._add(started, exited)
            return snapshot

    def _read_key(self, pid: int) -> object:
        """The pid's key; None when unreadable (counted and logged once per process); _GONE if it
        exited."""
        try:
            return ProcessKey.read(pid, self.proc)
        except (FileNotFoundError, ProcessLookupError):
            return _GONE
        except (OSError, ValueError, IndexError) as exc:
            if pid not in self._unreadable:
                self._unreadable.add(pid)
                self.counters.inc("process_watch_unreadable", reason=type(exc).__name__)
                log.info("process %d: cannot read its start time: %s", pid, exc)
            return None

    def after_each_scan(self, follow_up: Callable[[], object]) -> None:
        """Run ``follow_up`` (blocking) on the watcher's thread right after each periodic scan:
        a consumer that looks at every scan (the metadata resolver) then costs no wake-up and
        no thread hop of its own, and never asks for a second listing."""
        self._after_scan.append(follow_up)

    def nudge(self, pids: set[int]) -> None:
        """Scan now (on the periodic scan's thread) if one of ``pids`` is not in the latest
        scan: called with the processes of new stacks (the CPU profile's poll thread), so a
        process is read while it lives even when the periodic scan has backed off."""
        latest = self.latest
        if latest is not None and not pids - latest.keys.keys():
            return
        self._wake.set()

    def _scan_and_follow_up(self) -> None:
        self.scan()
        for follow_up in self._after_scan:
            try:
                follow_up()
            except Exception:  # one consumer's bug must not stop the scans or the others
                self.counters.inc("errors", kind="process_watch_follow_up")
                log.exception("after-scan step %r failed", follow_up)

    async def run(self, stop: asyncio.Event) -> None:
        """Scan every ``interval_s`` on a thread of its own until ``stop`` is set, each scan
        followed by the steps registered with :meth:`after_each_scan`.

        The thread sleeps between scans and never calls back into the event loop (subscribers
        take changes under :attr:`lock`): a scan that finds nothing changed costs one thread
        wake-up, not a hop to a worker thread and back to the loop."""
        halt = threading.Event()
        thread = threading.Thread(target=self._scan_every_interval, args=(halt,), name="process-watch",
                                  daemon=True)
        thread.start()
        try:
            await stop.wait()
        finally:
            halt.set()
            self._wake.set()
            await asyncio.to_thread(thread.join)

    def _scan_every_interval(self, halt: threading.Event) -> None:
        name_os_thread()
        wait = self.interval_s
        while not halt.is_set():
            try:
                self._scan_and_follow_up()
            except Exception:  # a bug here must not stop the agent: the consumers scan on demand
                self.counters.inc("errors", kind="process_watch")
                log.exception("process scan failed")
                self.last_scan_quiet = False
            wait = next_wait(wait, self.last_scan_quiet, self.interval_s, self.quiet_interval_s)
            self._wake.wait(wait)
            self._wake.clear()


_GONE = object()


def next_wait(previous_s: float, quiet: bool, interval_s: float, quiet_interval_s: float) -> float:
    """The periodic scan's next wait: doubled after a quiet scan (up to ``quiet_interval_s``),
    the scan interval after any other."""
    return min(2 * previous_s, quiet_interval_s) if quiet else interval_s


def young_since_ticks() -> float:
    """Start time (clock ticks since boot) after which a process counts as young."""
    return (time.clock_gettime(time.CLOCK_BOOTTIME) - YOUNG_PROCESS_S) * CLOCK_TICKS


def proc_fingerprint(proc: str = "/proc") -> tuple[int, int] | None:
    """(threads on the host, the last pid handed out) from ``proc``/loadavg; None if unreadable.

    Both change whenever a process or thread is created (a new pid) or reaped (one thread
    fewer), and neither changes otherwise: equal fingerprints mean /proc lists the same
    processes (a pid would have to wrap around the whole pid space between two reads to
    repeat). Exec changes neither: the watcher re-reads young processes' keys for that.
    """
    try:
        fields = read_proc_file(f"{proc}/loadavg").split()
        return int(fields[3].split(b"/")[1]), int(fields[4])
    except (OSError, IndexError, ValueError):
        return None


def same_pid_namespace(proc: str) -> bool:
    """Whether ``proc`` shows the agent's own pid namespace: loadavg's last pid is the reader's
    namespace's, so it says something about ``proc``'s processes only then.

    Compared by namespace when pid 1's can be read; otherwise (a sandbox may deny reading
    pid 1's namespace links even to root) by ``proc``'s ``self``, which names the reader's own
    pid as that namespace numbers it: the same number as ``os.getpid()`` in the reader's
    namespace, and a missing or other number in any other."""
    try:
        return os.readlink(f"{proc}/1/ns/pid") == os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    try:
        return os.readlink(f"{proc}/self") == str(os.getpid())
    except OSError:
        return False
