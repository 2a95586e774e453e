"""The busy host mix for the event-driven profile types (benchmarks/workloads/event_mix.c).

Spinning threads keep the CPUs busy, waker threads sleep and wake on a fixed period, and
pairs of threads hand a mutex back and forth, so the host switches context tens of
thousands of times a second and parks threads on futexes thousands of times a second. The
workload counts its own events (wakeups, contended acquisitions, futex waits the kernel
really parked it for) and prints them on SIGUSR1; this module starts it, reads those
counts and turns two readings into rates.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.measure import host_context_switches

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "benchmarks" / "workloads" / "event_mix.c"


@dataclass(frozen=True)
class MixShape:
    """Threads and periods of the mix. The defaults are the busy mix of issue #20: two
    spinners, four threads waking every millisecond, one pair handing a mutex back and forth
    (each holding it 250 us), which gives this 2-core VM ~20,000 context switches and
    ~3,000 contended futex waits a second."""

    spinners: int = 2
    wakers: int = 4
    wake_us: int = 1000
    pairs: int = 1
    hold_us: int = 250

    def scaled(self, factor: float) -> MixShape:
        """The same threads with every period divided by ``factor``: ``factor`` times the
        wakeup and hand-off rate where the CPUs keep up."""
        return replace(self, wake_us=max(1, round(self.wake_us / factor)), hold_us=max(1, round(self.hold_us / factor)))

    def argv(self, exe: Path, seconds: float = 0) -> list[str]:
        """Command line; ``seconds`` 0 runs until stopped."""
        return [str(exe), str(seconds), str(self.spinners), str(self.wakers), str(self.wake_us),
                str(self.pairs), str(self.hold_us)]


SPINNERS_ONLY = MixShape(spinners=2, wakers=0, pairs=0)


@dataclass(frozen=True)
class MixCounts:
    """Cumulative counts printed by the workload (see event_mix.c for each one's meaning)."""

    elapsed_ns: int
    units: int
    wakeups: int
    acquisitions: int
    contended: int
    futex_waits: int


def parse_counts(line: str) -> MixCounts:
    """Parse a ``counts key=value ...`` line; a line missing a count or with another
    first word is an error, not a zero."""
    words = line.split()
    if not words or words[0] != "counts":
        raise ValueError(f"not a counts line: {line!r}")
    values = dict(w.split("=", 1) for w in words[1:])
    try:
        return MixCounts(**{name: int(values[name]) for name in MixCounts.__dataclass_fields__})
    except KeyError as missing:
        raise ValueError(f"counts line without {missing}: {line!r}") from None


@dataclass(frozen=True)
class MixRates:
    """Events per second between two readings: the workload's own counts over its own
    clock, and the host's context switches (/proc/stat ``ctxt``, every process counted)."""

    seconds: float
    units_per_s: float
    wakeups_per_s: float
    contended_per_s: float
    futex_waits_per_s: float
    host_context_switches_per_s: float


def mix_rates(before: MixCounts, after: MixCounts, ctxt_before: int, ctxt_after: int) -> MixRates:
    seconds = (after.elapsed_ns - before.elapsed_ns) / 1e9
    if seconds <= 0:
        raise ValueError("the second reading is not later than the first")
    return MixRates(seconds=seconds,
                    units_per_s=(after.units - before.units) / seconds,
                    wakeups_per_s=(after.wakeups - before.wakeups) / seconds,
                    contended_per_s=(after.contended - before.contended) / seconds,
                    futex_waits_per_s=(after.futex_waits - before.futex_waits) / seconds,
                    host_context_switches_per_s=(ctxt_after - ctxt_before) / seconds)


def build_event_mix(out_dir: Path) -> Path:
    out = out_dir / "event_mix"
    subprocess.run(["gcc", "-O2", "-g", "-fno-omit-frame-pointer", "-pthread", "-o", str(out), str(SOURCE)],
                   check=True)
    return out


class EventMix:
    """A running event_mix process whose counts can be read at any moment."""

    def __init__(self, exe: Path, shape: MixShape, seconds: float = 0) -> None:
        self.shape = shape
        self.proc = subprocess.Popen(shape.argv(exe, seconds), stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        # Until "ready" its SIGUSR1 handler may not be installed, and SIGUSR1 would end it.
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            self.proc.wait(30)
            raise RuntimeError(f"event_mix did not start: {shape.argv(exe, seconds)}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def counts(self) -> MixCounts:
        """Ask the workload for its counts (SIGUSR1) and read the line it prints."""
        self.proc.send_signal(signal.SIGUSR1)
        return self._read_line()

    def reading(self) -> tuple[MixCounts, int]:
        """The workload's counts and the host's context switches, read together."""
        return self.counts(), host_context_switches()

    def stop(self) -> MixCounts:
        """Stop the workload and return its final counts."""
        self.proc.send_signal(signal.SIGTERM)
        final = self._read_line()
        self.proc.wait(30)
        return final

    def _read_line(self) -> MixCounts:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"event_mix exited (code {self.proc.poll()}) without printing its counts")
        return parse_counts(line)

    def __enter__(self) -> EventMix:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
