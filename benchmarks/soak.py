"""Soak: does memory stay flat? Agent + aggregator + a realistic workload for a long time.

    sudo .venv/bin/python -m benchmarks.soak [--duration 300] [--interval 5] [--types cpu,wall]
    sudo .venv/bin/python -m benchmarks.soak --duration 3600          # the hour-long soak
    sudo .venv/bin/python -m benchmarks.soak --duration 3600 --new-binary-every 30

Starts a real nats-server (JetStream), ``stackfleet aggregator`` and ``stackfleet agent`` as
separate processes, and benchmarks/workloads/host_mix.c restarted in a loop (new processes,
new stacks: what makes dictionaries and symbol caches grow if anything leaks), and with
``--new-binary-every S`` a never-seen C binary (built by gcc) and Python script every S
seconds: what a host that deploys or runs jobs does to the agent's symbol caches. Samples the
resident memory (VmRSS) of agent and aggregator every ``--interval`` seconds, then prints
and writes JSON: the series, and per process a least-squares slope over the *second half*
(the first half includes warm-up: BPF compile, symbol tables, dictionaries filling). The
verdict is "flat" when that slope, extrapolated over an hour, is under ``--max-growth-mib-per-hour``.
A slope over minutes says little about a leak of kilobytes per hour: run the hour for that.
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

from benchmarks.measure import process_rss_bytes
from benchmarks.run import ROOT, STACKFLEET, build_workload, stop
from stackfleet.nats_server import NatsServer

MIB = 1024 * 1024


def second_half_slope_mib_per_hour(series: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time in the second half of the run, MiB per hour."""
    half = series[len(series) // 2:]
    if len(half) < 3:
        return 0.0
    slope, _ = statistics.linear_regression([t for t, _ in half], [rss / MIB for _, rss in half])
    return slope * 3600


def verdict(series: list[tuple[float, int]], max_growth_mib_per_hour: float) -> dict[str, Any]:
    slope = second_half_slope_mib_per_hour(series)
    rss = [r for _, r in series]
    return {
        "start_mib": round(rss[0] / MIB, 1),
        "end_mib": round(rss[-1] / MIB, 1),
        "max_mib": round(max(rss) / MIB, 1),
        "second_half_slope_mib_per_hour": round(slope, 2),
        "flat": slope < max_growth_mib_per_hour,
    }


def workload_loop(exe: Path, stop_at: float) -> subprocess.Popen[bytes] | None:
    """Start the next short host_mix run if the soak is not over (2 busy, 4 sleepy threads, 20 s)."""
    if time.monotonic() >= stop_at:
        return None
    seconds = max(1.0, min(20.0, stop_at - time.monotonic()))
    return subprocess.Popen([str(exe), str(seconds), "2", "4"], stdout=subprocess.DEVNULL)


NEW_BINARY_C = """
#include <time.h>
volatile unsigned long sink;
__attribute__((noinline)) void spin_%(n)d(void) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do {
        for (int k = 0; k < 100000; k++) sink += k * %(n)d;
        clock_gettime(CLOCK_MONOTONIC, &b);
    } while ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec) < 500000000L);
}
int main(void) { spin_%(n)d(); return 0; }
"""
NEW_SCRIPT_PY = """import time
def work_%(n)d():
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass
work_%(n)d()
"""


def start_new_binary(out_dir: Path, n: int) -> subprocess.Popen[bytes]:
    """Build and run a binary never seen before (its own build id and function name), then a
    Python script with a new function: what a host that deploys, builds or runs jobs does.
    The compiler's own processes (gcc, cc1, as, ld) are short-lived processes too."""
    source = out_dir / f"new_{n}.c"
    source.write_text(NEW_BINARY_C % {"n": n})
    script = out_dir / f"new_{n}.py"
    script.write_text(NEW_SCRIPT_PY % {"n": n})
    exe = out_dir / f"new_{n}"
    command = f"gcc -O1 -g -o {exe} {source} && {exe}; {sys.executable} {script}; rm -f {exe} {source} {script}"
    return subprocess.Popen(["sh", "-c", command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def soak(duration_s: float, interval_s: float, types: str, out_dir: Path,
         new_binary_every_s: float = 0.0) -> dict[str, Any]:
    exe = build_workload(out_dir)
    with NatsServer(store_dir=str(out_dir / "jetstream")) as nats:
        env = {**os.environ, "STACKFLEET_NATS__URL": nats.url, "STACKFLEET_HOST_NAME": "soak-host"}
        agg_log = open(out_dir / "aggregator.log", "wb")  # noqa: SIM115 - closed in finally
        agent_log = open(out_dir / "agent.log", "wb")  # noqa: SIM115
        aggregator = subprocess.Popen([STACKFLEET, "aggregator", "--output-dir", str(out_dir / "profiles"),
                                       "--otlp-endpoint", "", "--log-level", "WARNING"],
                                      env=env, stdout=agg_log, stderr=subprocess.STDOUT)
        agent = subprocess.Popen([STACKFLEET, "agent", "--types", types, "--log-level", "WARNING"],
                                 env=env, stdout=agent_log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        stop_at = started + duration_s
        series: dict[str, list[tuple[float, int]]] = {"agent": [], "aggregator": []}
        work = workload_loop(exe, stop_at)
        new_binaries = 0
        next_binary = started + new_binary_every_s
        churn: subprocess.Popen[bytes] | None = None
        try:
            while time.monotonic() < stop_at:
                for name, proc in (("agent", agent), ("aggregator", aggregator)):
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}; see {out_dir}/{name}.log")
                    rss = process_rss_bytes(proc.pid)
                    if rss:  # 0 while the process is still exec'ing
                        series[name].append((time.monotonic() - started, rss))
                if work is None or work.poll() is not None:
                    work = workload_loop(exe, stop_at)
                churn_idle = churn is None or churn.poll() is not None
                if new_binary_every_s and time.monotonic() >= next_binary and churn_idle:
                    new_binaries += 1
                    churn = start_new_binary(out_dir, new_binaries)
                    next_binary += new_binary_every_s
                if series["agent"] and series["aggregator"]:
                    last = series["agent"][-1]
                    print(f"{last[0]:7.0f}s  agent {last[1] / MIB:7.1f} MiB  "
                          f"aggregator {series['aggregator'][-1][1] / MIB:7.1f} MiB", flush=True)
                time.sleep(min(interval_s, max(0.0, stop_at - time.monotonic())))
        finally:
            for child in (work, churn):
                if child is not None and child.poll() is None:
                    child.kill()
            stop(agent)
            stop(aggregator)
            agg_log.close()
            agent_log.close()
    return {"duration_s": duration_s, "interval_s": interval_s, "types": types,
            "new_binary_every_s": new_binary_every_s, "new_binaries": new_binaries,
            "series": {k: [[round(t, 1), r] for t, r in v] for k, v in series.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (3600 for the hour)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--types", default="cpu")
    parser.add_argument("--max-growth-mib-per-hour", type=float, default=20.0)
    parser.add_argument("--new-binary-every", type=float, default=0.0,
                        help="seconds between never-seen binaries and scripts (0: none)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "soak.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the soak runs the real agent (BPF): run it as root")
    with tempfile.TemporaryDirectory(prefix="stackfleet-soak-") as tmp:
        result = soak(args.duration, args.interval, args.types, Path(tmp), args.new_binary_every)
    series = {k: [(t, r) for t, r in v] for k, v in result["series"].items()}
    result["verdict"] = {name: verdict(s, args.max_growth_mib_per_hour) for name, s in series.items()}
    result["flat"] = all(v["flat"] for v in result["verdict"].values())
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    for name, v in result["verdict"].items():
        print(f"{name:10s} {v['start_mib']:7.1f} -> {v['end_mib']:7.1f} MiB (max {v['max_mib']:.1f}), "
              f"second-half slope {v['second_half_slope_mib_per_hour']:+.1f} MiB/h: "
              f"{'flat' if v['flat'] else 'GROWING'}")
    print(f"written to {args.json}")
    sys.exit(0 if result["flat"] else 1)


if __name__ == "__main__":
    main()
