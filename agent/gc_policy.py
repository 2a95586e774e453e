"""How often the agent's Python runs its cyclic garbage collector.

CPython collects its youngest generation after 700 net allocations of container objects
(lists, tuples, dicts, dataclass instances), every tenth of those the middle one, and the
whole heap when the survivors grew by a quarter. The agent allocates containers in bursts
(a flush of thousands of samples, a new stack's frames) and keeps large caches (symbolized
frames, stacks, line tables), so at the default a CPU profile at 999 Hz ran ~1 young and
~0.1 middle collections a second plus a whole-heap one about every minute (~28 ms over
~77,000 tracked objects): 0.4 - 0.9 ms of CPU a second, ~0.2 - 0.45 us a sample
(docs/design/overhead.md, "The garbage collector's thresholds").

Nearly everything the agent allocates is freed by reference counting before a collection
sees it; a young generation of ``YOUNG_GENERATION_THRESHOLD`` lets those die first, so the
collections that remain find the same cycles ~14 times less often at 999 Hz and are fewer
still at lower rates. The older generations' ratios stay as CPython sets them. Cyclic
garbage waits longer to be freed: at most the young generation's worth of containers
(~1 MB), far inside the agent's memory budget.
"""

from __future__ import annotations

import gc

YOUNG_GENERATION_THRESHOLD = 10_000


def apply_gc_policy() -> tuple[int, ...]:
    """Raise the young generation's threshold (the others unchanged); returns the old ones."""
    before = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *before[1:])
    return before
