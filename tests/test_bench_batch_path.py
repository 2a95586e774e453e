"""The batch-path benchmark's ring holds one flush in one piece (benchmarks/cpu_batch_path.py)."""

from __future__ import annotations

from benchmarks.cpu_batch_path import MIN_RING_BYTES, ring_bytes_for


def test_the_ring_is_a_power_of_two_that_holds_the_flush() -> None:
    assert ring_bytes_for(100) == MIN_RING_BYTES == 1 << 20
    assert ring_bytes_for(1 << 20) == 1 << 20
    # One flush at 999 Hz on two CPUs: 20,000 records of 64 bytes with their headers.
    assert ring_bytes_for(20_000 * 64) == 2 << 20
    assert ring_bytes_for((4 << 20) + 1) == 8 << 20
