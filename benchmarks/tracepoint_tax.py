"""What attaching to a tracepoint costs the host beyond its BPF program's counted run time.

    sudo .venv/bin/python -m benchmarks.tracepoint_tax [--rounds 5] [--json FILE]

The agent's figures (benchmarks/busy_mix.py) are its process's CPU time plus its programs'
run time from ``kernel.bpf_stats``. A program on a hook also costs the host work that neither
counts: the tracepoint's dispatch around the program (a classic tracepoint fills a perf
record for it), and, for system-call tracepoints, the slow path that every system call of
every task takes while any of them is enabled. This measures both with empty programs, on
the events' own clock (benchmarks/workloads/event_tax.c): in each round, a loop of N events
with nothing attached and one with the hook's empty programs, both with bpf_stats off as in
production, the order alternating round by round; the tax is the median of the rounds' own
differences. A third loop with bpf_stats on gives the programs' counted run time per run,
so what the agent's figures leave out is the rest.

Hooks: the lock profile's two futex system-call tracepoints, timed on ``getppid`` calls
(which they do not trace: the tax falls on every system call); ``sched:sched_switch`` as the
wall profile attaches it (a classic tracepoint), and as a raw tracepoint, timed on
context switches between two processes on one CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.cost import program_deltas, snapshot
from benchmarks.machine import describe as describe_machine
from benchmarks.measure import BPF_STATS_ENABLED, enable_bpf_stats, set_bpf_stats

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "benchmarks" / "workloads" / "event_tax.c"
LOOP_TIMEOUT_S = 120  # a loop takes 1 - 2 s; a hung one (event_tax.c exits on a failed step) stops the run


@dataclass(frozen=True)
class Hook:
    """Empty programs on one hook and the event loop that exercises it."""

    name: str
    text: str
    workload: str  # event_tax.c's mode
    events: int
    fires_on_event: bool  # whether the programs run on the loop's own events


HOOKS = (
    Hook("sys_enter_futex + sys_exit_futex (classic)",
         "TRACEPOINT_PROBE(syscalls, sys_enter_futex) { return 0; }\n"
         "TRACEPOINT_PROBE(syscalls, sys_exit_futex) { return 0; }\n",
         "syscalls", 5_000_000, False),
    Hook("sched_switch (classic)", "TRACEPOINT_PROBE(sched, sched_switch) { return 0; }\n", "switches", 300_000, True),
    Hook("sched_switch (raw)", "RAW_TRACEPOINT_PROBE(sched_switch) { return 0; }\n", "switches", 300_000, True),
)


@dataclass
class HookRound:
    """One round of one hook: the loop without and with its empty programs (bpf_stats off, as
    in production), in ``order``, and the programs' counted run time per run from a third
    loop with bpf_stats on (None where they do not run on the loop's events: their few runs
    on other processes' events are cold and say nothing of the loop)."""

    order: str  # "off, on" or "on, off"
    off_ns: float
    on_ns: float
    counted_ns_per_run: float | None


@dataclass
class HookResult:
    """Every round of one hook."""

    name: str
    workload: str
    events_per_loop: int
    rounds: list[HookRound] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Medians over rounds; the tax is the median of each round's own difference, so a
        round the machine ran slow in does not pair with another's fast one."""
        counted = [r.counted_ns_per_run for r in self.rounds if r.counted_ns_per_run is not None]
        return {"median_off_ns": statistics.median(r.off_ns for r in self.rounds),
                "median_on_ns": statistics.median(r.on_ns for r in self.rounds),
                "tax_ns": statistics.median(r.on_ns - r.off_ns for r in self.rounds),
                "counted_ns": statistics.median(counted) if counted else 0.0}


def build(out_dir: Path) -> Path:
    """Compile the event loops into ``out_dir``."""
    exe = out_dir / "event_tax"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def time_events(exe: Path, hook: Hook) -> float:
    """Mean ns per event of one loop."""
    out = subprocess.run([str(exe), hook.workload, str(hook.events)], capture_output=True, text=True, check=True,
                         timeout=LOOP_TIMEOUT_S)
    return float(out.stdout)


def with_hook(exe: Path, hook: Hook) -> tuple[float, float | None]:
    """ns per event with the hook's empty programs attached (bpf_stats off), then their
    counted run time per run over a second loop with bpf_stats on."""
    from bcc import BPF

    bpf = BPF(text=hook.text)  # tracepoint probes attach on load
    try:
        time.sleep(0.3)
        set_bpf_stats(False)
        per_event = time_events(exe, hook)
        set_bpf_stats(True)
        before = snapshot(os.getpid())
        time_events(exe, hook)
        after = snapshot(os.getpid())
    finally:
        bpf.cleanup()
    deltas = program_deltas(before.programs, after.programs)
    runs, ns = sum(d.runs for d in deltas), sum(d.run_time_ns for d in deltas)
    return per_event, (ns / runs if runs and hook.fires_on_event else None)


def measure(rounds: int) -> list[HookResult]:
    """``rounds`` rounds of every hook, the order of the two loops alternating round by round."""
    results = {h.name: HookResult(h.name, h.workload, h.events) for h in HOOKS}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        for r in range(rounds):
            for hook in HOOKS:
                if r % 2 == 0:
                    set_bpf_stats(False)
                    off = time_events(exe, hook)
                    on, counted = with_hook(exe, hook)
                    order = "off, on"
                else:
                    on, counted = with_hook(exe, hook)
                    set_bpf_stats(False)
                    off = time_events(exe, hook)
                    order = "on, off"
                results[hook.name].rounds.append(HookRound(order, off, on, counted))
            print(f"round {r + 1} of {rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
    return list(results.values())


def report(results: list[HookResult]) -> None:
    print(f"\n{'hook':44} {'event':9} {'off ns':>8} {'on ns':>8} {'tax ns':>8} {'counted ns':>11}")
    for res in results:
        s = res.summary()
        print(f"{res.name:44} {res.workload:9} {s['median_off_ns']:8.1f} {s['median_on_ns']:8.1f} {s['tax_ns']:8.1f} "
              f"{s['counted_ns']:11.1f}")
    print("(medians over rounds; tax: the median of each round's own extra time an event with the empty "
          "program attached, bpf_stats off; counted: that program's bpf_stats run time per run, 0 where it "
          "does not run on the loop's events)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    stats_were = BPF_STATS_ENABLED.read_text().strip()
    if not enable_bpf_stats():
        sys.exit("cannot enable kernel.bpf_stats_enabled (root needed)")
    try:
        results = measure(args.rounds)
    finally:
        BPF_STATS_ENABLED.write_text(stats_were)
    report(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(),
                                         "hooks": [{**asdict(r), **r.summary()} for r in results]}, indent=1) + "\n")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
