"""Cost of heap profiling for a program that allocates: no profiling, sampled mode, precise mode.

    sudo .venv/bin/python -m benchmarks.heap_overhead [--rounds 5] [--json out.json]

Runs the same malloc/free loop (benchmarks/workloads/alloc_loop.c, blocks of 16 B .. 2 KiB)
side by side in one run, the configurations interleaved round after round, with one agent
running the heap actor:

- ``none``: not profiled (a copy of the binary no selector matches, no library);
- ``library``: the sampler library preloaded under another file name, which the agent does
  not probe: what the wrappers cost by themselves;
- ``sampled``: the sampler library preloaded (512 KiB mean), its probes attached by the agent;
- ``precise``: selected by name, uprobes on every libc allocation call (fewer pairs: slow).

Two loops: ``tight`` allocates and frees and does nothing else (tens of millions of pairs a
second: the worst case, where the wrappers' few instructions and every sample show), and
``5M/s``, where each pair is followed by computation calibrated so that the unprofiled loop
runs about 5.9 million pairs a second. Each run reports wall and thread-CPU time per pair;
the slowdown is taken on CPU time (which includes the uprobe handlers but not the time the
loop waits for a CPU on a busy machine) and on wall time, median over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.heap_sampler import ENV_SAMPLE_BYTES, LIBRARY_NAME, build_library
from benchmarks.measure import process_cpu_s
from benchmarks.run import STACKFLEET
from stackfleet.nats_server import NatsServer

ROOT = Path(__file__).resolve().parents[1]
TARGET_NS_PER_PAIR = 170.0  # the 5M/s loop: ~5.9 million pairs a second of CPU (margin for a busy machine)
SAMPLE_BYTES = 512 * 1024


@dataclass
class Run:
    wall_ns: float
    cpu_ns: float
    sampled: int  # allocations the library sampled (-1: no library)
    probe_byte: int  # first byte of the library's probe function: 0x0f unprobed (-1: no library)


@dataclass
class Config:
    name: str
    exe: Path
    calls: int
    env: dict[str, str] = field(default_factory=dict)
    wait_s: float = 0.0  # the precise mode's selector scan must probe the process first
    runs: list[Run] = field(default_factory=list)
    agent_cpu_s: float = 0.0  # the agent's CPU time while this configuration's runs ran

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def timed(config: Config, work: int) -> Run:
    env = {"PATH": "/usr/bin:/bin", **config.env}
    proc = subprocess.Popen([str(config.exe), str(config.calls), str(work)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdin and proc.stdout
    proc.stdout.readline()
    time.sleep(config.wait_s)
    out, _ = proc.communicate("go\n")
    words = out.split()
    return Run(float(words[1]), float(words[3]), int(words[5]), int(words[7]))


def calibrate(exe: Path) -> int:
    """WORK steps that bring the unprofiled loop to about TARGET_NS_PER_PAIR of CPU per pair."""
    probe = Config("calibrate", exe, 1_000_000)
    base = statistics.median(timed(probe, 0).cpu_ns for _ in range(3))
    with_work = statistics.median(timed(probe, 100).cpu_ns for _ in range(3))
    return max(1, round(100 * (TARGET_NS_PER_PAIR - base) / max(with_work - base, 1.0)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=4_000_000, help="pairs per run of the tight loop")
    parser.add_argument("--calls-5m", type=int, default=1_000_000, help="pairs per run of the 5M/s loop")
    parser.add_argument("--precise-calls", type=int, default=50_000)
    parser.add_argument("--json", type=Path, help="write the runs and medians here")
    args = parser.parse_args()
    library = build_library()
    with tempfile.TemporaryDirectory() as tmp_dir, NatsServer() as nats:
        tmp = Path(tmp_dir)
        subprocess.run(["gcc", "-O2", "-o", str(tmp / "loop_none"), str(ROOT / "benchmarks/workloads/alloc_loop.c")],
                       check=True)
        for name in ("loop_library", "loop_sampled", "loop_precise"):
            shutil.copy2(tmp / "loop_none", tmp / name)
        unprobed = tmp / "libstackfleet_heap_unprobed.so"  # a name the agent does not look for
        shutil.copy2(library, unprobed)
        assert unprobed.name != LIBRARY_NAME
        work_5m = calibrate(tmp / "loop_none")
        agent = subprocess.Popen([STACKFLEET, "agent", "--nats", nats.url, "--types", "heap", "--log-level", "WARNING"],
                                 env={"STACKFLEET_TARGET_COMM": "^loop_precise$", "PATH": "/usr/bin:/bin"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loops: dict[str, tuple[int, list[Config]]] = {}
        try:
            time.sleep(8)  # compile and attach
            for loop, work, calls in (("tight", 0, args.calls), ("5M/s", work_5m, args.calls_5m)):
                configs = [
                    Config("none", tmp / "loop_none", calls),
                    Config("library", tmp / "loop_library", calls,
                           {"LD_PRELOAD": str(unprobed), ENV_SAMPLE_BYTES: str(SAMPLE_BYTES)}),
                    Config("sampled", tmp / "loop_sampled", calls,
                           {"LD_PRELOAD": str(library), ENV_SAMPLE_BYTES: str(SAMPLE_BYTES)}),
                    Config("precise", tmp / "loop_precise", args.precise_calls, wait_s=2.5),
                ]
                for _ in range(args.rounds):
                    for config in configs:
                        before = process_cpu_s(agent.pid)
                        config.runs.append(timed(config, work))
                        time.sleep(1.0)  # the agent's flush of this run's records
                        config.agent_cpu_s += process_cpu_s(agent.pid) - before
                check_probes(configs)
                loops[loop] = (work, configs)
        finally:
            agent.terminate()
            agent.wait(30)
    report(loops, args)
    return 0


NOP5_FIRST_BYTE = 0x0F


def check_probes(configs: list[Config]) -> None:
    """The library-alone runs must have had no uprobe on the probe function, the sampled runs one
    (else the columns would measure something else than they say)."""
    by_name = {c.name: c for c in configs}
    library = {r.probe_byte for r in by_name["library"].runs}
    sampled = {r.probe_byte for r in by_name["sampled"].runs}
    if library != {NOP5_FIRST_BYTE} or NOP5_FIRST_BYTE in sampled or -1 in sampled:
        raise SystemExit(f"probe state not as intended: library runs {library}, sampled runs {sampled}")


def report(loops: dict[str, tuple[int, list[Config]]], args: argparse.Namespace) -> None:
    out: dict[str, object] = {"rounds": args.rounds, "sample_bytes": SAMPLE_BYTES, "cpus": os.cpu_count(),
                              "loadavg_end": Path("/proc/loadavg").read_text().split()[:3], "loops": {}}
    for loop, (work, configs) in loops.items():
        none = configs[0]
        base_cpu, base_wall = none.median("cpu_ns"), none.median("wall_ns")
        print(f"\n{loop} loop (work {work} steps a pair): {1e3 / base_cpu:.1f} M pairs/s of CPU unprofiled")
        print(f"  {'mode':8} {'cpu ns/pair':>12} {'wall ns/pair':>13} {'slowdown cpu':>13} {'slowdown wall':>14}"
              f" {'samples/s':>10}")
        rows: dict[str, dict[str, float | list[dict[str, float]]]] = {}
        for config in configs:
            cpu, wall = config.median("cpu_ns"), config.median("wall_ns")
            sampled = statistics.median(r.sampled for r in config.runs)
            rate = sampled / (config.calls * cpu * 1e-9) if sampled > 0 else 0.0
            rows[config.name] = {"cpu_ns": cpu, "wall_ns": wall, "slowdown_cpu": cpu / base_cpu - 1,
                                 "slowdown_wall": wall / base_wall - 1, "samples_per_cpu_s": rate,
                                 "runs": [asdict(r) for r in config.runs]}
            print(f"  {config.name:8} {cpu:12.1f} {wall:13.1f} {100 * (cpu / base_cpu - 1):12.1f}%"
                  f" {100 * (wall / base_wall - 1):13.1f}% {rate:10.0f}")
        sampled_slowdown = configs[2].median("cpu_ns") / base_cpu - 1
        per_sample = ((configs[2].median("cpu_ns") - configs[1].median("cpu_ns")) * configs[2].calls
                      / max(1.0, statistics.median(r.sampled for r in configs[2].runs)))
        samples = sum(r.sampled for r in configs[2].runs)
        agent_per_sample = (configs[2].agent_cpu_s - configs[0].agent_cpu_s) / max(1, samples)
        print(f"  per sample (alloc + free probes, beyond the library): {per_sample / 1e3:.2f} us;"
              f" sampled-mode target < 5% slowdown: {'met' if sampled_slowdown < 0.05 else 'NOT met'}")
        print(f"  agent CPU per sample (sampled runs minus unprofiled runs): {agent_per_sample * 1e6:.0f} us")
        out["loops"][loop] = {"work": work, "per_sample_us": per_sample / 1e3,  # type: ignore[index]
                              "agent_us_per_sample": agent_per_sample * 1e6, "modes": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
