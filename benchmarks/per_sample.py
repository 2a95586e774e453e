"""Per-sample cost of the agent's CPU profile next to bcc's ``profile`` tool, side by side.

    sudo .venv/bin/python -m benchmarks.run --mode per-sample [--rates 99,999] [--duration 20]

On one workload (two spinning threads, benchmarks/workloads/event_mix.c) and at one
sampling rate, the two profilers are run one after the other, alternating, each for
``--duration`` seconds:
- the agent with ``--types cpu`` (after all its actors attached and ``--warmup`` seconds):
  user+sys CPU of its process tree plus its BPF programs' run time;
- bcc's ``profile -F HZ`` (Debian's bpfcc-tools: ``profile-bpfcc``), from the moment its
  program first runs (its start-up compile is not counted, as the agent's is not): its
  process CPU plus its BPF program's run time over the window. What it spends after the
  window, symbolizing and printing every stack it collected (rusage at exit), is a one-off
  like the agent's warm-up: printed beside the ratio, not in it.
Each cost is divided by the samples taken in the window (runs of the tool's ``perf_event``
programs, benchmarks/cost.py), and the ratio of the medians is printed with the ratio of
each round. The target of issue #20: agent <= 3x bcc's ``profile``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.cost import Comparison, CostSnapshot, WindowCost, acquaint, snapshot, window_cost
from benchmarks.event_mix import SPINNERS_ONLY, EventMix, build_event_mix
from benchmarks.measure import BPF_PROG_TYPE_PERF_EVENT, bpf_programs
from benchmarks.run import free_port, start_agent, stop, wait_all_actors
from stackfleet.nats_server import NatsServer

PROFILE_TOOLS = ("profile-bpfcc", "/usr/share/bcc/tools/profile")
RATIO_TARGET = 3.0


def profile_tool() -> str:
    """The path of bcc's ``profile`` tool, or a clear error naming the package."""
    for name in PROFILE_TOOLS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("bcc's profile tool not found (profile-bpfcc): install Debian's bpfcc-tools "
                     "(scripts/setup.sh does)")


def agent_arm(nats_url: str, hz: int, warmup_s: float, duration_s: float) -> WindowCost:
    """The agent with ``cpu`` only at ``hz``: its cost over ``duration_s`` after warm-up."""
    port = free_port()
    agent = start_agent(nats_url, "cpu", {"STACKFLEET_FREQUENCY_HZ": str(hz)}, port)
    try:
        wait_all_actors(port, "cpu", time.monotonic())
        acquaint(agent.pid)
        time.sleep(warmup_s)
        before = snapshot(agent.pid)
        time.sleep(duration_s)
        return window_cost(before, snapshot(agent.pid, labelled=True))
    finally:
        stop(agent)


