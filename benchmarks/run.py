"""The overhead and scale suite: one command, every figure measured side by side, with targets.

    sudo .venv/bin/python -m benchmarks.run [--repeats 3] [--seconds 15] [--hosts 1000] [--replicas 2]
    sudo .venv/bin/python -m benchmarks.run --mode per-sample|busy|storm|py-spy [--duration 20]

The modes other than ``suite`` each measure one thing of issue #20 and write their own JSON
beside results.json: ``per-sample`` the agent's cost per CPU sample next to bcc's ``profile``
(benchmarks/per_sample.py), ``busy`` and ``storm`` the agent on a host with many context
switches and futex waits (benchmarks/busy_mix.py), ``py-spy`` where the agent's own CPU goes
there (benchmarks/agent_profile.py).

The ``suite`` measures, in one run on this machine:

- agent CPU (user+sys of the agent process, plus its BPF programs' run time from the
  kernel's bpf_stats) while a realistic workload (benchmarks/workloads/host_mix.c) keeps
  both cores busy;
- workload slowdown: the same fixed-duration workload, agent off vs on, alternated,
  compared by units of work completed (a ratio, robust to the machine's noise);
- network per host: bytes the NATS server received from the agent (/connz), steady state;
- wire encoding: bytes per host-second for naive (no dictionary), deltas, deltas + zstd;
- agent resident memory at the end of the run (the soak test watches it for an hour);
- agent start to first samples, BPF compile included;
- aggregator intake: N simulated hosts at 99 Hz x 2 CPUs through a real nats-server, and
  whether the aggregator keeps up (samples exported in time / published) and its CPU
  (phases and definitions in benchmarks/intake.py).
Results print as a table and go to benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.intake import aggregator_intake
from benchmarks.measure import (
    Stat,
    bpf_runtime_ns,
    connection_in_bytes,
    enable_bpf_stats,
    process_cpu_s,
    process_rss_bytes,
)
from stackfleet.nats_server import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[1]
STACKFLEET = str(Path(sys.executable).parent / "stackfleet")


def build_workload(tmp: Path) -> Path:
    out = tmp / "host_mix"
    subprocess.run(["gcc", "-O2", "-g", "-fno-omit-frame-pointer", "-pthread", "-o", str(out),
                    str(ROOT / "benchmarks/workloads/host_mix.c")], check=True)
    return out


def run_workload(exe: Path, seconds: float) -> int:
    out = subprocess.run([str(exe), str(seconds), "2", "4"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


# Each started agent's log (warnings and errors), by pid: what ``require_running`` shows when
# an agent has exited under a benchmark.
AGENT_LOGS: dict[int, Path] = {}
LOG_TAIL_LINES = 30


def start_agent(nats_url: str, types: str, extra_env: dict[str, str] | None = None,
                metrics_port: int = 0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STACKFLEET_HOST_NAME": "bench-host", "PYTHONFAULTHANDLER": "1", **(extra_env or {})}
    if metrics_port:
        env["STACKFLEET_METRICS_ADDRESS"] = f"127.0.0.1:{metrics_port}"
    with tempfile.NamedTemporaryFile(prefix="stackfleet-agent-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen([STACKFLEET, "agent", "--nats", nats_url, "--types", types, "--log-level", "WARNING"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    AGENT_LOGS[proc.pid] = Path(log.name)
    return proc


def require_running(agent: subprocess.Popen[bytes]) -> None:
    """Raise, with the end of its log, if the agent has exited: a window of a dead agent would
    read as no cost at all."""
    if agent.poll() is None:
        return
    log = AGENT_LOGS.get(agent.pid)
    tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if log and log.exists() else []
    raise RuntimeError(f"the agent exited with {agent.returncode} ({log}):\n" + "\n".join(tail))


def wait_all_actors(metrics_port: int, types: str, started: float, timeout_s: float = 120) -> float:
    """Seconds from agent spawn until every actor has compiled and attached its BPF program.

    Compiling a program costs seconds of CPU; the steady-state measurement must not start
    while a later actor is still compiling (on a loaded machine that takes tens of seconds).
    """
    wanted = {f'stackfleet_agent_actor_started_total{{type="{t}"}}' for t in types.split(",")}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            if all(any(line.startswith(w) for line in text.splitlines()) for w in wanted):
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"actors {types} not all started within {timeout_s}s")


def wait_first_samples(nats: NatsServer, started: float, timeout_s: float = 60) -> float:
    """Seconds from agent spawn until the NATS server has received its first samples."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if connection_in_bytes(nats.monitor_url, "stackfleet-agent") > 0:
            return time.monotonic() - started
        time.sleep(0.05)
    raise TimeoutError("agent published nothing")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def agent_overhead(exe: Path, seconds: float, repeats: int, types: str,
                   agent_env: dict[str, str] | None = None, warmup_s: float = 20) -> dict[str, Any]:
    """Alternate workload runs without and with the agent; measure agent cost and slowdown."""
    off_units: list[float] = []
    on_units: list[float] = []
    agent_cpu_pct: list[float] = []
    bpf_cpu_pct: list[float] = []
    net_bps: list[float] = []
    startup_s: list[float] = []
    all_started_s: list[float] = []
    warmup_cpu_pct: list[float] = []
    rss: list[float] = []
    with NatsServer() as nats:
        for _ in range(repeats):
            off_units.append(run_workload(exe, seconds))
            started = time.monotonic()
            metrics_port = free_port()
            agent = start_agent(nats.url, types, agent_env, metrics_port)
            try:
                startup_s.append(wait_first_samples(nats, started))
                all_started_s.append(wait_all_actors(metrics_port, types, started))
                # Warm-up: one run of the same workload with the agent on, so the measured run
                # sees a long-running agent (symbols, unwind tables, stacks of this workload
                # cached), not its first minute. Its cost is reported separately.
                cpu_w, bpf_w, t_w = process_cpu_s(agent.pid), bpf_runtime_ns(agent.pid), time.monotonic()
                if warmup_s > 0:
                    run_workload(exe, warmup_s)
                warmup_elapsed = time.monotonic() - t_w
                warmup_cpu_pct.append(100 * ((process_cpu_s(agent.pid) - cpu_w)
                                             + (bpf_runtime_ns(agent.pid) - bpf_w) / 1e9) / warmup_elapsed)
                cpu0, bpf0 = process_cpu_s(agent.pid), bpf_runtime_ns(agent.pid)
                net0, t0 = connection_in_bytes(nats.monitor_url, "stackfleet-agent"), time.monotonic()
                on_units.append(run_workload(exe, seconds))
                elapsed = time.monotonic() - t0
                cpu1, bpf1 = process_cpu_s(agent.pid), bpf_runtime_ns(agent.pid)
                net1 = connection_in_bytes(nats.monitor_url, "stackfleet-agent")
                agent_cpu_pct.append(100 * (cpu1 - cpu0) / elapsed)
                bpf_cpu_pct.append(100 * (bpf1 - bpf0) / 1e9 / elapsed)
                net_bps.append((net1 - net0) / elapsed)
                rss.append(process_rss_bytes(agent.pid) / 2**20)
            finally:
                stop(agent)
    slowdown = [100 * (1 - on / off) for on, off in zip(on_units, off_units, strict=True)]
    return {
        "agent_cpu_pct_of_core": Stat(agent_cpu_pct),
        "bpf_cpu_pct_of_core": Stat(bpf_cpu_pct),
        "agent_total_cpu_pct_of_core": Stat([a + b for a, b in zip(agent_cpu_pct, bpf_cpu_pct, strict=True)]),
        "workload_slowdown_pct": Stat(slowdown),
        "network_bytes_per_s": Stat(net_bps),
        "agent_rss_mb": Stat(rss),
        "start_to_first_samples_s": Stat(startup_s),
        "start_to_all_actors_attached_s": Stat(all_started_s),
        "agent_warmup_total_cpu_pct_of_core": Stat(warmup_cpu_pct),
    }


