"""Where the CPU profile's BPF program spends its time per sample: run time per run of the
agent's ``perf_event`` program (kernel ``bpf_stats``) for variants of the program, alternated.

    sudo .venv/bin/python -m benchmarks.cpu_program_cost [--variants base,no_unwind,...]
        [--rounds 2] [--seconds 6] [--rate 999] [--revision REV]

Each variant is the working tree's bpf/ package with a few lines of C replaced (see
VARIANTS: a part switched off, or done twice to weigh it); the agent (``--types cpu``) loads
it from a copy put first on ``PYTHONPATH``. ``--revision`` adds a variant ``REV`` built from
that revision's bpf/ instead (before/after comparisons). For each round, in rotated order,
each variant's agent runs once and the host runs three workloads one after the other, each
for ``--seconds`` after a short warm-up:
- ``spinners``: two threads spinning through 64 call paths, frame pointers, CFI tables
  (benchmarks/workloads/event_mix.c, the per-sample benchmark's workload);
- ``python``: two CPython processes in a three-deep call chain (CPython frames, CFI: Debian's
  interpreter has no frame pointers);
- ``nofp``: two C processes built without frame pointers (CFI only:
  integration/workloads/nofp_chain.c).
Printed: ns per run of the sample program (its tail calls included) per variant and workload
(median over rounds), and the load average. The host's other processes are sampled too, so
the workload's share of the runs is printed beside it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent.bpf.layouts import CpuCounter
from benchmarks.event_mix import SPINNERS_ONLY, EventMix, build_event_mix
from benchmarks.measure import BPF_PROG_TYPE_PERF_EVENT, BpfProgStats, bpf_programs, enable_bpf_stats
from benchmarks.run import free_port, start_agent, stop, wait_all_actors
from stackfleet.nats_server import NatsServer

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ROOT / "integration" / "workloads"
PYTHON = "/usr/bin/python3"
PYTHON_LOOP = ("import time\nopen('/proc/self/comm', 'w').write('sfbench_py')\n"
               "def compute():\n    t = 0\n    for i in range(2000):\n        t += i * i\n    return t\n"
               "def handler():\n    return compute()\n"
               "def main(end):\n    while time.monotonic() < end:\n        handler()\n"
               "main(time.monotonic() + {s})\n")

# Only the workloads' samples go past the entry (by the first four bytes of the thread name,
# "sfbe", which the workloads' executables and the Python loop are given:
# the host's other processes, the agent included, would otherwise be most of the runs on a
# shared machine); applied to every variant. A filtered-out run costs what "filtered" shows.
# The filter comes before the CPU_SAMPLES counter, which so counts the workload's runs exactly
# (read from the program's counters map by id: workload_runs()).
WORKLOAD_COMMS = (b"sfbench_mix", b"sfbench_nofp", b"sfbench_py")
ENTRY_LINE = "count(CPU_SAMPLES);"


def _comm_word(name: bytes) -> int:
    return int.from_bytes(name[:4], "little")


WORKLOAD_FILTER = ("{ char comm_[16] = {}; bpf_get_current_comm(comm_, sizeof(comm_)); "
                   "u32 word_ = *(u32 *)comm_; if (" +
                   " && ".join(sorted({f"word_ != {_comm_word(c)}U" for c in WORKLOAD_COMMS})) + ") return 0; }")

# name -> (file under bpf/, old text, new text) replacements.
VARIANTS: dict[str, list[tuple[str, str, str]]] = {
    "base": [],
    # Every run filtered out: the cost of a run that stops at the filter.
    "filtered": [("cpu_sample_entry.h", "collect_python_frames_for_tail_call(pid_tgid);", "return 0;")],
    # The CPython reader off (py_procs lookup and the frame walk).
    "no_python": [("cpu_sample_entry.h", "collect_python_frames_for_tail_call(pid_tgid);", "")],
    # No CFI unwinding: bpf_get_stack()'s frame-pointer stack (and its copy) only.
    "no_unwind": [("cpu.bpf.c", "unwind_user_stack_first(ctx, ev);", "")],
    # No kernel stack (bpf_get_stack of the kernel stack, taken for kernel-mode samples only).
    "no_kstack": [("cpu.bpf.c", "fill_stack_event_opts(ctx, ev, pid_tgid, sample_in_kernel_mode(ctx), 0, 0);",
                   "fill_stack_event_opts(ctx, ev, pid_tgid, 0, 0, 0);")],
    # The stack hashed twice: the second hash's cost is the hash's.
    "hash_x2": [("cpu.bpf.c", "u64 id = dedup_stack_id(ks);",
                 "u64 id = dedup_stack_id(ks); ks->generation ^= 1; id ^= dedup_stack_id(ks) & 0; "
                 "ks->generation ^= 1;")],
    # The stored stack compared twice.
    "compare_x2": [("cpu.bpf.c", "if (!dedup_same_stack(stored, ks) ||",
                    "if (!dedup_same_stack(stored, ks) || !dedup_same_stack(stored, ks) ||")],
    # The user stack walked twice by bpf_get_stack (frame pointers).
    "ustack_x2": [("stack_event.h", "ev->user_len = bpf_get_stack(ctx, ev->user, sizeof(ev->user), BPF_F_USER_STACK);",
                   "ev->user_len = bpf_get_stack(ctx, ev->user, sizeof(ev->user), BPF_F_USER_STACK); "
                   "ev->user_len = bpf_get_stack(ctx, ev->user, sizeof(ev->user), BPF_F_USER_STACK);")],
    # No record: the emit stage returns before the known-stacks lookup and the ring buffer.
    "no_emit": [("cpu.bpf.c", "    u64 id = dedup_stack_id(ks);", "    return 0;\n    u64 id = dedup_stack_id(ks);")],
    # The known-stacks lookup and compare, but no ring-buffer record.
    "no_record": [("cpu.bpf.c", "struct sample_record *rec = events.ringbuf_reserve(",
                   "count(CPU_STACKS_KNOWN); return 0;\n        struct sample_record *rec = events.ringbuf_reserve(")],
    # Nothing after the CPython reader (the entry program only).
    "entry_only": [("cpu_sample_entry.h", "cpu_stages.call(ctx, 0);", "return 0;")],
}


@dataclass
class Window:
    runs: int
    ns: int

    @property
    def ns_per_run(self) -> float:
        return self.ns / self.runs if self.runs else float("nan")


def variant_tree(dest: Path, name: str, revision: str | None) -> Path:
    """A directory holding a ``bpf`` package: the working tree's with the variant's edits,
    or ``revision``'s."""
    pkg = dest / name / "bpf"
    if revision and name == revision:
        pkg.parent.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "bpf"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(pkg.parent)], input=archive, check=True)
        edits = []
    else:
        shutil.copytree(ROOT / "bpf", pkg, ignore=shutil.ignore_patterns("__pycache__"))
        edits = VARIANTS[name]
    edits = [("cpu_sample_entry.h", ENTRY_LINE, WORKLOAD_FILTER + "\n    " + ENTRY_LINE), *edits]
    for file, old, new in edits:
        path = pkg / file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"variant {name}: {old!r} is not exactly once in bpf/{file}")
        path.write_text(text.replace(old, new))
    return pkg.parent


