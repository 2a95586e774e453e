"""One memory budget in bytes for the agent's caches that grow with what the host runs.

The wire encoders' dictionaries, the symbolizer's address and frame caches, the CPython
frame caches and the CPU actor's symbolized stacks each fill with the stacks of every
process the host starts. Bounded one by one, their bounds add up to more than the agent's
memory target on a host that churns processes (docs/design/overhead.md, "One memory budget
for the caches"). Here they share one budget: each cache holds a :class:`BudgetShare`, a
fixed part of the budget, charges an estimated size when it adds an entry (never on a hit,
so the per-sample paths stay as they are) and evicts its oldest or least recently used
entries when its share is spent. Every eviction is counted: ``cache_evictions{cache=...}``
(entries) and ``cache_evicted_bytes{cache=...}`` (estimated bytes).

The sizes are estimates per kind of entry, measured with tracemalloc on real entries (each
constant says how); what a share has charged is an upper bound of what its cache holds
(entries dropped without telling the share, e.g. with an exited process, are found at the
next recount), so the caches together stay under the budget whatever the process churn.

:class:`PerProcessEntries` is the bookkeeping for caches kept as one plain dict per process
instance (the symbolizer's frames, the CPython frames): a dict lookup per hit, and the
process's LRU order decides whose entries go first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

from shared.counters import Counters

# What the caches may hold together. The rest of an agent with cpu,wall,lock,goroutine is
# estimated at ~140 MB on a quiet host (interpreter and imports, bcc and its four modules, file
# pages, BPF maps, the allocator's working set: docs/design/overhead.md, "One memory budget
# for the caches"), so the caches get what is left under 150 MB, with the allocator's
# overhead on top of the estimates.
DEFAULT_BUDGET_BYTES = 16 * 1024 * 1024
# Parts of the budget per cache (they add up to 1). The wire dictionaries hold one table per
# profile type; the CPU actor's stacks see every new stack and keep 2 generations.
DEFAULT_SHARES: dict[str, float] = {
    "wire_dictionaries": 0.35,
    "cpu_stacks": 0.25,
    "symbol_frames": 0.15,
    "symbol_addresses": 0.15,
    "python_frames": 0.10,
}
# A per-process cache over its share is trimmed to this part of it, so one trim (a recount
# over the processes) makes room for many entries, not one.
LOW_WATER = 0.75


class BudgetShare:
    """One cache's part of the budget: what it has charged, and its evictions, counted."""

    __slots__ = ("_counters", "evicted_entries", "limit", "name", "used")

    def __init__(self, name: str, limit: int, counters: Counters) -> None:
        self.name = name
        self.limit = limit
        self.used = 0
        self.evicted_entries = 0
        self._counters = counters

    @property
    def over(self) -> bool:
        return self.used > self.limit

    def charge(self, nbytes: int) -> bool:
        """Charge one new entry's estimated bytes; True when the share is now spent (evict)."""
        self.used += nbytes
        return self.used > self.limit

    def release(self, nbytes: int) -> None:
        """Entries the cache dropped for another reason than the budget (exited process, expiry)."""
        self.used = max(0, self.used - nbytes)

    def evicted(self, entries: int, nbytes: int) -> None:
        """Entries the cache dropped to stay within its share: counted, and their bytes freed."""
        if entries <= 0:
            return
        self.used = max(0, self.used - nbytes)
        self.evicted_entries += entries
        self._counters.inc("cache_evictions", entries, cache=self.name)
        self._counters.inc("cache_evicted_bytes", nbytes, cache=self.name)


class MemoryBudget:
    """The agent's cache budget, split into one :class:`BudgetShare` per cache."""

    def __init__(self, total_bytes: int = DEFAULT_BUDGET_BYTES, counters: Counters | None = None,
                 shares: dict[str, float] | None = None) -> None:
        self.total_bytes = total_bytes
        self.counters = counters or Counters()
        fractions = shares or DEFAULT_SHARES
        if sum(fractions.values()) > 1.0 + 1e-9:
            raise ValueError("the caches' shares add up to more than the whole budget")
        self._shares = {name: BudgetShare(name, int(total_bytes * part), self.counters)
                        for name, part in fractions.items()}

    def share(self, name: str) -> BudgetShare:
        return self._shares[name]

    @property
    def accounted(self) -> int:
        """Bytes charged by all caches together (never more than ``total_bytes`` after each
        cache's eviction step)."""
        return sum(s.used for s in self._shares.values())

    def snapshot(self) -> dict[str, int]:
        """Charged bytes per cache, for logs and benchmarks."""
        return {name: s.used for name, s in self._shares.items()}


class PerProcessEntries:
    """Cached entries kept in one plain dict per process instance, charged to one share.

    ``dicts_oldest_first`` gives every live process's dict, least recently used process
    first (the owner's own LRU order). Over the share, the dicts are recounted (processes
    evicted or forgotten took theirs along) and the least recently used processes' dicts
    are emptied until the share is down to ``LOW_WATER``: their hot entries come back at
    their next sample.
    """

    def __init__(self, share: BudgetShare, entry_bytes: int,
                 dicts_oldest_first: Callable[[], Iterable[Sized]]) -> None:
        self.share = share
        self.entry_bytes = entry_bytes
        self._dicts = dicts_oldest_first

    def added(self) -> None:
        """One entry was added to some process's dict."""
        if self.share.charge(self.entry_bytes):
            self._trim()

    def dropped(self, entries: Sized) -> None:
        """A process's dict is gone with its process (not an eviction)."""
        self.share.release(len(entries) * self.entry_bytes)

    def _trim(self) -> None:
        dicts: list[Any] = list(self._dicts())
        self.share.used = sum(map(len, dicts)) * self.entry_bytes
        if not self.share.over:
            return
        target = int(self.share.limit * LOW_WATER)
        for held in dicts:
            if self.share.used <= target:
                break
            n = len(held)
            if n:
                held.clear()
                self.share.evicted(n, n * self.entry_bytes)


class BudgetCollector:
    """The budget's charged bytes per cache as the gauge ``<namespace>_cache_budget_bytes``
    (and the budget itself, ``cache="total"``), read at each scrape."""

    def __init__(self, budget: MemoryBudget, namespace: str) -> None:
        self.budget = budget
        self.name = f"{namespace}_cache_budget_bytes"

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        gauge = GaugeMetricFamily(self.name, "bytes charged to the cache memory budget per cache", labels=["cache"])
        for cache, used in self.budget.snapshot().items():
            gauge.add_metric([cache], float(used))
        gauge.add_metric(["total"], float(self.budget.total_bytes))
        yield gauge
