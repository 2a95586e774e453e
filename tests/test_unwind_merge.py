"""Merging FDEs into one table does not depend on their order in the section.

Known answer, written out here: 200 FDEs with gaps between them, two rows each (a rule at
the start, another 4 bytes in), give begin, begin + 4 and end (a NONE row for the gap) in
address order. The FDEs come sorted, nearly sorted (two stretches: merged lazily) and
shuffled (far more stretches: sorted as a list), with two FDEs of the same range (the later
in the section wins).
"""

from __future__ import annotations

import random

from agent.unwind.cfi import NO_INFO, Fde, FdeRows, RowKind, Rule
from agent.unwind.table import MAX_MERGED_RUNS, merge_fdes

START = Rule(RowKind.CFA_RSP, 8, 0)


def _fde(begin: int, end: int, rows: list[tuple[int, Rule]]) -> Fde:
    out = FdeRows()
    for address, rule in rows:
        out.addresses.append(address)
        out.rules.append(rule)
    return begin, end, out


def _fdes() -> tuple[list[Fde], list[int], list[Rule]]:
    fdes, pcs, rules = [], [], []
    for i in range(200):
        begin = 0x1000 + 0x40 * i
        pushed = Rule(RowKind.CFA_RSP, 16 + 8 * (i % 3), -16)
        fdes.append(_fde(begin, begin + 0x30, [(begin, START), (begin + 4, pushed)]))
        pcs += [begin, begin + 4, begin + 0x30]
        rules += [START, pushed, NO_INFO]
    return fdes, pcs, rules


def test_sorted_nearly_sorted_and_shuffled_fdes_give_one_table() -> None:
    fdes, pcs, rules = _fdes()
    nearly = fdes[100:] + fdes[:100]
    shuffled = fdes[:]
    random.Random(3).shuffle(shuffled)
    for order in (fdes, nearly, shuffled):
        got_pcs, got_rules = merge_fdes(order)
        assert list(got_pcs) == pcs and got_rules == rules
    assert len(shuffled) > 2 * MAX_MERGED_RUNS


def test_of_two_fdes_with_one_range_the_later_wins() -> None:
    other = Rule(RowKind.CFA_RBP, 16, -16)
    first = _fde(0x2000, 0x2010, [(0x2000, START)])
    second = _fde(0x2000, 0x2010, [(0x2000, other)])
    for order, winner in (([first, second], other), ([second, first], START)):
        pcs, rules = merge_fdes(order)
        assert list(pcs) == [0x2000, 0x2010] and rules == [winner, NO_INFO]
