"""Native unwinding from DWARF call-frame information, for code without frame pointers.

``cfi`` parses ``.eh_frame``/``.debug_frame`` into rules, ``table`` merges them into one
compact sorted table per file, ``cache`` keeps tables per file identity, ``loader`` feeds
them to the BPF unwinder in bpf/unwind.h, ``sharing`` gives every profile type that captures
user stacks the same maps and worker, and ``reference`` is the same walk in Python for tests
and debugging. Design and measurements: docs/design/native-unwinding.md.
"""

from agent.unwind.loader import BccUnwindMaps, NativeUnwinder
from agent.unwind.sharing import ActorUnwinding, SharedUnwinding, chain_stages

__all__ = ["ActorUnwinding", "BccUnwindMaps", "NativeUnwinder", "SharedUnwinding", "chain_stages"]
