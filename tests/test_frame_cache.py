"""The aggregating actors' cache of symbolized stacks (agent/stacks/frame_cache.py)."""

from __future__ import annotations

from agent.stacks.frame_cache import FrameCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_id_found_cached_stays_cached_for_its_window_when_the_ttl_passes_meanwhile() -> None:
    """The window's ids are settled by begin_window; the TTL passing before the lookups (a slow
    conversion, a long agent start) must not take a stack that was not read from the map."""
    clock = Clock()
    cache: FrameCache[str] = FrameCache(capacity=8, ttl_s=60, clock=clock)
    cache.put((1, 7), "frames of 7")
    assert cache.begin_window([(1, 7), (1, 8), (1, 8)]) == [(1, 8)]
    clock.now = 61.0
    assert cache.get((1, 7)) == "frames of 7"
    # The next window starts by expiring, so every id is read again.
    assert cache.expire_if_due() and cache.begin_window([(1, 7)]) == [(1, 7)]
    assert not cache.expire_if_due()


def test_evictions_take_stacks_the_window_does_not_name() -> None:
    cache: FrameCache[str] = FrameCache(capacity=3, ttl_s=60, clock=Clock())
    for stack in (1, 2, 3):
        cache.put((1, stack), str(stack))
    assert cache.begin_window([(1, 1), (1, 4)]) == [(1, 4)]
    cache.put((1, 4), "4")
    assert cache.get((1, 1)) == "1" and cache.get((1, 2)) is None and len(cache) == 3
