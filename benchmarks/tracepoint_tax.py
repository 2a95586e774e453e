"""What attaching to a tracepoint costs the host beyond its BPF program's counted run time.

    sudo .venv/bin/python -m benchmarks.tracepoint_tax [--rounds 5] [--json FILE]

The agent's figures (benchmarks/busy_mix.py) are its process's CPU time plus its programs'
run time from ``kernel.bpf_stats``. A program on a hook also costs the host work that neither
counts: the tracepoint's dispatch around the program (a classic tracepoint fills a perf
record for it), and, for system-call tracepoints, the slow path that every system call of
every task takes while any of them is enabled. This measures both with empty programs, on
the events' own clock (benchmarks/workloads/event_tax.c): a loop of N events with nothing
attached, then with each hook's empty program, alternated round by round. The difference
per event is set beside the program's counted run time per run, so what the agent's
figures leave out is the rest.

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
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.cost import program_deltas, snapshot
from benchmarks.machine import describe as describe_machine
from benchmarks.measure import enable_bpf_stats

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "benchmarks" / "workloads" / "event_tax.c"


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
class HookResult:
    name: str
    workload: str
    off_ns: list[float]
    on_ns: list[float]
    counted_ns_per_run: list[float]  # the empty program's bpf_stats run time per run

    def summary(self) -> dict[str, float]:
        off, on = statistics.median(self.off_ns), statistics.median(self.on_ns)
        counted = statistics.median(self.counted_ns_per_run) if self.counted_ns_per_run else 0.0
        return {"median_off_ns": off, "median_on_ns": on, "tax_ns": on - off, "counted_ns": counted}


def build(out_dir: Path) -> Path:
    exe = out_dir / "event_tax"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def time_events(exe: Path, hook: Hook) -> float:
    """Mean ns per event of one loop."""
    out = subprocess.run([str(exe), hook.workload, str(hook.events)], capture_output=True, text=True, check=True)
    return float(out.stdout)


def with_hook(exe: Path, hook: Hook) -> tuple[float, float | None]:
    """ns per event with the hook's empty programs attached, and their counted run time per
    run (None where they do not run on the loop's events: their few runs on other processes'
    events are cold and say nothing of the loop)."""
    from bcc import BPF

    bpf = BPF(text=hook.text)  # tracepoint probes attach on load
    try:
        time.sleep(0.3)
        before = snapshot(os.getpid())
        per_event = time_events(exe, hook)
        after = snapshot(os.getpid())
    finally:
        bpf.cleanup()
    runs = sum(d.runs for d in program_deltas(before.programs, after.programs))
    ns = sum(d.run_time_ns for d in program_deltas(before.programs, after.programs))
    return per_event, (ns / runs if runs and hook.fires_on_event else None)


def measure(rounds: int) -> list[HookResult]:
    results = {h.name: HookResult(h.name, h.workload, [], [], []) for h in HOOKS}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        for r in range(rounds):
            for hook in HOOKS:
                res = results[hook.name]
                res.off_ns.append(time_events(exe, hook))
                on, counted = with_hook(exe, hook)
                res.on_ns.append(on)
                if counted is not None:
                    res.counted_ns_per_run.append(counted)
            print(f"round {r + 1} of {rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
    return list(results.values())


def report(results: list[HookResult]) -> None:
    print(f"\n{'hook':44} {'event':9} {'off ns':>8} {'on ns':>8} {'tax ns':>8} {'counted ns':>11}")
    for res in results:
        s = res.summary()
        print(f"{res.name:44} {res.workload:9} {s['median_off_ns']:8.1f} {s['median_on_ns']:8.1f} {s['tax_ns']:8.1f} "
              f"{s['counted_ns']:11.1f}")
    print("(medians over rounds; tax: the event's extra time with the empty program attached; counted: that "
          "program's bpf_stats run time per run, 0 where it does not run on the loop's events)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not enable_bpf_stats():
        sys.exit("cannot enable kernel.bpf_stats_enabled (root needed)")
    results = measure(args.rounds)
    report(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(),
                                         "hooks": [{**asdict(r), **r.summary()} for r in results]}, indent=1) + "\n")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
