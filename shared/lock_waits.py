"""What kind of wait a lock-profile sample is, and which kinds are lock contention.

The agent labels every lock sample with ``lock.wait.kind`` (agent/actors/lock_waits.py decides it);
the aggregator's default lock views (the web page's lock view, pprof lock files) keep the
contention kinds only, mutex and rwlock: a thread parked on a condition variable, in
pthread_join or on a semaphore waits for an event, not for a lock another thread holds. The
other kinds stay in the data (OTLP exports, the web page's ``label`` filter).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

LOCK_WAIT_KIND = "lock.wait.kind"


class LockWaitKind(StrEnum):
    """Values of ``lock.wait.kind``; ``other`` is every wait that could not be told apart."""

    MUTEX = "mutex"
    RWLOCK = "rwlock"
    CONDITION = "condition"
    JOIN = "join"
    SEMAPHORE = "semaphore"
    OTHER = "other"


CONTENTION_KINDS = frozenset({LockWaitKind.MUTEX.value, LockWaitKind.RWLOCK.value})


def is_contention(attributes: Iterable[tuple[str, str]]) -> bool:
    """Whether a lock sample belongs in the default (contention) view.

    A sample without the label (from an agent that did not classify waits) is kept: nothing
    says it is not contention."""
    for key, value in attributes:
        if key == LOCK_WAIT_KIND:
            return value in CONTENTION_KINDS
    return True
