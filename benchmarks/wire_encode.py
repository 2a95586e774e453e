"""Per-sample cost of the agent's wire encoder (shared/wire.py StreamEncoder), before and after.

    .venv/bin/python -m benchmarks.wire_encode [--rounds 5] [--hz 999] [--cpus 2]

Samples come from benchmarks/host_simulator.py (a few hundred Zipf-popular stacks of 15-30
frames, the frames tuple of a stack reused sample after sample as the actors' stack cache
hands it over), batched per second as the agent flushes. Two encoders take the same
batches in turns:

- ``per-sample loop``: :class:`PerSampleEncoder` below, the encoder's former hot loop (a
  Python loop building every column sample by sample, stacks looked up by value, which
  hashes every frame);
- ``columns``: the current :meth:`StreamEncoder.encode` (columns built with C-level
  iteration, stacks looked up by tuple identity first).

Both must produce byte-identical messages (checked on every batch: the wire format is
unchanged). Printed: µs per sample, median over the rounds, the first batch (which fills
the dictionary) left out. The machine is shared: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.host_simulator import SimulatedHost
from shared.model import Sample
from shared.profile_types import ProfileType
from shared.wire import ATTRIBUTE_SETS_VERSION, MAX_ATTRS, StreamEncoder, pack


class PerSampleEncoder(StreamEncoder):
    """The reference: the same messages, built one sample at a time."""

    def encode(self, samples: Sequence[Sample], period: int) -> tuple[bytes | None, bytes | None]:
        if any(len(t.rows) > self.max_entries for t in self._tables()):
            self._reset_tables()
        ts, cpu, pid, tid, thread, process, stack = [], [], [], [], [], [], []
        values: list[list[int]] = []
        attr_sets: dict[tuple[int, ...], int] = {}
        attr: list[int] = []
        any_attrs = False
        t0 = min((s.timestamp_ns for s in samples), default=0)
        for s in samples:
            ts.append(s.timestamp_ns - t0)
            cpu.append(s.cpu)
            pid.append(s.pid)
            tid.append(s.tid)
            thread.append(self._string(s.thread_name))
            process.append(self._string(s.process_name))
            stack.append(self._stack(s.frames))
            values.append(list(s.values))
            flat: list[int] = []
            for k, v in list(s.attributes.items())[:MAX_ATTRS]:
                any_attrs = True
                flat.append(self._string(k))
                flat.append(self._string(v))
            attr.append(attr_sets.setdefault(tuple(flat), len(attr_sets)))
        dict_msg = self._dict_message()
        if not samples:
            return dict_msg, None
        body: dict[str, Any] = {**self._header("samples"), "seq": next(self._seq), "t0": t0, "period": period,
                                "ts": ts, "cpu": cpu, "pid": pid, "tid": tid, "thread": thread,
                                "process": process, "stack": stack, "values": values}
        if any_attrs:
            body.update(v=ATTRIBUTE_SETS_VERSION, attr_sets=list(map(list, attr_sets)), attr=attr)
        return dict_msg, pack(body)


def measure(rounds: int, hz: int, cpus: int) -> dict[str, float]:
    host = SimulatedHost(1)
    period = 1_000_000_000 // hz
    batches = [host.batch(1_700_000_000_000_000_000 + i * 1_000_000_000, 1.0, hz, cpus) for i in range(rounds + 1)]
    encoders: dict[str, StreamEncoder] = {
        "per-sample loop": PerSampleEncoder("bench", ProfileType.CPU, "agent"),
        "columns": StreamEncoder("bench", ProfileType.CPU, "agent"),
    }
    costs: dict[str, list[float]] = {name: [] for name in encoders}
    for i, batch in enumerate(batches):
        outputs = []
        for name, encoder in encoders.items():
            started = time.thread_time()
            outputs.append(encoder.encode(batch, period))
            if i:  # the first batch fills the dictionary
                costs[name].append((time.thread_time() - started) / len(batch) * 1e6)
        if outputs[0] != outputs[1]:
            raise RuntimeError(f"batch {i}: the two encoders' messages differ")
    return {name: statistics.median(c) for name, c in costs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="one-second batches measured")
    parser.add_argument("--hz", type=int, default=999)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    result = measure(args.rounds, args.hz, args.cpus)
    before, after = result["per-sample loop"], result["columns"]
    print(f"µs per sample ({args.hz} Hz x {args.cpus} CPUs per batch; identical messages): "
          f"per-sample loop {before:.2f}, columns {after:.2f} (x{before / after:.1f})")
    print(f"load average {os.getloadavg()[0]:.1f} (the machine is shared: compare columns of this run)")


if __name__ == "__main__":
    main()
