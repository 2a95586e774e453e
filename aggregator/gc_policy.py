"""How often CPython's cyclic garbage collector runs in the aggregator, and why less often.

The aggregator holds millions of long-lived objects (every stream's dictionary, the
interval's merged samples with their timestamp lists) and allocates a few hundred tuples
per samples message, nearly all freed by reference counting or kept for the interval.
With CPython's default thresholds (700, 10, 10) a young collection runs every 700 net
allocations and older generations are re-scanned often: measured with 1,000 simulated
hosts, 3 - 4 s of collector time per 10 s export interval, about a fifth of the
aggregator's CPU. With the thresholds below it was 0.7 s. Cycles are still collected;
garbage that is part of a cycle only lives a little longer (at most ~50,000 young objects).
"""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 20, 20)


def use_aggregator_thresholds() -> tuple[int, int, int]:
    """Apply :data:`THRESHOLDS` (process-wide) and return the previous ones."""
    previous = gc.get_threshold()
    gc.set_threshold(*THRESHOLDS)
    return previous[0], previous[1], previous[2]


def restore_thresholds(previous: tuple[int, int, int]) -> None:
    """Put back what :func:`use_aggregator_thresholds` replaced (an embedding process's own)."""
    gc.set_threshold(*previous)
