"""A SampleSink that adds each process's metadata attributes before passing samples on."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

from agent.actors.base import SampleSink
from agent.metadata.resolver import MetadataResolver
from shared.counters import Counters
from shared.model import Coded, Sample, SampleColumns, numbering
from shared.profile_types import ProfileType
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class MetadataSink(SampleSink):
    """Decorates the publisher: resolves new pids in a thread, then enriches in place.

    Attributes a sample already has (type-specific ones such as ``lock.address``) win over
    process metadata of the same key.
    """

    def __init__(self, inner: SampleSink, resolver: MetadataResolver, counters: Counters,
                 add_attributes: bool = True, own_network_namespace_only: bool = False) -> None:
        self.inner = inner
        self.resolver = resolver
        self.counters = counters
        self.add_attributes = add_attributes
        # Scoped agents (one per network namespace: a "host" that shares the kernel with
        # others, as in a netns test bed or a per-tenant sidecar) keep only their own processes.
        self.own_netns = os.stat("/proc/self/ns/net").st_ino if own_network_namespace_only else None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.resolver.kubelet is not None:
            await asyncio.to_thread(self.resolver.refresh_kubelet)
            self._tasks.append(asyncio.create_task(self._kubelet_loop(), name="kubelet-refresh"))
        await asyncio.to_thread(self.resolver.scan)
        if self.resolver.processes is not None:  # resolve right after each of the watcher's scans
            self.resolver.processes.after_each_scan(self.resolver.scan)
        else:
            self._tasks.append(asyncio.create_task(self._scan_loop(), name="metadata-scan"))

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self.resolver.close()

    async def _scan_loop(self) -> None:
        """New processes are resolved within a scan interval of starting, while they live
        (without the agent's process watcher; with it, after each of its scans)."""
        while True:
            await asyncio.sleep(self.resolver.settings.scan_interval_s)
            await asyncio.to_thread(self.resolver.scan)

    async def _kubelet_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resolver.settings.kubelet_refresh_s)
            await asyncio.to_thread(self.resolver.refresh_kubelet)

    async def submit(self, profile_type: ProfileType, samples: Sequence[Sample], period: int) -> None:
        if isinstance(samples, SampleColumns):
            return await self._submit_columns(profile_type, samples, period)
        stale = self.resolver.stale((s.pid, s.process_name) for s in samples)
        if stale:
            await asyncio.to_thread(self.resolver.resolve_many, stale)
        if self.own_netns is not None:
            kept = [s for s in samples if self.resolver.network_namespace(s.pid) == self.own_netns]
            if len(kept) != len(samples):
                self.counters.inc("samples_out_of_scope", len(samples) - len(kept), type=profile_type.value)
            samples = kept
        if self.add_attributes:
            for s in samples:
                attrs = self.resolver.cached(s.pid)
                if attrs:
                    s.attributes = {**attrs, **s.attributes} if s.attributes else dict(attrs)
        if samples:
            await self.inner.submit(profile_type, samples, period)

    async def _submit_columns(self, profile_type: ProfileType, columns: SampleColumns, period: int) -> None:
        """The same for a batch held in columns: each distinct (pid, process name) is looked
        at once, and every sample of a process refers to that process's one attributes dict
        (CPU samples have no attributes of their own: a sample that has some keeps them, first
        merged over the process's)."""
        stale = self.resolver.stale(_processes(columns))
        if stale:
            await asyncio.to_thread(self.resolver.resolve_many, stale)
        if self.own_netns is not None:
            in_scope = {pid: self.resolver.network_namespace(pid) == self.own_netns for pid in set(columns.pids)}
            if not all(in_scope.values()):
                keep = list(map(in_scope.__getitem__, columns.pids))
                self.counters.inc("samples_out_of_scope", len(keep) - sum(keep), type=profile_type.value)
                columns = columns.select(keep)
        if self.add_attributes:
            pids = dict.fromkeys(columns.pids)
            by_pid = [self.resolver.cached(pid) or {} for pid in pids]
            if any(by_pid):  # encoded: each process's one dict, then a code per sample
                process_attrs = Coded(by_pid, list(map(numbering(pids).__getitem__, columns.pids)))
                own = columns.attributes
                columns.attributes = process_attrs if own is None else [
                    {**p, **a} if a else p for p, a in zip(process_attrs.decoded(), own, strict=True)]
        if len(columns):
            await self.inner.submit(profile_type, columns, period)


def _processes(columns: SampleColumns) -> list[tuple[int, str]]:
    """The batch's distinct (pid, process name) pairs, in order: from an encoded name column,
    the pairs of pids and codes first (few: the CPU profile codes names by process)."""
    names = columns.column("process_names")
    if isinstance(names, Coded):
        return [(pid, names.values[code]) for pid, code in dict.fromkeys(zip(columns.pids, names.codes, strict=True))]
    return list(dict.fromkeys(zip(columns.pids, names, strict=True)))