def perf_programs(pid: int) -> dict[int, BpfProgStats]:
    return {i: p for i, p in bpf_programs([pid]).items() if p.prog_type == BPF_PROG_TYPE_PERF_EVENT}


def window(before: dict[int, BpfProgStats], after: dict[int, BpfProgStats]) -> Window:
    runs = ns = 0
    for i, p in after.items():
        b = before.get(i)
        runs += p.run_cnt - (b.run_cnt if b else 0)
        ns += p.run_time_ns - (b.run_time_ns if b else 0)
    return Window(runs, ns)


def build_nofp(tmp: Path) -> Path:
    exe = tmp / "sfbench_nofp"
    subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-g", "-o", str(exe), str(WORKLOADS / "nofp_chain.c")],
                   check=True)
    return exe


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_BPF, BPF_MAP_LOOKUP_ELEM, BPF_MAP_GET_FD_BY_ID = 321, 1, 14
BPF_MAP_TYPE_PERCPU_ARRAY = 6


class _MapElem(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _GetFdById(ctypes.Structure):
    _fields_ = [("map_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


def counters_map_id(agent_pid: int) -> int:
    """Id of the CPU program's ``counters`` map among the agent's fds: the per-CPU array of
    CPU_COUNTER_SLOTS u64 (agent/bpf/layouts.py CpuCounter)."""
    slots = len(CpuCounter)
    for info in Path(f"/proc/{agent_pid}/fdinfo").iterdir():
        try:
            fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        shape = tuple(fields.get(k, "").strip() for k in ("map_type", "value_size", "max_entries"))
        if shape == (str(BPF_MAP_TYPE_PERCPU_ARRAY), "8", str(slots)):
            return int(fields["map_id"])
    raise RuntimeError("the CPU program's counters map was not found")


def workload_runs(map_id: int) -> int:
    """CPU_SAMPLES summed over CPUs: the runs that passed the workload filter."""
    fd = _libc.syscall(SYS_BPF, BPF_MAP_GET_FD_BY_ID, ctypes.byref(_GetFdById(map_id=map_id)),
                       ctypes.sizeof(_GetFdById))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_MAP_GET_FD_BY_ID")
    try:
        cpus = os.cpu_count() or 1
        values = (ctypes.c_uint64 * cpus)()
        key = ctypes.c_uint32(CpuCounter.SAMPLES)
        attr = _MapElem(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(values))
        if _libc.syscall(SYS_BPF, BPF_MAP_LOOKUP_ELEM, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
            raise OSError(ctypes.get_errno(), "BPF_MAP_LOOKUP_ELEM")
        return sum(values)
    finally:
        os.close(fd)


# The workloads run at a higher priority for their short windows, so that on a shared host
# they still take most of the CPU (more of their samples in each window).
NICE = ["nice", "-n", "-10"]


def run_workload(kind: str, nofp: Path, event_mix: Path, agent_pid: int, warmup_s: float,
                 seconds: float) -> tuple[Window, float]:
    """(the agent's sample program over the window, the workload's runs in it)."""
    procs: list[subprocess.Popen[bytes]] = []
    mix = None
    total = warmup_s + seconds + 5
    if kind == "spinners":
        mix = EventMix(event_mix, SPINNERS_ONLY)
        os.setpriority(os.PRIO_PROCESS, mix.proc.pid, -10)
        for tid in os.listdir(f"/proc/{mix.proc.pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), -10)
    elif kind == "python":
        procs = [subprocess.Popen([*NICE, PYTHON, "-c", PYTHON_LOOP.format(s=total)]) for _ in range(2)]
    else:
        procs = [subprocess.Popen([*NICE, str(nofp), str(int(total))], stdout=subprocess.DEVNULL) for _ in range(2)]
    try:
        time.sleep(warmup_s)
        map_id = counters_map_id(agent_pid)
        before, runs = perf_programs(agent_pid), workload_runs(map_id)
        time.sleep(seconds)
        after, runs1 = perf_programs(agent_pid), workload_runs(map_id)
        return window(before, after), runs1 - runs
    finally:
        if mix is not None:
            mix.stop()
        for p in procs:
            p.kill()
            p.wait()


def workload_ns(w: Window, workload_runs: float, filtered_ns: float) -> float:
    """ns per run of the workload's samples: the window's time less its other runs', each
    costing what a filtered-out run costs."""
    others = max(0.0, w.runs - workload_runs)
    return (w.ns - others * filtered_ns) / workload_runs if workload_runs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="base,no_python,no_unwind,no_kstack,ustack_x2,hash_x2,"
                                              "compare_x2,no_emit,no_record,entry_only")
    parser.add_argument("--workloads", default="spinners,python,nofp")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--rate", type=int, default=999)
    parser.add_argument("--revision", help="also run this git revision's bpf/ as a variant")
    args = parser.parse_args()
    if not enable_bpf_stats():
        raise SystemExit("cannot enable kernel.bpf_stats_enabled (run as root)")
    names = ["filtered", *[n for n in args.variants.split(",") if n != "filtered"]]
    names += [args.revision] if args.revision else []
    kinds = args.workloads.split(",")
    windows: dict[tuple[int, str, str], tuple[Window, float]] = {}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp_name, NatsServer() as nats:
        tmp = Path(tmp_name)
        trees = {n: variant_tree(tmp / "variants", n, args.revision) for n in names}
        nofp, event_mix = build_nofp(tmp), build_event_mix(tmp).rename(tmp / "sfbench_mix")
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                port = free_port()
                env = {"STACKFLEET_FREQUENCY_HZ": str(args.rate), "PYTHONPATH": str(trees[name])}
                agent = start_agent(nats.url, "cpu", env, port)
                try:
                    wait_all_actors(port, "cpu", time.monotonic())
                    for kind in kinds:
                        w, runs = run_workload(kind, nofp, event_mix, agent.pid, args.warmup, args.seconds)
                        windows[(r, name, kind)] = (w, runs)
                        print(f"round {r} {name:12} {kind:9} {w.runs:6} runs, {runs:6.0f} of the "
                              f"workload; {w.ns_per_run:6.0f} ns/run", flush=True)
                finally:
                    stop(agent)
                loads.append(os.getloadavg()[0])
    print(f"\nns per sample of the workload in the CPU sample program (tail calls included), median of "
          f"{args.rounds} rounds at {args.rate} Hz; load average (1 min) {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'variant':14}" + "".join(f"{k:>12}" for k in kinds))
    for name in names:
        cells = []
        for kind in kinds:
            values = []
            for r in range(args.rounds):
                if (r, name, kind) in windows and (r, "filtered", kind) in windows:
                    w, runs = windows[(r, name, kind)]
                    values.append(w.ns_per_run if name == "filtered"
                                  else workload_ns(w, runs, windows[(r, "filtered", kind)][0].ns_per_run))
            cells.append(f"{statistics.median(values):12.0f}" if values else f"{'-':>12}")
        print(f"{name:14}" + "".join(cells))
    print("(filtered: ns per run of a run that stops at the workload filter)")


if __name__ == "__main__":
    main()
