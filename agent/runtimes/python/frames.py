"""CPython frames in every profile: which processes run Python, and splicing their frames in.

:class:`PythonProcesses` (one per agent) decides per process whether it runs CPython and
keeps what reading it takes; :class:`PythonStacks` (one per BPF program) tells its
program's ``py_procs`` map about those processes and turns the frames BPF recorded into
``cpython`` frames placed where the interpreter ran them.

Placement: each call of the evaluation loop (``_PyEval_EvalFrameDefault``) runs a run of
Python frames that ends, outermost, with an *entry* frame. Walking the native stack from
the leaf, the k-th evaluation-loop frame is replaced by the k-th such run, so C code called
from Python sits above the Python function that called it and Python called from C sits
above that C function. Runs left over when the native stack is cut short go outermost.

Everything here runs on the agent's single symbolization thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from agent.bpf.layouts import PyStatus
from agent.memory_budget import MemoryBudget, PerProcessEntries
from agent.process.memory import ProcessMemory
from agent.process.procmaps import ProcessKey
from agent.runtimes.python.code import BadObject, CodeReader
from agent.runtimes.python.linetable import line_for_offset
from agent.runtimes.python.process import FileCache, PythonProcess, UnsupportedPython, find_python
from shared.counters import Counters
from shared.model import Frame, FrameType

log = logging.getLogger(__name__)

OWNED_BY_CSTACK = 3  # 3.12+ _PyInterpreterFrame.owner of the shim each evaluation-loop call pushes
# The python_stacks counter's status label per bpf/stack_event.h enum py_status.
PY_STATUS: dict[int, str] = {PyStatus.NOT_PYTHON: "not_python", PyStatus.OK: "ok",
                             PyStatus.NO_THREAD: "no_thread_state", PyStatus.TRUNCATED: "truncated"}
IDENTITY_CHECK_S = 1.0  # a recycled PID (or an exec) is noticed within this
NEGATIVE_TTL_S = 10.0  # a process found not to run Python is looked at again after this
UNKNOWN_FRAME = "[unknown python frame]"
# Estimated bytes of one cached Python frame, charged to the cache budget
# (agent/memory_budget.py): its (code address, offset) key tuple with two large ints, the
# Frame (96 B, sys.getsizeof) and the dict slot; the names are the code object's, shared
# by its frames. Measured with tracemalloc on 20,000 entries made as _frame makes them (2,000
# code objects, ten offsets each): 218 B.
PYTHON_FRAME_ENTRY_BYTES = 220
UNREADABLE_RETRY_S = 2.0  # a code object that failed to read is read again after this


@dataclass
class _Entry:
    key: ProcessKey
    process: PythonProcess | None
    checked: float
    reader: CodeReader | None = None
    # This process instance's Python frames by (code address, offset): a plain dict per
    # process, bounded over all processes by PythonProcesses' share of the cache budget.
    frames: dict[tuple[int, int], Frame] = field(default_factory=dict)
    # Code addresses whose read failed (freed, torn): code address -> when to try again.
    unreadable: dict[int, float] = field(default_factory=dict)


class PythonProcesses:
    """Which processes run CPython (by ProcessKey), bounded LRU."""

    def __init__(self, counters: Counters | None = None, capacity: int = 4096,
                 budget: MemoryBudget | None = None) -> None:
        self.counters = counters or Counters()
        self.capacity = capacity
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._files = FileCache()
        # Python frames held in the entries (_Entry.frames), least recently used process first out.
        self.frames = PerProcessEntries((budget or MemoryBudget(counters=self.counters)).share("python_frames"),
                                        PYTHON_FRAME_ENTRY_BYTES, lambda: [e.frames for e in self._entries.values()])

    def lookup(self, pid: int) -> _Entry | None:
        """The entry for a live ``pid`` (looked at once, negatives again after a while)."""
        now = time.monotonic()
        entry = self._entries.get(pid)
        if entry is not None and now - entry.checked < (IDENTITY_CHECK_S if entry.process else NEGATIVE_TTL_S):
            self._entries.move_to_end(pid)
            return entry
        try:
            key = ProcessKey.read(pid)
        except (OSError, ValueError, IndexError):
            return entry  # gone: what we knew while it lived still reads its samples
        if entry is not None and entry.key == key and entry.process is not None:
            entry.checked = now
            return entry
        entry = self._probe(pid, key, now)
        self._entries[pid] = entry
        if len(self._entries) > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            _close(evicted)
        return entry

    def sweep_exited(self, grace_s: float = NEGATIVE_TTL_S) -> int:
        """Forget processes gone from /proc for ``grace_s`` (closing their memory readers, which
        hold an open /proc/PID/mem and a code cache); returns how many."""
        now = time.monotonic()
        gone = [pid for pid, e in self._entries.items()
                if now - e.checked > grace_s and not os.path.exists(f"/proc/{pid}")]
        for pid in gone:
            entry = self._entries.pop(pid)
            self.frames.dropped(entry.frames)
            _close(entry)
        return len(gone)

    def _probe(self, pid: int, key: ProcessKey, now: float) -> _Entry:
        old = self._entries.pop(pid, None)
        if old is not None:
            _close(old)
        try:
            process = find_python(pid, self._files)
        except UnsupportedPython as exc:
            self.counters.inc("python_processes", result="unsupported")
            log.info("pid %d: %s is not supported; its stacks stay native", pid, exc)
            return _Entry(key, None, now + 3600)  # not again for an hour
        except OSError:
            self.counters.inc("python_processes", result="unreadable")
            return _Entry(key, None, now)
        if process is None:
            return _Entry(key, None, now)
        try:
            reader = CodeReader(ProcessMemory(pid), process.offsets)
        except OSError:
            self.counters.inc("python_processes", result="unreadable")
            return _Entry(key, None, now)
        self.counters.inc("python_processes", result="found")
        log.info("pid %d runs CPython %d.%d (%s)", pid, *process.version, process.path)
        return _Entry(key, process, now, reader)


def _close(entry: _Entry) -> None:
    if entry.reader is not None:
        entry.reader.memory.close()


class PythonStacks:
    """One BPF program's view: keeps its ``py_procs`` map filled, splices frames."""

    def __init__(self, processes: PythonProcesses, py_procs: Any, counters: Counters, type_name: str) -> None:
        self.processes = processes
        self.table = py_procs
        self.counters = counters
        self.type_name = type_name
        self._written: dict[int, ProcessKey | None] = {}

    def announce(self, pid: int) -> None:
        """Make sure BPF reads Python frames of ``pid`` from its next sample on."""
        entry = self.processes.lookup(pid)
        process_key = entry.key if entry is not None and entry.process is not None else None
        if self._written.get(pid, ()) == process_key:
            return
        self._written[pid] = process_key
        if len(self._written) > 4 * self.processes.capacity:
            self._written.clear()
        if self.table is None:
            return
        key = self.table.Key(pid)
        if process_key is None or entry is None or entry.process is None:
            try:
                del self.table[key]
            except KeyError:
                pass
            return
        leaf = self.table.Leaf()
        process = entry.process
        leaf.runtime = process.runtime
        leaf.version = process.version[0] * 100 + process.version[1]
        for name, value in process.offsets.bpf_fields().items():
            setattr(leaf, name, value)
        try:
            self.table[key] = leaf
        except Exception as exc:  # map full: counted, this process keeps native stacks
            self.counters.inc("python_processes", result="bpf_map_full")
            log.debug("py_procs update for %d failed: %s", pid, exc)

    def note_repeat(self, pid: int, status: int) -> None:
        """What ``splice`` does besides splicing, for a stack whose result was cached upstream."""
        self.announce(pid)
        if status:
            self.counters.inc("python_stacks", type=self.type_name, status=PY_STATUS.get(status, "other"))

    def splice(self, pid: int, native: tuple[Frame, ...], records: tuple[tuple[int, int, int], ...],
               status: int) -> tuple[Frame, ...]:
        """``native`` (leaf first) with the evaluation-loop frames replaced by Python frames."""
        self.note_repeat(pid, status)
        if not records:
            return native
        entry = self.processes.lookup(pid)
        if entry is None or entry.process is None or entry.reader is None:
            return native
        runs = self._runs(entry, records)
        process = entry.process
        out: list[Frame] = []
        used = 0
        for frame in native:
            if used < len(runs) and process.in_eval_loop(frame):
                out.extend(runs[used])
                used += 1
            else:
                out.append(frame)
        for run in runs[used:]:
            out.extend(run)
        return tuple(out)

    def _runs(self, entry: _Entry, records: tuple[tuple[int, int, int], ...]) -> list[list[Frame]]:
        """Python frames grouped by evaluation-loop call, innermost first.

        How a call's outermost (entry) frame is marked differs: up to 3.10 every frame is its
        own call; 3.11 flags it (``is_entry``); 3.12+ puts a shim frame owned by the C
        stack just outside it, which is not a Python frame and is dropped.
        """
        assert entry.process is not None
        version = entry.process.version
        adaptive = entry.process.offsets.co_code_adaptive
        runs: list[list[Frame]] = [[]]
        for code, instr, marker in records:
            marker &= 0xFF
            if version >= (3, 12) and marker == OWNED_BY_CSTACK:
                if runs[-1]:
                    runs.append([])
                continue
            if version < (3, 11):
                # int f_lasti (the upper half of the 8 bytes read is the next field): -1 before
                # the first instruction; code units in 3.10, bytes before.
                lasti = instr & 0xFFFF_FFFF
                offset = -1 if lasti >= 0x8000_0000 else lasti * 2 if version >= (3, 10) else lasti
            else:
                offset = instr - code - adaptive
            runs[-1].append(self._frame(entry, code, offset))
            if version < (3, 11) or (version < (3, 12) and marker):
                runs.append([])
        if not runs[-1]:
            runs.pop()
        return runs

    def _frame(self, entry: _Entry, code: int, offset: int) -> Frame:
        key = (code, offset)
        frame = entry.frames.get(key)
        if frame is not None:
            return frame
        assert entry.process is not None and entry.reader is not None
        retry_at = entry.unreadable.get(code)
        if retry_at is not None and time.monotonic() < retry_at:
            self.counters.inc("python_frames_unreadable", type=self.type_name)
            return Frame(UNKNOWN_FRAME, "", 0, 0, FrameType.CPYTHON, None)
        try:
            info = entry.reader.code(code)
        except BadObject as exc:
            self.counters.inc("python_frames_unreadable", type=self.type_name)
            log.debug("pid %d: code object %#x: %s", entry.key.pid, code, exc)
            if len(entry.unreadable) >= 4096:
                entry.unreadable.clear()
            entry.unreadable[code] = time.monotonic() + UNREADABLE_RETRY_S
            return Frame(UNKNOWN_FRAME, "", 0, 0, FrameType.CPYTHON, None)
        known = 0 <= offset < 1 << 24  # else a torn read of the instruction pointer
        line = line_for_offset(entry.process.version, info.linetable, info.first_line, offset) if known else 0
        frame = Frame(info.name, info.filename, line or info.first_line, offset if known else 0,
                      FrameType.CPYTHON, None)
        entry.frames[key] = frame
        self.processes.frames.added()
        return frame
