"""What a profiler costs over a measured window: process CPU plus its BPF programs' run time.

A :class:`CostSnapshot` reads the kernel's counters for one process tree (CPU time, to the ns,
and ``run_time_ns``/``run_cnt`` of every BPF program it holds, kept while
``kernel.bpf_stats_enabled`` is 1); :func:`window_cost` turns two snapshots into a
:class:`WindowCost`. The arithmetic is kept apart from the reading so it can be checked
against recorded numbers.

"Samples" are the runs of the profiler's ``perf_event`` programs: each run is one tick of
the sampling clock on one CPU, whatever the profiler then does with it (bcc's ``profile`` and
our cpu program both skip the idle task after being run). Counting runs rather than what
each tool reports keeps the denominator the same for both tools.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from benchmarks.bpf_attach import program_labels
from benchmarks.measure import (
    BPF_PROG_TYPE_PERF_EVENT,
    BpfProgStats,
    bpf_programs,
    process_tree,
    process_tree_cpu_s,
)


@dataclass(frozen=True)
class CostSnapshot:
    """Counters of one profiler process tree at one moment."""

    monotonic_s: float
    process_cpu_s: float
    programs: dict[int, BpfProgStats]
    labels: dict[int, str] = field(default_factory=dict)  # program id -> name @ attach point


def snapshot(pid: int, labelled: bool = False) -> CostSnapshot:
    """Read the counters of ``pid``'s process tree now (``labelled``: and name its programs)."""
    tree = process_tree(pid)
    programs = bpf_programs(tree)
    labels: dict[int, str] = {}
    if labelled:
        for p in tree:
            labels.update(program_labels(p, [i for i in programs if i not in labels]))
    return CostSnapshot(time.monotonic(), process_tree_cpu_s(pid), programs, labels)


# How long the harness takes snapshots before a warm-up (see acquaint): at 99 Hz on a busy
# machine that is still ~50 samples of the harness's own process.
ACQUAINT_S = 0.5


def acquaint(pid: int, seconds: float = ACQUAINT_S) -> None:
    """Take snapshots of ``pid`` for ``seconds`` of this process's CPU, at the start of a
    warm-up.

    The agent profiles every process, this harness too, and meets a process the first time one
    of its samples lands: it then builds the unwind tables of the files the sample ran in
    (libpython's: ~90 ms of the agent's CPU) and symbolizes its stacks. The harness sleeps
    through the warm-up, so without this its first on-CPU moment was the window's first
    snapshot, and that one-off work fell inside the window as if it were a cost per sample
    (2 - 4 ms a second of a 60 - 90 s window). Snapshots run the code the window's own
    snapshots run, so their stacks are known by then too."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        snapshot(pid, labelled=True)


@dataclass(frozen=True)
class ProgramDelta:
    """One BPF program's runs and run time within a window."""

    prog_id: int
    type_name: str
    runs: int
    run_time_ns: int
    label: str = ""

    @property
    def us_per_run(self) -> float:
        return self.run_time_ns / self.runs / 1e3 if self.runs else 0.0


@dataclass(frozen=True)
class WindowCost:
    """A profiler's cost over ``seconds`` of wall time."""

    seconds: float
    process_cpu_s: float
    bpf_ns: int
    samples: int
    programs: list[ProgramDelta] = field(default_factory=list)

    @property
    def process_pct(self) -> float:
        """Process CPU as a percentage of one core."""
        return 100 * self.process_cpu_s / self.seconds

    @property
    def bpf_pct(self) -> float:
        """BPF programs' run time as a percentage of one core."""
        return 100 * self.bpf_ns / 1e9 / self.seconds

    @property
    def total_pct(self) -> float:
        return self.process_pct + self.bpf_pct

    @property
    def process_us_per_sample(self) -> float:
        return self.process_cpu_s * 1e6 / self.samples if self.samples else float("nan")

    @property
    def bpf_us_per_sample(self) -> float:
        return self.bpf_ns / 1e3 / self.samples if self.samples else float("nan")

    @property
    def us_per_sample(self) -> float:
        """Process CPU plus BPF run time, per sample, in microseconds."""
        return self.process_us_per_sample + self.bpf_us_per_sample


