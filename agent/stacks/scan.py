"""Recovering the frames that frame-pointer unwinding skips in code without frame pointers.

When the leaf of a user stack is in a library built without frame pointers (Debian's libc),
``rbp`` still holds the frame pointer of the last function that *has* one, so BPF's
frame-pointer walk goes from the leaf IP straight to that function's caller: the frames in
between — the libc functions and, worse, the application function that called into libc —
are lost. The BPF programs also copy the first bytes of the user stack above SP; the return
addresses of the skipped frames are in that copy, below the slot holding the first
frame-pointer return address.

This module scans that region, keeping only words that (1) point into an executable file
mapping and (2) follow a call instruction in that file — a return address can only be the
address right after a ``call``. Stale stack data rarely passes both. Full DWARF CFI
unwinding (issue "Full stacks without frame pointers") supersedes this; until then it is a
bounded, validated heuristic, and every recovered frame is counted.
"""

from __future__ import annotations

from array import array

from agent.symbols import Symbolizer
from shared.counters import Counters

_MAX_RECOVERED = 8


def looks_like_call_site(code: bytes) -> bool:
    """True if ``code`` (the 7 bytes before an address) ends with an x86-64 call instruction."""
    if len(code) < 7:
        return False
    if code[-5] == 0xE8:  # call rel32
        return True
    for length in (2, 3, 4, 6, 7):  # call r/m64: FF /2 with the ModRM forms of each length
        if code[-length] != 0xFF:
            continue
        modrm = code[-length + 1]
        mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
        if reg != 2:
            continue
        size = 2 + (1 if rm == 4 and mod != 3 else 0) + {0: 4 if rm == 5 else 0, 1: 1, 2: 4, 3: 0}[mod]
        if size == length:
            return True
    return False


def recover_skipped_frames(pid: int, user: list[int], user_sp: int, stack_copy: bytes,
                           symbolizer: Symbolizer, counters: Counters) -> list[int]:
    """``user`` with validated return addresses inserted between the leaf and the FP chain."""
    if not user or len(stack_copy) < 16:
        return user
    if symbolizer.has_frame_pointer_prologue(pid, user[0]):
        return user  # the leaf keeps a frame pointer: frame-pointer walking skipped nothing
    words = array("Q")
    words.frombytes(stack_copy[: len(stack_copy) - len(stack_copy) % 8])
    if len(user) == 1:
        # Frame-pointer walking found nothing past the leaf. Everything above SP belongs to
        # live caller frames (stale data lies *below* SP), so the whole copy may be scanned.
        end = len(words)
    else:
        try:
            end = words.index(user[1])  # the slot frame-pointer walking read its first return address from
        except ValueError:
            return user  # the first FP frame is beyond the copy: nothing we can place with confidence
    recovered = []
    for word in words[:end]:
        if word == user[0] or word < 4096:
            continue
        code = symbolizer.code_before(pid, word, 7)
        if code is not None and looks_like_call_site(code):
            recovered.append(word)
            if len(recovered) >= _MAX_RECOVERED:
                break
    if recovered:
        counters.inc("frames_recovered_by_scan", len(recovered))
    # Lower stack addresses are deeper (closer to the leaf): keep the copy's order.
    return [user[0], *recovered, *user[1:]]
