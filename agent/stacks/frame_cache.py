"""Symbolized stacks of the aggregating actors, cached by (pid, stack id) for one flush window.

BPF stores each distinct stack once in an LRU map and the aggregates of a window name them by
id; the actor symbolizes an id once and reuses the frames. Each drain first asks which of the
window's ids it must read from the map (``begin_window``: those not cached), reads them right
away, and then looks every entry's id up while building the window's samples. The cache is
emptied every ``ttl_s`` (reused pids, newly loaded symbols: ``expire_if_due``, at the start
of a window) and holds at most ``capacity`` stacks, least recently used out first.

An id found cached by ``begin_window`` stays cached until the window's samples are built: the
cache is not emptied in between, and the window's ids are touched so that evictions take
older ones first (unless one window names more than ``capacity`` stacks). Emptying it between
"cached, no need to read it" and the lookup would leave the window's entries without a stack
although the map still held it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

StackKey = tuple[int, int]  # pid, stack id
V = TypeVar("V")


class FrameCache(Generic[V]):
    """(pid, stack id) -> symbolized value; a bounded LRU emptied every ``ttl_s``."""

    def __init__(self, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._values: OrderedDict[StackKey, V] = OrderedDict()
        self._started = clock()

    def expire_if_due(self) -> bool:
        """Empty the cache if ``ttl_s`` has passed since it was last emptied; whether it was.
        Call it at the start of a window, never between ``begin_window`` and the lookups."""
        if self._clock() - self._started <= self.ttl_s:
            return False
        self._values.clear()
        self._started = self._clock()
        return True

    def begin_window(self, keys: Iterable[StackKey]) -> list[StackKey]:
        """The window's ``keys`` that are not cached, without repeats (to be read and put); the
        cached ones are moved to the recent end, so the window's own puts evict older ones."""
        missing: dict[StackKey, None] = {}
        for key in keys:
            if key in self._values:
                self._values.move_to_end(key)
            else:
                missing[key] = None
        return list(missing)

    def get(self, key: StackKey) -> V | None:
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key: StackKey, value: V) -> None:
        self._values[key] = value
        self._values.move_to_end(key)
        while len(self._values) > self.capacity:
            self._values.popitem(last=False)

    def __len__(self) -> int:
        return len(self._values)
