"""What native unwinding costs: agent CPU with the unwinder off and on, same workload, one run.

    sudo .venv/bin/python -m benchmarks.unwind_overhead [--repeats 5] [--seconds 10]

The host is kept busy on both cores by code without frame pointers, the case the unwinder
exists for: nofp_chain and qsort_callback (integration/workloads, -O2 -fomit-frame-pointer)
and a CPython loop (Debian's python3.11 has no frame pointers either). For each repeat the
agent (99 Hz, CPU profile) runs once with ``native_unwinding`` off and once on, in
alternating order, each for the same window after a warm-up; measured are the agent
process's CPU (user+sys, all threads: unwinder worker, symbolizer, publisher) and its BPF
programs' run time (kernel bpf_stats), as % of one core. Medians ± half-range and the on/off
ratio are printed. Building a binary's table is a one-time cost (per binary, cached by build
id): it shows in the start-up window, measured separately, and any builds inside the
measured window (binaries new to the agent: on a shared machine, other people's programs)
are reported as their own line. Results also go to benchmarks/unwind_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.measure import Stat, bpf_runtime_ns, enable_bpf_stats, process_cpu_s
from benchmarks.run import start_agent, stop, wait_first_samples
from stackfleet.nats_server import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ROOT / "integration" / "workloads"
PYTHON_LOOP = ("import time\nend = time.time() + {s}\n"
               "while time.time() < end:\n    sorted(str(i) for i in range(2000))\n")


def build(tmp: Path) -> list[Path]:
    out = []
    for source in ("nofp_chain.c", "qsort_callback.c"):
        exe = tmp / Path(source).stem
        subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-g", "-o", str(exe), str(WORKLOADS / source)],
                       check=True)
        out.append(exe)
    return out


def start_workload(exes: list[Path], seconds: float) -> list[subprocess.Popen[bytes]]:
    procs = [subprocess.Popen([str(e), str(seconds)], stdout=subprocess.DEVNULL) for e in exes]
    procs.append(subprocess.Popen(["/usr/bin/python3", "-c", PYTHON_LOOP.format(s=seconds)]))
    return procs


def unwind_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("stackfleet_agent_unwind"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("stackfleet_agent_").removesuffix("_total")] = float(value)
    return out


def one_run(nats: NatsServer, exes: list[Path], unwinding: bool, seconds: float,
            warmup_s: float) -> dict[str, float]:
    port = free_port()
    workload = start_workload(exes, seconds + warmup_s + 15)
    env = {"STACKFLEET_NATIVE_UNWINDING": "true" if unwinding else "false",
           "STACKFLEET_METRICS_ADDRESS": f"127.0.0.1:{port}"}
    started = time.monotonic()
    agent = start_agent(nats.url, "cpu", env)
    try:
        wait_first_samples(nats, started)
        time.sleep(warmup_s)  # tables built, caches warm
        startup_cpu = process_cpu_s(agent.pid)
        before = unwind_metrics(port)
        cpu0, bpf0, t0 = startup_cpu, bpf_runtime_ns(agent.pid), time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        cpu1, bpf1 = process_cpu_s(agent.pid), bpf_runtime_ns(agent.pid)
        metrics = unwind_metrics(port)
        build_ms = metrics.get("unwind_table_build_ms", 0.0) - before.get("unwind_table_build_ms", 0.0)
        worker_ms = metrics.get("unwind_worker_cpu_ms", 0.0) - before.get("unwind_worker_cpu_ms", 0.0)
    finally:
        stop(agent)
        for p in workload:
            p.kill()
            p.wait()
    return {"agent": 100 * (cpu1 - cpu0) / elapsed, "bpf": 100 * (bpf1 - bpf0) / 1e9 / elapsed,
            "table_builds": 100 * build_ms / 1000 / elapsed, "worker": 100 * worker_ms / 1000 / elapsed,
            "startup_cpu_s": startup_cpu, **{f"metric:{k}": v for k, v in metrics.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=8)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "unwind_overhead.json"))
    args = parser.parse_args()
    if not enable_bpf_stats():
        print("warning: cannot enable kernel.bpf_stats_enabled; BPF CPU will read 0", file=sys.stderr)
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp, NatsServer() as nats:
        exes = build(Path(tmp))
        for r in range(args.repeats):
            for unwinding in ((False, True) if r % 2 == 0 else (True, False)):
                runs[unwinding].append(one_run(nats, exes, unwinding, args.seconds, args.warmup))
                print(f"repeat {r + 1}/{args.repeats} unwinding={'on' if unwinding else 'off'}: "
                      f"agent {runs[unwinding][-1]['agent']:.2f}% bpf {runs[unwinding][-1]['bpf']:.3f}%",
                      file=sys.stderr)

    def stat(on: bool, key: str) -> Stat:
        return Stat([run[key] for run in runs[on]])

    def total(on: bool) -> Stat:
        return Stat([run["agent"] + run["bpf"] for run in runs[on]])

    def direct(on: bool) -> Stat:
        """What the unwinder itself adds: its worker thread, and BPF time above the off runs' median."""
        bpf_off = stat(False, "bpf").median
        return Stat([run["worker"] + run["bpf"] - bpf_off for run in runs[on]])

    rows = [("agent process, % of a core", stat(False, "agent"), stat(True, "agent")),
            ("BPF programs, % of a core", stat(False, "bpf"), stat(True, "bpf")),
            ("total, % of a core", total(False), total(True)),
            ("unwinder worker thread", stat(False, "worker"), stat(True, "worker")),
            ("  of which tables (once/binary)", stat(False, "table_builds"), stat(True, "table_builds")),
            ("unwinder's own cost", Stat([0.0]), direct(True)),
            ("CPU s to end of warm-up", stat(False, "startup_cpu_s"), stat(True, "startup_cpu_s"))]
    print(f"\n99 Hz CPU profile, both cores busy with code without frame pointers, {args.repeats} repeats "
          f"x {args.seconds:g} s (median ±half-range)\n")
    print(f"{'':30} {'unwinder off':>16} {'unwinder on':>16} {'on/off':>8}")
    results: dict[str, Any] = {}
    for name, off, on in rows:
        ratio = on.median / off.median if off.median else float("nan")
        shown = f"{ratio:>7.2f}x" if off.median else f"{'-':>8}"
        print(f"{name:30} {off!s:>16} {on!s:>16} {shown}")
        results[name] = {"off": off.values, "on": on.values, "off_median": off.median, "on_median": on.median,
                         "ratio": ratio}
    on_total, off_total, own = total(True).median, total(False).median, direct(True).median
    print(f"\nbudget: agent < 1% of a core. Unwinder's own cost (worker + extra BPF time): {own:.2f}% -> "
          f"{'within' if own < 1.0 else 'OVER'}; whole agent with it on: {on_total:.2f}% (off: {off_total:.2f}%); "
          "the whole-agent figures include symbolizing whatever else runs on this host")
    last = runs[True][-1]
    samples = last.get("metric:unwind_samples", 0.0)
    if samples:
        complete = last.get('metric:unwind_stacks{end="complete"}', 0.0)
        frames = sum(v for k, v in last.items() if k.startswith("metric:unwind_frames"))
        print(f"unwound in BPF (last run, whole host): {samples:.0f} stacks, {100 * complete / samples:.1f}% "
              f"ending at the outermost frame, {frames / samples:.1f} frames per stack")
        results["last_run_unwind_metrics"] = {k.removeprefix("metric:"): v for k, v in last.items()
                                              if k.startswith("metric:")}
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
