"""Sharing out uncaptured off-CPU time over captured stacks (agent/actors/wall.py).

The last test runs the capture process of bpf/wall.bpf.c on a simulated thread whose sleeps
differ in how likely they are to be captured, and checks the estimate against the known
truth: the reason for inverse-probability weights and per-state strata.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Hashable

from agent.actors.aggregated import AggregatedEntry, fold_carried_on_cpu, prune_earlier, release_waiting
from agent.actors.wall import (
    ON_CPU_LABEL,
    ON_CPU_TIME_LABEL,
    SHORT_OFF_CPU_LABEL,
    UNCAPTURED_LABEL,
    spread_uncaptured,
)

SLEEPING, PREEMPTED = 0x1, 0x0


def entry(tid: int, stack_id: int, label: int, total_ns: int, weighted_ns: int | None = None) -> AggregatedEntry:
    return AggregatedEntry(pid=10, tid=tid, stack_id=stack_id, label=label, count=1, total_ns=total_ns,
                           first_ts_mono_ns=0, last_ts_mono_ns=0, cpu=0,
                           weighted_ns=total_ns if weighted_ns is None else weighted_ns)


def totals(entries: list[AggregatedEntry]) -> dict[tuple[int, int, int], int]:
    return {(e.tid, e.stack_id, e.label): e.total_ns for e in entries}


def test_uncaptured_time_goes_to_captured_stacks_by_their_weights() -> None:
    entries = [entry(1, 7, SLEEPING, 3_000, weighted_ns=3_000), entry(1, 8, SLEEPING, 1_000, weighted_ns=5_000),
               entry(1, 0, UNCAPTURED_LABEL | SLEEPING, 4_001), entry(1, 9, ON_CPU_LABEL, 500),
               entry(1, 0, SHORT_OFF_CPU_LABEL, 50)]
    out = totals(spread_uncaptured(entries))
    assert (1, 0, UNCAPTURED_LABEL | SLEEPING) not in out
    # 8,001 ns asleep in all, shared 3:5 by weight (not 3:1 by captured time).
    assert out[(1, 7, SLEEPING)] == 8_001 * 3 // 8 and out[(1, 8, SLEEPING)] == 8_001 - 8_001 * 3 // 8
    assert out[(1, 9, ON_CPU_LABEL)] == 500 and out[(1, 0, SHORT_OFF_CPU_LABEL)] == 50  # not spread onto
    assert sum(out.values()) == sum(e.total_ns for e in entries)  # the thread's total stays exact


def test_each_task_state_keeps_its_own_total() -> None:
    entries = [entry(1, 7, SLEEPING, 1_000), entry(1, 8, PREEMPTED, 9_000),
               entry(1, 0, UNCAPTURED_LABEL | SLEEPING, 2_000), entry(1, 0, UNCAPTURED_LABEL | PREEMPTED, 500)]
    out = totals(spread_uncaptured(entries))
    assert out == {(1, 7, SLEEPING): 3_000, (1, 8, PREEMPTED): 9_500}


def test_threads_are_spread_separately_and_nothing_captured_keeps_its_entry() -> None:
    entries = [entry(1, 7, SLEEPING, 1_000), entry(1, 0, UNCAPTURED_LABEL | SLEEPING, 1_000),
               entry(2, 7, ON_CPU_LABEL, 1_000), entry(2, 0, UNCAPTURED_LABEL | SLEEPING, 2_000),
               entry(3, 7, PREEMPTED, 1_000), entry(3, 0, UNCAPTURED_LABEL | SLEEPING, 3_000)]
    out = totals(spread_uncaptured(entries))
    assert out == {(1, 7, SLEEPING): 2_000, (2, 7, ON_CPU_LABEL): 1_000, (2, 0, UNCAPTURED_LABEL | SLEEPING): 2_000,
                   (3, 7, PREEMPTED): 1_000, (3, 0, UNCAPTURED_LABEL | SLEEPING): 3_000}


def test_nothing_uncaptured_is_left_as_it_is() -> None:
    entries = [entry(1, 7, SLEEPING, 1_000, weighted_ns=4_000), entry(1, 0, SHORT_OFF_CPU_LABEL, 10)]
    assert spread_uncaptured(entries) == entries


PERIOD = 10_101_010  # one 99 Hz sample's value


def samples(tid: int, stack_id: int, count: int) -> AggregatedEntry:
    """An on-CPU aggregate as BPF fills it: count samples of one period each, weight one."""
    return dataclasses.replace(entry(tid, stack_id, ON_CPU_LABEL, count * PERIOD), count=count)


def test_on_cpu_time_carried_by_intervals_joins_the_threads_own_sum() -> None:
    """BPF records the on-CPU span ending at a switch-out in the map update of the interval
    that switch-out closes; the drain sums what each thread's entries carried (spans, ns,
    first and last span's start, the CPU of the last) and adds it to the thread's own
    on-CPU sum of the window, or makes one: one ON_CPU_TIME entry a thread, the other
    entries as they were."""
    alone = dataclasses.replace(entry(1, 0, ON_CPU_TIME_LABEL, 1_000), first_ts_mono_ns=500, last_ts_mono_ns=900,
                                cpu=1)
    others = [entry(1, 0, SHORT_OFF_CPU_LABEL, 40), entry(1, 7, SLEEPING, 5_000),
              entry(2, 0, UNCAPTURED_LABEL | SLEEPING, 7_000), entry(2, 8, SLEEPING, 1_000)]
    carried = {(10, 1): [4, 8_500, 100, 950, 3], (10, 2): [2, 300, 20, 30, 2]}
    out = fold_carried_on_cpu([alone, *others], carried, ON_CPU_TIME_LABEL)
    own = {e.tid: e for e in out if e.label == ON_CPU_TIME_LABEL}
    assert len([e for e in out if e.label == ON_CPU_TIME_LABEL]) == 2
    one = own[1]
    assert (one.total_ns, one.count, one.first_ts_mono_ns, one.last_ts_mono_ns, one.cpu) == (9_500, 5, 100, 950, 3)
    made = own[2]  # thread 2 had no on-CPU sum of its own in the window
    assert (made.pid, made.stack_id, made.total_ns, made.count, made.first_ts_mono_ns, made.last_ts_mono_ns,
            made.cpu, made.weighted_ns) == (10, 0, 300, 2, 20, 30, 2, 0)
    assert [e for e in out if e.label != ON_CPU_TIME_LABEL] == others


def test_measured_on_cpu_time_replaces_sample_counts() -> None:
    """A thread sampled 30 times (303 ms by count x period) that ran 250 ms by sched_switch:
    its samples share the 250 ms by their counts, nothing else of the thread changes."""
    entries = [samples(1, 7, 20), samples(1, 8, 10), entry(1, 0, ON_CPU_TIME_LABEL, 250_000_001),
               entry(1, 9, SLEEPING, 700_000_000), entry(1, 0, SHORT_OFF_CPU_LABEL, 50)]
    out = totals(spread_uncaptured(entries))
    assert out == {(1, 7, ON_CPU_LABEL): 250_000_001 * 2 // 3, (1, 8, ON_CPU_LABEL): 250_000_001 - 250_000_001 * 2 // 3,
                   (1, 9, SLEEPING): 700_000_000, (1, 0, SHORT_OFF_CPU_LABEL): 50}


def test_on_cpu_time_without_samples_uses_the_threads_earlier_samples_or_stays_labelled() -> None:
    earlier: dict[Hashable, list[AggregatedEntry]] = {}
    first = [samples(1, 7, 3), samples(1, 8, 1), entry(1, 0, ON_CPU_TIME_LABEL, 40_000_000)]
    assert sum(e.total_ns for e in spread_uncaptured(first, earlier)) == 40_000_000
    # A window in which thread 1 ran 8 ms between samples, and thread 2 ran 2 ms never sampled.
    second = [entry(1, 0, ON_CPU_TIME_LABEL, 8_000_000), entry(2, 0, ON_CPU_TIME_LABEL, 2_000_000)]
    out = totals(spread_uncaptured(second, earlier))
    assert out == {(1, 7, ON_CPU_LABEL): 6_000_000, (1, 8, ON_CPU_LABEL): 2_000_000,
                   (2, 0, ON_CPU_TIME_LABEL): 2_000_000}



def at(e: AggregatedEntry, ts_ns: int) -> AggregatedEntry:
    return dataclasses.replace(e, first_ts_mono_ns=ts_ns, last_ts_mono_ns=ts_ns)


def test_each_strata_stand_in_stacks_age_on_their_own() -> None:
    """Thread 1's sleeps were captured 2 s ago, thread 2's 61 s ago: the minute-old stand-in is
    dropped, the recent one kept (whatever the stack cache's TTL did meanwhile); over capacity
    the oldest go first."""
    second = 1_000_000_000
    earlier: dict[Hashable, list[AggregatedEntry]] = {}
    spread_uncaptured([at(entry(2, 8, SLEEPING, 1_000), 39 * second), at(entry(1, 7, SLEEPING, 1_000), 98 * second),
                       at(entry(3, 9, SLEEPING, 1_000), 99 * second)], earlier)
    prune_earlier(earlier, 100 * second, 60 * second, capacity=10)
    assert sorted(key[1] for key in earlier) == [1, 3]  # type: ignore[index]
    prune_earlier(earlier, 100 * second, 60 * second, capacity=1)
    assert [key[1] for key in earlier] == [3]  # type: ignore[index]
    later = [at(entry(3, 0, UNCAPTURED_LABEL | SLEEPING, 5_000), 101 * second)]
    assert totals(spread_uncaptured(later, earlier)) == {(3, 9, SLEEPING): 5_000}


def test_a_threads_first_windows_wait_for_its_first_captures() -> None:
    """Thread 1's first two windows have sleeps but no capture of them (a tight budget): they
    wait, and the third window's captures take them, stamped with their own times; thread 2's
    sums wait too and, with nothing captured of it within the wait, come back without a stack."""
    second = 1_000_000_000
    earlier: dict[Hashable, list[AggregatedEntry]] = {}
    waiting: dict[Hashable, list[AggregatedEntry]] = {}
    first = [at(entry(1, 0, UNCAPTURED_LABEL | SLEEPING, 400_000_000), 10 * second),
             at(entry(2, 0, UNCAPTURED_LABEL | SLEEPING, 5_000), 10 * second),
             at(entry(1, 9, ON_CPU_LABEL, 7), 10 * second)]
    assert totals(spread_uncaptured(first, earlier, waiting)) == {(1, 9, ON_CPU_LABEL): 7}
    nothing = [at(entry(1, 0, UNCAPTURED_LABEL | SLEEPING, 300_000_000), 11 * second)]
    assert spread_uncaptured(nothing, earlier, waiting) == []
    third = [at(entry(1, 7, SLEEPING, 10_000_000, weighted_ns=30_000_000), 12 * second),
             at(entry(1, 8, SLEEPING, 10_000_000, weighted_ns=10_000_000), 12 * second),
             at(entry(1, 0, UNCAPTURED_LABEL | SLEEPING, 380_000_000), 12 * second)]
    out = spread_uncaptured(third, earlier, waiting)
    assert sum(e.total_ns for e in out) == 400_000_000 + 300_000_000 + 400_000_000  # every window's, exactly
    assert {e.first_ts_mono_ns for e in out} == {10 * second, 11 * second, 12 * second}
    for ts, total in ((10 * second, 400_000_000), (11 * second, 300_000_000), (12 * second, 400_000_000)):
        shares_then = {e.stack_id: e.total_ns for e in out if e.first_ts_mono_ns == ts}
        assert shares_then == {7: total * 3 // 4, 8: total - total * 3 // 4}  # 3:1 by weight
    assert list(waiting) == [(10, 2, SLEEPING)]
    assert release_waiting(waiting, 12 * second, 2 * second) == []
    released = release_waiting(waiting, 12 * second + 1, 2 * second)
    assert totals(released) == {(2, 0, UNCAPTURED_LABEL | SLEEPING): 5_000} and not waiting
    waiting[(10, 3, SLEEPING)] = [at(entry(3, 0, UNCAPTURED_LABEL | SLEEPING, 9), 12 * second)]
    assert len(release_waiting(waiting, 12 * second, 2 * second, everything=True)) == 1 and not waiting

def test_samples_of_a_thread_without_measured_time_keep_their_values() -> None:
    """Switched in before the program attached: no on-CPU time measured, count x period stands."""
    entries = [samples(1, 7, 4), entry(2, 7, ON_CPU_TIME_LABEL, 5_000_000), samples(2, 7, 1)]
    assert totals(spread_uncaptured(entries)) == {(1, 7, ON_CPU_LABEL): 4 * PERIOD, (2, 7, ON_CPU_LABEL): 5_000_000}


def test_preemptions_without_a_capture_go_on_the_threads_on_cpu_samples() -> None:
    """Thread 1 had no preemption captured in the window (its CPU's budget was spent): its
    preempted time goes where it ran, by its samples; thread 2's captured preemption is kept,
    and thread 3, never sampled, keeps its preemptions stackless."""
    entries = [samples(1, 7, 3), samples(1, 8, 1), entry(1, 0, ON_CPU_TIME_LABEL, 40_000_000),
               entry(1, 0, UNCAPTURED_LABEL | PREEMPTED, 8_000_000), entry(1, 9, SLEEPING, 60_000_000),
               samples(2, 7, 1), entry(2, 10, PREEMPTED, 1_000_000),
               entry(2, 0, UNCAPTURED_LABEL | PREEMPTED, 3_000_000),
               entry(3, 0, UNCAPTURED_LABEL | PREEMPTED, 5_000_000)]
    out = totals(spread_uncaptured(entries))
    assert out == {(1, 7, ON_CPU_LABEL): 30_000_000, (1, 8, ON_CPU_LABEL): 10_000_000,
                   (1, 7, PREEMPTED): 6_000_000, (1, 8, PREEMPTED): 2_000_000, (1, 9, SLEEPING): 60_000_000,
                   (2, 7, ON_CPU_LABEL): PERIOD, (2, 10, PREEMPTED): 4_000_000,
                   (3, 0, UNCAPTURED_LABEL | PREEMPTED): 5_000_000}


# ---- the capture process of bpf/wall.bpf.c, simulated ---------------------------------------

RATE_HZ = 99
FAST_NAP, SLOW_NAP, BURST = 11, 12, 13  # stack ids: a 2 ms sleep in a burst, a 40 ms sleep after it


def simulate(seconds: float, seed: int) -> tuple[list[list[AggregatedEntry]], dict[int, int]]:
    """One thread: 10 cycles of (1 ms work, 2 ms FAST_NAP), then 20 ms of work and a 40 ms
    SLOW_NAP, for ``seconds``; every nap is captured with bpf/wall.bpf.c's probability
    min(1, t x RATE_HZ), t since the last capture. Returns the aggregates of 1 s windows as
    BPF would fill them, and the true sleep time per stack."""
    rng = random.Random(seed)
    windows: list[dict[int, list[int]]] = []  # per window: stack/label -> [ns, weighted ns]
    truth = {FAST_NAP: 0, SLOW_NAP: 0}
    now, last_capture = 0, -(10**12)

    def nap(stack: int, ns: int) -> None:
        nonlocal now, last_capture
        p = min(1.0, (now - last_capture) / 1e9 * RATE_HZ)
        window = windows[-1] if windows and now < len(windows) * 10**9 else None
        if window is None:
            windows.append({})
            window = windows[-1]
        truth[stack] += ns
        if rng.random() < p:
            last_capture = now
            sums = window.setdefault(stack, [0, 0])
            sums[0] += ns
            sums[1] += int(ns / p)
        else:
            window.setdefault(0, [0, 0])[0] += ns
        now += ns

    while now < seconds * 1e9:
        for _ in range(10):
            now += 1_000_000
            nap(FAST_NAP, 2_000_000)
        now += 20_000_000
        nap(SLOW_NAP, 40_000_000)
    drains = []
    for window in windows:
        drains.append([entry(1, stack, UNCAPTURED_LABEL | SLEEPING if stack == 0 else SLEEPING, ns, weighted)
                       for stack, (ns, weighted) in window.items()])
    return drains, truth


def test_naps_less_likely_to_be_captured_get_their_share_back() -> None:
    drains, truth = simulate(seconds=60, seed=7)
    true_fast = truth[FAST_NAP] / (truth[FAST_NAP] + truth[SLOW_NAP])

    def fast_share(drains: list[list[AggregatedEntry]]) -> float:
        spread = [e for drain in drains for e in spread_uncaptured(drain)]
        assert sum(e.total_ns for e in spread) == sum(truth.values())  # every nap accounted for
        return sum(e.total_ns for e in spread if e.stack_id == FAST_NAP) / sum(truth.values())

    assert abs(fast_share(drains) - true_fast) < 0.02, (fast_share(drains), true_fast)
    # The same data spread by captured time alone (every capture taken as equally likely)
    # under-reports the naps that follow a capture closely: what the weights are for.
    unweighted = [[entry(e.tid, e.stack_id, e.label, e.total_ns) for e in drain] for drain in drains]
    assert fast_share(unweighted) < true_fast - 0.05, (fast_share(unweighted), true_fast)
