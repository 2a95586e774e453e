"""Goroutine actor: live goroutines per start function and creation stack (bpf/goroutine.bpf.c).

Go processes are found among the processes the shared watcher (agent/process/watcher.py)
reports as started, every few seconds, before a flush's records are converted
(``track_started_processes``); each new Go binary gets
entry uprobes on ``runtime.newproc1`` and ``runtime.goexit1`` (once per binary: a uprobe on
a file covers every process running it) and each process its ``runtime.g`` offsets
(``startpc`` for exits, ``sched.bp`` for creation stacks: bpf/goroutine.bpf.c says why) in
the BPF ``go_procs`` map. Binaries of a Go release outside the checked range are not probed
(agent.runtimes.go.layout.unsupported_reason; counted as ``go_binaries_unsupported``). Creations
arrive with the creator's stack; exits are counted per start PC in the kernel. Live =
created - exited, per (process, start function, creation stack); when a start function was
created from several stacks, an exit is taken from the stack with the most live goroutines.

Reported as a snapshot every flush (profile type ``goroutine``, value = live count, the
aggregator keeps the latest): the leaf frame is the goroutine's start function, the rest is
where the ``go`` statement ran. Goroutines that existed before their process was probed
are not seen (counted from the moment of probing, like heap in-use after a restart).
Runtime-internal goroutines (start function in package ``runtime``, except runtime.main)
carry ``goroutine.system=true``, matching what ``runtime.NumGoroutine`` leaves out.

Alongside, every ``CURRENT_SCAN_INTERVAL_S`` the *current* stack of every goroutine is read
from the process's memory (agent.runtimes.go.goroutines, on this symbolization thread, never the
event loop). Both go out as the same profile type, told apart by the sample attribute
``goroutine.stack.kind`` = ``current`` | ``creation`` (docs/design/goroutine.md says why);
current stacks also carry ``goroutine.state``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import time
from collections import Counter
from typing import Any

from agent.actors.base import ActorContext, BpfActor
from agent.actors.sources import RingBufferSource
from agent.bpf.layouts import GoProc, GoroutineCounter
from agent.bpf.loader import BCC_LOCK
from agent.process.procmaps import FileKey
from agent.process.watcher import ProcessSubscription
from agent.runtimes.go.buildinfo import GoRuntimeInfo, go_runtime_info
from agent.runtimes.go.goroutines import GoroutineReader, ReadStats
from agent.runtimes.go.pclntab import GoSymbolTable
from agent.runtimes.go.probes import attach_go_probe
from shared.model import Frame, FrameType, Sample
from shared.profile_types import ProfileType

log = logging.getLogger(__name__)
DISCOVERY_INTERVAL_S = 2.0
CURRENT_SCAN_INTERVAL_S = 1.0
GO_FORMS_MAX = 65_536  # frames whose Go form is kept (~250 B each with the frame)
# Binaries known not to be Go (executable FileKeys): forgotten all at once past this many, so a
# host that keeps building new binaries costs a re-check now and then, not ever more memory.
MAX_NOT_GO = 16_384
StackKey = tuple[Frame, ...]
AttrKey = tuple[tuple[str, str], ...]


@dataclasses.dataclass
class _GoProcess:
    info: GoRuntimeInfo
    comm: str
    exe_path: str
    exe: FileKey
    # start PC -> creation stack -> live goroutines
    live: dict[int, Counter[StackKey]] = dataclasses.field(default_factory=dict)
    start_frames: dict[int, Frame] = dataclasses.field(default_factory=dict)
    reported: set[tuple[int, StackKey]] = dataclasses.field(default_factory=set)
    reader: GoroutineReader | None = None
    reported_current: set[tuple[StackKey, AttrKey]] = dataclasses.field(default_factory=set)
    # start PC -> exits counted so far (the kernel's counts are cumulative, see _apply_exits)
    exits_seen: dict[int, int] = dataclasses.field(default_factory=dict)


class GoroutineActor(BpfActor[bytes]):
    """Tracks goroutine creation/exit in every Go process on the host; creations come through
    a ring buffer (with the creator's stack, no Python frames: Go programs)."""

    profile_type = ProfileType.GOROUTINE
    bpf_source = "goroutine.bpf.c"

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx, RingBufferSource.of(ctx, self.profile_type))
        self._started: ProcessSubscription | None = None
        self._processes: dict[int, _GoProcess] = {}
        # Go binaries with uprobes attached -> bcc's event names of those uprobes (detached with
        # the binary's last process, so a host that runs many Go binaries does not keep every
        # one probed and pinned in the kernel).
        self._probed_binaries: dict[FileKey, list[bytes]] = {}
        self._not_go: set[FileKey] = set()
        self._discovered = 0.0
        self._scanned = 0.0
        # Symbol tables of Go binaries with a live process (each holds a descriptor, arrays of
        # hundreds of KB and caches: dropped with the binary's last process).
        self._tables: dict[FileKey, GoSymbolTable | None] = {}
        # Each symbolized frame's Go form, by the frame object's identity (the symbolizer hands
        # out the same object for an address it resolved before): the current-stack scan turns
        # every goroutine stack's frames into Go frames once a second. The frame is kept with its
        # Go form, so its id cannot be reused while the entry lives.
        self._go_forms: dict[int, tuple[Frame, str, Frame]] = {}

    def period(self) -> int:
        return 1

    def attach(self, bpf: Any) -> None:
        pass  # uprobes are attached per Go binary as processes are discovered

    # -- discovery ---------------------------------------------------------------------------
    def track_started_processes(self) -> None:
        """Probe the Go processes among those started since the last look (every
        DISCOVERY_INTERVAL_S)."""
        now = time.monotonic()
        if now - self._discovered < DISCOVERY_INTERVAL_S:
            return
        self._discovered = now
        if self._started is None:
            self._started = self.subscribe_to_processes()  # the first take: every live process
        changes = self._started.take()
        started = changes.started if changes.complete else \
            {pid: changes.snapshot.keys[pid] for pid in changes.snapshot.alive - set(self._processes)}
        own = os.getpid()
        for pid, key in started.items():
            if pid in self._processes or pid == own or key is None or key.exe is None:
                continue  # known, ourselves, unreadable, or a kernel thread
            exe = key.exe
            if exe in self._not_go:
                continue
            info = go_runtime_info(f"/proc/{pid}/exe", exe)
            if info is None:
                self._remember_not_go(exe)
                continue
            if info.unsupported:  # logged once per binary by go_runtime_info; counted once here
                self.ctx.counters.inc("go_binaries_unsupported", reason=info.unsupported)
                self._remember_not_go(exe)
                continue
            self._probe(pid, info, exe)

    def forget_exited_processes(self) -> None:
        """Forget exited processes (after their last records were converted), and detach the
        uprobes of binaries whose last process is gone."""
        if self.bpf is None or not self._processes:
            return
        alive = self.ctx.processes.current().alive
        for pid in set(self._processes) - alive:
            gone = self._processes.pop(pid)
            if gone.reader is not None:
                gone.reader.close()
            try:
                del self.bpf["go_procs"][ctypes.c_uint32(pid)]
            except KeyError:
                pass
        running = {proc.exe for proc in self._processes.values()}
        for exe in [e for e in self._tables if e not in running]:
            del self._tables[exe]
        for exe in [e for e in self._probed_binaries if e not in running]:
            self._unprobe(exe)

    def _unprobe(self, exe: FileKey) -> None:
        """Detach a binary's uprobes: its last process is gone."""
        self._detach(self._probed_binaries.pop(exe))
        self.ctx.counters.inc("go_binaries_unprobed")

    def _detach(self, events: list[bytes]) -> None:
        """Detach uprobes by bcc event name; failures are counted and logged."""
        with BCC_LOCK:
            for event in events:
                try:
                    self.bpf.detach_uprobe_event(event)
                except Exception as exc:  # bcc raises plain Exception
                    self.ctx.counters.inc("errors", kind="uprobe_detach")
                    log.warning("cannot detach uprobe %s: %s", event.decode(errors="replace"), exc)

    def _remember_not_go(self, exe: FileKey) -> None:
        if len(self._not_go) >= MAX_NOT_GO:
            self._not_go.clear()
        self._not_go.add(exe)

    def _probe(self, pid: int, info: GoRuntimeInfo, exe: FileKey) -> None:
        path = os.path.realpath(f"/proc/{pid}/exe")
        if exe not in self._probed_binaries:
            with BCC_LOCK:
                before = set(self.bpf.uprobe_fds)
                try:
                    for sym, fn in (("runtime.newproc1", "on_newproc1"), ("runtime.goexit1", "on_goexit1")):
                        attach_go_probe(self.bpf, path, info, sym, fn, pid=-1)
                except Exception as exc:
                    failure: Exception | None = exc
                else:
                    failure = None
                events = [e for e in self.bpf.uprobe_fds if e not in before]
            if failure is not None:
                log.warning("cannot probe Go binary %s (pid %d): %s", path, pid, failure)
                self.ctx.counters.inc("go_processes_skipped", reason="uprobe_failed")
                self._remember_not_go(exe)
                self.ctx.counters.inc("errors", kind=type(failure).__name__)
                self._detach(events)  # the half that did attach
                return
            self._probed_binaries[exe] = events
        layout = info.g_layout
        if info.startpc_offset is None:
            self.ctx.counters.inc("go_processes_without_exit_tracking")
        if layout is not None or info.startpc_offset is not None:
            procs = self.bpf["go_procs"]
            procs[ctypes.c_uint32(pid)] = GoProc(startpc=info.startpc_offset or 0,
                                                 sched_bp=layout.sched_bp if layout is not None else 0)
        self._processes[pid] = _GoProcess(info, self.ctx.symbolizer.process_name(pid), path, exe,
                                          reader=self._reader(pid, info, exe))
        self.ctx.counters.inc("go_processes_probed")

    def _reader(self, pid: int, info: GoRuntimeInfo, exe: FileKey) -> GoroutineReader | None:
        """A current-stack reader for ``pid``, or None (counted) when its Go is not supported."""
        if info.g_layout is None or not info.allgs:
            self.ctx.counters.inc("go_processes_without_current_stacks", reason="layout_unknown")
            return None
        if exe not in self._tables:
            try:
                self._tables[exe] = GoSymbolTable.from_elf(f"/proc/{pid}/exe")
            except Exception as exc:  # unusual file: no current stacks, creation profile still works
                self.ctx.counters.inc("errors", kind=type(exc).__name__)
                self._tables[exe] = None
        table = self._tables[exe]
        if table is None:
            return None
        try:
            return GoroutineReader(pid, table, info.g_layout, info.allgs)
        except OSError:
            self.ctx.counters.inc("go_processes_without_current_stacks", reason="mem_unreadable")
            return None

    # -- events ------------------------------------------------------------------------------
    def read_bpf_counters(self) -> None:
        self.count_drops(self.counter_deltas(), {GoroutineCounter.RING_FULL: "ringbuf_full",
                                                 GoroutineCounter.EXITS_MAP_FULL: "exit_map_full"})

    def _go_frames(self, frames: tuple[Frame, ...], exe_path: str) -> tuple[Frame, ...]:
        """Frames in the Go binary itself are Go frames (cgo libraries stay native)."""
        forms = self._go_forms
        if len(forms) > GO_FORMS_MAX:
            forms.clear()
        out = []
        for f in frames:
            known = forms.get(id(f))
            if known is None or known[0] is not f or known[1] != exe_path:
                go = f.mapping is not None and f.mapping.filename == exe_path
                known = forms[id(f)] = (f, exe_path, dataclasses.replace(f, frame_type=FrameType.GO) if go else f)
            out.append(known[2])
        return tuple(out)

    def to_samples(self, records: list[bytes]) -> list[Sample]:
        if self.bpf is None:
            return []
        ctx = self.ctx
        for ev in self.parsed(records):
            proc = self._processes.get(ev.pid)
            if proc is None:
                continue
            creator = self._go_frames(self.frames(ev), proc.exe_path)
            # The creator's stack starts inside the runtime (newproc1 <- systemstack <- newproc):
            # keep from the function with the `go` statement outwards.
            while len(creator) > 1 and creator[0].function.startswith("runtime."):
                creator = creator[1:]
            proc.live.setdefault(ev.aux, Counter())[creator] += 1
            if ev.aux not in proc.start_frames:
                start = ctx.symbolizer.symbolize_user(ev.pid, [ev.aux])[-1]  # an entry PC: never inlined
                proc.start_frames[ev.aux] = self._go_frames((start,), proc.exe_path)[0]
        self._apply_exits()
        out = self._snapshot()
        now = time.monotonic()
        if now - self._scanned >= CURRENT_SCAN_INTERVAL_S:
            self._scanned = now
            out.extend(self._current_snapshot())
        return out

    def _apply_exits(self) -> None:
        """Take the goroutines that exited since the last flush off their creation stacks.

        The kernel's per-(process, start PC) exit counts only grow: each flush takes the
        difference to what it saw last. Reading and then deleting an entry would lose the
        exits counted between the two; an entry is deleted only when its process is gone.
        """
        exits = self.bpf["exits"]
        counters = self.ctx.counters
        for key, value in list(exits.items()):
            proc = self._processes.get(key.tgid)
            if proc is None:  # the process has exited (or was never probed by this actor)
                try:
                    del exits[key]
                except KeyError:
                    pass
                continue
            total = int(value.value)
            new = total - proc.exits_seen.get(key.start_pc, 0)
            proc.exits_seen[key.start_pc] = total
            stacks = proc.live.get(key.start_pc)
            for _ in range(new):
                if not stacks:
                    counters.inc("goroutine_exits_unmatched")  # created before probing
                    continue
                stack, _n = stacks.most_common(1)[0]
                stacks[stack] -= 1
                if stacks[stack] <= 0:
                    del stacks[stack]

    def _current_snapshot(self) -> list[Sample]:
        """Current stacks of every goroutine of every probed process, grouped by stack and state."""
        now = self.ctx.clock.to_unix_ns(time.monotonic_ns())
        counters = self.ctx.counters
        out: list[Sample] = []
        for pid, proc in self._processes.items():
            if proc.reader is None:
                continue
            stats = ReadStats()
            try:
                goroutines = proc.reader.read(stats)
            except OSError as exc:
                counters.inc("goroutine_read_errors", reason="allgs_not_found" if "allgs" in str(exc) else "read")
                if "allgs" in str(exc):
                    proc.reader.close()
                    proc.reader = None
                continue
            for name in ("truncated", "unreadable", "over_limit"):
                if getattr(stats, name):
                    counters.inc("goroutine_stacks_" + name, getattr(stats, name))
            # Group by (pcs, whether they are unwound, state, start, truncated): goids differ.
            by_stack: Counter[tuple[tuple[int, ...], bool, str, str, bool]] = Counter()
            for g in goroutines:
                if g.pcs:
                    by_stack[(g.pcs, True, g.state, g.start, g.truncated)] += 1
                elif g.start_pc:  # running: only its start function is known
                    by_stack[((g.start_pc,), False, g.state, g.start, g.truncated)] += 1
                else:
                    counters.inc("goroutines_without_stack", state=g.state)
            current: dict[tuple[StackKey, AttrKey], int] = {}
            for (pcs, unwound, state, start, truncated), count in by_stack.items():
                frames = self._current_frames(pid, proc, pcs, leaf_is_return_address=unwound)
                attrs = self._attributes(proc, start, start.startswith("runtime.") and start != "runtime.main",
                                         "current")
                attrs["goroutine.state"] = state
                if truncated:
                    attrs["goroutine.stack.truncated"] = "true"
                key = (frames, tuple(sorted(attrs.items())))
                current[key] = current.get(key, 0) + count
            for (frames, attr_key), count in current.items():
                out.append(Sample(now, 0, pid, pid, proc.comm, proc.comm, frames, (count,), dict(attr_key)))
            # Stacks that no goroutine has any more report 0 once, so the latest snapshot is right.
            for frames, attr_key in proc.reported_current - set(current):
                out.append(Sample(now, 0, pid, pid, proc.comm, proc.comm, frames, (0,), dict(attr_key)))
            proc.reported_current = set(current)
        return out

    def _current_frames(self, pid: int, proc: _GoProcess, pcs: tuple[int, ...],
                        leaf_is_return_address: bool) -> StackKey:
        # The symbolizer looks up a leaf address as is and the others at address - 1 (call
        # sites); a parked goroutine's leaf is a return address too, so pass its call site.
        addresses = [pcs[0] - 1, *pcs[1:]] if leaf_is_return_address else list(pcs)
        return self._go_frames(self.ctx.symbolizer.symbolize_user(pid, addresses), proc.exe_path)

    def _snapshot(self) -> list[Sample]:
        now = self.ctx.clock.to_unix_ns(time.monotonic_ns())
        out = []
        for pid, proc in self._processes.items():
            current: set[tuple[int, StackKey]] = set()
            for start_pc, stacks in proc.live.items():
                start = proc.start_frames.get(start_pc)
                if start is None:
                    continue
                system = start.function.startswith("runtime.") and start.function != "runtime.main"
                for stack, count in stacks.items():
                    current.add((start_pc, stack))
                    out.append(self._sample(now, pid, proc, start, stack, count, system))
            # A stack whose goroutines all exited reports 0 once, so the latest snapshot is right.
            for start_pc, stack in proc.reported - current:
                start = proc.start_frames[start_pc]
                out.append(self._sample(now, pid, proc, start, stack, 0, start.function.startswith("runtime.")))
            proc.reported = current
        return out

    @staticmethod
    def _attributes(proc: _GoProcess, start: str, system: bool, kind: str) -> dict[str, str]:
        attrs = {"goroutine.start": start, "goroutine.system": "true" if system else "false",
                 "goroutine.stack.kind": kind}
        if proc.info.build_id:
            attrs["process.executable.build_id.go"] = proc.info.build_id
        if proc.info.go_version:
            attrs["process.runtime.version"] = proc.info.go_version
        return attrs

    def _sample(self, now: int, pid: int, proc: _GoProcess, start: Frame, stack: StackKey, count: int,
                system: bool) -> Sample:
        attrs = self._attributes(proc, start.function, system, "creation")
        return Sample(now, 0, pid, pid, proc.comm, proc.comm, (start, *stack), (count,), attrs)

