"""Spreading a thread's uncaptured off-CPU time over its captured stacks (agent/actors/wall.py)."""

from __future__ import annotations

from agent.actors.aggregated import AggregatedEntry
from agent.actors.wall import ON_CPU_LABEL, SHORT_OFF_CPU_LABEL, UNCAPTURED_LABEL, spread_uncaptured

SLEEPING = 0x1


def entry(tid: int, stack_id: int, label: int, total_ns: int) -> AggregatedEntry:
    return AggregatedEntry(pid=10, tid=tid, stack_id=stack_id, label=label, count=1, total_ns=total_ns,
                           first_ts_mono_ns=0, last_ts_mono_ns=0, cpu=0)


def totals(entries: list[AggregatedEntry]) -> dict[tuple[int, int, int], int]:
    return {(e.tid, e.stack_id, e.label): e.total_ns for e in entries}


def test_uncaptured_time_goes_to_captured_stacks_in_proportion() -> None:
    entries = [entry(1, 7, SLEEPING, 3_000), entry(1, 8, SLEEPING, 1_000), entry(1, 0, UNCAPTURED_LABEL, 4_001),
               entry(1, 9, ON_CPU_LABEL, 500), entry(1, 0, SHORT_OFF_CPU_LABEL, 50)]
    out = totals(spread_uncaptured(entries))
    assert (1, 0, UNCAPTURED_LABEL) not in out
    assert out[(1, 7, SLEEPING)] == 3_000 + 3_000 and out[(1, 8, SLEEPING)] == 1_000 + 1_001
    assert out[(1, 9, ON_CPU_LABEL)] == 500 and out[(1, 0, SHORT_OFF_CPU_LABEL)] == 50  # not spread onto
    assert sum(out.values()) == sum(e.total_ns for e in entries)  # the thread's total stays exact


def test_threads_are_spread_separately_and_nothing_captured_keeps_its_entry() -> None:
    entries = [entry(1, 7, SLEEPING, 1_000), entry(1, 0, UNCAPTURED_LABEL, 1_000),
               entry(2, 7, ON_CPU_LABEL, 1_000), entry(2, 0, UNCAPTURED_LABEL, 2_000)]
    out = totals(spread_uncaptured(entries))
    assert out == {(1, 7, SLEEPING): 2_000, (2, 7, ON_CPU_LABEL): 1_000, (2, 0, UNCAPTURED_LABEL): 2_000}


def test_nothing_uncaptured_is_left_as_it_is() -> None:
    entries = [entry(1, 7, SLEEPING, 1_000), entry(1, 0, SHORT_OFF_CPU_LABEL, 10)]
    assert spread_uncaptured(entries) == entries
