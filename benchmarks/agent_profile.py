"""Where the agent's own CPU goes under the busy mix: a py-spy profile, summarised.

    sudo .venv/bin/python -m benchmarks.run --mode py-spy [--types cpu,wall,lock,goroutine] [--duration 20]

The busy mix (benchmarks/event_mix.py) runs; the agent starts, attaches all its actors and
warms up for ``--warmup`` seconds, then py-spy (the dev extra in pyproject.toml) samples it
for ``--duration`` seconds without stopping it (``--nonblocking``; idle threads are left out,
so the samples are the agent's Python threads on CPU). The collapsed stacks are reduced to
functions: "self" counts samples whose innermost frame is the function, "inclusive" counts
samples with the function anywhere in the stack (once per sample). BPF time is not here
(py-spy sees the process only): the busy mode's per-program figures have it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.event_mix import EventMix, MixShape
from benchmarks.run import free_port, start_agent, stop, wait_all_actors
from stackfleet.nats_server import NatsServer

# A frame in py-spy's raw (collapsed) output: "function (path/to/file.py:123)", the line optional.
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str:
    """The py-spy executable: beside this interpreter (the venv's dev extra), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy not found: it is in the dev extra (pip install -e '.[dev]'; scripts/setup.sh "
                         "installs it)")
    return found


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """Stacks (outermost frame first) and their sample counts from collapsed-stack text:
    one ``frame;frame;...;frame COUNT`` per line. Lines without a count are an error."""
    stacks = []
    for line in text.splitlines():
        if not line.strip():
            continue
        frames, sep, count = line.rpartition(" ")
        if not sep or not count.isdigit():
            raise ValueError(f"not a collapsed-stack line: {line!r}")
        stacks.append((frames.split(";"), int(count)))
    return stacks


def function_name(frame: str) -> str | None:
    """``function (file)`` for a Python frame, without its line; None for py-spy's own
    process and thread marker frames, which are not code."""
    if frame.startswith(("process ", "thread ")):
        return None
    m = _FRAME.match(frame)
    return f"{m['function']} ({m['file']})" if m else frame


@dataclass(frozen=True)
class FunctionSummary:
    total_samples: int
    self_samples: list[tuple[str, int]]
    inclusive_samples: list[tuple[str, int]]
    # For each function in self_samples: its callers when it was the innermost frame, most
    # samples first (a library function such as copy's says nothing without them).
    callers: dict[str, list[tuple[str, int]]]


def summarise(stacks: list[tuple[list[str], int]], top: int = 20) -> FunctionSummary:
    """The ``top`` functions by self and by inclusive samples (ties in name order)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    callers: dict[str, Counter[str]] = {}
    total = 0
    for frames, count in stacks:
        names = [n for n in (function_name(f) for f in frames) if n is not None]
        total += count
        if names:
            own[names[-1]] += count
            if len(names) > 1:
                callers.setdefault(names[-1], Counter())[names[-2]] += count
        for name in set(names):
            inclusive[name] += count

    def ranked(counts: Counter[str], n: int = top) -> list[tuple[str, int]]:
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]

    self_top = ranked(own)
    return FunctionSummary(total, self_top, ranked(inclusive),
                           {name: ranked(callers[name], 3) for name, _ in self_top if name in callers})


def profile_agent(exe: Path, types: str, warmup_s: float, duration_s: float, rate_hz: int = 100,
                  target_comm: str = "") -> FunctionSummary:
    """py-spy the agent on the busy mix and summarise its stacks."""
    env = {"STACKFLEET_TARGET_COMM": target_comm} if target_comm else {}
    with tempfile.TemporaryDirectory() as tmp, NatsServer() as nats, EventMix(exe, MixShape()) as mix:
        port = free_port()
        agent = start_agent(nats.url, types, env, port)
        try:
            wait_all_actors(port, types, time.monotonic())
            time.sleep(warmup_s)
            out = Path(tmp) / "agent.txt"
            subprocess.run([py_spy(), "record", "--pid", str(agent.pid), "--duration", str(round(duration_s)),
                            "--rate", str(rate_hz), "--format", "raw", "--nonblocking",
                            "--output", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            text = out.read_text()
        finally:
            stop(agent)
        mix.stop()
    return summarise(parse_collapsed(text))


def report(summary: FunctionSummary, types: str) -> dict[str, Any]:
    """Print both top lists and return the JSON document."""
    total = summary.total_samples or 1
    print(f"\npy-spy of the agent ({types}), {summary.total_samples} samples on CPU")
    for title, rows in (("self", summary.self_samples), ("inclusive", summary.inclusive_samples)):
        print(f"\n{title:>9}  function")
        for name, count in rows:
            print(f"{100 * count / total:>8.1f}%  {name}")
            if title == "self" and summary.callers.get(name):
                caller, n = summary.callers[name][0]
                print(f"{'':>11}called from {caller} ({100 * n / total:.1f}%)")
    return {"types": types, "samples": summary.total_samples,
            "self": [{"function": n, "pct": round(100 * c / total, 1),
                      "callers": [{"function": f, "pct": round(100 * k / total, 1)}
                                  for f, k in summary.callers.get(n, [])]} for n, c in summary.self_samples],
            "inclusive": [{"function": n, "pct": round(100 * c / total, 1)} for n, c in summary.inclusive_samples]}
