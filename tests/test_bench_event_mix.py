"""The busy-mix workload (benchmarks/workloads/event_mix.c) counts what it promises.

Each run is short (0.3 - 0.5 s) and every check is a bound the workload's own clock and
periods give, never a speed: a waker sleeping P can wake at most elapsed / P times; two
threads each holding one mutex for at least H cannot acquire it more than elapsed / H + 2
times between them; threads that were not started count nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks.event_mix import EventMix, MixCounts, MixShape, build_event_mix, mix_rates, parse_counts

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_event_mix(tmp_path_factory.mktemp("event_mix"))


def run(exe: Path, shape: MixShape, seconds: float) -> MixCounts:
    out = subprocess.run(shape.argv(exe, seconds), capture_output=True, text=True, check=True, timeout=60).stdout
    lines = out.splitlines()
    assert lines[0] == "ready" and len(lines) == 2
    return parse_counts(lines[1])


def test_spinners_alone_count_only_units(exe: Path) -> None:
    c = run(exe, MixShape(spinners=2, wakers=0, pairs=0), 0.3)
    assert c.units > 0
    assert (c.wakeups, c.acquisitions, c.contended, c.futex_waits) == (0, 0, 0, 0)
    assert c.elapsed_ns >= 300_000_000


def test_waker_wakes_at_most_once_per_period(exe: Path) -> None:
    c = run(exe, MixShape(spinners=0, wakers=2, wake_us=20_000, pairs=0), 0.5)
    assert 0 < c.wakeups <= 2 * c.elapsed_ns // 20_000_000
    assert (c.units, c.acquisitions, c.futex_waits) == (0, 0, 0)


def test_mutex_pair_hands_off_with_parked_waits(exe: Path) -> None:
    hold_us = 2_000
    c = run(exe, MixShape(spinners=0, wakers=0, pairs=1, hold_us=hold_us), 0.5)
    # The mutex is held at least hold_us per acquisition, one holder at a time.
    assert c.acquisitions <= c.elapsed_ns // (hold_us * 1000) + 2
    assert 0 < c.contended <= c.acquisitions
    # The other thread comes back after hold/2 while the mutex is still held: it parks.
    assert c.futex_waits > 0
    assert (c.units, c.wakeups) == (0, 0)


def test_counts_on_signal_then_final(exe: Path) -> None:
    with EventMix(exe, MixShape(spinners=1, wakers=1, wake_us=5_000, pairs=1, hold_us=1_000)) as mix:
        first = mix.counts()
        second = mix.counts()
        final = mix.stop()
    assert mix.proc.returncode == 0
    for earlier, later in ((first, second), (second, final)):
        assert later.elapsed_ns > earlier.elapsed_ns
        assert later.units >= earlier.units and later.wakeups >= earlier.wakeups
        assert later.acquisitions >= earlier.acquisitions and later.futex_waits >= earlier.futex_waits
    rates = mix_rates(first, final, 1_000, 1_000 + 3 * (final.elapsed_ns - first.elapsed_ns) // 10**9)
    assert rates.seconds == (final.elapsed_ns - first.elapsed_ns) / 1e9
    assert rates.wakeups_per_s == (final.wakeups - first.wakeups) / rates.seconds


def test_bad_arguments_are_refused(exe: Path) -> None:
    r = subprocess.run([str(exe), "1", "1", "1", "0", "0", "0"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "WAKE_US" in r.stderr


def test_counts_line_parsing() -> None:
    line = "counts elapsed_ns=2000000000 units=5 wakeups=4000 acquisitions=7000 contended=6900 futex_waits=6950\n"
    c = parse_counts(line)
    assert c == MixCounts(2_000_000_000, 5, 4000, 7000, 6900, 6950)
    later = MixCounts(4_000_000_000, 5, 8000, 14000, 13900, 12950)
    r = mix_rates(c, later, 10_000, 60_000)
    assert (r.seconds, r.wakeups_per_s, r.contended_per_s, r.futex_waits_per_s, r.host_context_switches_per_s) == \
        (2.0, 2000.0, 3500.0, 3000.0, 25_000.0)
    with pytest.raises(ValueError, match="futex_waits"):
        parse_counts("counts elapsed_ns=1 units=1 wakeups=1 acquisitions=1 contended=1")
    with pytest.raises(ValueError):
        parse_counts("units 5")
    with pytest.raises(ValueError):
        mix_rates(later, c, 0, 0)


def test_scaled_shape_divides_periods() -> None:
    s = MixShape().scaled(2)
    assert (s.spinners, s.wakers, s.pairs, s.wake_us, s.hold_us) == (2, 4, 1, 500, 125)
