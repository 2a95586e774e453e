"""The agent process's CPU per second at a low rate, two source trees alternated in one run.

    sudo .venv/bin/python -m benchmarks.idle_cost --before REV [--rounds 3] [--hz 99]
                                                   [--warmup 20] [--duration 20]

At 99 Hz on a few CPUs the agent's process spends most of its CPU on fixed work (flushes,
/proc scans, metadata, pollers' wake-ups: docs/design/overhead.md, "Fixed work per second"),
not on samples. This runs the per-sample mode's workload (two spinning threads,
benchmarks/workloads/event_mix.c) and the agent with ``--types cpu``, from ``--before`` (a git
revision exported to a temporary directory) and from the working tree, alternating, each
for ``--duration`` seconds after all its actors attached and ``--warmup`` seconds. Measured
per run from the kernel's per-thread counters (so other processes' load does not count,
only what it does to this one): CPU time of every thread (``/proc/PID/task/*/schedstat``,
ns) and voluntary context switches (wake-ups), per group of threads named by ``py-spy dump``.
The symbolization and unwind-table threads are reported apart from the "fixed work": their
work follows the new stacks and binaries of other processes (a shared machine starts many),
not the agent's own timers. The load average is printed beside each run.
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
from pathlib import Path
from typing import Any

from benchmarks.event_mix import SPINNERS_ONLY, EventMix, build_event_mix
from benchmarks.run import free_port, stop, wait_all_actors
from stackfleet.nats_server import NatsServer

ROOT = Path(__file__).resolve().parent.parent
TREE_DIRS = ("agent", "shared", "stackfleet", "bpf")


def export_tree(revision: str, dest: Path) -> Path:
    """``revision``'s agent source folders in ``dest``/before."""
    out = dest / "before"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, *TREE_DIRS],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def thread_counters(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (CPU ns, voluntary context switches) of every thread of ``pid`` now."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
        except OSError:  # the thread ended
            continue
        switches = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        out[int(tid)] = (ns, switches)
    return out


# Threads whose work follows what other processes do (new stacks to symbolize, new binaries'
# unwind tables), reported apart: on a shared machine they swamp the fixed work.
DRIVEN_BY_OTHERS = ("symbolize", "unwind-tables")


def thread_names(pid: int) -> dict[int, str]:
    """tid -> Python thread name, from one ``py-spy dump`` (the OS names are all the process's)."""
    from benchmarks.agent_profile import py_spy

    dump = subprocess.run([py_spy(), "dump", "--nonblocking", "--pid", str(pid)], capture_output=True,
                          text=True, timeout=60).stdout
    names = {}
    for line in dump.splitlines():  # Thread 1234 (idle): "MainThread"
        if line.startswith("Thread ") and '"' in line:
            names[int(line.split()[1])] = line.split('"')[1]
    return names


def group(name: str) -> str:
    if name.startswith(DRIVEN_BY_OTHERS):
        return "symbolize+unwind"
    return "executor" if name.startswith(("uvloop_", "asyncio_")) else name


def window(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], seconds: float,
           names: dict[int, str] | None = None) -> dict[str, Any]:
    """CPU ms and wake-ups per second over a window (threads that ended in it are not counted),
    in total and per group of threads."""
    by_group: dict[str, list[float]] = {}
    for tid, (ns, switches) in after.items():
        ns0, switches0 = before.get(tid, (0, 0))
        row = by_group.setdefault(group((names or {}).get(tid, "other")), [0.0, 0.0])
        row[0] += (ns - ns0) / 1e6 / seconds
        row[1] += (switches - switches0) / seconds
    fixed = [v for g, v in by_group.items() if g != "symbolize+unwind"]
    return {"cpu_ms_per_s": sum(v[0] for v in by_group.values()),
            "wakeups_per_s": sum(v[1] for v in by_group.values()),
            "fixed_cpu_ms_per_s": sum(v[0] for v in fixed), "fixed_wakeups_per_s": sum(v[1] for v in fixed),
            "threads": {g: {"cpu_ms_per_s": round(v[0], 3), "wakeups_per_s": round(v[1], 2)}
                        for g, v in sorted(by_group.items())}}


def run_side(tree: Path, nats_url: str, hz: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree), "STACKFLEET_HOST_NAME": "bench-host",
           "STACKFLEET_FREQUENCY_HZ": str(hz), "STACKFLEET_METRICS_ADDRESS": f"127.0.0.1:{port}"}
    agent = subprocess.Popen([sys.executable, "-c", "from stackfleet.cli import app; app()", "agent", "--nats",
                              nats_url, "--types", "cpu", "--log-level", "WARNING"], cwd=tree, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_all_actors(port, "cpu", time.monotonic(), 400)
        time.sleep(warmup_s)
        names = thread_names(agent.pid)
        first, t0 = thread_counters(agent.pid), time.monotonic()
        time.sleep(duration_s)
        last, t1 = thread_counters(agent.pid), time.monotonic()
        return {**window(first, last, t1 - t0, names), "load_1m": os.getloadavg()[0]}
    finally:
        stop(agent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hz", type=int, default=99)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "idle_cost.json")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp, NatsServer() as nats, \
            EventMix(build_event_mix(Path(tmp)), SPINNERS_ONLY) as mix:
        trees = {"before": export_tree(args.before, Path(tmp)), "after": ROOT}
        for r in range(args.rounds):
            for side, tree in trees.items():
                result = run_side(tree, nats.url, args.hz, args.warmup, args.duration)
                runs[side].append(result)
                threads = ", ".join(f"{g} {v['cpu_ms_per_s']:.2f} ms/{v['wakeups_per_s']:.1f}"
                                    for g, v in result["threads"].items())
                print(f"round {r} {side:6}: {result['cpu_ms_per_s']:.2f} ms of CPU a second, "
                      f"{result['wakeups_per_s']:.1f} wake-ups a second; fixed work (all but symbolize+unwind) "
                      f"{result['fixed_cpu_ms_per_s']:.2f} ms, {result['fixed_wakeups_per_s']:.1f} wake-ups; "
                      f"load {result['load_1m']:.1f}; per thread group (ms/s / wake-ups/s): {threads}", flush=True)
        mix.stop()
    out: dict[str, Any] = {"before": args.before, "hz": args.hz, "warmup_s": args.warmup,
                           "duration_s": args.duration, "runs": runs}
    for side, results in runs.items():
        med = {k: statistics.median(r[k] for r in results)
               for k in ("cpu_ms_per_s", "wakeups_per_s", "fixed_cpu_ms_per_s", "fixed_wakeups_per_s")}
        out[f"{side}_median"] = {k: round(v, 3) for k, v in med.items()}
        print(f"{side:6} median: {med['cpu_ms_per_s']:.2f} ms of CPU a second, {med['wakeups_per_s']:.1f} wake-ups; "
              f"fixed work {med['fixed_cpu_ms_per_s']:.2f} ms, {med['fixed_wakeups_per_s']:.1f} wake-ups a second")
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
