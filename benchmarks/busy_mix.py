"""The agent's cost on a busy host, and under an event storm.

    sudo .venv/bin/python -m benchmarks.run --mode busy  [--duration 20] [--repeats 2]
    sudo .venv/bin/python -m benchmarks.run --mode storm [--duration 20] [--storm-factor 2]

``busy``: the event mix (benchmarks/event_mix.py: two spinners, four threads waking every
millisecond, a pair handing a mutex back and forth) runs throughout; the agent is started
with ``cpu`` and then with ``cpu,wall,lock,goroutine`` (alternated, ``--repeats`` rounds),
and after all its actors attached and ``--warmup`` seconds it is measured for
``--duration`` seconds: % of one core (process tree user+sys, plus its BPF programs' run
time), RSS at the end, and the mix's achieved rates (host context switches, the
workload's own futex waits), which must reach 15,000 and 2,000 a second for the figures to
count as the busy mix of issue #20.

``storm``: one agent (``--types``, all four event types by default) sees the mix at its
rate and at ``--storm-factor`` times its rate (every period divided), plus the spinners
alone, alternated round by round, each on a fresh workload after ``--settle`` seconds. It
prints the cost at each, the achieved event rates, and the cost ratio between the two
rates (target: doubling the events must not double the cost); with the spinners-only cost
subtracted, also the ratio of the part that follows events (derived, labelled as such).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cost import WindowCost, acquaint, snapshot, window_cost
from benchmarks.event_mix import SPINNERS_ONLY, EventMix, MixRates, MixShape, mix_rates
from benchmarks.measure import host_processes_started, process_tree_rss_bytes
from benchmarks.memory_breakdown import KINDS, rss_breakdown
from benchmarks.run import free_port, require_running, start_agent, stop, wait_all_actors
from stackfleet.nats_server import NatsServer

MIN_CONTEXT_SWITCHES_PER_S = 15_000
MIN_FUTEX_WAITS_PER_S = 2_000
CPU_TARGET_PCT = {"cpu": 1.0, "cpu,wall,lock,goroutine": 2.0}
RSS_TARGET_MB = 150
# Compiles take minutes when the shared machine is loaded: wait that long for every actor.
ACTORS_START_TIMEOUT_S = 600
STORM_COST_RATIO_LIMIT = 2.0
# Below this growth of the events the cost ratio says nothing about how cost follows events.
STORM_MIN_EVENT_RATIO = 1.2


@dataclass(frozen=True)
class Window:
    """The agent's cost and the mix's achieved rates over one measured window."""

    cost: WindowCost
    rates: MixRates
    rss_mb: float
    # The agent process's resident memory by kind of mapping at the window's end, MB
    # (benchmarks/memory_breakdown.py).
    rss_parts_mb: dict[str, float] = field(default_factory=dict)
    # Processes and threads the host created during the window (/proc/stat): the agent reads
    # and symbolizes each new program it samples, so a window that held some (another job's,
    # a shell's) costs the agent more than the mix does.
    processes_started: int = 0


def measure_window(agent_pid: int, mix: EventMix, duration_s: float) -> Window:
    counts0, ctxt0 = mix.reading()
    started0 = host_processes_started()
    before = snapshot(agent_pid)
    time.sleep(duration_s)
    after = snapshot(agent_pid, labelled=True)
    started1 = host_processes_started()
    counts1, ctxt1 = mix.reading()
    parts = {kind: value / 2**20 for kind, value in rss_breakdown(agent_pid).items()}
    return Window(window_cost(before, after), mix_rates(counts0, counts1, ctxt0, ctxt1),
                  process_tree_rss_bytes(agent_pid) / 2**20, parts, started1 - started0)


def mix_is_busy(rates: MixRates) -> bool:
    """Whether a window had the event rates the busy mix promises."""
    return (rates.host_context_switches_per_s >= MIN_CONTEXT_SWITCHES_PER_S
            and rates.futex_waits_per_s >= MIN_FUTEX_WAITS_PER_S)


def agent_env(target_comm: str) -> dict[str, str]:
    return {"STACKFLEET_TARGET_COMM": target_comm} if target_comm else {}


def busy(exe: Path, type_sets: list[str], repeats: int, warmup_s: float, duration_s: float,
         target_comm: str = "") -> dict[str, list[Window]]:
    """Alternate the agent's type sets on the running busy mix."""
    windows: dict[str, list[Window]] = {types: [] for types in type_sets}
    with NatsServer() as nats, EventMix(exe, MixShape()) as mix:
        for _ in range(repeats):
            for types in type_sets:
                port = free_port()
                agent = start_agent(nats.url, types, agent_env(target_comm), port)
                try:
                    wait_all_actors(port, types, time.monotonic(), ACTORS_START_TIMEOUT_S)
                    acquaint(agent.pid)
                    time.sleep(warmup_s)
                    require_running(agent)
                    w = measure_window(agent.pid, mix, duration_s)
                    require_running(agent)
                finally:
                    stop(agent)
                windows[types].append(w)
                print(f"  {types}: {w.cost.total_pct:.2f} % of a core, {w.rss_mb:.0f} MB; "
                      f"{w.rates.host_context_switches_per_s:,.0f} switches/s, "
                      f"{w.rates.futex_waits_per_s:,.0f} futex waits/s, "
                      f"{w.processes_started} processes started", flush=True)
        mix.stop()
    return windows


