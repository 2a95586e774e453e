"""Agent cost of the heap type on Go processes: ``--types cpu`` against ``--types cpu,heap``.

    sudo .venv/bin/python -m benchmarks.go_heap_overhead [--repeats 2] [--seconds 15]

Workload: two go_churn processes (benchmarks/workloads/go_churn: allocation churn from ~40
call paths, memory profiling on) keep both cores busy. In one run, alternated per repeat:
no agent, the agent with ``cpu``, the agent with ``cpu,heap`` (no process selector: the
native heap mode probes nothing, every Go process is read from memory every 5 s). For each
agent run: its CPU (user+sys plus its BPF programs' run time, % of one core) over the
measured window after a warm-up, and the workload's allocations completed (slowdown
against the no-agent run). Results print and go to benchmarks/go_heap_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import bpf_runtime_ns, enable_bpf_stats, process_cpu_s
from benchmarks.run import free_port, start_agent, stop, wait_all_actors
from stackfleet.nats_server import NatsServer

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
WARMUP_S = 8.0


def build(tmp: Path) -> Path:
    exe = tmp / "go_churn"
    env = {"GO111MODULE": "off", "GOCACHE": str(tmp / "cache"), "GOFLAGS": "", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp)}
    subprocess.run(["go", "build", "-o", str(exe), "main.go"], cwd=ROOT / "benchmarks/workloads/go_churn",
                   env=env, check=True)
    return exe


def run_workload(exe: Path, seconds: float) -> int:
    """Allocations all processes completed in ``seconds``."""
    procs = [subprocess.Popen([str(exe), str(seconds), "16"], stdout=subprocess.PIPE, text=True)
             for _ in range(PROCESSES)]
    return sum(int(p.communicate()[0].split()[-1]) for p in procs)


def measured(exe: Path, seconds: float, nats_url: str, types: str) -> tuple[float, int]:
    """(agent CPU % of a core, allocations) for one agent run with ``types``."""
    started, port = time.monotonic(), free_port()
    agent = start_agent(nats_url, types, metrics_port=port)
    try:
        wait_all_actors(port, types, started)
        run_workload(exe, WARMUP_S)  # first reads and symbolization of the workload's stacks
        cpu0, bpf0, t0 = process_cpu_s(agent.pid), bpf_runtime_ns(agent.pid), time.monotonic()
        units = run_workload(exe, seconds)
        elapsed = time.monotonic() - t0
        cpu = process_cpu_s(agent.pid) - cpu0 + (bpf_runtime_ns(agent.pid) - bpf0) / 1e9
        return 100 * cpu / elapsed, units
    finally:
        stop(agent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    enable_bpf_stats()
    results: dict[str, Any] = {"none": {"allocations": []}, "cpu": {"agent_cpu_pct": [], "allocations": []},
                               "cpu,heap": {"agent_cpu_pct": [], "allocations": []}}
    with tempfile.TemporaryDirectory() as tmp, NatsServer() as nats:
        exe = build(Path(tmp))
        for _ in range(args.repeats):
            results["none"]["allocations"].append(run_workload(exe, args.seconds))
            for types in ("cpu", "cpu,heap"):
                cpu, units = measured(exe, args.seconds, nats.url, types)
                results[types]["agent_cpu_pct"].append(round(cpu, 2))
                results[types]["allocations"].append(units)
    base = statistics.median(results["none"]["allocations"])
    for types in ("cpu", "cpu,heap"):
        entry = results[types]
        entry["agent_cpu_pct_median"] = round(statistics.median(entry["agent_cpu_pct"]), 2)
        entry["workload_slowdown_pct_median"] = round(100 * (1 - statistics.median(entry["allocations"]) / base), 2)
        print(f"--types {types:9s} agent CPU {entry['agent_cpu_pct_median']:5.2f}% of a core "
              f"(runs {entry['agent_cpu_pct']}), workload slowdown {entry['workload_slowdown_pct_median']:5.2f}%")
    results["setup"] = {"processes": PROCESSES, "seconds": args.seconds, "repeats": args.repeats,
                        "warmup_s": WARMUP_S, "heap_go_interval_s": 5.0}
    (ROOT / "benchmarks" / "go_heap_overhead.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
