"""Keeping libraries the agent never uses out of its memory.

nats-py imports aiohttp (with its HTTP parser and multidict) whenever aiohttp is installed,
for NATS over WebSocket. aiohttp is installed for the aggregator's web page, and the agent
connects over TCP only (nats:// or tls://; AgentSettings refuses ws:// URLs), so in the agent
process that import is ~6 MB of resident memory for nothing (docs/design/overhead.md).
Marking the module as missing before nats-py is first imported makes nats-py take its own
"aiohttp not installed" path.
"""

from __future__ import annotations

import sys

UNUSED_BY_AGENT = ("aiohttp",)


def skip_unused_imports() -> bool:
    """Call before anything imports nats; False when it is too late (nats already imported)."""
    if "nats" in sys.modules:
        return False
    for name in UNUSED_BY_AGENT:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None marks "not installed"
    return True
