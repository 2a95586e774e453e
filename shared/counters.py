"""Named event counters: every drop, error and retry is counted somewhere a person can see.

Deliberately tiny: a dict of ints with optional label tuples, cheap on hot paths, read
by the metrics endpoints (shared/metrics_server.py) and logged periodically.
"""

from __future__ import annotations

import threading
from collections import defaultdict


class Counters:
    """Thread-safe monotonically increasing counters keyed by (name, labels)."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], int] = defaultdict(int)
        self._lock = threading.Lock()

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] += amount

    def get(self, name: str, **labels: str) -> int:
        """Value of one series, or the sum over all label sets when no labels are given."""
        with self._lock:
            if labels:
                return self._values.get((name, tuple(sorted(labels.items()))), 0)
            return sum(v for (n, _), v in self._values.items() if n == name)

    def snapshot(self) -> dict[str, int]:
        """Flat view ``name{k=v,...} -> value`` for logs and tests."""
        with self._lock:
            items = list(self._values.items())
        out = {}
        for (name, labels), value in items:
            suffix = ",".join(f"{k}={v}" for k, v in labels)
            out[f"{name}{{{suffix}}}" if suffix else name] = value
        return out

    def series(self) -> list[tuple[str, tuple[tuple[str, str], ...], int]]:
        """Every series as (name, sorted labels, value), sorted; for the metrics endpoint."""
        with self._lock:
            return sorted((name, labels, value) for (name, labels), value in self._values.items())