def program_deltas(before: dict[int, BpfProgStats], after: dict[int, BpfProgStats],
                   labels: dict[int, str] | None = None) -> list[ProgramDelta]:
    """Per-program runs and time between two readings; a program loaded in between counts
    from zero (the kernel's statistics start at load). A program unloaded in between is not
    in ``after`` and its last runs are lost: the windows here are measured while the tools
    keep their programs loaded."""
    deltas = []
    for prog_id, now in sorted(after.items()):
        then = before.get(prog_id)
        runs = now.run_cnt - (then.run_cnt if then else 0)
        ns = now.run_time_ns - (then.run_time_ns if then else 0)
        deltas.append(ProgramDelta(prog_id, now.type_name, runs, ns, (labels or {}).get(prog_id, "")))
    return deltas


def sample_runs(before: dict[int, BpfProgStats], after: dict[int, BpfProgStats]) -> int:
    """Runs of the ``perf_event`` programs between two readings: the samples taken."""
    perf_ids = {i for i, p in after.items() if p.prog_type == BPF_PROG_TYPE_PERF_EVENT}
    return sum(d.runs for d in program_deltas(before, after) if d.prog_id in perf_ids)


def window_cost(before: CostSnapshot, after: CostSnapshot, process_cpu_s: float | None = None) -> WindowCost:
    """The cost between two snapshots. ``process_cpu_s`` replaces the snapshots' CPU
    difference when it was measured another way (a tool's rusage at exit, which includes
    the work it does after its last snapshot, such as printing its stacks)."""
    programs = program_deltas(before.programs, after.programs, {**before.labels, **after.labels})
    cpu = after.process_cpu_s - before.process_cpu_s if process_cpu_s is None else process_cpu_s
    return WindowCost(seconds=after.monotonic_s - before.monotonic_s, process_cpu_s=cpu,
                      bpf_ns=sum(p.run_time_ns for p in programs),
                      samples=sample_runs(before.programs, after.programs), programs=programs)


@dataclass(frozen=True)
class Comparison:
    """Per-sample cost of the agent next to bcc's ``profile``, over alternated rounds."""

    hz: int
    agent: list[WindowCost]
    reference: list[WindowCost]
    # CPU seconds the reference spent after its window on one-off work (bcc's profile
    # symbolizes and prints all its stacks at exit), one per round; not in the ratio.
    reference_exit_cpu_s: list[float] = field(default_factory=list)

    @property
    def agent_us(self) -> float:
        return statistics.median(w.us_per_sample for w in self.agent)

    @property
    def reference_us(self) -> float:
        return statistics.median(w.us_per_sample for w in self.reference)

    @property
    def ratio(self) -> float:
        """Median agent cost per sample over median reference cost per sample."""
        return self.agent_us / self.reference_us

    @property
    def reference_us_with_exit(self) -> float:
        """Median reference cost per sample if its exit-time work is spread over the window's samples."""
        return statistics.median((w.process_cpu_s + x) * 1e6 / w.samples + w.bpf_us_per_sample
                                 for w, x in zip(self.reference, self.reference_exit_cpu_s, strict=True))

    @property
    def round_ratios(self) -> list[float]:
        """The ratio within each round (agent and reference measured back to back)."""
        return [a.us_per_sample / r.us_per_sample for a, r in zip(self.agent, self.reference, strict=True)]


def cost_ratio(low: list[WindowCost], high: list[WindowCost]) -> float:
    """Median total cost (% of a core) at the higher event rate over that at the lower one."""
    return statistics.median(w.total_pct for w in high) / statistics.median(w.total_pct for w in low)
