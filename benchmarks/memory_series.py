"""The agent's resident memory over time on the busy mix: is it flat?

    sudo .venv/bin/python -m benchmarks.memory_series [--types cpu,wall,lock,goroutine]
                                                      [--every 30] [--duration 300] [--out series.json]

Starts the busy mix (benchmarks/event_mix.py) and one agent; once every actor has attached,
prints every ``--every`` seconds: the agent's RSS and its anonymous part, what the caches
have charged to the memory budget (``cache_budget_bytes``, agent/memory_budget.py), the
evictions so far, the agent's % of a core over the interval (process + BPF) and the load
average. On a shared machine the agent also profiles every other process, which is the
process churn the budget is there for: the load average says how much there was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.cost import snapshot, window_cost
from benchmarks.event_mix import EventMix, MixShape, build_event_mix
from benchmarks.measure import process_tree_rss_bytes
from benchmarks.memory_breakdown import rss_breakdown
from benchmarks.run import free_port, start_agent, stop, wait_all_actors
from stackfleet.nats_server import NatsServer

_SAMPLE = re.compile(r'^stackfleet_agent_(cache_budget_bytes|cache_evictions_total)\{cache="(\w+)"\} (\S+)$')


def budget_metrics(port: int) -> dict[str, dict[str, float]]:
    """{"cache_budget_bytes": {cache: bytes}, "cache_evictions_total": {cache: n}} from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {"cache_budget_bytes": {}, "cache_evictions_total": {}}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)][m.group(2)] = float(m.group(3))
    return out


def series(types: str, every_s: float, duration_s: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, NatsServer() as nats:
        exe = build_event_mix(Path(tmp))
        with EventMix(exe, MixShape()) as mix:
            port = free_port()
            agent = start_agent(nats.url, types, None, port)
            try:
                wait_all_actors(port, types, time.monotonic(), 600)
                started = time.monotonic()
                before = snapshot(agent.pid)
                while True:
                    time.sleep(every_s)
                    after = snapshot(agent.pid)
                    metrics = budget_metrics(port)
                    charged = metrics["cache_budget_bytes"]
                    t_s = round(time.monotonic() - started)
                    row = {
                        "t_s": t_s,
                        "rss_mb": round(process_tree_rss_bytes(agent.pid) / 2**20, 1),
                        "anonymous_mb": round(rss_breakdown(agent.pid).get("anonymous", 0) / 2**20, 1),
                        "budget_charged_mb": round(sum(v for k, v in charged.items() if k != "total") / 2**20, 2),
                        "budget_mb": round(charged.get("total", 0) / 2**20, 1),
                        "charged_mb": {k: round(v / 2**20, 2) for k, v in charged.items() if k != "total"},
                        "evictions": {k: int(v) for k, v in metrics["cache_evictions_total"].items()},
                        "agent_pct_of_core": round(window_cost(before, after).total_pct, 2),
                        "load_average_1m": os.getloadavg()[0],
                    }
                    before = after
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if t_s >= duration_s:
                        break
            finally:
                stop(agent)
            mix.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="cpu,wall,lock,goroutine")
    parser.add_argument("--every", type=float, default=30)
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = series(args.types, args.every, args.duration)
    if args.out:
        args.out.write_text(json.dumps({"types": args.types, "series": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