def wire_sizes(seconds: int = 30) -> dict[str, Any]:
    """Bytes per host-second for three encodings of the same simulated traffic."""
    from benchmarks.host_simulator import SimulatedHost
    from shared.wire import StreamEncoder

    host = SimulatedHost(7)
    t0 = time.time_ns()
    deltas = compressed = naive = 0
    for s in range(seconds):
        batch = host.batch(t0 + s * 10**9, 1, 99, 2)
        # naive: every batch self-contained (a fresh dictionary each time), uncompressed
        fresh = StreamEncoder(host.name, host.encoder.profile_type, "x")
        d, m = fresh.encode(batch, 10_101_010)
        naive += len(_raw(d)) + len(_raw(m))
        d, m = host.encoder.encode(batch, 10_101_010)
        compressed += len(d or b"") + len(m or b"")
        deltas += len(_raw(d)) + len(_raw(m))
    return {"naive_bytes_per_host_s": naive / seconds, "delta_bytes_per_host_s": deltas / seconds,
            "delta_zstd_bytes_per_host_s": compressed / seconds}


def _raw(msg: bytes | None) -> bytes:
    """The msgpack bytes of a message, decompressed if zstd-framed."""
    if not msg:
        return b""
    import zstandard

    from shared.wire import ZSTD_MAGIC

    return zstandard.ZstdDecompressor().decompressobj().decompress(msg) if msg[:4] == ZSTD_MAGIC else msg