def storm(exe: Path, types: str, factor: float, repeats: int, warmup_s: float, settle_s: float,
          duration_s: float, target_comm: str = "") -> dict[str, list[Window]]:
    """One agent; the spinners alone, the mix, and the mix ``factor`` times faster, alternated."""
    shapes = {"spinners only": SPINNERS_ONLY, "mix x1": MixShape(), f"mix x{factor:g}": MixShape().scaled(factor)}
    windows: dict[str, list[Window]] = {name: [] for name in shapes}
    with NatsServer() as nats:
        port = free_port()
        agent = start_agent(nats.url, types, agent_env(target_comm), port)
        try:
            wait_all_actors(port, types, time.monotonic(), ACTORS_START_TIMEOUT_S)
            acquaint(agent.pid)
            with EventMix(exe, MixShape()) as warm:
                time.sleep(warmup_s)
                warm.stop()
            for _ in range(repeats):
                for name, shape in shapes.items():
                    with EventMix(exe, shape) as mix:
                        time.sleep(settle_s)
                        require_running(agent)
                        w = measure_window(agent.pid, mix, duration_s)
                        require_running(agent)
                        mix.stop()
                    windows[name].append(w)
                    print(f"  {name}: {w.cost.total_pct:.2f} % of a core; "
                          f"{w.rates.host_context_switches_per_s:,.0f} switches/s, "
                          f"{w.rates.futex_waits_per_s:,.0f} futex waits/s, "
                          f"{w.processes_started} processes started", flush=True)
        finally:
            stop(agent)
    return windows


def median(values: list[float]) -> float:
    return statistics.median(values)


def window_fields(w: Window) -> dict[str, Any]:
    c, r = w.cost, w.rates
    return {"seconds": round(c.seconds, 2), "agent_pct_of_core": round(c.total_pct, 2),
            "process_pct": round(c.process_pct, 2), "bpf_pct": round(c.bpf_pct, 2), "rss_mb": round(w.rss_mb, 1),
            "rss_parts_mb": {k: round(v, 1) for k, v in w.rss_parts_mb.items()},
            "host_context_switches_per_s": round(r.host_context_switches_per_s),
            "futex_waits_per_s": round(r.futex_waits_per_s), "contended_per_s": round(r.contended_per_s),
            "wakeups_per_s": round(r.wakeups_per_s), "processes_started": w.processes_started,
            "programs": [{"id": p.prog_id, "program": p.label or p.type_name, "runs_per_s": round(p.runs / c.seconds),
                          "us_per_run": round(p.us_per_run, 2),
                          "pct_of_core": round(100 * p.run_time_ns / 1e9 / c.seconds, 2)}
                         for p in c.programs if p.runs]}


