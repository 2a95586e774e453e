"""The wall and lock BPF programs of two source trees, side by side on the busy mix.

    sudo .venv/bin/python -m benchmarks.event_programs --before DIR [--rounds 4] [--seconds 12]

DIR is another checkout of the project (``git archive COMMIT | tar -x -C DIR``). Each round
starts one process per tree (``--child``) that compiles bpf/wall.bpf.c and bpf/lock.bpf.c
with the defines their actors use with both types on (native unwinding off, every process
traced; in trees where the wall program takes the lock waits from its switch-outs, the wall
program and the lock maps: agent/actors/lock_maps.py), attaches them, drains their
aggregation maps once a second as the agent does, and reports each program's runs and run
time (``kernel.bpf_stats_enabled``) over the same window: both trees see exactly the same
events. Programs attached to one tracepoint run one after the other and
the first pays for the cold cache, so the attach order alternates round by round. The busy
mix (benchmarks/event_mix.py) runs throughout; the machine's load average is printed, since
everything else the host runs is in the events too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent.bpf.layouts import AggCounter
from benchmarks.cost import program_deltas, snapshot
from benchmarks.event_mix import EventMix, MixShape, build_event_mix, mix_rates
from benchmarks.measure import enable_bpf_stats

ROOT = Path(__file__).resolve().parents[1]
LOCK_MAPS = "lock maps (written by wall.bpf.c)"


def both_types() -> Any:
    """The agent's settings with the wall and lock profiles on."""
    from agent.settings import AgentSettings
    from shared.profile_types import ProfileType

    return AgentSettings(types=[ProfileType.WALL, ProfileType.LOCK])


def actor_defines(program: str) -> dict[str, int | str]:
    """The defines the program's actor compiles it with (native unwinding off)."""
    from agent.actors.lock import LockActor
    from agent.actors.wall import WallActor
    from shared.counters import Counters

    actors = {"wall.bpf.c": WallActor, "lock.bpf.c": LockActor}
    ctx = SimpleNamespace(settings=both_types(), counters=Counters(), symbolizer=None, python=None,
                          unwinding=None, processes=None)
    return actors[program](ctx).bpf_defines()  # type: ignore[arg-type]


def load_programs(extra_defines: list[str]) -> dict[str, Any]:
    """The wall and lock programs as their actors load them, by name: bcc modules, or the
    shared lock maps when the wall program writes the lock waits."""
    from bcc import PerfSWConfig, PerfType

    from agent.actors.lock_maps import LockMapsView, lock_waits_from_switches, shared_lock_maps
    from agent.bpf.loader import load_program

    settings = both_types()
    from_switches = lock_waits_from_switches(settings)
    loaded: dict[str, Any] = {}
    if from_switches:
        loaded[LOCK_MAPS] = LockMapsView(shared_lock_maps(settings))
    for program in ("wall.bpf.c",) if from_switches else ("wall.bpf.c", "lock.bpf.c"):
        defines = actor_defines(program)
        for item in extra_defines:
            name, _, value = item.partition("=")
            defines[name] = value or 1
        bpf = load_program(program, defines)  # tracepoint probes attach on load
        if program == "wall.bpf.c":
            bpf.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK,
                                  fn_name="on_cpu_sample", sample_freq=99)
        loaded[program] = bpf
    return loaded


def drain_forever(bpfs: list[Any], stop: threading.Event) -> None:
    """Flip each program's aggregation generation and empty the other map once a second, as
    the agent's drain does (bpf/stack_agg.h), so the maps never fill."""
    generation = 0
    while not stop.wait(1.0):
        generation ^= 1
        for bpf in bpfs:
            bpf["agg_generation"][0] = bpf["agg_generation"].Leaf(generation)
        time.sleep(0.01)
        for bpf in bpfs:
            bpf[f"agg{generation ^ 1}"].clear()


def child(extra_defines: list[str]) -> None:
    """Load and attach both programs, then answer ``go`` and ``stop`` lines on stdin with
    snapshots; print the window's per-program deltas as one JSON line."""
    loaded = load_programs(extra_defines)
    bpfs = list(loaded.values())
    stop = threading.Event()
    drainer = threading.Thread(target=drain_forever, args=(bpfs, stop), daemon=True)
    drainer.start()
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    before = snapshot(os.getpid(), labelled=True)
    counts_before = [counter_sums(bpf) for bpf in bpfs]
    assert sys.stdin.readline().strip() == "stop"
    after = snapshot(os.getpid(), labelled=True)
    counts_after = [counter_sums(bpf) for bpf in bpfs]
    stop.set()
    drainer.join()  # a daemon thread left inside a bcc call can hang the interpreter's exit
    deltas = program_deltas(before.programs, after.programs, {**before.labels, **after.labels})
    print(json.dumps({"seconds": after.monotonic_s - before.monotonic_s,
                      "programs": [{"label": d.label or d.type_name, "runs": d.runs, "ns": d.run_time_ns}
                                   for d in deltas if d.runs],
                      "counters": {program: [b - a for a, b in zip(c0, c1, strict=True)]
                                   for program, c0, c1 in zip(loaded, counts_before, counts_after, strict=True)}}),
          flush=True)