TARGETS = {
    "agent_total_cpu_pct_of_core": ("< 1 %", lambda v: v < 1.0),
    "workload_slowdown_pct": ("< 1 %", lambda v: v < 1.0),
    "network_bytes_per_s": ("< 10,000 B/s", lambda v: v < 10_000),
    "agent_rss_mb": ("< 150 MB", lambda v: v < 150),
    "start_to_first_samples_s": ("< 10 s", lambda v: v < 10),
    "kept_up_ratio": (">= 0.99 at 1,000 hosts", lambda v: v >= 0.99),
}
# A slowdown whose runs spread by more than the target itself (this VM: +-10 % and more) is
# not measured, whatever its median says.
NOISE_BOUND = {"workload_slowdown_pct": 1.0}


MODE_JSON = {"suite": "results.json", "per-sample": "per_sample.json", "busy": "busy_mix.json",
             "storm": "storm.json", "py-spy": "agent_py_spy.json"}
ALL_EVENT_TYPES = "cpu,wall,lock,goroutine"


def run_mode(args: argparse.Namespace) -> None:
    """One of issue #20's measurements; prints its table and writes its JSON."""
    from benchmarks import agent_profile, busy_mix, machine, per_sample
    from benchmarks.event_mix import build_event_mix

    if not enable_bpf_stats():
        raise SystemExit("cannot enable kernel.bpf_stats_enabled (run as root): BPF run time would read 0")
    repeats = 2 if args.repeats is None else args.repeats
    out: dict[str, Any] = {"mode": args.mode, "duration_s": args.duration, "warmup_s": args.warmup,
                           "repeats": repeats, "target_comm": args.target_comm or "(all processes)",
                           "load_average_at_start": os.getloadavg(), "machine": machine.describe()}
    print(f"machine: {out['machine']['cpu'].get('model_name', '?')}, kernel {out['machine']['kernel']}, "
          f"syscall round trip {out['machine']['syscall_round_trip_ns']:.0f} ns", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode == "per-sample":
            rates = [int(r) for r in args.rates.split(",")]
            out.update(per_sample.report(per_sample.per_sample(rates, repeats, args.warmup, args.duration)))
        else:
            exe = build_event_mix(Path(tmp))
            if args.mode == "busy":
                type_sets = [args.types] if args.types else ["cpu", ALL_EVENT_TYPES]
                out.update(busy_mix.busy_report(busy_mix.busy(exe, type_sets, repeats, args.warmup, args.duration,
                                                              args.target_comm)))
            elif args.mode == "storm":
                types = args.types or ALL_EVENT_TYPES
                out.update(busy_mix.storm_report(busy_mix.storm(
                    exe, types, args.storm_factor, repeats, args.warmup, args.settle, args.duration,
                    args.target_comm), types))
            else:
                types = args.types or ALL_EVENT_TYPES
                out.update(agent_profile.report(agent_profile.profile_agent(
                    exe, types, args.warmup, args.duration, target_comm=args.target_comm), types))
    out["load_average_at_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\nload average at start {out['load_average_at_start'][0]:.1f}, at end {out['load_average_at_end'][0]:.1f} "
          f"(the machine is shared: other jobs' load is in every figure)\nwritten to {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=list(MODE_JSON), default="suite")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds per measurement (suite: 3; per-sample, busy, storm: 2)")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--types", default=None,
                        help="agent profile types (suite: cpu; storm and py-spy: cpu,wall,lock,goroutine)")
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--intake-seconds", type=int, default=20)
    parser.add_argument("--skip-intake", action="store_true")
    parser.add_argument("--replicas", type=int, default=2,
                        help="aggregator replicas sharing the intake (the target is 2 cores: one per core)")
    parser.add_argument("--warmup", type=float, default=20,
                        help="seconds of workload with the agent on before each measured run")
    parser.add_argument("--target-comm", default="",
                        help="trace only processes whose name matches (STACKFLEET_TARGET_COMM); on a shared "
                             "machine this keeps other people's processes out of the wall/lock figures")
    parser.add_argument("--duration", type=float, default=20,
                        help="seconds of each measured window in the per-sample, busy, storm and py-spy modes")
    parser.add_argument("--rates", default="99,999", help="per-sample mode: sampling rates in Hz")
    parser.add_argument("--storm-factor", type=float, default=2, help="storm mode: how much faster the fast mix is")
    parser.add_argument("--settle", type=float, default=5,
                        help="storm mode: seconds between starting a workload and measuring")
    parser.add_argument("--json", default=None, help="output file (default: per mode, in benchmarks/)")
    args = parser.parse_args()
    if args.json is None:
        args.json = str(ROOT / "benchmarks" / MODE_JSON[args.mode])
    if args.mode != "suite":
        run_mode(args)
        return
    args.repeats = 3 if args.repeats is None else args.repeats
    args.types = args.types or "cpu"
    if not enable_bpf_stats():
        print("warning: cannot enable kernel.bpf_stats_enabled; BPF CPU will read 0", file=sys.stderr)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_workload(Path(tmp))
        agent_env = {"STACKFLEET_TARGET_COMM": args.target_comm} if args.target_comm else {}
        results.update(agent_overhead(exe, args.seconds, args.repeats, args.types, agent_env, args.warmup))
        results["types"] = args.types
        results["target_comm"] = args.target_comm or "(all processes)"
    results.update(wire_sizes())
    if not args.skip_intake:
        results.update(aggregator_intake(args.hosts, args.intake_seconds, args.replicas))
    print(f"\n{'measure':34} {'value (median ±half-range)':>30}  {'target':>24}  met")
    flat: dict[str, Any] = {}
    for name, value in results.items():
        median = value.median if isinstance(value, Stat) else value
        target, ok = TARGETS.get(name, ("", None))
        met = "" if ok is None else ("yes" if ok(median) else "NO")
        if name in NOISE_BOUND and isinstance(value, Stat) and value.spread >= NOISE_BOUND[name]:
            met = "noise"  # the runs disagree by more than the target: no verdict either way
        shown = str(value) if isinstance(value, Stat) else (f"{value:,.3g}" if isinstance(value, float) else value)
        print(f"{name:34} {shown!s:>30}  {target:>24}  {met}")
        flat[name] = {"median": value.median, "spread": value.spread, "samples": value.values} \
            if isinstance(value, Stat) else value
    Path(args.json).write_text(json.dumps(flat, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
