"""Attaching uprobes to Go runtime functions, with or without a symbol table.

bcc resolves a probe by symbol name from ``.symtab``; a stripped Go binary has none, but its
pclntab still names every function, so the entry address found there is used instead.
"""

from __future__ import annotations

from typing import Any

from agent.runtimes.go.buildinfo import GoRuntimeInfo


def attach_go_probe(bpf: Any, path: str, info: GoRuntimeInfo, sym: str, fn: str, pid: int) -> None:
    """Entry uprobe on a Go runtime function: by name, or by pclntab address when stripped."""
    if info.has_symbols:
        bpf.attach_uprobe(name=path, sym=sym, fn_name=fn, pid=pid)
        return
    addr = info.entry(sym)
    if addr is None:
        raise LookupError(f"{sym} not in the pclntab of {path}")
    bpf.attach_uprobe(name=path, addr=addr, fn_name=fn, pid=pid)
