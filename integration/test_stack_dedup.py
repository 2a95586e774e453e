"""Stacks deduplicated in the kernel (bpf/stack_dedup.h), on the real kernel, known answers.

The CPU actor runs alone (no NATS) at 199 Hz with the native unwinder while frame-pointer
workloads spin in known call chains; every record it receives is kept in ring order.

- Normal program: each (stack id, serial) arrives whole exactly once, before any id record
  naming it; id records outnumber whole stacks; every sample of a worker thread has the
  workload's chain.
- Forced collisions (every stack hashed to id 1) in a two-entry map, two different programs
  at once: the program detects the collisions (counted) and sends those stacks whole; no
  sample of one program ever carries a function of the other.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.actors.base import ActorContext, SampleSink
from agent.actors.cpu import CpuActor
from agent.bpf.layouts import CpuCounter, DedupFlags
from agent.bpf.loader import read_percpu_counters
from agent.bpf.records import parse_stack_event
from agent.bpf.ring_reader import RingItem, ring_records
from agent.bpf.sample_records import SAMPLE_RECORD
from agent.clock import MonotonicToUnix
from agent.runtimes.python.frames import PythonProcesses
from agent.settings import AgentSettings
from agent.symbols import Symbolizer
from agent.unwind.sharing import SharedUnwinding
from integration.harness import build_c
from shared.counters import Counters
from shared.model import FrameType, Sample, SampleColumns

SECONDS, HZ = 4.0, 199
MIN_ID_RECORDS, MAX_WAIT_S = 50, 30.0
CPU_CHAIN = ["hot_leaf", "middle", "outer", "run_thread"]
NOFP_CHAIN = ["hot_leaf", "chain_three", "chain_two", "chain_one", "main"]


@dataclass
class Run:
    records: list[bytes] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    bpf_counters: list[int] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    py_procs: list[int] = field(default_factory=list)  # the program's py_procs pids at the end


class _Sink(SampleSink):
    def __init__(self, run: Run) -> None:
        self.run = run

    async def submit(self, profile_type: Any, samples: list[Sample], period: int) -> None:
        self.run.samples.extend(samples)


def _id_records(run: Run, pid: int) -> int:
    return sum(1 for r in list(run.records) if len(r) == SAMPLE_RECORD.size and SAMPLE_RECORD.unpack_from(r)[3] == pid)


def _run_actor(extra_defines: dict[str, int | str], seconds: float, until_ids_of: int = 0,
               after_python_of: int = 0, **settings_overrides: Any) -> Run:
    """Run the actor for ``seconds``, then (up to MAX_WAIT_S) until ``until_ids_of``'s stacks
    come as id records: a process's first samples come whole, with their stack copy, until the
    unwinder has read its maps (seconds on a loaded machine). With ``after_python_of``, the
    ``seconds`` start once the actor has announced that CPython process to BPF (up to
    MAX_WAIT_S): its samples before carry no Python frames, and on a loaded machine the first
    batch can take seconds."""
    run = Run()

    class Actor(CpuActor):
        def bpf_defines(self) -> dict[str, int | str]:
            return {**super().bpf_defines(), **extra_defines}

        def to_samples(self, records: Sequence[RingItem]) -> SampleColumns:
            run.records.extend(ring_records(records))
            return super().to_samples(records)

    async def main() -> None:
        settings = AgentSettings(**{"frequency_hz": HZ, "flush_interval_s": 0.5, "cpu_stack_dedup": True,
                                    **settings_overrides})
        ctx = ActorContext(settings, Symbolizer(), ThreadPoolExecutor(1), _Sink(run), run.counters,
                           MonotonicToUnix(), python=PythonProcesses(run.counters),  # its counts in the run's
                           unwinding=SharedUnwinding(run.counters, settings.unwind_table_rows))
        actor = Actor(ctx)
        task = asyncio.ensure_future(actor.run())
        while actor.bpf is None and not task.done():
            await asyncio.sleep(0.05)
        waited = 0.0
        while after_python_of and not _announced(actor, after_python_of) and waited < MAX_WAIT_S:
            await asyncio.sleep(0.1)
            waited += 0.1
        await asyncio.sleep(seconds)
        waited = 0.0
        while until_ids_of and _id_records(run, until_ids_of) < MIN_ID_RECORDS and waited < MAX_WAIT_S:
            await asyncio.sleep(0.5)
            waited += 0.5
        if actor.bpf is not None:
            run.bpf_counters = read_percpu_counters(actor.bpf["counters"])
            run.py_procs = sorted(k.value for k in actor.bpf["py_procs"])
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    return run


def _announced(actor: CpuActor, pid: int) -> bool:
    """Whether ``pid`` is in the program's ``py_procs`` map (BPF reads its Python frames)."""
    bpf = actor.bpf
    return bpf is not None and bpf["py_procs"].Key(pid) in bpf["py_procs"]


def _has_chain(sample: Sample, chain: list[str]) -> bool:
    names = [f.function for f in sample.frames]
    return names[: len(chain)] == chain or any(names[i : i + len(chain)] == chain for i in range(len(names)))


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dedup")
    return build_c("cpu_chain.c", tmp), build_c("nofp_chain.c", tmp)


