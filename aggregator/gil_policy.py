"""How often the aggregator's threads hand each other the GIL, and why more often than default.

Each export interval is encoded (OTLP, pprof) in a worker thread that holds the GIL for
seconds of pure-Python work at fleet scale. The event loop, which pulls and merges the next
messages, gets the GIL back only when the worker is forced to release it, every
``sys.getswitchinterval()`` (5 ms by default), and then gives it up again at its next network
wait. A shorter interval lets the loop take in messages several times faster while an export
is being encoded; with the default a replica has no headroom at 1,000 hosts (figures:
docs/design/fleet.md, "Aggregator tuning").
"""

from __future__ import annotations

import sys


def use_switch_interval(seconds: float) -> float:
    """Set the interpreter's switch interval (process-wide); returns the previous one."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    return previous
