"""Addresses of the Go runtime's profile variables found from the code that uses them, for
binaries without a symbol table (``-ldflags=-s``, common in production).

Each variable is taken from the RIP-relative data references (``agent.runtimes.go.layout.
data_references``) of runtime functions found by name in the pclntab (present in stripped
binaries), as the intersection of two or more functions' references, so that a variable is
accepted only when exactly one address fits every rule (runtime/mprof.go, malloc.go):

    mbuckets        mProf_FlushLocked  and  memProfileInternal (MemProfile up to 1.22)  and  stkbucket
    bbuckets        blockProfileInternal (BlockProfile up to 1.22)  and  stkbucket
    xbuckets        mutexProfileInternal (MutexProfile up to 1.22)  and  stkbucket
    MemProfileRate  allocmcache  and  profilealloc; when initialised in the file (1.21+),
                    its value there must be the default 512 KiB
    mProfCycle      mProf_Flush, less the profile locks it shares with memProfileInternal
    ticks           ticksPerSecond (tickspersecond up to 1.21): the reference R such that
                    R + the release's offset of ticks.val is referenced too (optional)

The three list heads must also be distinct and in a pointer section (.data/.bss). Each rule
was checked against ``go tool nm`` of real builds for the releases in ``CHECKED_MINORS``
(tests/test_go_heap_code.py); other releases are not read from code (their inlining may
differ), and a binary where any rule finds no single answer is reported, never guessed.
The reader then checks every bucket's type against its list (agent.runtimes.go.heap), so an address
that is wrong all the same gives a counted read failure, not a wrong profile.
No Python library reads any of this; hand-written.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from elftools.elf.elffile import ELFFile

from agent.runtimes.go.layout import data_references
from agent.runtimes.go.pclntab import load_go_table

CHECKED_MINORS = frozenset({19, 21, 23, 25, 26, 27})
DEFAULT_MEMPROFILE_RATE = 512 * 1024
POINTER_SECTIONS = (".data", ".bss")
FUNCTIONS = ("runtime.stkbucket", "runtime.mProf_FlushLocked", "runtime.mProf_Flush",
             "runtime.memProfileInternal", "runtime.MemProfile", "runtime.blockProfileInternal",
             "runtime.BlockProfile", "runtime.mutexProfileInternal", "runtime.MutexProfile",
             "runtime.allocmcache", "runtime.profilealloc", "runtime.ticksPerSecond", "runtime.tickspersecond")


class NotFoundInCode(Exception):
    """A runtime variable has no single address that fits its rule."""


def find_from_code(elf: ELFFile, ticks_val: int | None) -> dict[str, int]:
    """Link-time addresses of mbuckets, bbuckets, xbuckets, MemProfileRate, mProfCycle (and
    ticks when ``ticks_val``, the offset of ticks.val, is known and the rule fits); raises
    NotFoundInCode naming the first variable that cannot be told apart."""
    table = load_go_table(elf)
    if table is None:
        raise NotFoundInCode("no pclntab")
    entries = table.function_entries(FUNCTIONS)

    def refs(*names: str) -> set[int]:
        """References of the first of ``names`` present (a newer name first)."""
        for name in names:
            if name in entries:
                return set(data_references(elf, table, entries[name]))
        raise NotFoundInCode(f"none of {', '.join(names)} in the pclntab")

    stkbucket = refs("runtime.stkbucket")
    mem_profile = refs("runtime.memProfileInternal", "runtime.MemProfile")
    found = {
        "runtime.mbuckets": _one("runtime.mbuckets", refs("runtime.mProf_FlushLocked") & mem_profile & stkbucket),
        "runtime.bbuckets": _one("runtime.bbuckets",
                                 refs("runtime.blockProfileInternal", "runtime.BlockProfile") & stkbucket),
        "runtime.xbuckets": _one("runtime.xbuckets",
                                 refs("runtime.mutexProfileInternal", "runtime.MutexProfile") & stkbucket),
        "runtime.MemProfileRate": _one("runtime.MemProfileRate",
                                       refs("runtime.allocmcache") & refs("runtime.profilealloc")),
        "runtime.mProfCycle": _one("runtime.mProfCycle", refs("runtime.mProf_Flush") - mem_profile),
    }
    heads = [found[n] for n in ("runtime.mbuckets", "runtime.bbuckets", "runtime.xbuckets")]
    if len(set(heads)) != 3 or not all(_section_of(elf, a) in POINTER_SECTIONS for a in heads):
        raise NotFoundInCode("bucket list heads are not three distinct pointer variables")
    rate = _file_word(elf, found["runtime.MemProfileRate"])
    if rate is not None and rate != DEFAULT_MEMPROFILE_RATE:
        raise NotFoundInCode(f"runtime.MemProfileRate candidate holds {rate} in the file, not 512 KiB")
    if ticks_val is not None:
        try:
            ticks = refs("runtime.ticksPerSecond", "runtime.tickspersecond")
            found["runtime.ticks"] = _one("runtime.ticks", {r for r in ticks if r + ticks_val in ticks})
        except NotFoundInCode:
            pass  # optional: mutex/block delays are then not converted (counted by the reader's user)
    return found


def _one(name: str, candidates: Iterable[int]) -> int:
    found = sorted(candidates)
    if len(found) != 1:
        raise NotFoundInCode(f"{name}: {len(found)} candidate addresses")
    return found[0]


def _section_of(elf: ELFFile, address: int) -> str | None:
    for section in elf.iter_sections():
        if section["sh_addr"] <= address < section["sh_addr"] + section["sh_size"] and section.name:
            return section.name
    return None


def _file_word(elf: ELFFile, address: int) -> int | None:
    """The 8-byte value at ``address`` in the file; None when it lies in a no-bits section."""
    for section in elf.iter_sections():
        if section["sh_addr"] <= address < section["sh_addr"] + section["sh_size"]:
            if section["sh_type"] == "SHT_NOBITS":
                return None
            return int(struct.unpack_from("<q", section.data(), address - section["sh_addr"])[0])
    return None