def print_programs(ws: list[Window]) -> None:
    """Each BPF program that ran: median runs/s, us per run and % of a core over ``ws``."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for w in ws:
        for p in w.cost.programs:
            if p.runs:
                rows.setdefault(p.label or p.type_name, []).append(
                    (p.runs / w.cost.seconds, p.us_per_run, 100 * p.run_time_ns / 1e9 / w.cost.seconds))
    for label, values in sorted(rows.items(), key=lambda kv: -median([v[2] for v in kv[1]])):
        print(f"    {label:52} {median([v[0] for v in values]):>9,.0f} runs/s {median([v[1] for v in values]):>7.2f} us"
              f" {median([v[2] for v in values]):>6.2f} %")


def busy_report(windows: dict[str, list[Window]]) -> dict[str, Any]:
    """Print the busy-mix table and return its JSON document."""
    print(f"\n{'types':26} {'% core':>7} {'process':>8} {'BPF':>6} {'RSS MB':>7} {'switches/s':>11} "
          f"{'futex waits/s':>14}  busy mix  target")
    out: dict[str, Any] = {}
    for types, ws in windows.items():
        total = median([w.cost.total_pct for w in ws])
        rss = median([w.rss_mb for w in ws])
        cpu_target = CPU_TARGET_PCT.get(types)
        met = "" if cpu_target is None else ("yes" if total < cpu_target and rss < RSS_TARGET_MB else "NO")
        busy_ok = all(mix_is_busy(w.rates) for w in ws)
        target = f"< {cpu_target:g} %, < {RSS_TARGET_MB} MB: {met}" if cpu_target is not None else ""
        print(f"{types:26} {total:>7.2f} {median([w.cost.process_pct for w in ws]):>8.2f} "
              f"{median([w.cost.bpf_pct for w in ws]):>6.2f} {rss:>7.0f} "
              f"{median([w.rates.host_context_switches_per_s for w in ws]):>11,.0f} "
              f"{median([w.rates.futex_waits_per_s for w in ws]):>14,.0f}  {'yes' if busy_ok else 'NO':8}  {target}")
        print_programs(ws)
        out[types] = {"agent_pct_of_core": round(total, 2), "rss_mb": round(rss, 1), "mix_busy_enough": busy_ok,
                      "target_pct": cpu_target, "met": met == "yes",
                      "rss_parts_mb": {k: round(v, 1) for k, v in rss_parts(ws).items()},
                      "windows": [window_fields(w) for w in ws]}
    print_rss_parts(windows)
    return out


def rss_parts(ws: list[Window]) -> dict[str, float]:
    """Median resident MB per kind of mapping over ``ws``."""
    return {kind: median([w.rss_parts_mb.get(kind, 0.0) for w in ws]) for kind in KINDS}


def print_rss_parts(windows: dict[str, list[Window]]) -> None:
    """The agent's resident memory by kind of mapping, one column per type set (medians)."""
    names = list(windows)
    parts = {types: rss_parts(ws) for types, ws in windows.items()}
    print("\nagent RSS by kind of mapping, MB (median; benchmarks/memory_breakdown.py)")
    print(f"{'':12}" + "".join(f"{types:>26}" for types in names))
    for kind in KINDS:
        print(f"{kind:12}" + "".join(f"{parts[types][kind]:>26.1f}" for types in names))
    print(f"{'total':12}" + "".join(f"{median([w.rss_mb for w in windows[t]]):>26.1f}" for t in names))


