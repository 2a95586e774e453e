"""How often CPython's cyclic garbage collector runs in the aggregator, and why less often.

The aggregator holds millions of long-lived objects (every stream's dictionary, the
interval's merged samples with their timestamp lists) and allocates a few hundred tuples
per samples message, nearly all freed by reference counting or kept for the interval.
CPython's default thresholds (700, 10, 10) run a young collection every 700 net allocations
and re-scan the older generations often, which at fleet scale costs a large share of the
aggregator's CPU for no garbage found (figures: docs/design/fleet.md, "Aggregator tuning").
Cycles are still collected; garbage that is part of a cycle only lives a little longer (at
most ~50,000 young objects).
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