def counter_sums(bpf: Any) -> list[int]:
    """The program's per-CPU ``counters`` (bpf/counters.h), summed over CPUs."""
    table = bpf["counters"]
    return [sum(table[table.Key(slot)]) for slot in range(len(table))]


def start_child(tree: Path, extra_defines: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, "-m", "benchmarks.event_programs", "--child", *[f"-D{d}" for d in extra_defines]]
    proc = subprocess.Popen(argv, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"{tree}: the child did not attach ({line!r})")
    return proc


def one_round(trees: dict[str, tuple[Path, list[str]]], order: list[str], mix: EventMix,
              seconds: float) -> dict[str, Any]:
    procs = {name: start_child(*trees[name]) for name in order}
    try:
        time.sleep(2)
        for p in procs.values():
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        start = mix.reading()
        time.sleep(seconds)
        end = mix.reading()
        for p in procs.values():
            assert p.stdin is not None
            p.stdin.write("stop\n")
            p.stdin.flush()
        results = {}
        for name, p in procs.items():
            assert p.stdout is not None
            results[name] = json.loads(p.stdout.readline())
            p.wait(60)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(30)
    rates = mix_rates(start[0], end[0], start[1], end[1])
    return {"order": order, "switches_per_s": rates.host_context_switches_per_s,
            "futex_waits_per_s": rates.futex_waits_per_s, "load_average": os.getloadavg()[0], "trees": results}


def report(rounds: list[dict[str, Any]], names: list[str]) -> None:
    for r in rounds:
        print(f"round: first {r['order'][0]}, {r['switches_per_s']:,.0f} switches/s, "
              f"{r['futex_waits_per_s']:,.0f} futex waits/s, load {r['load_average']:.1f}")
        for name in names:
            res = r["trees"][name]
            for p in res["programs"]:
                us = p["ns"] / p["runs"] / 1e3
                pct = 100 * p["ns"] / 1e9 / res["seconds"]
                print(f"  {name:8} {p['label'][:56]:56} {p['runs'] / res['seconds']:>9,.0f} runs/s "
                      f"{us:6.3f} us {pct:6.3f} %")
            for program, counts in res["counters"].items():
                captured = counts[AggCounter.CAPTURED] / res["seconds"]
                stored = counts[AggCounter.STACKS_STORED] / res["seconds"]
                print(f"  {name:8} {program}: {captured:,.0f} captures/s, {stored:,.1f} new stacks/s")
    print("\nmean us/run over rounds (both attach orders):")
    labels = sorted({p["label"] for r in rounds for p in r["trees"][names[0]]["programs"]})
    for label in labels:
        cells = []
        for name in names:
            runs = [p for r in rounds for p in r["trees"][name]["programs"] if p["label"] == label]
            us = statistics.mean(p["ns"] / p["runs"] / 1e3 for p in runs) if runs else float("nan")
            cells.append(f"{name} {us:6.3f}")
        print(f"  {label[:56]:56} " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-D", dest="defines", action="append", default=[],
                        help="child: an extra define NAME[=VALUE]")
    parser.add_argument("--before", type=Path, help="the other tree (a checkout of the project)")
    parser.add_argument("--before-define", action="append", default=[], help="extra define for the before tree")
    parser.add_argument("--after-define", action="append", default=[], help="extra define for this tree")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        child(args.defines)
        return
    if not enable_bpf_stats():
        sys.exit("cannot enable kernel.bpf_stats_enabled (root needed)")
    before = args.before.resolve() if args.before else ROOT
    trees = {"before": (before, args.before_define), "after": (ROOT, args.after_define)}
    names = list(trees)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_event_mix(Path(tmp))
        with EventMix(exe, MixShape()) as mix:
            time.sleep(2)
            for i in range(args.rounds):
                order = names if i % 2 == 0 else names[::-1]
                rounds.append(one_round(trees, order, mix, args.seconds))
                print(f"round {i + 1} done, load {os.getloadavg()[0]:.1f}", flush=True)
            mix.stop()
    report(rounds, names)
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1))


if __name__ == "__main__":
    main()
