"""KernelSymbols built row by row (merged stretches, no list of rows) equals a plain sort.

Known answer: the text symbols of a kallsyms file sorted by (address, name) as a list; the
table must hold the same addresses and names in the same order, for this machine's own
/proc/kallsyms (nearly sorted: merged) and for a shuffled copy (far from sorted: the list
fallback), ties at one address included.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agent.symbols.kallsyms import MAX_MERGED_RUNS, KernelSymbols


def _reference(text: bytes) -> list[tuple[int, bytes]]:
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in (b"t", b"T", b"w", b"W") and int(parts[0], 16):
            rows.append((int(parts[0], 16), parts[2] if len(parts) == 3 else parts[2] + b" " + parts[3]))
    return sorted(rows)


def _table(table: KernelSymbols) -> list[tuple[int, bytes]]:
    return [(table.addresses[i], table._names[i].encode()) for i in range(len(table))]


def _kallsyms() -> bytes:
    text = Path("/proc/kallsyms").read_bytes()
    if not _reference(text):
        pytest.skip("/proc/kallsyms shows no addresses here")
    return text


def test_this_machines_kallsyms_in_order(tmp_path: Path) -> None:
    text = _kallsyms()
    path = tmp_path / "kallsyms"
    path.write_bytes(text)
    assert _table(KernelSymbols(str(path))) == _reference(text)


def test_shuffled_kallsyms_with_ties_falls_back_to_one_sort(tmp_path: Path) -> None:
    lines = _kallsyms().splitlines()[:5000]
    lines += [b"ffffffff00000100 T tie_b", b"ffffffff00000100 T tie_a"]  # one address, two names
    random.Random(7).shuffle(lines)
    text = b"\n".join(lines) + b"\n"
    path = tmp_path / "kallsyms"
    path.write_bytes(text)
    table = KernelSymbols(str(path))
    assert _table(table) == _reference(text)
    assert table.lookup(0xFFFFFFFF00000100) == "tie_b"  # the last of a tie, as a sorted list gives
    assert len(_reference(text)) > 2 * MAX_MERGED_RUNS  # far more stretches than are merged