def wait_sampling(pid: int, timeout_s: float = 120) -> CostSnapshot:
    """Wait until ``pid`` holds a perf_event program that has run (bcc compiles first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.prog_type == BPF_PROG_TYPE_PERF_EVENT and p.run_cnt > 0 for p in bpf_programs([pid]).values()):
            return snapshot(pid)
        time.sleep(0.1)
    raise TimeoutError(f"bcc profile (pid {pid}) did not start sampling within {timeout_s}s")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def reference_arm(hz: int, duration_s: float) -> tuple[WindowCost, float]:
    """bcc's ``profile -F hz``: its cost over ``duration_s`` from its first sample, and the
    CPU seconds it spends after SIGINT printing (symbolizing) the stacks it collected."""
    with tempfile.TemporaryFile("w+") as stderr:
        # SIGINT back to its default in the child: a shell running this in the background
        # ignores it, the child would inherit that and never stop.
        proc = subprocess.Popen([profile_tool(), "-F", str(hz), "-f"], stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=_default_sigint)
        try:
            try:
                start = wait_sampling(proc.pid)
            except TimeoutError as e:
                stderr.seek(0)
                raise TimeoutError(f"{e}; its stderr: {stderr.read()[-2000:]}") from None
            time.sleep(duration_s)
            end = snapshot(proc.pid, labelled=True)
            proc.send_signal(signal.SIGINT)  # profile prints its (folded) stacks and exits
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return window_cost(start, end), usage.ru_utime + usage.ru_stime - end.process_cpu_s
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait(30)


def per_sample(rates: list[int], repeats: int, warmup_s: float, duration_s: float) -> list[Comparison]:
    """Alternate the agent and bcc's ``profile`` at each rate, ``repeats`` rounds each,
    while the workload keeps two threads spinning."""
    profile_tool()  # fail before anything starts
    comparisons = []
    with tempfile.TemporaryDirectory() as tmp, NatsServer() as nats, \
            EventMix(build_event_mix(Path(tmp)), SPINNERS_ONLY) as mix:
        for hz in rates:
            agent_costs, reference_costs, exit_cpu = [], [], []
            for _ in range(repeats):
                agent_costs.append(agent_arm(nats.url, hz, warmup_s, duration_s))
                reference, exit_cpu_s = reference_arm(hz, duration_s)
                reference_costs.append(reference)
                exit_cpu.append(exit_cpu_s)
                print(f"  {hz} Hz round: agent {agent_costs[-1].us_per_sample:.1f} us/sample, "
                      f"bcc profile {reference_costs[-1].us_per_sample:.1f} us/sample", flush=True)
            comparisons.append(Comparison(hz, agent_costs, reference_costs, exit_cpu))
        mix.stop()
    return comparisons


def cost_fields(w: WindowCost) -> dict[str, Any]:
    return {"seconds": round(w.seconds, 2), "samples": w.samples, "samples_per_s": round(w.samples / w.seconds, 1),
            "process_cpu_s": round(w.process_cpu_s, 3), "bpf_ms": round(w.bpf_ns / 1e6, 2),
            "us_per_sample": round(w.us_per_sample, 2), "process_us_per_sample": round(w.process_us_per_sample, 2),
            "bpf_us_per_sample": round(w.bpf_us_per_sample, 2), "pct_of_core": round(w.total_pct, 2),
            "programs": [{"id": p.prog_id, "program": p.label or p.type_name, "runs": p.runs,
                          "us_per_run": round(p.us_per_run, 2)} for p in w.programs if p.runs]}


def report(comparisons: list[Comparison]) -> dict[str, Any]:
    """Print the table and return the JSON document."""
    print(f"\n{'rate':>6} {'tool':14} {'samples/s':>10} {'us/sample':>10} {'process':>8} {'BPF':>7} "
          f"{'% core':>7}")
    out: dict[str, Any] = {"target_ratio": RATIO_TARGET, "rates": {}}
    for c in comparisons:
        for tool, costs in (("agent (cpu)", c.agent), ("bcc profile", c.reference)):
            for w in costs:
                print(f"{c.hz:>4}Hz {tool:14} {w.samples / w.seconds:>10.0f} {w.us_per_sample:>10.2f} "
                      f"{w.process_us_per_sample:>8.2f} {w.bpf_us_per_sample:>7.2f} {w.total_pct:>7.2f}")
        ratios = ", ".join(f"{r:.1f}" for r in c.round_ratios)
        met = "yes" if c.ratio <= RATIO_TARGET else "NO"
        exit_s = ", ".join(f"{x:.2f}" for x in c.reference_exit_cpu_s)
        print(f"{c.hz:>4}Hz ratio agent / bcc profile: {c.ratio:.1f} (rounds: {ratios}); "
              f"target <= {RATIO_TARGET:g}: {met}")
        print(f"      bcc profile's exit-time symbolization: {exit_s} s of CPU; counted in, "
              f"{c.reference_us_with_exit:.2f} us/sample (ratio {c.agent_us / c.reference_us_with_exit:.1f})")
        out["rates"][str(c.hz)] = {
            "agent_us_per_sample": round(c.agent_us, 2), "bcc_profile_us_per_sample": round(c.reference_us, 2),
            "ratio": round(c.ratio, 2), "round_ratios": [round(r, 2) for r in c.round_ratios],
            "met": c.ratio <= RATIO_TARGET,
            "bcc_profile_exit_cpu_s": [round(x, 3) for x in c.reference_exit_cpu_s],
            "bcc_profile_us_per_sample_with_exit": round(c.reference_us_with_exit, 2),
            "agent": [cost_fields(w) for w in c.agent], "bcc_profile": [cost_fields(w) for w in c.reference]}
    return out

