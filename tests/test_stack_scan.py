"""Stack-scan recovery: call-site validation on real instruction encodings."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from agent.stacks.scan import looks_like_call_site
from agent.symbols.elf import ElfSymbols


def test_call_encodings_are_recognised() -> None:
    pad = b"\x90" * 7
    assert looks_like_call_site(pad + b"\xe8\x10\x20\x30\x40")  # call rel32
    assert looks_like_call_site(pad + b"\xff\xd0")  # call rax
    assert looks_like_call_site(pad + b"\x41\xff\xd3")  # call r11 (REX.B)
    assert looks_like_call_site(pad + b"\xff\x50\x08")  # call [rax+8]
    assert looks_like_call_site(pad + b"\xff\x54\x24\x08")  # call [rsp+8] (SIB, disp8)
    assert looks_like_call_site(pad + b"\xff\x15\x00\x10\x00\x00")  # call [rip+0x1000]
    assert looks_like_call_site(pad + b"\xff\x94\x24\x00\x01\x00\x00")  # call [rsp+0x100] (SIB, disp32)


def test_non_calls_are_rejected() -> None:
    pad = b"\x90" * 7
    assert not looks_like_call_site(pad + b"\x90\x90\x90\x90\x90")
    assert not looks_like_call_site(pad + b"\xff\xe0")  # jmp rax (FF /4)
    assert not looks_like_call_site(pad + b"\xff\x25\x00\x10\x00\x00")  # jmp [rip+...]
    assert not looks_like_call_site(pad + b"\x48\x89\xc7")  # mov rdi, rax
    assert not looks_like_call_site(b"\xe8")  # too short to tell


def test_code_before_candidate_addresses_is_read_from_the_file_once() -> None:
    """Stack scans ask for the same return addresses sample after sample: one file read each."""
    from agent.symbols import Symbolizer

    sym = Symbolizer()
    proc = subprocess.Popen(["sleep", "10"])
    try:
        time.sleep(0.3)
        maps = Path(f"/proc/{proc.pid}/maps").read_text().splitlines()
        text = next(line for line in maps if " r-xp " in line and "sleep" in line)
        address = int(text.split("-")[0], 16) + 0x100
        first = sym.code_before(proc.pid, address, 7)
        assert first is not None and len(first) == 7
        reads = 0
        original = ElfSymbols.read

        def counting_read(self: ElfSymbols, offset: int, size: int) -> bytes:
            nonlocal reads
            reads += 1
            return original(self, offset, size)

        ElfSymbols.read = counting_read  # type: ignore[method-assign]
        try:
            assert sym.code_before(proc.pid, address, 7) == first
        finally:
            ElfSymbols.read = original  # type: ignore[method-assign]
        assert reads == 0
    finally:
        proc.kill()
        proc.wait()