@pytest.fixture
def workloads(binaries: tuple[Path, Path]) -> Iterator[tuple[int, int]]:
    cpu_chain, nofp_chain = binaries
    lifetime = "600"  # killed at the end; BPF compiles take tens of seconds on a loaded machine
    procs = [subprocess.Popen([str(cpu_chain), lifetime, "1"], stdout=subprocess.DEVNULL),
             subprocess.Popen([str(nofp_chain), lifetime], stdout=subprocess.DEVNULL)]
    yield procs[0].pid, procs[1].pid
    for p in procs:
        p.kill()
        p.wait()


def test_each_stack_whole_once_then_ids(workloads: tuple[int, int]) -> None:
    chain_pid, _ = workloads
    run = _run_actor({}, SECONDS, until_ids_of=chain_pid)
    first_kind: dict[tuple[int, int], int] = {}
    whole = ids = 0
    for raw in run.records:
        _ts, stack_id, serial, pid, _tid, _cpu, flags, _comm = SAMPLE_RECORD.unpack_from(raw)
        if pid != chain_pid or flags == DedupFlags.UNSTORED:
            continue
        key = (stack_id, serial)
        if flags == DedupFlags.NEW:
            assert key not in first_kind or first_kind[key] != DedupFlags.NEW, "a stored stack sent whole twice"
            whole += 1
        else:
            ids += 1
        first_kind.setdefault(key, flags)
    # A whole record precedes the id records of its stack (unless the ring buffer dropped it:
    # then the stack came from the kernel map, counted).
    came_first_as_id = sum(1 for kind in first_kind.values() if kind == DedupFlags.ID_ONLY)
    assert came_first_as_id <= run.counters.get("cpu_stacks_from_kernel")
    assert ids > whole > 0, (ids, whole)
    # Samples that interrupted user mode (no kernel frames): the spinning chain, every one,
    # except those taken before the symbolizer could read the new process (all frames
    # unnamed, mapping unknown: never a wrong name).
    worker = [s for s in run.samples if s.pid == chain_pid and s.tid != chain_pid
              and not any(f.frame_type == "kernel" for f in s.frames)]
    named = [s for s in worker if any(f.function for f in s.frames)]
    assert named and all(_has_chain(s, CPU_CHAIN) for s in named), [
        [(f.function, hex(f.address)) for f in s.frames] for s in named if not _has_chain(s, CPU_CHAIN)][:3]
    assert len(named) >= 0.8 * len(worker), (len(named), len(worker))
    assert run.counters.get("events_dropped", type="cpu", reason="stack_unknown") == 0
    assert all(s.thread_name == "cpu_chain" for s in named)


def test_forced_collisions_counted_never_misattributed(workloads: tuple[int, int]) -> None:
    chain_pid, nofp_pid = workloads
    run = _run_actor({"STACK_ID_MASK": 0, "KNOWN_STACK_ENTRIES": 2}, SECONDS)
    assert run.bpf_counters[CpuCounter.STACK_COLLISIONS] > 0
    chain = [s for s in run.samples if s.pid == chain_pid]
    nofp = [s for s in run.samples if s.pid == nofp_pid]
    chain_only = {"run_thread", "outer", "middle"}
    nofp_only = {"chain_one", "chain_two", "chain_three"}
    assert chain and nofp
    assert not any(nofp_only & {f.function for f in s.frames} for s in chain)
    assert not any(chain_only & {f.function for f in s.frames} for s in nofp)
    assert any(_has_chain(s, CPU_CHAIN) for s in chain) and any(_has_chain(s, NOFP_CHAIN) for s in nofp)
    # Every record of one stack id is a whole stack or names the single stored one.
    assert {SAMPLE_RECORD.unpack_from(r)[1] for r in run.records} <= {0, 1}


def _agent_spin(stop: threading.Event, tids: list[int]) -> int:
    tids.append(threading.get_native_id())
    total = 0
    while not stop.is_set():
        for i in range(500):
            total += i * i
    return total


def test_the_agents_own_samples_keep_their_leaf_and_python_frames() -> None:
    """The agent (this process) is not unwound and its interpreter has no frame pointers: its
    samples carry the exact native leaf and its CPython frames, never the stack words a
    frame-pointer walk would take for return addresses. A thread of this process spinning in
    ``_agent_spin`` is sampled with that function as a CPython frame, at one of its lines,
    once the actor has announced this process to BPF."""
    stop, tids = threading.Event(), list[int]()
    spinner = threading.Thread(target=_agent_spin, args=(stop, tids), daemon=True)
    spinner.start()
    try:
        run = _run_actor({}, SECONDS, after_python_of=os.getpid())
    finally:
        stop.set()
        spinner.join()
    me = os.getpid()
    own = [parse_stack_event(r[SAMPLE_RECORD.size:]) for r in run.records
           if len(r) > SAMPLE_RECORD.size and SAMPLE_RECORD.unpack_from(r)[3] == me]
    assert own and all(len(ev.user) <= 1 for ev in own), sorted({len(ev.user) for ev in own})
    samples = [s for s in run.samples if s.pid == me]
    assert all(sum(f.frame_type == FrameType.NATIVE for f in s.frames) <= 1 for s in samples)
    code = _agent_spin.__code__
    lines = range(code.co_firstlineno, code.co_firstlineno + len(inspect.getsourcelines(_agent_spin)[0]))
    spinner_samples = [s for s in samples if s.tid == tids[0]]
    spins = [f for s in spinner_samples for f in s.frames
             if f.frame_type == FrameType.CPYTHON and f.function == "_agent_spin"]
    # What the spinner's samples held, for a failure to say why (one CI run had no such frame).
    seen = [[(str(f.frame_type), f.function) for f in s.frames][:6] for s in spinner_samples[:4]]
    python = {k: v for k, v in run.counters.snapshot().items() if "python" in str(k)}
    statuses = Counter((ev.py_status, len(ev.python)) for ev in own)
    assert spins, (len(spinner_samples), len(samples), seen, python, statuses, me in run.py_procs)
    assert all(f.line in lines and f.filename == code.co_filename for f in spins)