@dataclass(frozen=True)
class StormSummary:
    """Cost and event rates at the base rate and the faster one, from the median windows."""

    cost_ratio: float
    context_switch_ratio: float
    futex_wait_ratio: float
    event_part_ratio: float  # (fast - spinners only) / (base - spinners only): derived

    @property
    def event_ratio(self) -> float:
        """The smaller of the two event growths (the stricter basis for the verdict)."""
        return min(self.context_switch_ratio, self.futex_wait_ratio)

    @property
    def elasticity(self) -> float:
        """How cost follows events: ln(cost ratio) / ln(event ratio); 1 is proportional. The
        events rarely double exactly on a loaded machine; at this elasticity a doubling would
        multiply the cost by 2 ** elasticity."""
        return math.log(self.cost_ratio) / math.log(self.event_ratio)

    @property
    def met(self) -> bool | None:
        """Doubling the events does not double the cost; None when the events barely grew."""
        if self.event_ratio < STORM_MIN_EVENT_RATIO:
            return None
        return self.cost_ratio < STORM_COST_RATIO_LIMIT and self.elasticity < 1


def storm_summary(quiet: list[Window], base: list[Window], fast: list[Window]) -> StormSummary:
    def m(ws: list[Window], pick: Any) -> float:
        return median([pick(w) for w in ws])

    def cost(w: Window) -> float:
        return w.cost.total_pct

    def ctxt(w: Window) -> float:
        return w.rates.host_context_switches_per_s

    def futex(w: Window) -> float:
        return w.rates.futex_waits_per_s

    return StormSummary(cost_ratio=m(fast, cost) / m(base, cost),
                        context_switch_ratio=m(fast, ctxt) / m(base, ctxt),
                        futex_wait_ratio=m(fast, futex) / m(base, futex),
                        event_part_ratio=(m(fast, cost) - m(quiet, cost)) / (m(base, cost) - m(quiet, cost)))


def storm_report(windows: dict[str, list[Window]], types: str) -> dict[str, Any]:
    """Print the storm comparison and return its JSON document."""
    names = list(windows)
    quiet, base, fast = (windows[n] for n in names)
    print(f"\nagent {types}")
    print(f"{'workload':16} {'% core':>7} {'process':>8} {'BPF':>6} {'switches/s':>11} {'futex waits/s':>14}")
    for name, ws in windows.items():
        print(f"{name:16} {median([w.cost.total_pct for w in ws]):>7.2f} "
              f"{median([w.cost.process_pct for w in ws]):>8.2f} {median([w.cost.bpf_pct for w in ws]):>6.2f} "
              f"{median([w.rates.host_context_switches_per_s for w in ws]):>11,.0f} "
              f"{median([w.rates.futex_waits_per_s for w in ws]):>14,.0f}")
    for name, ws in windows.items():
        print(f"  BPF programs, {name}:")
        print_programs(ws)
    s = storm_summary(quiet, base, fast)
    print(f"events {names[2]} / {names[1]}: context switches x{s.context_switch_ratio:.2f}, "
          f"futex waits x{s.futex_wait_ratio:.2f}")
    verdict = {True: "yes", False: "NO", None: f"no verdict: events grew less than x{STORM_MIN_EVENT_RATIO:g}"}[s.met]
    print(f"agent cost {names[2]} / {names[1]}: x{s.cost_ratio:.2f}; elasticity to events {s.elasticity:.2f} "
          f"(at x2 events: x{2 ** s.elasticity:.2f}; target < x{STORM_COST_RATIO_LIMIT:g}: {verdict}); "
          f"the part above the spinners-only cost (derived): "
          f"x{s.event_part_ratio:.2f}")
    return {"types": types, "cost_ratio": round(s.cost_ratio, 2), "met": s.met,
            "elasticity": round(s.elasticity, 2), "cost_ratio_at_2x_events": round(2 ** s.elasticity, 2),
            "context_switch_ratio": round(s.context_switch_ratio, 2),
            "futex_wait_ratio": round(s.futex_wait_ratio, 2),
            "event_part_cost_ratio_derived": round(s.event_part_ratio, 2),
            "workloads": {name: [window_fields(w) for w in ws] for name, ws in windows.items()}}