def test_the_agents_own_samples_are_kept_one_in_n_and_weigh_n_periods() -> None:
    """With ``cpu_self_sample_one_in`` = 4, BPF keeps about a quarter of the agent's own
    samples (the rest counted, SELF_NOT_KEPT) and each kept one weighs four periods, so their
    sum estimates the agent's CPU time without bias; other processes keep every sample."""
    stop, tids = threading.Event(), list[int]()
    spinner = threading.Thread(target=_agent_spin, args=(stop, tids), daemon=True)
    spinner.start()
    try:
        run = _run_actor({}, SECONDS, cpu_self_sample_one_in=4)
    finally:
        stop.set()
        spinner.join()
    me, period = os.getpid(), 1_000_000_000 // HZ
    kept = sum(1 for r in run.records if SAMPLE_RECORD.unpack_from(r)[3] == me)
    # The counter as the actor folded it at its last flush: the same span as the records.
    not_kept = run.counters.get("cpu_self_samples_not_kept")
    assert 0 < run.bpf_counters[CpuCounter.SELF_NOT_KEPT] <= not_kept
    taken = kept + not_kept  # the spinner alone is ~4 s x 199 Hz
    assert taken > 400, (kept, not_kept)
    # Binomial(taken, 1/4): the kept share within five standard deviations of a quarter.
    sigma = (0.25 * 0.75 / taken) ** 0.5
    assert abs(kept / taken - 0.25) < 5 * sigma, (kept, taken)
    own = [s for s in run.samples if s.pid == me]
    assert own and {s.values for s in own} == {(4 * period,)}
    assert {s.values for s in run.samples if s.pid != me} <= {(period,)}


@pytest.fixture
def kernel_reader(tmp_path: Path) -> Iterator[int]:
    """kernel_read: its main thread in read(2) of /dev/zero, its second thread spinning."""
    proc = subprocess.Popen([str(build_c("kernel_read.c", tmp_path)), "600"], stdout=subprocess.DEVNULL)
    yield proc.pid
    proc.kill()
    proc.wait()


def test_kernel_stack_where_the_sample_interrupted_the_kernel_only(kernel_reader: int) -> None:
    """A sample that interrupted the kernel carries the kernel stack, leaf first, above the
    user stack of the system call; a sample that interrupted user mode carries none (the
    program does not walk the kernel stack there, bpf/cpu.bpf.c). kernel_read's main thread
    spends most of its CPU time in read(2) of /dev/zero; its second thread stays in user
    space."""
    pid = kernel_reader
    run = _run_actor({}, SECONDS)

    def kernel(s: Sample) -> list[str]:
        return [f.function for f in s.frames if f.frame_type == FrameType.KERNEL]

    def user(s: Sample) -> list[str]:
        return [f.function for f in s.frames if f.frame_type != FrameType.KERNEL]

    reader = [s for s in run.samples if s.pid == pid and s.tid == pid]
    in_kernel = [s for s in reader if kernel(s)]
    assert len(in_kernel) >= 0.5 * len(reader) > 0, (len(in_kernel), len(reader))
    # Leaf first: every kernel frame comes before the first user frame.
    assert all(f.frame_type == FrameType.KERNEL for s in in_kernel for f in s.frames[: len(kernel(s))])
    in_read = [s for s in in_kernel if {"vfs_read", "ksys_read"} & set(kernel(s))]
    assert len(in_read) >= 0.9 * len(in_kernel), Counter(tuple(kernel(s)[:4]) for s in in_kernel).most_common(3)
    through_loop = [s for s in in_read if "read_loop" in user(s) and "main" in user(s)]
    assert len(through_loop) >= 0.8 * len(in_read), Counter(tuple(user(s)) for s in in_read).most_common(3)

    spinner = [s for s in run.samples if s.pid == pid and s.tid != pid and "spin_leaf" in user(s)]
    assert len(spinner) >= 20, len(spinner)
    with_kernel = [kernel(s) for s in spinner if kernel(s)]
    assert len(with_kernel) <= max(1, 0.02 * len(spinner)), with_kernel[:3]
